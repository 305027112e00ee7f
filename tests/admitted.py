"""Requests as the engine core receives them: their ``kv_*`` keys admitted by a front end."""

from __future__ import annotations

from typing import Any

from vllm_kvcompress.admission import Frontend, admit, remember
from vllm_kvcompress.config import CompressionSpec


def admitted_args(xargs: dict[str, Any] | None, server: CompressionSpec | None = None
                  ) -> dict[str, Any] | None:
    """``xargs`` after the front end's admission (the resolved spec stored for the engine)."""
    if xargs is None:
        return None
    frontend = Frontend(server or CompressionSpec(), None, None)
    args = dict(xargs)
    remember(args, admit(args, frontend), frontend)
    return args
