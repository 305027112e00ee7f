"""Policy registry: name -> factory, plus the ``vllm_kvcompress.policies`` entry-point group.

Built-in policies are registered when this module is imported (cheap: no vLLM, no kernels).
Third-party packages add policies with an entry point::

    [project.entry-points."vllm_kvcompress.policies"]
    mypolicy = "my_pkg.policy:register"    # a callable that calls register_policy(...)

Entry points are loaded lazily, once, the first time a name is looked up or listed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from .base import KVPolicy
from .chunkkv import ChunkKV
from .pyramidkv import PyramidKV
from .snapkv import SnapKV
from .streamingllm import StreamingLLM

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
        build: makes the policy object from a validated spec.
        paper: link to the paper.
        summary: one line on what it keeps.
        parameters: the spec fields the policy reads.
        needs_queries: whether selection reads the observation-window queries (the engine then
            recomputes the window's tokens even when they hit the prefix cache).
    """

    name: str
    build: Callable[[CompressionSpec], KVPolicy]
    paper: str
    summary: str
    parameters: tuple[str, ...]
    needs_queries: bool = True


_REGISTRY: dict[str, PolicyInfo] = {}
_entry_points_loaded = False


def register_policy(info: PolicyInfo, *, replace: bool = False) -> None:
    """Adds a policy; registering the same object twice is a no-op.

    Raises:
        ValueError: the name is taken by a different policy and ``replace`` is False, or the
            name is reserved.
    """
    if info.name == NO_POLICY:
        raise ValueError(f"policy name {NO_POLICY!r} is reserved for 'no compression'")
    existing = _REGISTRY.get(info.name)
    if existing is not None and existing != info and not replace:
        raise ValueError(f"policy {info.name!r} is already registered")
    _REGISTRY[info.name] = info


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


def build_policy(spec: CompressionSpec) -> KVPolicy | None:
    """The policy object for a resolved spec, or ``None`` for ``policy: none``."""
    if spec.policy == NO_POLICY:
        return None
    return get_policy_info(spec.policy).build(spec)


_WINDOW_PARAMS = ("ratio", "budget", "window", "sink_tokens", "min_prompt_len")

for _info in (
    PolicyInfo(
        name="streamingllm",
        build=lambda spec: StreamingLLM(),
        paper="https://arxiv.org/abs/2309.17453",
        summary="attention sinks + most recent tokens; no scoring",
        parameters=("ratio", "budget", "sink_tokens", "min_prompt_len"),
        needs_queries=False,
    ),
    PolicyInfo(
        name="snapkv",
        build=lambda spec: SnapKV(pool_kernel=spec.pool_kernel),
        paper="https://arxiv.org/abs/2404.14469",
        summary="top tokens by observation-window attention, average-pooled",
        parameters=(*_WINDOW_PARAMS, "pool_kernel"),
    ),
    PolicyInfo(
        name="chunkkv",
        build=lambda spec: ChunkKV(scorer=SnapKV(pool_kernel=spec.pool_kernel),
                                   chunk_size=spec.chunk_size, reuse_layers=spec.reuse_layers),
        paper="https://arxiv.org/abs/2502.00299",
        summary="top whole chunks by mean window attention; layer-wise index reuse",
        parameters=(*_WINDOW_PARAMS, "pool_kernel", "chunk_size", "reuse_layers"),
    ),
    PolicyInfo(
        name="pyramidkv",
        build=lambda spec: PyramidKV(scorer=SnapKV(pool_kernel=spec.pool_kernel)),
        paper="https://arxiv.org/abs/2406.02069",
        summary="SnapKV selection with budgets decreasing from lower to upper layers",
        parameters=(*_WINDOW_PARAMS, "pool_kernel"),
    ),
):
    register_policy(_info)
