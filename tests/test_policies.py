"""Tests of the pure-torch policy library against independent float64 / pure-Python references.

Every reference below is written from the definitions in ``shared/notes/methods.md`` and the module
docstrings, with explicit loops, and never calls the library's helpers (``select``,
``protected_mask``, ``middle_range``, ``pool_scores``, ``window_attention_scores``, ...).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

import pytest
import torch

from vllm_kvcompress.config import CompressionSpec
from vllm_kvcompress.policies import (
    ChunkKV,
    KVPolicy,
    LayerObservation,
    Param,
    PolicyInfo,
    PyramidKV,
    SnapKV,
    StreamingLLM,
    TopK,
    all_params,
    build_policy,
    chunk_select,
    get_policy_info,
    policy_names,
    pool_scores,
    pyramid_schedule,
    register_policy,
    select,
    window_attention_scores,
)
from vllm_kvcompress.policies import registry as registry_module

RTOL = 1e-5
ATOL = 1e-5
BUILTIN = ("chunkkv", "pyramidkv", "snapkv", "streamingllm")


# --------------------------------------------------------------------------------------------
# Shapes and random data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One test geometry: heads, head_dim, prompt length, sinks, window and budget."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    seq_len: int
    sinks: int
    window: int
    budget: int

    @property
    def name(self) -> str:
        ratio = self.num_q_heads // self.num_kv_heads
        return (f"gqa{ratio}-d{self.head_dim}-L{self.seq_len}-s{self.sinks}-w{self.window}"
                f"-b{self.budget}")


SHAPES = [
    Shape(4, 4, 16, 37, 4, 8, 12),     # GQA 1, budget == sinks + window
    Shape(4, 4, 16, 37, 4, 8, 17),     # GQA 1, small budget
    Shape(9, 3, 64, 101, 4, 16, 30),   # GQA 3, small budget
    Shape(9, 3, 16, 101, 4, 16, 85),   # GQA 3, large budget
    Shape(8, 2, 64, 250, 4, 32, 60),   # GQA 4, small budget
    Shape(8, 2, 16, 250, 4, 32, 201),  # GQA 4, large budget
    Shape(8, 2, 16, 250, 4, 32, 250),  # GQA 4, budget == L (keeps everything)
    Shape(9, 3, 64, 37, 2, 5, 37),     # GQA 3, budget == L
    Shape(4, 4, 64, 101, 0, 1, 40),    # no sinks, window of one token
    Shape(8, 2, 16, 37, 1, 3, 23),     # odd everything
]
SEEDS = [0, 1]
SHAPE_IDS = [s.name for s in SHAPES]


def make_qk(shape: Shape, seed: int, extra_queries: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh continuous float32 queries ``[Hq, w + extra, d]`` and keys ``[Hkv, L, d]``."""
    gen = torch.Generator().manual_seed(1000 + seed)
    queries = 1.5 * torch.randn(shape.num_q_heads, shape.window + extra_queries, shape.head_dim,
                                generator=gen)
    keys = torch.randn(shape.num_kv_heads, shape.seq_len, shape.head_dim, generator=gen)
    return queries, keys


def make_obs(shape: Shape, seed: int, budget: int | None = None, layer_idx: int = 0,
             num_layers: int = 1) -> LayerObservation:
    """A ``LayerObservation`` for ``shape`` with seeded random queries and keys."""
    queries, keys = make_qk(shape, seed)
    return LayerObservation(
        seq_len=shape.seq_len, budget=shape.budget if budget is None else budget,
        sink_tokens=shape.sinks, window=shape.window, layer_idx=layer_idx,
        num_layers=num_layers, num_kv_heads=shape.num_kv_heads, queries=queries, keys=keys,
    )


