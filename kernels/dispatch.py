"""Which implementation runs the compression step on a device: Triton or the torch reference.

``VLLM_KVCOMPRESS_KERNELS`` overrides the choice (``auto`` | ``torch`` | ``triton`` | ``cuda``).
``auto`` picks, per device, the fastest implementation that runs there: the CUDA C++ compaction
(``csrc/``, built on demand) > Triton > the torch reference. PyPI Triton has no CPU backend, so
CPU uses the torch reference (forcing ``triton`` on CPU needs ``TRITON_INTERPRET=1``, which is for
tests). Only compaction has a CUDA C++ kernel; scoring and selection use Triton there. The choice
is logged once per device type.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("vllm.kvcompress")

ENV = "VLLM_KVCOMPRESS_KERNELS"
CHOICES = ("auto", "torch", "triton", "cuda")

_logged: set[tuple[str, str, str]] = set()


class KernelChoiceError(ValueError):
    """An impossible kernel choice (unknown name, or Triton on a device it cannot run on)."""


def _triton_runs_on(device: torch.device) -> bool:
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_backend(device: torch.device, requested: str | None = None) -> str:
    """``"triton"`` or ``"torch"`` for work on ``device``.

    Args:
        device: where the KV cache lives.
        requested: ``auto``/``torch``/``triton``/``cuda``; ``None`` reads
            ``VLLM_KVCOMPRESS_KERNELS``.

    Raises:
        KernelChoiceError: unknown name, or ``triton`` where it cannot run.
    """
    requested = (requested or os.environ.get(ENV) or "auto").lower()
    if requested not in CHOICES:
        raise KernelChoiceError(f"{ENV}: must be one of {', '.join(CHOICES)}, got {requested!r}")
    if requested == "cuda":
        requested = "triton"  # scoring and selection: Triton is the fastest there is
    if requested == "auto":
        choice = "triton" if device.type == "cuda" and _triton_runs_on(device) else "torch"
    elif requested == "triton" and not _triton_runs_on(device):
        raise KernelChoiceError(f"{ENV}=triton: Triton cannot run on {device.type} here "
                                "(no CUDA device; the interpreter needs TRITON_INTERPRET=1)")
    else:
        choice = requested
    _log_once(device, "scoring/selection", choice)
    return choice


def compaction_backend(device: torch.device, requested: str | None = None) -> str:
    """``"cuda"``, ``"triton"`` or ``"torch"`` for compaction on ``device``.

    Raises:
        KernelChoiceError: as ``kernel_backend``, or ``cuda`` where the extension cannot load.
    """
    requested = (requested or os.environ.get(ENV) or "auto").lower()
    if requested in ("auto", "cuda") and device.type == "cuda":
        from .cuda_ext import load

        if load() is not None:
            _log_once(device, "compaction", "cuda")
            return "cuda"
        if requested == "cuda":
            raise KernelChoiceError(f"{ENV}=cuda: the CUDA extension could not be built")
    elif requested == "cuda":
        raise KernelChoiceError(f"{ENV}=cuda: no CUDA device")
    choice = kernel_backend(device, "auto" if requested == "cuda" else requested)
    _log_once(device, "compaction", choice)
    return choice


def _log_once(device: torch.device, what: str, choice: str) -> None:
    key = (device.type, what, choice)
    if key not in _logged:
        _logged.add(key)
        logger.info("vllm-kvcompress: %s kernels on %s: %s", what, device.type, choice)
