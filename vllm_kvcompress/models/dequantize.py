"""A GGUF file to a plain Hugging Face checkpoint that stock vLLM loads.

transformers reads the GGUF (weights, config, tokenizer, chat template) and dequantizes every
tensor with the ``gguf`` package's kernels; we save the dense model as safetensors. Two details:

* transformers 5 can keep GGUF weights packed (when the ``kernels`` package provides a matmul
  kernel); ``GgufConfig(dequantize=True)`` asks for dense weights always.
* the loaded model keeps the GGUF quantizer, and ``save_pretrained`` refuses a model "quantized
  with QuantizationMethod.GGUF"; the weights are already dense, so the marker is dropped
  (``hf_quantizer`` and ``config.quantization_config``) before saving.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .errors import ModelPreparationError

DTYPES = ("bfloat16", "float32")


def dequantize_gguf(gguf_path: Path, out: Path, dtype: str = "bfloat16",
                    stop_token_ids: Sequence[int] = ()) -> Path:
    """Writes ``gguf_path``'s model as a dense safetensors checkpoint with its tokenizer.

    Args:
        gguf_path: the GGUF file.
        out: destination folder (created; files of the same names are replaced).
        dtype: ``bfloat16`` or ``float32`` weights.
        stop_token_ids: end-of-generation token ids for ``generation_config.json`` (the GGUF
            names one end token; chat models often stop on two). Empty: keep the GGUF's.

    Returns:
        ``out``.

    Raises:
        ModelPreparationError: ``gguf``/``accelerate`` missing, or transformers cannot read it.
    """
    if dtype not in DTYPES:
        raise ModelPreparationError(f"dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    try:
        import gguf  # noqa: F401  (transformers imports it lazily and fails late without it)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
        from transformers.utils import is_accelerate_available
    except ImportError as err:
        raise ModelPreparationError(
            f"dequantizing a GGUF file needs {err.name or 'gguf'}: pip install "
            "'vllm-kvcompress[models]' (or `pip install gguf accelerate`)") from err
    if not is_accelerate_available():
        raise ModelPreparationError("transformers loads GGUF files only with `accelerate`: pip "
                                    "install 'vllm-kvcompress[models]'")
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=getattr(torch, dtype),
        quantization_config=GgufConfig(dequantize=True))
    _drop_gguf_marker(model)
    if stop_token_ids:
        model.generation_config.eos_token_id = list(stop_token_ids)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    _check_saved_config(out)
    return out


def _drop_gguf_marker(model: object) -> None:
    """Lets ``save_pretrained`` write the (already dense) model as a plain checkpoint."""
    packed = [name for name, module in model.named_modules()  # type: ignore[attr-defined]
              if type(module).__name__.startswith("Gguf")]
    if packed:
        raise ModelPreparationError(
            f"transformers kept {len(packed)} GGUF-packed modules ({packed[0]}, ...) although "
            "dense weights were asked for; this transformers version is not supported")
    model.hf_quantizer = None  # type: ignore[attr-defined]
    config = model.config  # type: ignore[attr-defined]
    if hasattr(config, "quantization_config"):
        del config.quantization_config


def _check_saved_config(out: Path) -> None:
    """vLLM would try to honour a leftover ``quantization_config``: there must be none."""
    config = json.loads((out / "config.json").read_text())
    if "quantization_config" in config:
        config.pop("quantization_config")
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
