"""Q-Filters' scorer: each key's projection on its head's query direction.

Paper: Godey et al., "Q-Filters: Leveraging Query-Key Geometry for Efficient Key-Value Cache
Compression" (2025), https://arxiv.org/abs/2503.02812

Per (layer, KV head) a filter ``f``: the principal direction of that head's (post-RoPE) queries
on calibration text, from ``kvcompress calibrate``. The paper shows ``E_q[<q, k>] ~ kappa <k, u>``
along the principal direction ``u`` oriented so queries project positively (``kappa > 0``), so a
key's expected attention logit is its projection on ``u``. The file stores ``f = -u`` (kvpress's
convention, whose published filters are used with ``score = -<k, f>``), so the score here is
``-<k, f> = <k, u>``: higher = more expected attention = keep. ``kvcompress calibrate`` writes
the sign this way and checks it on its own text.

Needs no attention weights and no queries at compression time (``needs_queries`` is False): a
prefix-cache hit needs no window recompute, so the scheduler does not cap the hit for it. Per KV
head by nature; default selection ``per_head`` (as the paper and kvpress's ``QFilterPress``).

Inputs: ``keys [H, L, D]``, ``model_data`` (``QFilterFile``). Output: scores ``[H, L]`` float32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from .base import KEYS, MODEL_DATA, LayerObservation
from .model_data import ModelDataHook, ModelShape
from .params import Param

#: Tensor name and metadata key inside a filter file (safetensors).
FILTERS_TENSOR = "q_filters"
METADATA_KEY = "vllm_kvcompress"

QFILTERS_PATH = Param("qfilters_path", Path, None, "qfilters: filter file for the served model "
                      "(kvcompress calibrate MODEL --out FILE).")


@dataclass(frozen=True)
class QFilterFile:
    """A loaded filter file.

    Attributes:
        filters: ``[num_layers, num_kv_heads, head_dim]`` float32, ``f = -u`` per head.
        model: the model the filters were calibrated on (name or path, informational).
        num_q_heads: query heads per layer of that model.
        tokens: calibration tokens used.
    """

    filters: torch.Tensor
    model: str
    num_q_heads: int
    tokens: int

    @property
    def num_layers(self) -> int:
        return self.filters.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.filters.shape[1]

    @property
    def head_dim(self) -> int:
        return self.filters.shape[2]


def save_filters(path: str | Path, filters: torch.Tensor, *, model: str, num_q_heads: int,
                 tokens: int) -> None:
    """Writes ``filters [layers, kv_heads, head_dim]`` with metadata naming the model and shape."""
    from safetensors.torch import save_file

    if filters.dim() != 3:
        raise ValueError(f"filters must be [layers, kv_heads, head_dim], got "
                         f"{tuple(filters.shape)}")
    meta = {"model": model, "num_layers": filters.shape[0], "num_kv_heads": filters.shape[1],
            "num_q_heads": num_q_heads, "head_dim": filters.shape[2], "tokens": tokens,
            "sign": "f = -u, u oriented so queries project positively; score = -<k, f>"}
    save_file({FILTERS_TENSOR: filters.float().contiguous()}, str(path),
              metadata={METADATA_KEY: json.dumps(meta)})


def load_filters(path: str) -> QFilterFile:
    """Reads a filter file.

    Raises:
        ValueError: not a filter file written by ``kvcompress calibrate`` (one line).
    """
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get(METADATA_KEY, "null"))
            filters = handle.get_tensor(FILTERS_TENSOR)
    except Exception as err:  # safetensors raises several types for a foreign file
        raise ValueError(f"{path} is not a Q-Filters file (kvcompress calibrate): "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
                         ) from None
    if not isinstance(meta, dict) or filters.dim() != 3:
        raise ValueError(f"{path} is not a Q-Filters file (kvcompress calibrate): missing "
                         f"{METADATA_KEY!r} metadata or a 3-D {FILTERS_TENSOR!r} tensor")
    return QFilterFile(filters=filters.float(), model=str(meta.get("model", "?")),
                       num_q_heads=int(meta.get("num_q_heads", 0)),
                       tokens=int(meta.get("tokens", 0)))


def check_filters(data: QFilterFile, shape: ModelShape) -> None:
    """Raises ``ValueError`` (one line) when the filters do not fit the served model."""
    want = (shape.num_layers, shape.num_kv_heads, shape.head_dim)
    got = (data.num_layers, data.num_kv_heads, data.head_dim)
    if got != want:
        raise ValueError(f"the Q-Filters file was calibrated on {data.model!r} with (layers, "
                         f"kv_heads, head_dim) = {got}, the served model {shape.model!r} has "
                         f"{want}; run kvcompress calibrate {shape.model} --out FILE")


QFILTERS_DATA = ModelDataHook(param=QFILTERS_PATH.name, load=load_filters, check=check_filters)


@dataclass(frozen=True)
class QFilters:
    """Key projection on calibrated query directions (no parameters beyond the file)."""

    inputs: ClassVar[frozenset[str]] = frozenset({KEYS, MODEL_DATA})

    def score(self, obs: LayerObservation) -> torch.Tensor:
        """Returns ``[H, L]`` float32, ``-<k, f>`` with this rank's heads' filters."""
        data: QFilterFile = obs.require(MODEL_DATA)
        keys = obs.require(KEYS).float()  # [H, L, D]
        heads = slice(obs.kv_head_offset, obs.kv_head_offset + keys.shape[0])
        filters = data.filters[obs.layer_idx, heads].to(keys.device)  # [H, D]
        return -(keys * filters[:, None, :]).sum(dim=-1)
