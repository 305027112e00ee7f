"""Which implementation runs the compression step on a device: Triton or the torch reference.

``VLLM_KVCOMPRESS_KERNELS`` overrides the choice (``auto`` | ``torch`` | ``triton``); servers can
also pass ``--kv-kernels``. ``auto`` picks Triton on CUDA devices and the torch reference
elsewhere (PyPI Triton has no CPU backend; forcing ``triton`` on CPU needs
``TRITON_INTERPRET=1``, which is for tests). CUDA C++ kernels (``csrc/``) are not built yet, so
they are never chosen. The choice is logged once per device type.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("vllm.kvcompress")

ENV = "VLLM_KVCOMPRESS_KERNELS"
CHOICES = ("auto", "torch", "triton")

_logged: set[tuple[str, str]] = set()


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
        requested: ``auto``/``torch``/``triton``; ``None`` reads ``VLLM_KVCOMPRESS_KERNELS``.

    Raises:
        KernelChoiceError: unknown name, or ``triton`` where it cannot run.
    """
    requested = (requested or os.environ.get(ENV) or "auto").lower()
    if requested not in CHOICES:
        raise KernelChoiceError(f"{ENV}: must be one of {', '.join(CHOICES)}, got {requested!r}")
    if requested == "auto":
        choice = "triton" if device.type == "cuda" and _triton_runs_on(device) else "torch"
    elif requested == "triton" and not _triton_runs_on(device):
        raise KernelChoiceError(f"{ENV}=triton: Triton cannot run on {device.type} here "
                                "(no CUDA device; the interpreter needs TRITON_INTERPRET=1)")
    else:
        choice = requested
    key = (device.type, choice)
    if key not in _logged:
        _logged.add(key)
        logger.info("vllm-kvcompress: compression kernels on %s: %s", device.type, choice)
    return choice
