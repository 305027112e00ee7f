"""Per-model data a policy may ask for (calibrated vectors, head patterns, ...).

A policy declares a ``ModelDataHook``: which of its parameters holds the file path, how to load
the file, and how to check it against the model being served. The file is loaded once per
process (cached by path and modification time) and checked at startup for a server default (one
clear line if it does not fit) and per request for ``vllm_xargs`` (HTTP 400 naming the key). The
worker hands the loaded object to the scorer as ``LayerObservation.model_data``.

Importable without vLLM.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """What a model-data file must match.

    Attributes:
        model: the served model's name or path.
        num_layers: attention layers.
        num_kv_heads: KV heads per layer (all ranks together).
        num_q_heads: query heads per layer.
        head_dim: size of one head.
    """

    model: str
    num_layers: int
    num_kv_heads: int
    num_q_heads: int
    head_dim: int


@dataclass(frozen=True)
class ModelDataHook:
    """A policy's per-model data.

    Attributes:
        param: name of the policy's path parameter (declared with ``type=Path``).
        load: ``path -> data``; raises ``ValueError`` (one line) for an unreadable file.
        check: ``(data, shape) -> None``; raises ``ValueError`` (one line) when the data does
            not fit the model.
    """

    param: str
    load: Callable[[str], Any]
    check: Callable[[Any, ModelShape], None]


@functools.lru_cache(maxsize=32)
def _load_cached(load: Callable[[str], Any], path: str, mtime_ns: int) -> Any:
    return load(path)


def load_model_data(hook: ModelDataHook, path: str, shape: ModelShape | None = None) -> Any:
    """Loads (once per process per file version) and, given a shape, checks the data.

    Raises:
        ValueError: the file cannot be read or does not fit ``shape``; one line.
    """
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror}") from None
    data = _load_cached(hook.load, path, mtime)
    if shape is not None:
        hook.check(data, shape)
    return data
