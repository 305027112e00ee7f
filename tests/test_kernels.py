"""Triton kernels against their torch references, on fresh random data each run.

On CPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest.py
before any kernel module is imported), so shapes stay small; on a GPU the same tests run compiled.
Covered: odd shapes, GQA 1/4/8, partial last blocks, non-contiguous block ids, large block ids
(int64 slot arithmetic), bf16/fp16/fp32. Kept-index kernels must match exactly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from vllm_kvcompress.kernels.chunk_select import (
    chunk_means_triton,
    chunk_select_triton,
    stable_descending_order,
)
from vllm_kvcompress.kernels.compaction import compact_paged
from vllm_kvcompress.kernels.window_scores import paged_window_scores

from vllm_kvcompress.engine.cpu_paged_cache import row_slots
from vllm_kvcompress.engine.flash_paged_cache import FlashLayoutCache
from vllm_kvcompress.policies import chunk_means, chunk_select, window_attention_scores

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO = Path(__file__).resolve().parents[1]
#: Scores are sums of softmax weights computed in fp32 in a different order than the reference.
SCORE_TOL = {"rtol": 2e-4, "atol": 1e-6}


def fresh_generator() -> torch.Generator:
    """A generator seeded from the OS: different data every run (the seed is printed on failure)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def random_row(gen: torch.Generator, num_blocks: int, n_blocks: int) -> torch.Tensor:
    return (torch.randperm(num_blocks - 1, generator=gen)[:n_blocks] + 1).to(torch.int64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("q_heads", "kv_heads", "head_dim", "block_size", "seq_len", "window"), [
    (4, 4, 32, 16, 53, 7),      # GQA 1, partial last block, window < tile
    (8, 2, 64, 16, 77, 20),     # GQA 4
    (8, 1, 48, 32, 90, 33),     # GQA 8, head_dim not a power of two
])
def test_window_scores_match_reference(dtype: torch.dtype, q_heads: int, kv_heads: int,
                                       head_dim: int, block_size: int, seq_len: int,
                                       window: int) -> None:
    gen = fresh_generator()
    num_blocks = 64
    cache = torch.randn(num_blocks, kv_heads, block_size, 2 * head_dim, generator=gen).to(dtype)
    row = random_row(gen, num_blocks, -(-seq_len // block_size))
    queries = torch.randn(q_heads, window, head_dim, generator=gen).to(dtype)
    keys, _ = FlashLayoutCache().read(cache, row, seq_len)
    want = window_attention_scores(queries.float(), keys.float())
    got = paged_window_scores(queries.to(DEVICE), cache.to(DEVICE), row.to(DEVICE), seq_len)
    torch.testing.assert_close(got.cpu(), want, **SCORE_TOL)
    # Every window query's weights sum to 1: the total mass is q_heads * window.
    assert abs(float(got.sum()) - q_heads * window) < 1e-3 * q_heads * window


def test_window_scores_on_the_cpu_attn_vec_layout() -> None:
    """The same kernel reads CPU_ATTN's `vec` layout (K column-major per block and head)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from vllm_kvcompress.engine.cpu_paged_cache import CpuAttnCache

    gen = fresh_generator()
    heads, head_dim, block_size, seq_len, window = 2, 32, 32, 70, 9
    isa = _get_attn_isa(torch.float32, block_size, head_dim)
    if isa != "vec":
        pytest.skip(f"this CPU's attention ISA is {isa!r}, not 'vec'")
    cache = torch.zeros(8, heads, block_size, 2 * head_dim)
    row = random_row(gen, 8, 3)
    keys = torch.randn(heads, seq_len, head_dim, generator=gen)
    CpuAttnCache(isa).write(cache, keys, keys, row_slots(row, seq_len, block_size))
    queries = torch.randn(4, window, head_dim, generator=gen)
    got = paged_window_scores(queries, cache, row, seq_len, layout="cpu_vec")
    torch.testing.assert_close(got, window_attention_scores(queries, keys), **SCORE_TOL)


def test_window_scores_reject_bad_input() -> None:
    cache = torch.zeros(4, 2, 16, 64)
    row = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="not a multiple"):
        paged_window_scores(torch.zeros(3, 4, 32), cache, row, 20)
    with pytest.raises(ValueError, match="2 \\* head_dim"):
        paged_window_scores(torch.zeros(2, 4, 16), cache, row, 20)
    with pytest.raises(ValueError, match="hold < 40"):
        paged_window_scores(torch.zeros(2, 4, 32), cache, row, 40)
    with pytest.raises(ValueError, match="int32/int64"):
        paged_window_scores(torch.zeros(2, 4, 32), cache, row.float(), 20)
    with pytest.raises(ValueError, match="layout"):
        paged_window_scores(torch.zeros(2, 4, 32), cache, row, 20, layout="amx")


@pytest.mark.parametrize(("n", "chunk"), [(1, 10), (37, 10), (200, 7), (513, 20), (64, 1)])
def test_chunk_means_bit_identical(n: int, chunk: int) -> None:
    gen = fresh_generator()
    scores = torch.rand(n, generator=gen) ** 3  # wide dynamic range
    want_means, want_sizes = chunk_means(scores, chunk)
    got_means, got_sizes = chunk_means_triton(scores.to(DEVICE), chunk)
    assert torch.equal(got_means.cpu(), want_means) and torch.equal(got_sizes.cpu(), want_sizes)


@pytest.mark.parametrize("n", [1, 5, 130, 700])
def test_rank_equals_stable_argsort_with_ties(n: int) -> None:
    gen = fresh_generator()
    values = torch.randint(0, 6, (n,), generator=gen).float()  # many exact ties
    want = torch.argsort(values, descending=True, stable=True)
    assert torch.equal(stable_descending_order(values.to(DEVICE)).cpu(), want)
    values = torch.randn(n, generator=gen)
    want = torch.argsort(values, descending=True, stable=True)
    assert torch.equal(stable_descending_order(values.to(DEVICE)).cpu(), want)


@pytest.mark.parametrize(("seq_len", "budget", "sinks", "window", "chunk"), [
    (300, 75, 4, 32, 10), (101, 40, 0, 8, 7), (257, 36, 4, 32, 10), (500, 499, 4, 16, 20),
    (64, 64, 4, 8, 10),
])
def test_chunk_select_kernel_matches_exactly(seq_len: int, budget: int, sinks: int, window: int,
                                             chunk: int) -> None:
    gen = fresh_generator()
    for scores in (torch.rand(seq_len, generator=gen),
                   torch.randint(0, 4, (seq_len,), generator=gen).float()):  # ties
        want = chunk_select(scores, budget, sinks, window, chunk)
        got = chunk_select_triton(scores.to(DEVICE), budget, sinks, window, chunk)
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize(("heads", "head_dim", "block_size", "prompt_len", "kept"), [
    (2, 64, 16, 150, 45), (1, 48, 32, 97, 40), (8, 32, 16, 33, 17),
])
def test_compaction_matches_gather_then_write(dtype: torch.dtype, in_place: bool, heads: int,
                                              head_dim: int, block_size: int, prompt_len: int,
                                              kept: int) -> None:
    gen = fresh_generator()
    num_blocks = 40
    cache = torch.randn(num_blocks, heads, block_size, 2 * head_dim, generator=gen).to(dtype)
    src_row = random_row(gen, num_blocks, -(-prompt_len // block_size))
    kept_idx = torch.sort(torch.randperm(prompt_len, generator=gen)[:kept]).values
    n_dst = -(-kept // block_size)
    dst_row = src_row[:n_dst] if in_place else torch.tensor(
        [b for b in range(1, num_blocks) if b not in src_row.tolist()][:n_dst])
    access = FlashLayoutCache()
    keys, values = access.read(cache, src_row, prompt_len)
    want = cache.clone()
    access.write(want, keys[:, kept_idx].clone(), values[:, kept_idx].clone(),
                 row_slots(dst_row, kept, block_size))
    src_slots = row_slots(src_row, prompt_len, block_size)[kept_idx]
    got = cache.to(DEVICE)
    compact_paged(got, src_slots.to(DEVICE), row_slots(dst_row, kept, block_size).to(DEVICE),
                  in_place=in_place)
    assert torch.equal(got.cpu(), want)


def test_compaction_large_block_ids_and_bad_input() -> None:
    """A pool of two million blocks: slot and offset arithmetic stays in int64 (int32 slots are
    refused, since real pools overflow them); out-of-range slots are refused."""
    block_size = 16
    num_blocks = (2**31) // block_size // 64 + 8  # slot ids above 2**25, a tiny lane
    cache = torch.zeros(num_blocks, 1, block_size, 2, dtype=torch.float16)
    src = torch.tensor([(num_blocks - 1) * block_size + 3], dtype=torch.int64)
    dst = torch.tensor([(num_blocks - 5) * block_size], dtype=torch.int64)
    cache[num_blocks - 1, 0, 3] = torch.tensor([1.5, -2.0], dtype=torch.float16)
    compact_paged(cache, src, dst, in_place=False)
    assert cache[num_blocks - 5, 0, 0].tolist() == [1.5, -2.0]
    with pytest.raises(ValueError, match="int64"):
        compact_paged(cache, src.int(), dst.int(), in_place=False)
    with pytest.raises(ValueError, match="out of range"):
        compact_paged(cache, src + 10**9, dst, in_place=False)


INSTANTIATE = """
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "paged_compaction.cuh"
#define INST(T) template __global__ void kvcompress::copy_lanes_kernel<T>(const T*, T*, \\
    const int64_t*, const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, int);
INST(float)
INST(__half)
INST(__nv_bfloat16)
"""


def test_csrc_kernel_compiles_with_nvcc(tmp_path: Path) -> None:
    """The CUDA compaction kernel compiles for Hopper (sm_90) with every cache dtype. The torch
    binding itself needs a CUDA build of torch and is built on a GPU machine on first use."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed: the CUDA kernel is compiled only where CUDA exists")
    source = tmp_path / "instantiate.cu"
    source.write_text(INSTANTIATE)
    proc = subprocess.run([nvcc, "-std=c++17", "-arch=sm_90", "-c", str(source), "-o",
                           str(tmp_path / "k.o"), f"-I{REPO / 'csrc'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU and CUDA torch")
@pytest.mark.parametrize("in_place", [False, True])
def test_cuda_compaction_matches_reference(in_place: bool) -> None:
    from vllm_kvcompress.kernels.cuda_ext import load

    ext = load()
    assert ext is not None, "the CUDA extension failed to build"
    gen = fresh_generator()
    block_size, heads, head_dim, prompt_len, kept = 16, 8, 128, 1000, 250
    cache = torch.randn(200, heads, block_size, 2 * head_dim, generator=gen).to(torch.bfloat16)
    src_row = random_row(gen, 200, -(-prompt_len // block_size))
    kept_idx = torch.sort(torch.randperm(prompt_len, generator=gen)[:kept]).values
    n_dst = -(-kept // block_size)
    dst_row = src_row[:n_dst] if in_place else torch.tensor(
        [b for b in range(1, 200) if b not in src_row.tolist()][:n_dst])
    access = FlashLayoutCache()
    keys, values = access.read(cache, src_row, prompt_len)
    want = cache.clone()
    access.write(want, keys[:, kept_idx].clone(), values[:, kept_idx].clone(),
                 row_slots(dst_row, kept, block_size))
    got = cache.cuda()
    ext.compact_paged(got, row_slots(src_row, prompt_len, block_size)[kept_idx].cuda(),
                      row_slots(dst_row, kept, block_size).cuda(), in_place)
    assert torch.equal(got.cpu(), want)


def test_dispatch_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_kvcompress.kernels.dispatch import (
        KernelChoiceError,
        compaction_backend,
        kernel_backend,
    )

    cpu = torch.device("cpu")
    monkeypatch.delenv("VLLM_KVCOMPRESS_KERNELS", raising=False)
    assert kernel_backend(cpu) == "torch" and compaction_backend(cpu) == "torch"
    monkeypatch.setenv("VLLM_KVCOMPRESS_KERNELS", "triton")
    assert kernel_backend(cpu) == "triton"  # the interpreter is on in tests
    monkeypatch.setenv("VLLM_KVCOMPRESS_KERNELS", "fast")
    with pytest.raises(KernelChoiceError, match="VLLM_KVCOMPRESS_KERNELS: must be one of"):
        kernel_backend(cpu)
    monkeypatch.setenv("VLLM_KVCOMPRESS_KERNELS", "cuda")
    with pytest.raises(KernelChoiceError, match="no CUDA device"):
        compaction_backend(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("VLLM_KVCOMPRESS_KERNELS", "triton")
    with pytest.raises(KernelChoiceError, match="cannot run on cpu"):
        kernel_backend(cpu)
