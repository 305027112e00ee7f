"""The policy library: pure torch, importable without vLLM.

Each policy is a small frozen dataclass in its own module; ``select`` and the window scorer are
shared; the registry maps names to factories (and loads third-party entry points lazily).
"""

from .base import (
    KVPolicy,
    LayerObservation,
    Scorer,
    SelectionKernels,
    middle_range,
    protected_mask,
    select,
)
from .chunkkv import ChunkKV, chunk_means, chunk_select, stable_descending
from .pyramidkv import PyramidKV, pyramid_schedule
from .registry import (
    ENTRY_POINT_GROUP,
    NO_POLICY,
    PolicyInfo,
    build_policy,
    get_policy_info,
    policy_names,
    register_policy,
)
from .snapkv import SnapKV
from .streamingllm import StreamingLLM
from .window_scoring import pool_scores, window_attention_scores

__all__ = [
    "ENTRY_POINT_GROUP",
    "NO_POLICY",
    "ChunkKV",
    "KVPolicy",
    "LayerObservation",
    "PolicyInfo",
    "PyramidKV",
    "Scorer",
    "SelectionKernels",
    "SnapKV",
    "StreamingLLM",
    "build_policy",
    "chunk_means",
    "chunk_select",
    "get_policy_info",
    "middle_range",
    "policy_names",
    "pool_scores",
    "protected_mask",
    "pyramid_schedule",
    "register_policy",
    "select",
    "stable_descending",
    "window_attention_scores",
]
