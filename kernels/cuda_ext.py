"""On-demand build of the CUDA C++ kernels in ``csrc/`` (only where CUDA exists).

``load()`` compiles ``csrc/paged_compaction.cu`` with ``torch.utils.cpp_extension`` the first
time it is called on a machine with a CUDA device and a CUDA build of torch, and caches the module;
everywhere else it returns ``None`` and the dispatcher falls back to Triton or torch. The sources
sit next to this package in both layouts: ``<repo>/csrc`` beside ``<repo>/kernels`` in a source or
editable checkout, and ``vllm_kvcompress/csrc`` beside ``vllm_kvcompress/kernels`` in an installed
wheel (pyproject.toml ships them there as package data), so ``CSRC`` is ``<this file>/../../csrc``.

The module has one function, ``compact_paged(cache, src_slots, dst_slots, in_place) -> None``
(FLASH_ATTN / TRITON_ATTN layout only), with the contract of the Triton
``kernels.compaction.compact_paged`` at ``layout="flash"``:

* ``cache``: ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]`` CUDA tensor (fp32, fp16 or
  bf16), last dim contiguous.
* ``src_slots``: contiguous int64, ``[num_kv_heads, n]`` (row ``h`` = physical slots of head
  ``h``'s kept tokens) or ``[n]`` (shared by every head).
* ``dst_slots``: contiguous int64 ``[n]``, shared: slot ``j`` receives each head's ``j``-th kept
  token.
* ``in_place``: destinations may overlap sources (staged through a dense buffer).

Bad input (device, shapes, dtype, contiguity, slots out of range) raises ``RuntimeError`` from
``TORCH_CHECK``; the range check costs one host sync.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger("vllm.kvcompress")

# Checkout: <repo>/kernels/cuda_ext.py -> <repo>/csrc. Wheel: vllm_kvcompress/kernels/cuda_ext.py
# -> vllm_kvcompress/csrc (package data, see pyproject.toml). tests/test_wheel.py checks both.
CSRC = Path(__file__).resolve().parents[1] / "csrc"


@functools.lru_cache(maxsize=1)
def load() -> ModuleType | None:
    """The compiled extension, or ``None`` where it cannot be built (logged once)."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return None
    source = CSRC / "paged_compaction.cu"
    if not source.is_file():
        logger.info("vllm-kvcompress: %s not found (incomplete install); no CUDA kernels",
                    source)
        return None
    try:
        from torch.utils.cpp_extension import load as build

        return build(name="kvcompress_cuda", sources=[str(source)],
                     extra_include_paths=[str(CSRC)], extra_cuda_cflags=["-O3"], verbose=False)
    except Exception as err:  # a failed build must not take the engine down
        logger.warning("vllm-kvcompress: building the CUDA kernels failed (%s); using Triton",
                       err)
        return None
