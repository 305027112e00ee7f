"""Policy registry: name -> factory, plus the ``vllm_kvcompress.policies`` entry-point group.

Built-in policies are registered when this module is imported (cheap: no vLLM, no kernels).
Third-party packages add policies with an entry point::

    [project.entry-points."vllm_kvcompress.policies"]
    mypolicy = "my_pkg.policy:register"    # a callable that calls register_policy(...)

Entry points are loaded lazily, once, the first time a name is looked up or listed.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from .base import KVPolicy
from .chunkkv import CHUNK_GRID, CHUNK_SIZE, REUSE_LAYERS, ChunkKV
from .expected_attention import FUTURE_POSITIONS, ExpectedAttention
from .keydiff import KeyDiff
from .knorm import KeyNorm
from .kvzip import KVZIP_CHUNK_SIZE, KVzip
from .merge import MergeEvicted
from .model_data import ModelDataHook
from .params import COMMON_PARAMS, HEAD_SELECT_MODES, Param
from .pyramidkv import BETA, PyramidKV
from .qfilters import QFILTERS_DATA, QFILTERS_PATH, QFilters
from .sagekv import SAGE_QUERIES, SageKV
from .snapkv import POOL_KERNEL, SnapKV
from .streamingllm import StreamingLLM
from .topk import TopK
from .tova import TOVA

if TYPE_CHECKING:
    from ..config import CompressionSpec

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "vllm_kvcompress.policies"
NO_POLICY = "none"


@dataclass(frozen=True)
class PolicyInfo:
    """A registered policy.

    Attributes:
        name: the name users pass as ``policy`` / ``--kv-policy`` / ``kv_policy``.
        build: makes the policy object from a validated spec (``spec.head_select`` is already
            resolved to this policy's default when the user did not set it).
        paper: link to the paper.
        summary: one line on what it keeps.
        parameters: the policy's own settings, declared once (flags, YAML keys, ``kv_*`` keys,
            validation and the listing are generated from them). The common settings
            (``COMMON_PARAMS``: ratio, budget, window, ...) apply to every policy.
        default_head_select: ``shared`` or ``per_head`` when the request does not say.
        model_data: per-model data the policy loads from one of its path parameters.
        scorer_param: name of a parameter whose value is another policy whose scorer this one
            wraps (ChunkKV's ``chunk_scorer``); that policy's model data then applies too.
    """

    name: str
    build: Callable[[CompressionSpec], KVPolicy]
    paper: str
    summary: str
    parameters: tuple[Param, ...] = ()
    default_head_select: str = "shared"
    model_data: ModelDataHook | None = None
    scorer_param: str | None = None


#: Policies that are a token scorer inside ``TopK``: ChunkKV can wrap any of them.
TOKEN_SCORER_POLICIES = ("snapkv", "streamingllm", "tova", "sagekv", "knorm", "keydiff",
                         "expected_attention", "qfilters")
CHUNK_SCORER = Param("chunk_scorer", str, "snapkv", "ChunkKV: the token scorer whose scores are "
                     "averaged per chunk (a TopK policy's name).", choices=TOKEN_SCORER_POLICIES)

_REGISTRY: dict[str, PolicyInfo] = {}
_entry_points_loaded = False


def register_policy(info: PolicyInfo, *, replace: bool = False) -> None:
    """Adds a policy; registering the same object twice is a no-op.

    Raises:
        ValueError: the name is taken by a different policy and ``replace`` is False, the
            name is reserved, or a parameter clashes with a differently declared one.
    """
    if info.name == NO_POLICY:
        raise ValueError(f"policy name {NO_POLICY!r} is reserved for 'no compression'")
    if info.default_head_select not in HEAD_SELECT_MODES:
        raise ValueError(f"policy {info.name!r}: default_head_select must be one of "
                         f"{', '.join(HEAD_SELECT_MODES)}")
    existing = _REGISTRY.get(info.name)
    if existing is not None and existing != info and not replace:
        raise ValueError(f"policy {info.name!r} is already registered")
    known = {p.name: p for p in COMMON_PARAMS}
    for other in _REGISTRY.values():
        if other.name != info.name:
            known.update({p.name: p for p in other.parameters})
    for param in info.parameters:
        if param.name in known and known[param.name] != param:
            raise ValueError(f"policy {info.name!r}: parameter {param.name!r} is already "
                             "declared differently (by the common settings or another policy)")
    if info.model_data is not None and info.model_data.param not in {
            p.name for p in info.parameters}:
        raise ValueError(f"policy {info.name!r}: model_data.param {info.model_data.param!r} is "
                         "not one of its parameters")
    _REGISTRY[info.name] = info
    build_policy.cache_clear()


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()()
        except Exception:  # A broken third-party policy must not take the server down.
            logger.exception("vllm-kvcompress: failed to load policy entry point %s", ep.value)


def policy_names() -> list[str]:
    """All valid ``policy`` values, ``none`` first."""
    _load_entry_points()
    return [NO_POLICY, *sorted(_REGISTRY)]


def get_policy_info(name: str) -> PolicyInfo:
    """Looks a policy up by name.

    Raises:
        KeyError: unknown name (the message lists the valid ones).
    """
    _load_entry_points()
    if name not in _REGISTRY:
        raise KeyError(f"unknown policy {name!r}; allowed: {', '.join(policy_names())}")
    return _REGISTRY[name]


def all_params() -> dict[str, Param]:
    """Every setting, common first, then each policy's own in name order (one per name)."""
    _load_entry_points()
    params = {p.name: p for p in COMMON_PARAMS}
    for name in sorted(_REGISTRY):
        for param in _REGISTRY[name].parameters:
            params.setdefault(param.name, param)
    return params


def resolved_head_select(spec: CompressionSpec) -> str:
    """The request's selection mode: its own setting, else the policy's default."""
    if spec.head_select is not None or spec.policy == NO_POLICY:
        return spec.head_select or "shared"
    return get_policy_info(spec.policy).default_head_select


def model_data_hook(spec: CompressionSpec) -> ModelDataHook | None:
    """The per-model data a spec's policy reads: its own, or that of the policy whose scorer it
    wraps (``chunk_scorer: qfilters``)."""
    if spec.policy == NO_POLICY:
        return None
    info = get_policy_info(spec.policy)
    if info.model_data is None and info.scorer_param is not None:
        inner = getattr(spec, info.scorer_param)
        if inner is not None and inner != spec.policy:
            return get_policy_info(inner).model_data
    return info.model_data


def scorer_of(spec: CompressionSpec, policy: str) -> object:
    """The scorer of ``policy`` built from ``spec``'s settings (for wrappers like ChunkKV)."""
    inner = build_policy(spec.replace(policy=policy, merge="off"))
    scorer = getattr(inner, "scorer", None)
    if scorer is None:
        raise ValueError(f"policy {policy!r} has no token scorer to wrap")
    return scorer


@functools.lru_cache(maxsize=256)
def build_policy(spec: CompressionSpec) -> KVPolicy | None:
    """The policy object for a resolved spec, or ``None`` for ``policy: none``.

    Cached per spec (specs are immutable and hashable; policies are stateless): the scheduler
    and the workers ask for it on every compressing step.
    """
    if spec.policy == NO_POLICY:
        return None
    info = get_policy_info(spec.policy)
    policy = info.build(spec.replace(head_select=resolved_head_select(spec)))
    # merge is a wrapper around whatever the policy selects (built-in or entry point).
    return MergeEvicted(policy) if spec.merge == "on" else policy


for _info in (
    PolicyInfo(
        name="streamingllm",
        build=lambda spec: TopK(StreamingLLM(), head_select=spec.head_select),
        paper="https://arxiv.org/abs/2309.17453",
        summary="attention sinks + most recent tokens; no scoring",
    ),
    PolicyInfo(
        name="snapkv",
        build=lambda spec: TopK(SnapKV(pool_kernel=spec.pool_kernel),
                                head_select=spec.head_select),
        paper="https://arxiv.org/abs/2404.14469",
        summary="top tokens by observation-window attention, average-pooled",
        parameters=(POOL_KERNEL,),
    ),
    PolicyInfo(
        name="chunkkv",
        build=lambda spec: ChunkKV(scorer=scorer_of(spec, spec.chunk_scorer),
                                   chunk_size=spec.chunk_size, reuse_layers=spec.reuse_layers,
                                   head_select=spec.head_select, chunk_grid=spec.chunk_grid),
        paper="https://arxiv.org/abs/2502.00299",
        summary="top whole chunks by mean score (window attention by default, any token scorer "
                "with chunk_scorer); layer-wise index reuse",
        parameters=(POOL_KERNEL, CHUNK_SIZE, REUSE_LAYERS, CHUNK_GRID, CHUNK_SCORER),
        scorer_param=CHUNK_SCORER.name,
    ),
    PolicyInfo(
        name="pyramidkv",
        build=lambda spec: PyramidKV(scorer=SnapKV(pool_kernel=spec.pool_kernel),
                                     beta=spec.beta, head_select=spec.head_select),
        paper="https://arxiv.org/abs/2406.02069",
        summary="SnapKV selection with budgets decreasing from lower to upper layers",
        parameters=(POOL_KERNEL, BETA),
    ),
    PolicyInfo(
        name="tova",
        build=lambda spec: TopK(TOVA(), head_select=spec.head_select),
        paper="https://arxiv.org/abs/2401.06104",
        summary="top tokens by the last prompt token's attention (all heads: one token set)",
    ),
    PolicyInfo(
        name="sagekv",
        build=lambda spec: TopK(SageKV(sage_queries=spec.sage_queries),
                                head_select=spec.head_select),
        paper="https://arxiv.org/abs/2503.08879",
        summary="per-head top tokens by the final prompt tokens' attention, sinks + window kept",
        parameters=(SAGE_QUERIES,),
        default_head_select="per_head",
    ),
    PolicyInfo(
        name="knorm",
        build=lambda spec: TopK(KeyNorm(), head_select=spec.head_select),
        paper="https://arxiv.org/abs/2406.11430",
        summary="keys with the smallest L2 norm; reads keys only",
        default_head_select="per_head",
    ),
    PolicyInfo(
        name="keydiff",
        build=lambda spec: TopK(KeyDiff(), head_select=spec.head_select),
        paper="https://arxiv.org/abs/2504.15364",
        summary="keys least similar (cosine) to the mean key; reads keys only",
        default_head_select="per_head",
    ),
    PolicyInfo(
        name="expected_attention",
        build=lambda spec: TopK(ExpectedAttention(future_positions=spec.future_positions),
                                head_select=spec.head_select),
        paper="https://arxiv.org/abs/2510.00636",
        summary="expected attention of future queries (window statistics, RoPE-averaged) "
                "times value norm",
        parameters=(FUTURE_POSITIONS,),
        # shared since 2026-12-07: on Qwen2.5-0.5B per_head scored -0.14 [-0.29, -0.01] below
        # it at 0.125 kept (-0.07 at 0.25; turn 2 -0.75), docs/ARCHITECTURE.md (Defaults).
        default_head_select="shared",
    ),
    PolicyInfo(
        name="kvzip",
        build=lambda spec: TopK(KVzip(chunk_size=spec.kvzip_chunk_size),
                                head_select=spec.head_select),
        paper="https://arxiv.org/abs/2505.23416",
        summary="query-agnostic: top tokens by the attention they get while the model "
                "reconstructs the context (an extra pass after the prompt)",
        parameters=(KVZIP_CHUNK_SIZE,),
    ),
    PolicyInfo(
        name="qfilters",
        build=lambda spec: TopK(QFilters(), head_select=spec.head_select),
        paper="https://arxiv.org/abs/2503.02812",
        summary="keys' projection on calibrated query directions (kvcompress calibrate); "
                "reads keys only",
        parameters=(QFILTERS_PATH,),
        default_head_select="per_head",
        model_data=QFILTERS_DATA,
    ),
):
    register_policy(_info)
