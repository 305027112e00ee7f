"""vLLM general-plugin entry point: ``vllm.general_plugins`` -> ``plugin:register``.

vLLM calls ``register()`` in every process it starts (API server / LLM process, engine core,
workers), possibly more than once. It is idempotent, imports vLLM only when called, checks the
vLLM version and exits with one clear line on an unsupported one.

Set ``VLLM_KVCOMPRESS_DISABLE=1`` to load vLLM without any of the plugin's patches.
"""

from __future__ import annotations

import logging
import os

# Under "vllm." so vLLM's log handler and VLLM_LOGGING_LEVEL apply to our lines too.
logger = logging.getLogger("vllm.kvcompress")

_registered = False


def register() -> None:
    """Applies the plugin's vLLM patches once per process."""
    global _registered
    if _registered:
        return
    _registered = True
    if os.environ.get("VLLM_KVCOMPRESS_DISABLE", "0") not in ("", "0"):
        logger.info("vllm-kvcompress disabled by VLLM_KVCOMPRESS_DISABLE")
        return
    from .deployment import GPU_OPT_IN_ENV
    from .vllm_patches import apply_all

    if os.environ.get(GPU_OPT_IN_ENV, "0") not in ("", "0"):
        # The worker hooks live in the V1 model runner; V2 (the GPU default) has none yet.
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        logger.info("vllm-kvcompress: %s=1: using vLLM's V1 model runner", GPU_OPT_IN_ENV)
    applied = apply_all()
    logger.debug("vllm-kvcompress patches applied: %s", applied)
