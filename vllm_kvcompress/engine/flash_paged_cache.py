"""Reading and writing tokens of the FLASH_ATTN / TRITON_ATTN paged KV cache (vLLM 0.32).

Both backends allocate one tensor per layer, ``[num_blocks, num_kv_heads, block_size,
2 * head_size]``, and view it as ``kv_cache.transpose(1, 2).split(head_size, dim=-1)``: token
``t`` of block ``b`` keeps its key in ``[b, :, t, :head_size]`` and its value in
``[b, :, t, head_size:]``. Unquantized caches only (fp8 caches are refused by the caller).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlashLayoutCache:
    """Token access for the FlashAttention-style layout."""

    #: Layout name for the Triton kernels (``vllm_kvcompress.kernels``).
    kernel_layout = "flash"

    def read(self, cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``num_tokens`` tokens of a block row.

        Returns:
            ``(keys, values)``, each ``[num_kv_heads, num_tokens, head_size]``.
        """
        _, num_heads, block_size, two_d = cache.shape
        head_size = two_d // 2
        n_blocks = -(-num_tokens // block_size)
        rows = cache[block_ids[:n_blocks].to(cache.device, torch.long)]  # [n, H, bs, 2D]
        rows = rows.transpose(0, 1).reshape(num_heads, n_blocks * block_size, two_d)
        return rows[:, :num_tokens, :head_size], rows[:, :num_tokens, head_size:]

    def write(self, cache: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              slots: torch.Tensor) -> None:
        """Writes ``[num_kv_heads, n, head_size]`` keys/values to physical ``slots`` ``[n]``."""
        block_size = cache.shape[2]
        head_size = cache.shape[3] // 2
        slots = slots.to(cache.device, torch.long)
        blocks, offsets = slots // block_size, slots % block_size
        # Advanced indexing puts the token dim first: [n, H, D].
        cache[blocks, :, offsets, :head_size] = keys.transpose(0, 1).to(cache.dtype)
        cache[blocks, :, offsets, head_size:] = values.transpose(0, 1).to(cache.dtype)