def random_scores(seq_len: int, seed: int) -> torch.Tensor:
    """Continuous float32 scores ``[L]`` (no exact ties with probability one)."""
    gen = torch.Generator().manual_seed(5000 + seed)
    return torch.rand(seq_len, generator=gen, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Independent references (float64 / pure Python)
# --------------------------------------------------------------------------------------------


def ref_window_scores(queries: torch.Tensor, keys: torch.Tensor,
                      scale: float | None = None) -> torch.Tensor:
    """``[Hkv, L]`` float64: per KV head, the causal softmax weights summed over the window
    queries and over the query heads of its GQA group (query head ``h`` -> KV head
    ``h // group``), softmax written out by hand."""
    q = queries.double()
    k = keys.double()
    num_q_heads, window, head_dim = q.shape
    num_kv_heads, seq_len, _ = k.shape
    group = num_q_heads // num_kv_heads
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    out = torch.zeros(num_kv_heads, seq_len, dtype=torch.float64)
    for kv in range(num_kv_heads):
        for g in range(group):
            head = kv * group + g
            for i in range(window):
                pos = seq_len - window + i  # absolute position of this window query
                visible = k[kv, : pos + 1]  # causal: keys 0..pos only
                logits = (visible @ q[head, i]) * scale
                exp = torch.exp(logits - logits.max())
                out[kv, : pos + 1] += exp / exp.sum()
    return out


def ref_pool(values: Sequence[float], kernel: int) -> list[float]:
    """Zero-padded moving average of width ``kernel`` (pad counted in the denominator)."""
    half = kernel // 2
    n = len(values)
    return [sum(values[j] for j in range(i - half, i + half + 1) if 0 <= j < n) / kernel
            for i in range(n)]


def ref_snapkv_head_scores(queries: torch.Tensor, keys: torch.Tensor, window: int,
                           kernel: int) -> list[list[float]]:
    """SnapKV token scores per KV head: window scores of the last ``window`` queries, pooled."""
    per_head = ref_window_scores(queries[:, -window:, :], keys)
    return [ref_pool(row.tolist(), kernel) for row in per_head]


def ref_snapkv_scores(queries: torch.Tensor, keys: torch.Tensor, window: int,
                      kernel: int) -> list[float]:
    """SnapKV token scores in shared mode: the per-head scores summed over KV heads."""
    heads = ref_snapkv_head_scores(queries, keys, window, kernel)
    return [sum(head[j] for head in heads) for j in range(len(heads[0]))]


def ref_protected(seq_len: int, sinks: int, window: int) -> set[int]:
    """Sinks ``[0, s)`` and window ``[L - w, L)``."""
    return set(range(min(sinks, seq_len))) | set(range(max(seq_len - window, 0), seq_len))


def ref_select(scores: Sequence[float], budget: int, sinks: int, window: int) -> list[int]:
    """Sinks + window + best other tokens by ``sorted`` with key ``(-score, index)``."""
    seq_len = len(scores)
    protected = ref_protected(seq_len, sinks, window)
    free = budget - len(protected)
    candidates = [i for i in range(seq_len) if i not in protected]
    ranked = sorted(candidates, key=lambda i: (-scores[i], i))
    return sorted(protected | set(ranked[:free]))


def ref_chunks(seq_len: int, sinks: int, window: int, chunk_size: int,
               from_zero: bool = False) -> list[list[int]]:
    """Chunks of ``chunk_size`` tokens over ``[sinks, L - window)``, the last one possibly short;
    ``from_zero``: on the grid ``[k c, (k + 1) c)`` cut to that range (first one possibly short)."""
    end = seq_len - window
    if not from_zero:
        return [list(range(a, min(a + chunk_size, end))) for a in range(sinks, end, chunk_size)]
    grid = [list(range(a, a + chunk_size)) for a in range(0, end, chunk_size)]
    chunks = [[i for i in chunk if sinks <= i < end] for chunk in grid]
    return [chunk for chunk in chunks if chunk]


def ref_chunk_select(scores: Sequence[float], budget: int, sinks: int, window: int,
                     chunk_size: int, from_zero: bool = False) -> list[int]:
    """ChunkKV selection: chunks ranked by ``(-mean, chunk index)``; whole chunks while the
    cumulative size fits ``budget - sinks - window``; the next-ranked chunk trimmed to its best
    tokens (ties to the earlier index) when tokens remain."""
    seq_len = len(scores)
    chunks = ref_chunks(seq_len, sinks, window, chunk_size, from_zero)
    means = [sum(scores[i] for i in ch) / len(ch) for ch in chunks]
    ranked = sorted(range(len(chunks)), key=lambda j: (-means[j], j))
    free = budget - sinks - window
    kept = ref_protected(seq_len, sinks, window)
    used = 0
    pos = 0
    while pos < len(ranked) and used + len(chunks[ranked[pos]]) <= free:
        kept.update(chunks[ranked[pos]])
        used += len(chunks[ranked[pos]])
        pos += 1
    remainder = free - used
    if remainder > 0:
        boundary = chunks[ranked[pos]]
        best = sorted(boundary, key=lambda i: (-scores[i], i))[:remainder]
        kept.update(best)
    return sorted(kept)


def ref_pyramid_schedule(mean_free: int, num_layers: int, max_free: int,
                         beta: float) -> list[int]:
    """Arithmetic sequence from ``max`` (layer 0) to ``min = m / beta`` (top), ``max + min = 2m``,
    shifted up so that ``max <= max_free`` while keeping ``max + min = 2m``; floored (exact
    rationals); the integer remainder goes to the lowest layers without exceeding ``max_free``."""
    if num_layers == 1:
        return [mean_free]
    m = Fraction(mean_free)
    low = m / Fraction(beta)
    high = 2 * m - low
    if high > max_free:
        high = Fraction(max_free)
        low = 2 * m - high
    exact = [high - (high - low) * i / (num_layers - 1) for i in range(num_layers)]
    assert sum(exact) == m * num_layers  # same total as the uniform budget
    budgets = [min(math.floor(v), max_free) for v in exact]
    remainder = mean_free * num_layers - sum(budgets)
    for i in range(num_layers):
        add = min(max_free - budgets[i], remainder)
        budgets[i] += add
        remainder -= add
    assert remainder == 0
    return budgets


# --------------------------------------------------------------------------------------------
# Invariant checks
# --------------------------------------------------------------------------------------------


def assert_valid_kept(kept: torch.Tensor, seq_len: int, budget: int, sinks: int,
                      window: int, heads: int | None = None) -> None:
    """Budget exact, int64, sorted ascending, unique, in range, sinks and window kept; a policy's
    ``[heads, budget]`` result is checked row by row."""
    assert kept.dtype == torch.int64
    if heads is not None:
        assert tuple(kept.shape) == (heads, budget)
        for row in kept:
            assert_valid_kept(row, seq_len, budget, sinks, window)
        return
    assert kept.dim() == 1
    assert kept.numel() == budget
    values = kept.tolist()
    assert all(a < b for a, b in itertools.pairwise(values)), "not strictly ascending"
    assert all(0 <= v < seq_len for v in values)
    assert ref_protected(seq_len, sinks, window) <= set(values)


def assert_whole_chunks(kept: torch.Tensor, seq_len: int, sinks: int, window: int,
                        chunk_size: int, from_zero: bool = False) -> None:
    """Every middle chunk is kept whole or dropped, except at most one trimmed chunk (per row)."""
    if kept.dim() == 2:
        for row in kept:
            assert_whole_chunks(row, seq_len, sinks, window, chunk_size, from_zero)
        return
    kept_set = set(kept.tolist())
    partial = 0
    for chunk in ref_chunks(seq_len, sinks, window, chunk_size, from_zero):
        n_kept = sum(i in kept_set for i in chunk)
        if 0 < n_kept < len(chunk):
            partial += 1
    assert partial <= 1


# --------------------------------------------------------------------------------------------
# window_attention_scores and pool_scores
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_window_attention_scores_match_reference(shape: Shape, seed: int) -> None:
    """Window scores equal the float64 per-query causal softmax summed over window and GQA group."""
    queries, keys = make_qk(shape, seed)
    got = window_attention_scores(queries, keys)
    assert got.dtype == torch.float32
    assert got.shape == (shape.num_kv_heads, shape.seq_len)
    torch.testing.assert_close(got.double(), ref_window_scores(queries, keys), rtol=RTOL,
                               atol=ATOL)
    # Each window query's softmax sums to one: per KV head the total is group * window.
    group = shape.num_q_heads // shape.num_kv_heads
    torch.testing.assert_close(got.double().sum(dim=1),
                               torch.full((shape.num_kv_heads,), float(group * shape.window),
                                          dtype=torch.float64), rtol=RTOL, atol=1e-4)


@pytest.mark.parametrize("scale", [0.05, 1.0])
def test_window_attention_scores_explicit_scale(scale: float) -> None:
    """An explicit softmax scale is used instead of 1/sqrt(head_dim)."""
    shape = SHAPES[2]
    queries, keys = make_qk(shape, 3)
    got = window_attention_scores(queries, keys, scale=scale)
    torch.testing.assert_close(got.double(), ref_window_scores(queries, keys, scale=scale),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("softcap", [2.0, 30.0])
def test_window_attention_scores_logit_softcap(softcap: float) -> None:
    """A layer's logit soft-cap c * tanh(s / c) is applied before the softmax (written out here
    with an explicit loop, in float64)."""
    shape = SHAPES[4]
    queries, keys = make_qk(shape, 5)
    scale = 0.3
    got = window_attention_scores(queries, keys, scale=scale, softcap=softcap)
    q, k = queries.double(), keys.double()
    group = shape.num_q_heads // shape.num_kv_heads
    want = torch.zeros(shape.num_kv_heads, shape.seq_len, dtype=torch.float64)
    for head in range(shape.num_q_heads):
        kv = head // group
        for i in range(shape.window):
            pos = shape.seq_len - shape.window + i
            logits = (k[kv, : pos + 1] @ q[head, i]) * scale
            logits = softcap * torch.tanh(logits / softcap)
            want[kv, : pos + 1] += torch.softmax(logits, dim=0)
    torch.testing.assert_close(got.double(), want, rtol=RTOL, atol=ATOL)
    assert not torch.allclose(got, window_attention_scores(queries, keys, scale=scale))


def test_window_attention_scores_causal_mask() -> None:
    """Window query i (position L - w + i) puts no weight on later keys."""
    shape = SHAPES[4]
    queries, keys = make_qk(shape, 0)
    got = window_attention_scores(queries, keys)
    # The last key is seen only by the last window query of each of the group's heads.
    group = shape.num_q_heads // shape.num_kv_heads
    ref = ref_window_scores(queries, keys)
    torch.testing.assert_close(got.double()[:, -1], ref[:, -1], rtol=RTOL, atol=ATOL)
    assert bool((got[:, -1] <= group + 1e-5).all())
    # The first key is seen by every window query of every head.
    assert bool((got[:, 0] > 0).all())


@pytest.mark.parametrize("kernel", [1, 3, 5, 9])
@pytest.mark.parametrize("seq_len", [1, 4, 37, 250])
def test_pool_scores_matches_reference(seq_len: int, kernel: int) -> None:
    """pool_scores is a zero-padded moving average (pad counted), on 1-D and batched inputs."""
    gen = torch.Generator().manual_seed(seq_len * 31 + kernel)
    batch = torch.rand(3, seq_len, generator=gen, dtype=torch.float32)
    got = pool_scores(batch, kernel)
    assert got.shape == batch.shape
    for row in range(3):
        ref = torch.tensor(ref_pool(batch[row].double().tolist(), kernel), dtype=torch.float64)
        torch.testing.assert_close(got[row].double(), ref, rtol=RTOL, atol=ATOL)
    got_1d = pool_scores(batch[0], kernel)
    assert got_1d.shape == (seq_len,)
    torch.testing.assert_close(got_1d, got[0])


@pytest.mark.parametrize("kernel", [0, 2, 4, -1])
def test_pool_scores_rejects_even_or_nonpositive_kernel(kernel: int) -> None:
    """Only positive odd kernels are accepted."""
    with pytest.raises(ValueError, match="odd"):
        pool_scores(torch.zeros(10), kernel)


# --------------------------------------------------------------------------------------------
# select
# --------------------------------------------------------------------------------------------

SELECT_CASES = [
    # (seq_len, sinks, window, budget)
    (37, 4, 8, 12), (37, 4, 8, 20), (37, 4, 8, 37), (101, 0, 1, 1), (101, 0, 1, 50),
    (101, 4, 16, 21), (250, 4, 32, 36), (250, 4, 32, 100), (250, 4, 32, 249), (250, 4, 32, 250),
    (37, 0, 0, 5), (37, 37, 0, 37),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", SELECT_CASES, ids=[str(c) for c in SELECT_CASES])
def test_select_matches_reference(case: tuple[int, int, int, int], seed: int) -> None:
    """select keeps sinks, window and the top-(budget - protected) others, like sorted()."""
    seq_len, sinks, window, budget = case
    scores = random_scores(seq_len, seed)
    kept = select(scores, budget, sinks, window)
    assert_valid_kept(kept, seq_len, budget, sinks, window)
    assert kept.tolist() == ref_select(scores.double().tolist(), budget, sinks, window)


@pytest.mark.parametrize("seed", SEEDS)
def test_select_ties_go_to_earlier_index(seed: int) -> None:
    """With many exact ties, the earlier token wins (deterministic, kernel-reproducible)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (101,), generator=gen).float()
    for budget in (10, 33, 57, 90):
        kept = select(scores, budget, 4, 5)
        assert kept.tolist() == ref_select(scores.tolist(), budget, 4, 5)


def test_select_ignores_protected_scores() -> None:
    """Huge scores on sinks/window do not steal budget from the middle."""
    scores = torch.arange(20, dtype=torch.float32)
    scores[:2] = 1e9
    scores[-3:] = 1e9
    kept = select(scores, 8, 2, 3).tolist()
    assert kept == [0, 1, 14, 15, 16, 17, 18, 19]


def test_select_rejects_bad_inputs() -> None:
    """select rejects 2-D scores and budgets outside [protected, L]."""
    with pytest.raises(ValueError, match="1-D"):
        select(torch.zeros(2, 10), 5, 1, 1)
    with pytest.raises(ValueError, match="budget"):
        select(torch.zeros(10), 3, 2, 2)
    with pytest.raises(ValueError, match="budget"):
        select(torch.zeros(10), 11, 2, 2)


# --------------------------------------------------------------------------------------------
# LayerObservation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seq_len", "budget", "sinks", "window"), [
    (37, 11, 4, 8),   # budget < sinks + window
    (37, 38, 4, 8),   # budget > L
    (10, 10, 6, 5),   # sinks + window > L
])
def test_layer_observation_rejects_bad_budget(seq_len: int, budget: int, sinks: int,
                                              window: int) -> None:
    """LayerObservation requires sinks + window <= budget <= L."""
    with pytest.raises(ValueError, match="budget"):
        LayerObservation(seq_len=seq_len, budget=budget, sink_tokens=sinks, window=window)


def test_layer_observation_rejects_bad_layer_and_missing_qk() -> None:
    """layer_idx must lie in [0, num_layers); scorers need queries and keys."""
    with pytest.raises(ValueError, match="layer_idx"):
        LayerObservation(seq_len=10, budget=5, sink_tokens=1, window=1, layer_idx=2,
                         num_layers=2)
    obs = LayerObservation(seq_len=10, budget=5, sink_tokens=1, window=1)
    with pytest.raises(ValueError, match="window_attention"):
        SnapKV().score(obs)
    with pytest.raises(ValueError, match="num_kv_heads"):
        LayerObservation(seq_len=10, budget=5, sink_tokens=1, window=1, num_kv_heads=0)
    # The boundary values are accepted.
    LayerObservation(seq_len=10, budget=10, sink_tokens=2, window=3)
    LayerObservation(seq_len=10, budget=5, sink_tokens=2, window=3)


# --------------------------------------------------------------------------------------------
# StreamingLLM
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_streamingllm_keeps_sinks_and_most_recent(shape: Shape) -> None:
    """StreamingLLM keeps [0, s) and the last budget - s tokens, with or without q/k."""
    expected = [*range(shape.sinks),
                *range(shape.seq_len - (shape.budget - shape.sinks), shape.seq_len)]
    bare = LayerObservation(seq_len=shape.seq_len, budget=shape.budget,
                            sink_tokens=shape.sinks, window=shape.window,
                            num_kv_heads=shape.num_kv_heads)
    for mode in ("shared", "per_head"):
        policy = TopK(StreamingLLM(), head_select=mode)
        assert policy.inputs == frozenset()
        for obs in (bare, make_obs(shape, 0)):
            kept = policy.keep_indices(obs)
            assert_valid_kept(kept, shape.seq_len, shape.budget, shape.sinks, shape.window,
                              heads=shape.num_kv_heads)
            assert kept.tolist() == [expected] * shape.num_kv_heads
    assert policy.selection_layer(7) == 0
    assert policy.layer_budget(shape.budget, 3, 8, shape.seq_len, shape.sinks + shape.window) \
        == shape.budget


# --------------------------------------------------------------------------------------------
# SnapKV
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", [1, 5])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_snapkv_matches_reference(shape: Shape, seed: int, kernel: int) -> None:
    """SnapKV scores = pooled window scores summed over heads; kept = reference top-k."""
    obs = make_obs(shape, seed)
    ref_heads = ref_snapkv_head_scores(obs.queries, obs.keys, shape.window, kernel)
    got = SnapKV(pool_kernel=kernel).score(obs)
    assert got.dtype == torch.float32 and tuple(got.shape) == (shape.num_kv_heads, shape.seq_len)
    torch.testing.assert_close(got.double(), torch.tensor(ref_heads, dtype=torch.float64),
                               rtol=RTOL, atol=ATOL)
    # shared: one token set from the scores summed over KV heads
    ref_scores = ref_snapkv_scores(obs.queries, obs.keys, shape.window, kernel)
    kept = TopK(SnapKV(pool_kernel=kernel)).keep_indices(obs)
    assert_valid_kept(kept, shape.seq_len, shape.budget, shape.sinks, shape.window,
                      heads=shape.num_kv_heads)
    want = ref_select(ref_scores, shape.budget, shape.sinks, shape.window)
    assert kept.tolist() == [want] * shape.num_kv_heads
    # per_head: each KV head its own top tokens, same count
    kept = TopK(SnapKV(pool_kernel=kernel), head_select="per_head").keep_indices(obs)
    assert_valid_kept(kept, shape.seq_len, shape.budget, shape.sinks, shape.window,
                      heads=shape.num_kv_heads)
    assert kept.tolist() == [ref_select(head, shape.budget, shape.sinks, shape.window)
                             for head in ref_heads]


def test_snapkv_uses_only_last_window_queries() -> None:
    """Extra leading queries beyond the window are ignored by SnapKV.score."""
    shape = SHAPES[3]
    queries, keys = make_qk(shape, 0, extra_queries=7)
    obs = LayerObservation(seq_len=shape.seq_len, budget=shape.budget, sink_tokens=shape.sinks,
                           window=shape.window, num_kv_heads=shape.num_kv_heads,
                           queries=queries, keys=keys)
    ref = ref_snapkv_head_scores(queries, keys, shape.window, 5)
    torch.testing.assert_close(SnapKV().score(obs).double(),
                               torch.tensor(ref, dtype=torch.float64), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kernel", [0, 2, 6, -3])
def test_snapkv_rejects_even_pool_kernel(kernel: int) -> None:
    """SnapKV's pool kernel must be a positive odd integer."""
    with pytest.raises(ValueError, match="pool_kernel"):
        SnapKV(pool_kernel=kernel)


# --------------------------------------------------------------------------------------------
# ChunkKV
# --------------------------------------------------------------------------------------------

CHUNK_SIZES = [1, 7, 10]


@pytest.mark.parametrize("grid", ["after_sinks", "from_zero"])
@pytest.mark.parametrize("mode", ["shared", "per_head"])
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_chunkkv_matches_reference(shape: Shape, seed: int, chunk_size: int, mode: str,
                                   grid: str) -> None:
    """ChunkKV(SnapKV) keeps exactly the reference chunk selection on reference scores: on the
    head-summed scores (shared) or on each head's own (per_head), on either chunk grid."""
    obs = make_obs(shape, seed)
    policy = ChunkKV(scorer=SnapKV(pool_kernel=5), chunk_size=chunk_size, head_select=mode,
                     chunk_grid=grid)
    from_zero = grid == "from_zero"
    if mode == "shared":
        rows = [ref_snapkv_scores(obs.queries, obs.keys, shape.window, 5)] * shape.num_kv_heads
    else:
        rows = ref_snapkv_head_scores(obs.queries, obs.keys, shape.window, 5)
    kept = policy.keep_indices(obs)
    assert_valid_kept(kept, shape.seq_len, shape.budget, shape.sinks, shape.window,
                      heads=shape.num_kv_heads)
    assert_whole_chunks(kept, shape.seq_len, shape.sinks, shape.window, chunk_size, from_zero)
    assert kept.tolist() == [ref_chunk_select(row, shape.budget, shape.sinks, shape.window,
                                              chunk_size, from_zero) for row in rows]


CHUNK_SELECT_CASES = [
    # (seq_len, sinks, window, budget, chunk_size)
    (37, 4, 8, 12, 10), (37, 4, 8, 20, 10), (37, 4, 8, 37, 10), (37, 4, 8, 30, 4),
    (101, 0, 1, 50, 7), (101, 4, 16, 47, 3), (101, 4, 16, 47, 1), (101, 4, 16, 60, 200),
    (250, 4, 32, 100, 10), (250, 4, 32, 133, 16), (250, 4, 32, 249, 20), (250, 3, 5, 10, 64),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", CHUNK_SELECT_CASES, ids=[str(c) for c in CHUNK_SELECT_CASES])
def test_chunk_select_matches_reference(case: tuple[int, int, int, int, int], seed: int) -> None:
    """chunk_select on random scores equals the pure-Python chunk reference."""
    seq_len, sinks, window, budget, chunk_size = case
    scores = random_scores(seq_len, seed)
    kept = chunk_select(scores, budget, sinks, window, chunk_size)
    assert_valid_kept(kept, seq_len, budget, sinks, window)
    assert_whole_chunks(kept, seq_len, sinks, window, chunk_size)
    assert kept.tolist() == ref_chunk_select(scores.double().tolist(), budget, sinks, window,
                                             chunk_size)
    kept = chunk_select(scores, budget, sinks, window, chunk_size, origin=0)
    assert_valid_kept(kept, seq_len, budget, sinks, window)
    assert_whole_chunks(kept, seq_len, sinks, window, chunk_size, from_zero=True)
    assert kept.tolist() == ref_chunk_select(scores.double().tolist(), budget, sinks, window,
                                             chunk_size, from_zero=True)


@pytest.mark.parametrize("seed", SEEDS)
def test_chunk_select_ties(seed: int) -> None:
    """Tied chunk means rank by chunk index; tied tokens in the trimmed chunk go to the earlier."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (83,), generator=gen).float()
    for budget, chunk_size in itertools.product((9, 20, 41, 70), (1, 3, 5, 10)):
        kept = chunk_select(scores, budget, 2, 6, chunk_size)
        assert kept.tolist() == ref_chunk_select(scores.tolist(), budget, 2, 6, chunk_size)
    # All-equal scores: the earliest chunks win, then the earliest tokens of the next one.
    flat = torch.ones(40)
    kept = chunk_select(flat, 2 + 3 + 12, 2, 3, 5).tolist()
    assert kept == [0, 1, *range(2, 14), 37, 38, 39]


def test_chunk_select_last_partial_chunk_is_a_chunk() -> None:
    """The short last chunk of the middle is ranked by its own mean and kept whole."""
    # Middle [1, 24) with chunk 10: chunks [1,11), [11,21), [21,24); the short one scores best.
    scores = torch.zeros(26)
    scores[21:24] = 5.0
    kept = chunk_select(scores, 1 + 2 + 3, 1, 2, 10).tolist()
    assert kept == [0, 21, 22, 23, 24, 25]


def test_chunk_grid_from_zero_splits_at_multiples_of_the_chunk_size() -> None:
    """With 4 sinks and chunks of 10, the zero grid's first chunk is [4, 10) (6 tokens) and the
    next [10, 20); the sinks grid's are [4, 14) and [14, 24). A 6-token best region [4, 10) is
    kept whole on the zero grid and exactly fills a budget of 6 free tokens."""
    scores = torch.zeros(40)
    scores[4:10] = 1.0
    zero = chunk_select(scores, 4 + 2 + 6, 4, 2, 10, origin=0).tolist()
    assert zero == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 38, 39]
    sinks = chunk_select(scores, 4 + 2 + 6, 4, 2, 10).tolist()
    assert sinks == zero  # trimmed best chunk [4, 14) gives the same 6 best tokens here
    scores[10:14] = 0.9  # now [4,14) is the best sinks-grid chunk but does not fit whole
    assert chunk_select(scores, 4 + 2 + 10, 4, 2, 10).tolist() == [*range(14), 38, 39]
    assert chunk_select(scores, 4 + 2 + 10, 4, 2, 10, origin=0).tolist() == [
        *range(10), 10, 11, 12, 13, 38, 39]


@pytest.mark.parametrize("reuse", [1, 2, 3, 4, 8])
def test_chunkkv_selection_layer_reuse_groups(reuse: int) -> None:
    """Layers are grouped reuse_layers at a time; each maps to the first layer of its group."""
    policy = ChunkKV(reuse_layers=reuse)
    groups = [list(range(a, min(a + reuse, 32))) for a in range(0, 32, reuse)]
    for group in groups:
        for layer in group:
            assert policy.selection_layer(layer) == group[0]
    assert policy.layer_budget(50, 5, 32, 100, 10) == 50


@pytest.mark.parametrize(("chunk_size", "reuse"), [(0, 1), (-1, 1), (10, 0)])
def test_chunkkv_rejects_bad_parameters(chunk_size: int, reuse: int) -> None:
    """ChunkKV rejects chunk_size < 1 and reuse_layers < 1."""
    with pytest.raises(ValueError, match="chunk_size" if chunk_size < 1 else "reuse_layers"):
        ChunkKV(chunk_size=chunk_size, reuse_layers=reuse)


def test_selectors_reject_bad_mode_and_grid() -> None:
    with pytest.raises(ValueError, match="head_select"):
        ChunkKV(head_select="per_token")
    with pytest.raises(ValueError, match="head_select"):
        TopK(SnapKV(), head_select="")
    with pytest.raises(ValueError, match="head_select"):
        PyramidKV(head_select="heads")
    with pytest.raises(ValueError, match="chunk_grid"):
        ChunkKV(chunk_grid="sentences")

# --------------------------------------------------------------------------------------------
# PyramidKV
# --------------------------------------------------------------------------------------------

SCHEDULE_CASES = [
    # (mean_free, num_layers, max_free, beta)
    (0, 8, 10, 20.0), (10, 1, 10, 20.0), (10, 2, 100, 20.0), (17, 5, 200, 20.0),
    (100, 32, 1000, 20.0), (100, 32, 150, 20.0), (100, 32, 100, 20.0), (37, 7, 40, 3.0),
    (5, 32, 9, 1.0), (64, 28, 500, 2.5), (3, 32, 1000, 20.0),
]


@pytest.mark.parametrize("case", SCHEDULE_CASES, ids=[str(c) for c in SCHEDULE_CASES])
def test_pyramid_schedule_matches_reference(case: tuple[int, int, int, float]) -> None:
    """pyramid_schedule equals the floored exact arithmetic sequence of the docstring."""
    mean_free, num_layers, max_free, beta = case
    got = pyramid_schedule(mean_free, num_layers, max_free, beta)
    assert got == ref_pyramid_schedule(mean_free, num_layers, max_free, beta)


def test_pyramid_schedule_invariants_grid() -> None:
    """Over a grid: non-increasing, in [0, max_free], exact total, equal to the reference."""
    for mean_free, extra, num_layers, beta in itertools.product(
            range(0, 41, 3), (0, 1, 5, 37), (1, 2, 3, 5, 8, 32), (1.0, 2.0, 3.5, 20.0)):
        max_free = mean_free + extra
        got = pyramid_schedule(mean_free, num_layers, max_free, beta)
        assert len(got) == num_layers
        assert all(isinstance(v, int) for v in got)
        assert all(a >= b for a, b in itertools.pairwise(got)), got
        assert all(0 <= v <= max_free for v in got), got
        assert sum(got) == mean_free * num_layers
        assert got == ref_pyramid_schedule(mean_free, num_layers, max_free, beta), (
            mean_free, num_layers, max_free, beta)


def test_pyramid_schedule_rejects_bad_mean() -> None:
    """mean_free must lie in [0, max_free]."""
    with pytest.raises(ValueError, match="mean_free"):
        pyramid_schedule(11, 4, 10, 20.0)
    with pytest.raises(ValueError, match="mean_free"):
        pyramid_schedule(-1, 4, 10, 20.0)


def test_pyramidkv_rejects_small_beta() -> None:
    """beta < 1 would make the top layer larger than the mean."""
    with pytest.raises(ValueError, match="beta"):
        PyramidKV(beta=0.5)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_pyramidkv_matches_reference(shape: Shape, seed: int) -> None:
    """Per-layer budgets follow the reference schedule; each layer keeps the reference top-k."""
    num_layers = 6
    protected = shape.sinks + shape.window
    policy = PyramidKV(scorer=SnapKV(pool_kernel=5), beta=4.0)
    schedule = ref_pyramid_schedule(shape.budget - protected, num_layers,
                                    shape.seq_len - protected, 4.0)
    queries, keys = make_qk(shape, seed)
    ref_scores = ref_snapkv_scores(queries, keys, shape.window, 5)
    ref_heads = ref_snapkv_head_scores(queries, keys, shape.window, 5)
    per_head = PyramidKV(scorer=SnapKV(pool_kernel=5), beta=4.0, head_select="per_head")
    budgets = []
    for layer in range(num_layers):
        budget = policy.layer_budget(shape.budget, layer, num_layers, shape.seq_len, protected)
        assert budget == protected + schedule[layer]
        assert protected <= budget <= shape.seq_len
        budgets.append(budget)
        obs = LayerObservation(seq_len=shape.seq_len, budget=budget, sink_tokens=shape.sinks,
                               window=shape.window, layer_idx=layer, num_layers=num_layers,
                               num_kv_heads=shape.num_kv_heads, queries=queries, keys=keys)
        kept = policy.keep_indices(obs)
        assert_valid_kept(kept, shape.seq_len, budget, shape.sinks, shape.window,
                          heads=shape.num_kv_heads)
        want = ref_select(ref_scores, budget, shape.sinks, shape.window)
        assert kept.tolist() == [want] * shape.num_kv_heads
        assert per_head.keep_indices(obs).tolist() == [
            ref_select(head, budget, shape.sinks, shape.window) for head in ref_heads]
        assert policy.selection_layer(layer) == layer
    assert sum(budgets) == shape.budget * num_layers
    assert all(a >= b for a, b in itertools.pairwise(budgets))


# --------------------------------------------------------------------------------------------
# Invariants shared by every policy
# --------------------------------------------------------------------------------------------

POLICIES: list[tuple[str, KVPolicy]] = [
    ("streamingllm", TopK(StreamingLLM())),
    ("snapkv-k5", TopK(SnapKV())),
    ("snapkv-k1-per-head", TopK(SnapKV(pool_kernel=1), head_select="per_head")),
    ("chunkkv-c10", ChunkKV()),
    ("chunkkv-c3-k1", ChunkKV(scorer=SnapKV(pool_kernel=1), chunk_size=3, reuse_layers=2)),
    ("chunkkv-c7-per-head-zero", ChunkKV(chunk_size=7, head_select="per_head",
                                         chunk_grid="from_zero")),
    ("chunkkv-streaming", ChunkKV(scorer=StreamingLLM(), chunk_size=4)),
    ("pyramidkv", PyramidKV()),
    ("pyramidkv-per-head", PyramidKV(head_select="per_head")),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("named", POLICIES, ids=[n for n, _ in POLICIES])
def test_policy_invariants(named: tuple[str, KVPolicy], shape: Shape, seed: int) -> None:
    """Every policy, every layer: exact budget, sorted unique int64 in range, sinks+window kept."""
    name, policy = named
    assert isinstance(policy, KVPolicy)
    num_layers = 3
    protected = shape.sinks + shape.window
    for layer in range(num_layers):
        budget = policy.layer_budget(shape.budget, layer, num_layers, shape.seq_len, protected)
        obs = make_obs(shape, seed, budget=budget, layer_idx=layer, num_layers=num_layers)
        kept = policy.keep_indices(obs)
        assert_valid_kept(kept, shape.seq_len, budget, shape.sinks, shape.window,
                          heads=shape.num_kv_heads)
        if budget == shape.seq_len:
            assert kept.tolist() == [list(range(shape.seq_len))] * shape.num_kv_heads
        if isinstance(policy, ChunkKV):
            assert_whole_chunks(kept, shape.seq_len, shape.sinks, shape.window,
                                policy.chunk_size, policy.chunk_grid == "from_zero")
        if getattr(policy, "head_select", "shared") == "shared":
            assert all(torch.equal(row, kept[0]) for row in kept)
        if isinstance(getattr(policy, "scorer", None), StreamingLLM) and \
                isinstance(policy, TopK):
            assert kept[0].tolist()[shape.sinks:] == list(
                range(shape.seq_len - (budget - shape.sinks), shape.seq_len))
        # Deterministic: the same observation gives the same answer.
        assert torch.equal(kept, policy.keep_indices(obs)), name


@pytest.mark.parametrize("named", POLICIES, ids=[n for n, _ in POLICIES])
def test_budget_equal_to_prompt_keeps_everything(named: tuple[str, KVPolicy]) -> None:
    """budget == L keeps every token for every policy (PyramidKV: every layer)."""
    _, policy = named
    shape = SHAPES[6]
    for layer in range(4):
        budget = policy.layer_budget(shape.seq_len, layer, 4, shape.seq_len,
                                     shape.sinks + shape.window)
        assert budget == shape.seq_len
        kept = policy.keep_indices(make_obs(shape, 0, budget=budget, layer_idx=layer,
                                            num_layers=4))
        assert kept.tolist() == [list(range(shape.seq_len))] * shape.num_kv_heads


def test_window_attention_scores_rejects_bad_shapes() -> None:
    """GQA needs num_q_heads % num_kv_heads == 0; head_dim must match; window <= L; 3-D only."""
    with pytest.raises(ValueError, match="multiple"):
        window_attention_scores(torch.randn(5, 4, 16), torch.randn(2, 20, 16))
    with pytest.raises(ValueError, match="head_dim"):
        window_attention_scores(torch.randn(4, 4, 16), torch.randn(2, 20, 8))
    with pytest.raises(ValueError, match="window"):
        window_attention_scores(torch.randn(4, 21, 16), torch.randn(2, 20, 16))
    with pytest.raises(ValueError, match="3-D"):
        window_attention_scores(torch.randn(4, 16), torch.randn(2, 20, 16))


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@pytest.fixture
def clean_registry() -> Iterator[None]:
    """Removes (or restores) whatever a test registers in the private ``_REGISTRY``."""
    before = dict(registry_module._REGISTRY)
    yield
    for name in list(registry_module._REGISTRY):
        if name not in before:
            del registry_module._REGISTRY[name]
    registry_module._REGISTRY.update(before)


def _dummy_info(name: str, summary: str = "keeps everything") -> PolicyInfo:
    return PolicyInfo(name=name, build=_build_dummy, paper="https://example.invalid",
                      summary=summary)


def _build_dummy(spec: CompressionSpec) -> KVPolicy:
    return TopK(StreamingLLM())


def test_policy_names_lists_none_first_and_builtins() -> None:
    """policy_names() starts with "none" and contains the four built-in policies."""
    names = policy_names()
    assert names[0] == "none"
    assert set(BUILTIN) <= set(names)
    assert names.count("none") == 1


def test_get_policy_info_unknown_name_lists_allowed() -> None:
    """An unknown name raises KeyError whose message lists every valid name."""
    with pytest.raises(KeyError) as excinfo:
        get_policy_info("no-such-policy")
    message = excinfo.value.args[0]
    assert "no-such-policy" in message
    for name in ("none", *BUILTIN):
        assert name in message


def test_get_policy_info_builtins_describe_parameters() -> None:
    """Built-in infos name the spec fields they read."""
    assert "pool_kernel" in {p.name for p in get_policy_info("snapkv").parameters}
    assert {"chunk_size", "reuse_layers", "pool_kernel", "chunk_grid"} <= {
        p.name for p in get_policy_info("chunkkv").parameters}
    assert get_policy_info("pyramidkv").name == "pyramidkv"
    assert get_policy_info("streamingllm").paper.startswith("https://")


@pytest.mark.usefixtures("clean_registry")
def test_register_policy_idempotent_and_conflicts() -> None:
    """Same object twice is a no-op; a different object under the name is refused (unless
    replace=True); the name "none" is reserved."""
    info = _dummy_info("test-dummy")
    register_policy(info)
    register_policy(info)
    assert get_policy_info("test-dummy") is info
    assert policy_names().count("test-dummy") == 1
    other = _dummy_info("test-dummy", summary="something else")
    with pytest.raises(ValueError, match="already registered"):
        register_policy(other)
    assert get_policy_info("test-dummy") is info
    register_policy(other, replace=True)
    assert get_policy_info("test-dummy") is other
    with pytest.raises(ValueError, match="reserved"):
        register_policy(_dummy_info("none"))
    with pytest.raises(ValueError, match="already registered"):
        register_policy(_dummy_info("snapkv"))


@pytest.mark.usefixtures("clean_registry")
def test_registered_policy_is_buildable_from_spec() -> None:
    """A newly registered policy becomes a valid spec value and build_policy calls its factory."""
    register_policy(_dummy_info("test-custom"))
    assert "test-custom" in policy_names()
    policy = build_policy(CompressionSpec(policy="test-custom"))
    assert policy == TopK(StreamingLLM())


def test_clean_registry_fixture_removed_test_entries() -> None:
    """The fixture left no test policy behind."""
    assert "test-dummy" not in policy_names()
    assert "test-custom" not in policy_names()
    assert get_policy_info("snapkv").summary.startswith("top tokens")


def test_build_policy_uses_spec_parameters() -> None:
    """build_policy returns the right type with the spec's pool_kernel/chunk_size/reuse_layers."""
    assert build_policy(CompressionSpec()) is None
    assert build_policy(CompressionSpec(policy="none")) is None
    assert build_policy(CompressionSpec(policy="streamingllm")) == TopK(StreamingLLM())

    snap = build_policy(CompressionSpec(policy="snapkv", pool_kernel=7))
    assert snap == TopK(SnapKV(pool_kernel=7))
    per_head = build_policy(CompressionSpec(policy="snapkv", head_select="per_head"))
    assert per_head == TopK(SnapKV(), head_select="per_head")

    chunk = build_policy(CompressionSpec(policy="chunkkv", pool_kernel=3, chunk_size=13,
                                         reuse_layers=4))
    assert isinstance(chunk, ChunkKV)
    assert (chunk.chunk_size, chunk.reuse_layers) == (13, 4)
    assert chunk.scorer == SnapKV(pool_kernel=3)
    assert chunk.selection_layer(6) == 4

    pyramid = build_policy(CompressionSpec(policy="pyramidkv", pool_kernel=9, beta=3.0))
    assert pyramid == PyramidKV(scorer=SnapKV(pool_kernel=9), beta=3.0)

    defaults = build_policy(CompressionSpec(policy="chunkkv"))
    assert isinstance(defaults, ChunkKV)
    # 20, not the paper's 10: measured on Qwen2.5 (docs/ARCHITECTURE.md, "Defaults").
    assert (defaults.chunk_size, defaults.reuse_layers) == (20, 1)
    assert defaults.scorer == SnapKV(pool_kernel=5)


# --------------------------------------------------------------------------------------------
# Declared parameters (policy-owned settings)
# --------------------------------------------------------------------------------------------

TEMPERATURE = Param("temperature", float, 1.0, "Test scorer: softmax temperature.", minimum=0,
                    exclusive_minimum=True)


def test_builtin_parameters_are_declared_once_and_generate_names() -> None:
    params = all_params()
    assert list(params)[:7] == ["policy", "ratio", "budget", "window", "sink_tokens",
                                "min_prompt_len", "head_select"]
    assert {"pool_kernel", "chunk_size", "reuse_layers", "chunk_grid", "beta"} <= set(params)
    assert params["chunk_size"].flag == "--kv-chunk-size"
    assert params["chunk_size"].request_key == "kv_chunk_size"
    assert params["pool_kernel"].allowed() == "an odd integer >= 1"
    assert params["ratio"].allowed() == "a number with 0 < ratio <= 1"
    assert params["head_select"].allowed() == "one of shared, per_head"


@pytest.mark.usefixtures("clean_registry")
def test_third_party_policy_owns_its_parameters() -> None:
    """A registered policy's own Param becomes a spec field with its default, a kv_* key with
    validation naming the key, and reaches the policy's build."""
    from vllm_kvcompress.config import CompressionConfigError, cli_names, resolve_request

    seen = []

    def build(spec: CompressionSpec) -> KVPolicy:
        seen.append(spec.temperature)
        return TopK(StreamingLLM())

    register_policy(PolicyInfo(name="test-params", build=build, paper="-", summary="-",
                               parameters=(TEMPERATURE,)))
    assert cli_names()["temperature"] == "--kv-temperature"
    spec = resolve_request(CompressionSpec(policy="test-params"), {"kv_temperature": 0.5})
    assert spec.temperature == 0.5
    assert CompressionSpec(policy="test-params").temperature == 1.0
    build_policy(spec)
    assert seen == [0.5]
    with pytest.raises(CompressionConfigError) as info:
        resolve_request(spec, {"kv_temperature": 0})
    assert str(info.value) == "kv_temperature: must be a number > 0 (got 0)"
    # A clashing declaration of an existing name is refused at registration.
    clash = Param("chunk_size", int, 5, "another meaning", minimum=2)
    with pytest.raises(ValueError, match="declared differently"):
        register_policy(PolicyInfo(name="test-clash", build=build, paper="-", summary="-",
                                   parameters=(clash,)))
    # Sharing an identical declaration is fine (pool_kernel is shared by three policies).
    register_policy(PolicyInfo(name="test-share", build=build, paper="-", summary="-",
                               parameters=(all_params()["pool_kernel"],)))
