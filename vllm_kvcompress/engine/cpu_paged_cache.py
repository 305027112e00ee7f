"""Reading and writing tokens of vLLM's CPU_ATTN paged KV cache.

The per-layer cache is ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``; vLLM views each
``(block, head)`` plane as K (first half) then V (second half), and the ISA-specific writer
(``vec``, ``vec16``, ``amx``, ``neon``, ...) stores tokens inside a half in its own order (``vec``
keeps K column-major, V row-major). Rather than hard-code one decoder per ISA, we *probe* the
order once per (ISA, dtype, block size, head size): write index-coded tokens through vLLM's own
writer and read back where each (token, dim) landed. The result is a gather permutation; a
read-back self-test on random data confirms it, and compression is refused (with one log line)
where it fails, e.g. for a packed or quantized layout.

Writing always goes through vLLM's writer, so it is layout-agnostic by construction.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HalfLayout:
    """Where token ``t``, dim ``d`` of one K (or V) half-plane is stored.

    Attributes:
        key_perm: ``[block_size * head_size]`` int64, ``key_perm[t * head_size + d]`` = flat
            offset inside the K half-plane.
        value_perm: the same for V.
    """

    key_perm: torch.Tensor
    value_perm: torch.Tensor


def _write(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor,
           isa: str, kv_cache_dtype: str = "auto") -> None:
    from vllm import _custom_ops as ops

    num_blocks, num_heads, block_size, _ = cache.shape
    key_cache, value_cache = cache.view(num_blocks, num_heads, 2 * block_size, -1).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa, k_scale=1.0,
                                   v_scale=1.0, kv_cache_dtype=kv_cache_dtype)


@functools.lru_cache(maxsize=16)
def probe_layout(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> HalfLayout:
    """Finds the storage order of one block by writing index-coded tokens through vLLM.

    Each (token, dim) gets a unique id < ``block_size * head_size``. bf16/fp16 hold integers
    exactly only up to 256/2048, so ids are written in base-128 digits over several passes.

    Raises:
        ValueError: the layout is not a permutation of (token, dim) (packed or quantized).
    """
    n = block_size * head_size
    ids = torch.arange(n, dtype=torch.int64)
    key_pos = torch.zeros(n, dtype=torch.int64)
    value_pos = torch.zeros(n, dtype=torch.int64)
    slots = torch.arange(block_size, dtype=torch.int64)
    digit_base = 128
    scale = 1
    remaining = ids.clone()
    while scale < n:
        digits = (remaining % digit_base).to(dtype).view(block_size, 1, head_size)
        cache = torch.full((1, 1, block_size, 2 * head_size), -1.0, dtype=dtype)
        _write(digits, digits, cache, slots, isa)
        halves = cache.view(2, n)  # one block, one head: K half then V half
        for half, pos in zip(halves, (key_pos, value_pos), strict=True):
            if (half < 0).any():
                raise ValueError(f"CPU KV layout for isa={isa} is not a plain permutation")
            pos += half.to(torch.int64) * scale
        remaining //= digit_base
        scale *= digit_base
    # pos[offset] = id stored at offset -> invert to perm[id] = offset.
    key_perm = torch.empty(n, dtype=torch.int64)
    value_perm = torch.empty(n, dtype=torch.int64)
    key_perm[key_pos] = torch.arange(n)
    value_perm[value_pos] = torch.arange(n)
    layout = HalfLayout(key_perm, value_perm)
    _self_test(layout, isa, dtype, block_size, head_size)
    return layout


def _self_test(layout: HalfLayout, isa: str, dtype: torch.dtype, block_size: int,
               head_size: int) -> None:
    gen = torch.Generator().manual_seed(0)
    num_heads, num_blocks, n_tokens = 2, 3, 2 * block_size + 3
    key = torch.randn(n_tokens, num_heads, head_size, generator=gen).to(dtype)
    value = torch.randn(n_tokens, num_heads, head_size, generator=gen).to(dtype)
    block_ids = torch.tensor([2, 0, 1])
    slots = block_ids.repeat_interleave(block_size)[:n_tokens] * block_size + (
        torch.arange(n_tokens) % block_size)
    cache = torch.zeros(num_blocks, num_heads, block_size, 2 * head_size, dtype=dtype)
    _write(key, value, cache, slots, isa)
    got_k, got_v = read_tokens(cache, block_ids, n_tokens, layout)
    if not (torch.equal(got_k, key.transpose(0, 1)) and torch.equal(got_v, value.transpose(0, 1))):
        raise ValueError(f"CPU KV layout read-back self-test failed for isa={isa}")


def read_tokens(cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int,
                layout: HalfLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num_tokens`` tokens of a block row.

    Args:
        cache: one layer's cache ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``.
        block_ids: ``[>= cdiv(num_tokens, block_size)]`` the row's block ids, in order.
        num_tokens: tokens to read.
        layout: from ``probe_layout``.

    Returns:
        ``(keys, values)``, each ``[num_kv_heads, num_tokens, head_size]`` in the cache dtype.
    """
    _, num_heads, block_size, two_d = cache.shape
    head_size = two_d // 2
    n_blocks = -(-num_tokens // block_size)
    planes = cache[block_ids[:n_blocks].to(torch.long)].view(n_blocks, num_heads, 2,
                                                            block_size * head_size)
    keys = planes[:, :, 0, layout.key_perm].view(n_blocks, num_heads, block_size, head_size)
    values = planes[:, :, 1, layout.value_perm].view(n_blocks, num_heads, block_size, head_size)
    keys = keys.transpose(0, 1).reshape(num_heads, n_blocks * block_size, head_size)
    values = values.transpose(0, 1).reshape(num_heads, n_blocks * block_size, head_size)
    return keys[:, :num_tokens], values[:, :num_tokens]


def write_tokens(cache: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 slots: torch.Tensor, isa: str, kv_cache_dtype: str = "auto") -> None:
    """Writes tokens to physical slots through vLLM's own CPU writer.

    Args:
        cache: one layer's cache ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``.
        keys: ``[num_kv_heads, n, head_size]``.
        values: ``[num_kv_heads, n, head_size]``.
        slots: ``[n]`` int64 physical slots (``block_id * block_size + offset``).
        isa: the layer's ``isa`` attribute.
        kv_cache_dtype: the attention impl's ``kv_cache_dtype``.
    """
    _write(keys.transpose(0, 1).contiguous(), values.transpose(0, 1).contiguous(), cache,
           slots, isa, kv_cache_dtype)


@dataclass(frozen=True)
class CpuAttnCache:
    """Token access for one CPU_ATTN layer (the ISA and cache dtype of its attention impl)."""

    isa: str
    kv_cache_dtype: str = "auto"

    @property
    def kernel_layout(self) -> str | None:
        """``"cpu_vec"`` where the Triton scoring kernel can address keys by strides."""
        return "cpu_vec" if self.isa == "vec" else None

    def read(self, cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, block_size, two_d = cache.shape
        layout = probe_layout(self.isa, cache.dtype, block_size, two_d // 2)
        return read_tokens(cache, block_ids, num_tokens, layout)

    def write(self, cache: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              slots: torch.Tensor) -> None:
        write_tokens(cache, keys, values, slots, self.isa, self.kv_cache_dtype)


def row_slots(block_ids: torch.Tensor, num_tokens: int, block_size: int) -> torch.Tensor:
    """Physical slots of the first ``num_tokens`` positions of a block row, ``[num_tokens]``."""
    positions = torch.arange(num_tokens, dtype=torch.int64, device=block_ids.device)
    return block_ids.to(torch.int64)[positions // block_size] * block_size + positions % block_size
