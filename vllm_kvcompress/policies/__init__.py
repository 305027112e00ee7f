"""The policy library: pure torch, importable without vLLM.

A policy is a scorer (``[num_kv_heads, L]`` scores, declaring the inputs it reads) inside a
selector (``TopK``, ``ChunkKV``, ``PyramidKV``: shared or per-head selection). Each scorer and
selector is a small frozen dataclass in its own module; parameters are declared once as
``Param``s; the registry maps names to factories (and loads third-party entry points lazily).
"""

from .base import (
    INPUTS,
    KEYS,
    MODEL_DATA,
    QUERIES,
    VALUES,
    WINDOW_ATTENTION,
    KVPolicy,
    LayerObservation,
    Scorer,
    SelectionKernels,
    middle_range,
    needs_queries,
    protected_mask,
    select,
    select_per_mode,
)
from .chunkkv import ChunkKV, chunk_means, chunk_select, stable_descending
from .model_data import ModelDataHook, ModelShape, load_model_data
from .params import COMMON_PARAMS, HEAD_SELECT_MODES, Param
from .pyramidkv import PyramidKV, pyramid_schedule
from .registry import (
    ENTRY_POINT_GROUP,
    NO_POLICY,
    PolicyInfo,
    all_params,
    build_policy,
    get_policy_info,
    model_data_hook,
    policy_names,
    register_policy,
    resolved_head_select,
)
from .snapkv import SnapKV
from .streamingllm import StreamingLLM
from .topk import TopK
from .window_scoring import pool_scores, window_attention_scores

__all__ = [
    "COMMON_PARAMS",
    "ENTRY_POINT_GROUP",
    "HEAD_SELECT_MODES",
    "INPUTS",
    "KEYS",
    "MODEL_DATA",
    "NO_POLICY",
    "QUERIES",
    "VALUES",
    "WINDOW_ATTENTION",
    "ChunkKV",
    "KVPolicy",
    "LayerObservation",
    "ModelDataHook",
    "ModelShape",
    "Param",
    "PolicyInfo",
    "PyramidKV",
    "Scorer",
    "SelectionKernels",
    "SnapKV",
    "StreamingLLM",
    "TopK",
    "all_params",
    "build_policy",
    "chunk_means",
    "chunk_select",
    "get_policy_info",
    "load_model_data",
    "middle_range",
    "model_data_hook",
    "needs_queries",
    "policy_names",
    "pool_scores",
    "protected_mask",
    "pyramid_schedule",
    "register_policy",
    "resolved_head_select",
    "select",
    "select_per_mode",
    "stable_descending",
    "window_attention_scores",
]
