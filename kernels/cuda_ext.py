"""On-demand build of the CUDA C++ kernels in ``csrc/`` (only where CUDA exists).

``load()`` compiles ``csrc/`` (``SOURCES``: the kernel's launcher ``paged_compaction.cu`` with
nvcc, the torch binding ``paged_compaction_binding.cpp`` with the host compiler) with
``torch.utils.cpp_extension`` the first time it is called on a machine with a CUDA device and a
CUDA build of torch, and caches the module; everywhere else it returns ``None`` and the dispatcher
falls back to Triton or torch. The sources sit next to this package in both layouts:
``<repo>/csrc`` beside ``<repo>/kernels`` in a source or editable checkout, and
``vllm_kvcompress/csrc`` beside ``vllm_kvcompress/kernels`` in an installed wheel (pyproject.toml
ships them there as package data), so ``CSRC`` is ``<this file>/../../csrc``.

The module has one function, ``compact_paged(cache, src_slots, dst_slots, in_place,
check_range=True) -> None``
(FLASH_ATTN / TRITON_ATTN layout only), with the contract of the Triton
``kernels.compaction.compact_paged`` at ``layout="flash"``:

* ``cache``: ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]`` CUDA tensor (fp32, fp16 or
  bf16), last dim contiguous.
* ``src_slots``: contiguous int64, ``[num_kv_heads, n]`` (row ``h`` = physical slots of head
  ``h``'s kept tokens) or ``[n]`` (shared by every head).
* ``dst_slots``: contiguous int64 ``[n]``, shared: slot ``j`` receives each head's ``j``-th kept
  token.
* ``in_place``: destinations may overlap sources (staged through a dense buffer).

Callers use ``compact_paged`` below, the checked wrapper: it validates in Python with the Triton
wrapper's own checks (``ValueError`` naming the argument) and only then calls the binding, whose
``TORCH_CHECK``s are the last guard for direct callers. Bad input must not reach them: on the H200
image of 2026-11-26 (torch 2.11.0+cu130, g++ 13.3) a failing ``TORCH_CHECK`` in the binding ended
the process (segmentation fault) instead of raising, with the checks in nvcc-compiled host code
and in a g++-compiled ``.cpp`` alike, while a cpp-only ``load_inline`` extension raised. Cause
open; the xfail test ``test_cuda_binding_raises_on_bad_input`` tracks it.
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
#: Compiled sources (headers beside them: ``paged_compaction.cuh``, ``paged_compaction_launch.h``).
SOURCES = ("paged_compaction.cu", "paged_compaction_binding.cpp")


@functools.lru_cache(maxsize=1)
def load() -> ModuleType | None:
    """The compiled extension, or ``None`` where it cannot be built (logged once)."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return None
    sources = [CSRC / name for name in SOURCES]
    missing = [str(path) for path in sources if not path.is_file()]
    if missing:
        logger.info("vllm-kvcompress: %s not found (incomplete install); no CUDA kernels",
                    ", ".join(missing))
        return None
    try:
        from torch.utils.cpp_extension import load as build

        return build(name="kvcompress_cuda", sources=[str(path) for path in sources],
                     extra_include_paths=[str(CSRC)], extra_cuda_cflags=["-O3"], verbose=False)
    except Exception as err:  # a failed build must not take the engine down
        logger.warning("vllm-kvcompress: building the CUDA kernels failed (%s); using Triton",
                       err)
        return None


def compact_paged(cache: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor,
                  in_place: bool) -> None:
    """The CUDA C++ compaction, checked: the contract of the Triton ``compact_paged`` at
    ``layout="flash"`` (shapes there).

    Raises:
        ValueError: bad shapes, dtypes, devices, strides or slots (before any launch).
        RuntimeError: the extension is not available here (``load()`` returned ``None``).
    """
    from .compaction import check_compaction_inputs

    check_compaction_inputs(cache, src_slots, dst_slots, "flash")
    if cache.device.type != "cuda":
        raise ValueError(f"cache must be on a CUDA device for the CUDA kernel, got {cache.device}")
    extension = load()
    if extension is None:
        raise RuntimeError("the CUDA compaction extension is not available on this machine")
    # The range was checked above (one host sync); the binding need not sync again.
    extension.compact_paged(cache, src_slots.contiguous(), dst_slots.contiguous(), in_place,
                            check_range=False)
