"""The literature's methods (tova, sagekv, knorm, keydiff, expected_attention, qfilters): each
scorer against an independent, straightforward reference written here (loops over heads and
tokens, explicit rotation matrices), the registry's defaults, the prefix-cache cap, RoPE
handling, and Q-Filters calibration on the tiny model."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vllm_kvcompress.config import CompressionSpec
from vllm_kvcompress.policies import LayerObservation, build_policy, get_policy_info
from vllm_kvcompress.policies.base import needs_queries
from vllm_kvcompress.policies.expected_attention import ExpectedAttention
from vllm_kvcompress.policies.keydiff import KeyDiff
from vllm_kvcompress.policies.knorm import KeyNorm
from vllm_kvcompress.policies.model_data import ModelShape
from vllm_kvcompress.policies.qfilters import (
    QFilters,
    check_filters,
    load_filters,
    save_filters,
)
from vllm_kvcompress.policies.rotary import Rotary
from vllm_kvcompress.policies.sagekv import SageKV
from vllm_kvcompress.policies.tova import TOVA

NEW_METHODS = ("tova", "sagekv", "knorm", "keydiff", "expected_attention", "qfilters")
# (num_q_heads, num_kv_heads): MHA, GQA 3, GQA 4.
HEAD_LAYOUTS = [(2, 2), (6, 2), (8, 2)]


def observation(seed: int, q_heads: int, kv_heads: int, seq_len: int = 37, window: int = 8,
                head_dim: int = 16, **extra: object) -> LayerObservation:
    gen = torch.Generator().manual_seed(seed)
    return LayerObservation(
        seq_len=seq_len, budget=seq_len // 2, sink_tokens=3, window=window,
        num_kv_heads=kv_heads,
        queries=torch.randn(q_heads, window, head_dim, generator=gen),
        keys=torch.randn(kv_heads, seq_len, head_dim, generator=gen) * 2,
        values=torch.randn(kv_heads, seq_len, head_dim, generator=gen), **extra)


def softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    exps = [math.exp(x - top) for x in xs]
    return [e / sum(exps) for e in exps]


def last_queries_reference(obs: LayerObservation, count: int) -> torch.Tensor:
    """Attention of the last ``count`` queries (causal), summed over them and the group."""
    q_heads, window, dim = obs.queries.shape
    group = q_heads // obs.num_kv_heads
    out = torch.zeros(obs.num_kv_heads, obs.seq_len, dtype=torch.float64)
    for qh in range(q_heads):
        kv = qh // group
        for row in range(window - count, window):
            pos = obs.seq_len - window + row
            logits = [float(obs.queries[qh, row].double() @ obs.keys[kv, t].double())
                      / math.sqrt(dim) for t in range(pos + 1)]
            for t, weight in enumerate(softmax(logits)):
                out[kv, t] += weight
    return out


@pytest.mark.parametrize(("q_heads", "kv_heads"), HEAD_LAYOUTS)
def test_tova_is_the_last_tokens_attention(q_heads: int, kv_heads: int) -> None:
    obs = observation(1, q_heads, kv_heads)
    got = TOVA().score(obs)
    assert got.shape == (kv_heads, obs.seq_len) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), last_queries_reference(obs, 1), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize(("q_heads", "kv_heads"), HEAD_LAYOUTS)
@pytest.mark.parametrize("count", [1, 3, 50])
def test_sagekv_sums_the_final_queries_attention(q_heads: int, kv_heads: int,
                                                 count: int) -> None:
    obs = observation(2, q_heads, kv_heads)
    got = SageKV(sage_queries=count).score(obs)
    want = last_queries_reference(obs, min(count, obs.window))  # capped at the window
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_knorm_and_keydiff_against_loops() -> None:
    obs = observation(3, 6, 2)
    norm = KeyNorm().score(obs)
    diff = KeyDiff().score(obs)
    for h in range(2):
        keys = [obs.keys[h, t].double() for t in range(obs.seq_len)]
        anchor = sum(k / k.norm() for k in keys) / len(keys)
        for t, k in enumerate(keys):
            assert norm[h, t].item() == pytest.approx(-math.sqrt(sum(x * x for x in k.tolist())),
                                                      rel=1e-5)
            cosine = float(k @ anchor) / (float(k.norm()) * float(anchor.norm()))
            assert diff[h, t].item() == pytest.approx(-cosine, abs=1e-5)
    # The kept tokens: low norms / distinctive keys (per head, the default).
    policy = build_policy(CompressionSpec(policy="knorm", ratio=0.5))
    kept = policy.keep_indices(obs)
    for h in range(2):
        free = [t for t in range(3, obs.seq_len - obs.window)]
        chosen = set(kept[h].tolist()) - set(range(3)) - set(range(obs.seq_len - 8, obs.seq_len))
        ranked = sorted(free, key=lambda t: float(obs.keys[h, t].norm()))
        assert chosen == set(ranked[:len(chosen)])


def rope_matrix(position: int, inv_freq: torch.Tensor, head_dim: int, neox: bool
                ) -> torch.Tensor:
    """The explicit ``[D, D]`` rotation of one position (float64)."""
    matrix = torch.eye(head_dim, dtype=torch.float64)
    half = inv_freq.shape[0]
    for i in range(half):
        a, b = (i, i + half) if neox else (2 * i, 2 * i + 1)
        angle = position * float(inv_freq[i])
        matrix[a, a] = matrix[b, b] = math.cos(angle)
        matrix[a, b] = -math.sin(angle)
        matrix[b, a] = math.sin(angle)
    return matrix


def make_rotary(head_dim: int, rotary_dim: int, positions: int, neox: bool
                ) -> tuple[Rotary, torch.Tensor]:
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) /
                                rotary_dim))
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    rotary = Rotary(cos=angles.cos().float(), sin=angles.sin().float(), head_dim=head_dim,
                    neox=neox)
    return rotary, inv_freq


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [16, 8])  # full and partial rotary
def test_rotary_rotate_and_mean_rotation_match_explicit_matrices(neox: bool,
                                                                 rotary_dim: int) -> None:
    rotary, inv_freq = make_rotary(16, rotary_dim, 64, neox)
    x = torch.randn(3, 5, 16)
    positions = torch.tensor([0, 7, 13, 40, 63])
    got = rotary.rotate(x, positions)
    for j, p in enumerate(positions.tolist()):
        want = x[:, j].double() @ rope_matrix(p, inv_freq, 16, neox).T
        torch.testing.assert_close(got[:, j].double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rotary.rotate(got, positions, inverse=True), x, rtol=1e-5,
                               atol=1e-5)
    future = torch.arange(20, 52)
    want = sum(rope_matrix(p, inv_freq, 16, neox) for p in future.tolist()) / len(future)
    torch.testing.assert_close(rotary.mean_rotation(future).double(), want, rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize(("q_heads", "kv_heads"), HEAD_LAYOUTS)
def test_expected_attention_against_explicit_gaussian_moment(q_heads: int,
                                                             kv_heads: int) -> None:
    """Pre-RoPE queries are drawn here and rotated with explicit matrices; the reference uses
    their statistics directly (no un-rotation), so a wrong inverse rotation fails."""
    head_dim, seq_len, window, sinks, future_n = 16, 41, 12, 3, 24
    rotary, inv_freq = make_rotary(head_dim, head_dim, 128, neox=True)
    gen = torch.Generator().manual_seed(4)
    pre = torch.randn(q_heads, window, head_dim, generator=gen, dtype=torch.float64) + 0.5
    positions = list(range(seq_len - window, seq_len))
    post = torch.stack([pre[:, j] @ rope_matrix(p, inv_freq, head_dim, True).T
                        for j, p in enumerate(positions)], dim=1)
    keys = torch.randn(kv_heads, seq_len, head_dim, generator=gen, dtype=torch.float64)
    values = torch.randn(kv_heads, seq_len, head_dim, generator=gen, dtype=torch.float64)
    obs = LayerObservation(seq_len=seq_len, budget=20, sink_tokens=sinks, window=window,
                           num_kv_heads=kv_heads, queries=post.float(), keys=keys.float(),
                           values=values.float(), rotary=rotary)
    got = ExpectedAttention(future_positions=future_n).score(obs)
    rotation = sum(rope_matrix(p, inv_freq, head_dim, True)
                   for p in range(seq_len, seq_len + future_n)) / future_n
    group = q_heads // kv_heads
    want = torch.zeros(kv_heads, seq_len, dtype=torch.float64)
    for qh in range(q_heads):
        mean = pre[qh].mean(0)
        cov = sum(torch.outer(q - mean, q - mean) for q in pre[qh]) / window
        mean, cov = rotation @ mean, rotation @ cov @ rotation.T
        kv = qh // group
        logits = [float(keys[kv, t] @ mean) / math.sqrt(head_dim) +
                  float(keys[kv, t] @ cov @ keys[kv, t]) / head_dim / 2
                  for t in range(sinks, seq_len)]
        for t, weight in zip(range(sinks, seq_len), softmax(logits), strict=True):
            want[kv, t] += weight / group * float(values[kv, t].norm())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)


def kvpress_expected_attention(pre_rope: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                               rotary: Rotary, sinks: int, future_n: int) -> torch.Tensor:
    """kvpress 0.5.5's ``ExpectedAttentionPress.score`` written as its code does it (batch 1,
    NeoX RoPE through ``cos I + sin P``): statistics of every pre-RoPE query but the sinks, the
    rotation averaged over positions ``L .. L+n-1``, ``K mu / sqrt(d) + K S K / d / 2``, softmax
    over the non-sink keys, the mean over each KV head's query heads, times ``||v||``. Sinks get
    0 here (kvpress pads them with max + 1; both keep them)."""
    q_heads, seq_len, dim = pre_rope.shape
    kv_heads = keys.shape[0]
    queries = pre_rope[:, sinks:].double()
    mean = queries.mean(dim=1, keepdim=True)
    centered = queries - mean
    cov = torch.einsum("nsi,nsj->nij", centered, centered) / queries.shape[1]
    half = dim // 2
    positions = torch.arange(seq_len, seq_len + future_n)
    cos = torch.cat([rotary.cos[positions]] * 2, dim=-1).double()  # HF duplicates the halves
    sin = torch.cat([rotary.sin[positions]] * 2, dim=-1).double()
    swap = torch.zeros(dim, dim, dtype=torch.float64)
    swap[half:, :half], swap[:half, half:] = torch.eye(half), -torch.eye(half)
    rotation = (cos[:, :, None] * torch.eye(dim) + sin[:, :, None] * swap).mean(dim=0)
    mean = mean.squeeze(1) @ rotation.T
    cov = rotation @ cov @ rotation.T
    group = q_heads // kv_heads
    k = keys[:, sinks:].double().repeat_interleave(group, dim=0).transpose(1, 2)  # [Hq, D, n]
    logits = (mean[:, None, :] @ k).squeeze(1) / math.sqrt(dim)
    logits = logits + torch.einsum("hin,hij,hjn->hn", k, cov, k) / dim / 2
    expected = torch.softmax(logits, dim=-1).view(kv_heads, group, -1).mean(dim=1)
    scores = torch.zeros(kv_heads, seq_len, dtype=torch.float64)
    scores[:, sinks:] = expected * values[:, sinks:].double().norm(dim=-1)
    return scores


@pytest.mark.parametrize(("q_heads", "kv_heads"), HEAD_LAYOUTS)
def test_expected_attention_with_every_query_is_kvpress_press(q_heads: int,
                                                               kv_heads: int) -> None:
    """Fed every non-sink prompt query (window = L - sinks), our scorer is kvpress's press: the
    one difference the Qwen audit found (docs/method-audit.md) is which queries give the
    statistics, not the formula, RoPE convention or GQA averaging."""
    head_dim, seq_len, sinks, future_n = 16, 45, 4, 32
    rotary, _ = make_rotary(head_dim, head_dim, 128, neox=True)
    gen = torch.Generator().manual_seed(11)
    pre = torch.randn(q_heads, seq_len, head_dim, generator=gen) + 0.3
    post = rotary.rotate(pre, torch.arange(seq_len))
    keys = torch.randn(kv_heads, seq_len, head_dim, generator=gen)
    values = torch.randn(kv_heads, seq_len, head_dim, generator=gen)
    window = seq_len - sinks
    obs = LayerObservation(seq_len=seq_len, budget=seq_len, sink_tokens=sinks, window=window,
                           num_kv_heads=kv_heads, queries=post[:, -window:], keys=keys,
                           values=values, rotary=rotary)
    got = ExpectedAttention(future_positions=future_n).score(obs)
    want = kvpress_expected_attention(pre, keys, values, rotary, sinks, future_n)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)


def test_keydiff_and_knorm_rank_bf16_keys_in_float32() -> None:
    """bf16 cache keys that point almost the same way: cosines computed in bf16 collapse onto a
    few values (kvpress's KeyDiffPress on a bf16 cache: Spearman vs float32 as low as 0.09 on
    some Qwen heads); ours are computed in float32 and rank every key as float64 does."""
    gen = torch.Generator().manual_seed(5)
    direction = torch.randn(16, generator=gen)
    keys = (direction + 0.1 * torch.randn(2, 200, 16, generator=gen)).bfloat16()
    obs = LayerObservation(seq_len=200, budget=50, sink_tokens=0, window=0, num_kv_heads=2,
                           keys=keys)
    exact = keys.double()
    anchor = torch.nn.functional.normalize(exact, dim=-1).mean(dim=1, keepdim=True)
    want = -torch.nn.functional.cosine_similarity(exact, anchor, dim=-1)
    got = KeyDiff().score(obs)
    assert got.dtype == torch.float32

    def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
        ra, rb = (x.argsort().argsort().double() for x in (a, b))
        return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])

    assert min(spearman(got[h], want[h]) for h in range(2)) > 0.999
    in_bf16 = -torch.nn.functional.cosine_similarity(
        keys, torch.nn.functional.normalize(keys, dim=-1).mean(dim=1, keepdim=True), dim=-1)
    assert in_bf16.unique().numel() < got.unique().numel() // 2  # what float32 avoids
    torch.testing.assert_close(KeyNorm().score(obs).double(), -exact.norm(dim=-1), rtol=1e-6,
                               atol=1e-6)


def test_expected_attention_clips_future_positions_to_the_rope_table() -> None:
    rotary, _ = make_rotary(16, 16, 45, neox=True)
    obs = observation(5, 4, 2, seq_len=40, rotary=rotary)
    clipped = ExpectedAttention(future_positions=512).score(obs)
    exact = ExpectedAttention(future_positions=5).score(obs)  # positions 40..44: the table's end
    torch.testing.assert_close(clipped, exact)


@pytest.mark.parametrize(("q_heads", "kv_heads"), HEAD_LAYOUTS)
def test_qfilters_projects_keys_on_this_ranks_filters(q_heads: int, kv_heads: int,
                                                      tmp_path: Path) -> None:
    filters = torch.randn(3, kv_heads * 2, 16)  # the whole model has 2x this rank's heads
    path = tmp_path / "f.safetensors"
    save_filters(path, filters, model="m", num_q_heads=q_heads * 2, tokens=10)
    data = load_filters(str(path))
    for offset in (0, kv_heads):
        obs = observation(6, q_heads, kv_heads, layer_idx=2, num_layers=3, model_data=data,
                          kv_head_offset=offset)
        got = QFilters().score(obs)
        for h in range(kv_heads):
            for t in range(obs.seq_len):
                want = -sum(float(a) * float(b) for a, b in
                            zip(obs.keys[h, t], filters[2, offset + h], strict=True))
                assert got[h, t].item() == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_qfilters_file_checks(tmp_path: Path) -> None:
    path = tmp_path / "f.safetensors"
    save_filters(path, torch.randn(4, 2, 64), model="tiny", num_q_heads=4, tokens=10)
    data = load_filters(str(path))
    check_filters(data, ModelShape("tiny", 4, 2, 4, 64))
    with pytest.raises(ValueError, match=r"\(layers, kv_heads, head_dim\) = \(4, 2, 64\).*"
                                         r"\(30, 3, 64\).*kvcompress calibrate"):
        check_filters(data, ModelShape("smollm2", 30, 3, 9, 64))
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="is not a Q-Filters file"):
        load_filters(str(other))
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="is not a Q-Filters file"):
        load_filters(str(other))


def test_registry_defaults_inputs_and_prefix_cache_cap(tmp_path: Path) -> None:
    """Key-only methods need no window recompute, so a prefix-cache hit is not capped for them;
    the attention-based ones are capped before their window."""
    from vllm_kvcompress.engine.scheduler_side import ManagerState, SchedulerCompression
    from vllm_kvcompress.engine.stats import CompressionStats

    path = tmp_path / "f.safetensors"
    save_filters(path, torch.randn(2, 2, 16), model="m", num_q_heads=4, tokens=10)
    default_mode = {"tova": "shared", "sagekv": "per_head", "knorm": "per_head",
                    "keydiff": "per_head", "expected_attention": "shared",
                    "qfilters": "per_head"}
    key_only = {"knorm", "keydiff", "qfilters"}
    for name in NEW_METHODS:
        info = get_policy_info(name)
        assert info.default_head_select == default_mode[name]
        extra = {"qfilters_path": str(path)} if name == "qfilters" else {}
        spec = CompressionSpec(policy=name, ratio=0.25, window=16, **extra)
        policy = build_policy(spec)
        assert policy.head_select == default_mode[name]
        assert needs_queries(policy) == (name not in key_only), name
        planner = SchedulerCompression(spec, SimpleNamespace(kvc=ManagerState()), None,
                                       block_size=32, num_layers=2, stats=CompressionStats())
        request = SimpleNamespace(request_id="r", num_prompt_tokens=1000, num_output_tokens=0,
                                  sampling_params=None)
        cap = planner.max_cache_hit_blocks(request)
        assert cap == (None if name in key_only else (1000 - 16) // 32), name


@pytest.mark.parametrize("name", NEW_METHODS)
@pytest.mark.parametrize("mode", ["shared", "per_head"])
def test_every_method_selects_in_both_modes_and_under_chunkkv(name: str, mode: str,
                                                              tmp_path: Path) -> None:
    """Each scorer runs through TopK in both modes and inside ChunkKV (whole chunks kept):
    rows sorted, unique, sinks and window kept, the same count per head."""
    from vllm_kvcompress.policies import ChunkKV

    path = tmp_path / "f.safetensors"
    save_filters(path, torch.randn(1, 2, 16), model="m", num_q_heads=6, tokens=10)
    rotary, _ = make_rotary(16, 16, 600, neox=True)
    obs = observation(7, 6, 2, seq_len=61, model_data=load_filters(str(path)), rotary=rotary)
    extra = {"qfilters_path": str(path)} if name == "qfilters" else {}
    policy = build_policy(CompressionSpec(policy=name, ratio=0.5, head_select=mode, **extra))
    scorer = policy.scorer
    for selector in (policy, ChunkKV(scorer=scorer, chunk_size=5, head_select=mode)):
        kept = selector.keep_indices(obs)
        assert kept.shape == (2, obs.budget)
        for row in kept.tolist():
            assert row == sorted(set(row))
            assert set(range(3)) | set(range(61 - 8, 61)) <= set(row)
        if mode == "shared":
            assert torch.equal(kept[0], kept[1])


# --- merge (ZeroMerge-style value folding) ---


def test_merge_evicted_against_a_loop_reference() -> None:
    from vllm_kvcompress.policies.merge import merge_evicted

    gen = torch.Generator().manual_seed(8)
    heads, seq_len, dim = 2, 23, 8
    keys = torch.randn(heads, seq_len, dim, generator=gen)
    values = torch.randn(heads, seq_len, dim, generator=gen)
    weights = torch.rand(heads, seq_len, generator=gen)
    kept = torch.stack([torch.tensor([0, 1, 5, 9, 14, 20, 22]),
                        torch.tensor([0, 2, 3, 11, 12, 21, 22])])
    got = merge_evicted(keys, values, weights, kept)
    for h in range(heads):
        kept_list = kept[h].tolist()
        sums = {t: values[h, t].double() * float(weights[h, t]) for t in kept_list}
        mass = {t: float(weights[h, t]) for t in kept_list}
        for e in range(seq_len):
            if e in kept_list:
                continue
            sims = {t: float(torch.nn.functional.cosine_similarity(keys[h, e], keys[h, t],
                                                                     dim=0))
                    for t in kept_list}
            target = max(kept_list, key=lambda t: (sims[t], -t))
            if sims[target] > 0:
                sums[target] = sums[target] + values[h, e].double() * float(weights[h, e])
                mass[target] += float(weights[h, e])
        for j, t in enumerate(kept_list):
            torch.testing.assert_close(got[h, j].double(), sums[t] / mass[t], rtol=1e-5,
                                       atol=1e-6)
    # Something was merged (the test would pass vacuously otherwise).
    assert not torch.allclose(got, values.gather(1, kept[..., None].expand(-1, -1, dim)))


def test_merge_wraps_any_policy_and_needs_window_attention(tmp_path: Path) -> None:
    from vllm_kvcompress.policies.merge import MergeEvicted

    for name in ("snapkv", "chunkkv", "knorm", "streamingllm"):
        plain = build_policy(CompressionSpec(policy=name, ratio=0.5))
        merged = build_policy(CompressionSpec(policy=name, ratio=0.5, merge="on"))
        assert isinstance(merged, MergeEvicted) and not isinstance(plain, MergeEvicted)
        assert merged.inputs >= {"keys", "values", "window_attention"}
        assert needs_queries(merged)  # its weights are the window's attention
        obs = observation(9, 4, 2, seq_len=50)
        torch.testing.assert_close(merged.keep_indices(obs), plain.keep_indices(obs))
        kept = merged.keep_indices(obs)
        values = merged.merged_values(obs, kept)
        assert values.shape == (2, obs.budget, 16)


@pytest.mark.parametrize("inner", ["tova", "knorm", "expected_attention", "qfilters"])
def test_chunkkv_wraps_any_token_scorer(inner: str, tmp_path: Path) -> None:
    """`chunk_scorer`: ChunkKV averages that policy's scores per chunk; a scorer's model data
    (Q-Filters) becomes ChunkKV's, so it is loaded, checked and handed over like the scorer's."""
    from vllm_kvcompress.policies import ChunkKV, model_data_hook

    path = tmp_path / "f.safetensors"
    save_filters(path, torch.randn(1, 2, 16), model="m", num_q_heads=6, tokens=10)
    extra = {"qfilters_path": str(path)} if inner == "qfilters" else {}
    spec = CompressionSpec(policy="chunkkv", ratio=0.5, chunk_scorer=inner, chunk_size=4, **extra)
    policy = build_policy(spec)
    plain = build_policy(CompressionSpec(policy=inner, ratio=0.5, **extra))
    assert isinstance(policy, ChunkKV) and policy.scorer == plain.scorer
    assert policy.inputs == plain.inputs
    assert (model_data_hook(spec) is not None) == (inner == "qfilters")
    rotary, _ = make_rotary(16, 16, 600, neox=True)
    obs = observation(10, 6, 2, seq_len=61, model_data=load_filters(str(path)), rotary=rotary)
    want = ChunkKV(scorer=plain.scorer, chunk_size=4).keep_indices(obs)
    torch.testing.assert_close(policy.keep_indices(obs), want)
