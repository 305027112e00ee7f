"""Per-model data through a policy's declared hook, and a key-only scorer, in the real engine.

A test policy (registered here, as a third-party package would through the entry-point group)
scores each key by its projection on a per-(layer, KV head) direction read from a file: it reads
keys and model data only, no queries. Checked: the file path parameter gets a flag, a YAML key
and a ``kv_*`` key from its one declaration; a file that does not fit the model is refused with
one line at startup (``vllm serve`` parser, offline ``LLM``) and with a 400-style error naming
``vllm_xargs.kv_direction_file`` per request; a good file is loaded and reaches the scorer in the
worker, whose kept tokens and greedy output equal the reference's own selection and decode.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from kv_reference import ReferenceModel

from vllm_kvcompress.policies import (
    KEYS,
    MODEL_DATA,
    LayerObservation,
    ModelDataHook,
    ModelShape,
    Param,
    PolicyInfo,
    TopK,
    register_policy,
)
from vllm_kvcompress.policies import registry as registry_module

pytestmark = pytest.mark.engine

ENGINE = {"max_model_len": 1024, "block_size": 32, "enforce_eager": True, "dtype": "float32",
          "seed": 0, "max_num_batched_tokens": 128, "max_num_seqs": 8,
          "num_gpu_blocks_override": 256}
DIRECTION_FILE = Param("direction_file", Path, None, "Test policy: file with one direction per "
                       "(layer, KV head), a torch tensor [layers, kv_heads, head_dim].")


@dataclass(frozen=True)
class KeyDirection:
    """Score = minus the projection of each key on its head's direction (key-only scorer)."""

    inputs: ClassVar[frozenset[str]] = frozenset({KEYS, MODEL_DATA})

    def score(self, obs: LayerObservation) -> torch.Tensor:
        directions = obs.require(MODEL_DATA)[obs.layer_idx]  # [H, D]
        keys = obs.require(KEYS).float()  # [H, L, D]
        return -(keys * directions[:, None, :].float()).sum(-1)


def load_directions(path: str) -> torch.Tensor:
    try:
        data = torch.load(path, weights_only=True)
    except Exception as err:
        raise ValueError(f"not a torch tensor file ({type(err).__name__})") from None
    if not isinstance(data, torch.Tensor) or data.dim() != 3:
        raise ValueError("must hold a 3-D tensor [layers, kv_heads, head_dim]")
    return data


def check_directions(data: torch.Tensor, shape: ModelShape) -> None:
    want = (shape.num_layers, shape.num_kv_heads, shape.head_dim)
    if tuple(data.shape) != want:
        raise ValueError(f"holds directions of shape {tuple(data.shape)}, but {shape.model} "
                         f"needs {want} (layers, kv_heads, head_dim)")


INFO = PolicyInfo(name="test-direction",
                  build=lambda spec: TopK(KeyDirection(), head_select=spec.head_select),
                  paper="-", summary="keys with the least projection on a direction",
                  parameters=(DIRECTION_FILE,), default_head_select="per_head",
                  model_data=ModelDataHook("direction_file", load_directions,
                                           check_directions))


@pytest.fixture(scope="module")
def registered() -> Iterator[None]:
    register_policy(INFO)
    yield
    registry_module._REGISTRY.pop(INFO.name, None)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, str]:
    """A good file for the tiny model (4 layers, 2 KV heads, head_dim 64) and a bad one."""
    folder = tmp_path_factory.mktemp("directions")
    gen = torch.Generator().manual_seed(3)
    paths = {"good": folder / "good.pt", "bad": folder / "bad.pt", "junk": folder / "junk.pt"}
    torch.save(torch.randn(4, 2, 64, generator=gen), paths["good"])
    torch.save(torch.randn(4, 2, 32, generator=gen), paths["bad"])
    paths["junk"].write_text("not a tensor")
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def llm(registered: None, tiny_model: Path, files: dict[str, str]) -> Iterator[Any]:
    import os

    from vllm import LLM

    os.environ["VLLM_KVCOMPRESS_RECORD_KEPT"] = "1"
    # Requests may name files under the operator's directory only.
    folder = str(Path(files["good"]).parent)
    engine = LLM(model=str(tiny_model), additional_config={"kvcompress": {
        "allowed_file_dir": folder}}, **ENGINE)
    yield engine
    del engine


def test_declared_path_parameter_generates_flag_and_keys(registered: None) -> None:
    from vllm_kvcompress.config import cli_names, request_names

    assert cli_names()["direction_file"] == "--kv-direction-file"
    assert request_names()["direction_file"] == "kv_direction_file"
    from vllm_kvcompress.admission import Frontend, admit
    from vllm_kvcompress.config import CompressionConfigError, CompressionSpec

    with pytest.raises(CompressionConfigError, match=r"^kv_direction_file: must be a file path "
                                                     r"\(a string of at most 1024 characters\)"):
        admit({"kv_direction_file": 7}, Frontend(CompressionSpec(), None, None))
    with pytest.raises(CompressionConfigError, match=r"^kv_direction_file: no usable file of "
                                                     r"that name \(per-request files are "
                                                     r"disabled on this server"):
        admit({"kv_direction_file": "/nope"}, Frontend(CompressionSpec(), None, None))


def test_vllm_serve_refuses_a_file_that_does_not_fit_in_one_line(
        registered: None, tiny_model: Path, files: dict[str, str]) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm_serve_parser import make_serve_parser

    from vllm_kvcompress import plugin

    plugin.register()
    parser = make_serve_parser()
    for name, fragment in (("bad", "needs (4, 2, 64)"), ("junk", "not a torch tensor file")):
        args = parser.parse_args([str(tiny_model), "--kv-policy", "test-direction",
                                  "--kv-direction-file", files[name]])
        args.model = args.model_tag
        with pytest.raises(SystemExit) as info:
            AsyncEngineArgs.from_cli_args(args)
        message = str(info.value)
        assert message.startswith("vllm-kvcompress: invalid configuration: "
                                  f"--kv-direction-file: {files[name]}: ")
        assert fragment in message and "\n" not in message
    args = parser.parse_args([str(tiny_model), "--kv-policy", "test-direction"])
    args.model = args.model_tag
    with pytest.raises(SystemExit, match="--kv-direction-file: policy 'test-direction' needs "
                                         "this file"):
        AsyncEngineArgs.from_cli_args(args)


def test_offline_server_default_with_a_bad_file_fails_at_construction(
        registered: None, tiny_model: Path, files: dict[str, str]) -> None:
    from vllm import LLM

    from vllm_kvcompress.config import CompressionConfigError

    with pytest.raises(CompressionConfigError,
                       match=r"additional_config\.kvcompress:direction_file: .*needs"):
        LLM(model=str(tiny_model), additional_config={"kvcompress": {
            "policy": "test-direction", "direction_file": files["bad"]}}, **ENGINE)


def test_request_with_model_data_is_exact_and_a_bad_file_is_refused(
        llm: Any, files: dict[str, str], tiny_model: Path) -> None:
    from vllm import SamplingParams

    from vllm_kvcompress.config import CompressionSpec, resolve_request

    with pytest.raises(Exception, match=r"kv_direction_file: .*needs \(4, 2, 64\)") as info:
        llm.generate([{"prompt_token_ids": list(range(5, 205))}], SamplingParams(
            max_tokens=2, extra_args={"kv_policy": "test-direction",
                                      "kv_direction_file": files["bad"]}), use_tqdm=False)
    assert getattr(info.value, "parameter", None) == "vllm_xargs.kv_direction_file"

    reference = ReferenceModel(tiny_model)
    import random

    rng = random.Random(11)
    cases = [{"kv_policy": "test-direction", "kv_direction_file": files["good"],
              "kv_ratio": 0.3, "kv_window": 16, "kv_head_select": mode}
             for mode in ("per_head", "shared")] + [None]
    prompts = [[rng.randrange(4, 1000) for _ in range(260)] for _ in cases]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], [
        SamplingParams(max_tokens=17, temperature=0.0, ignore_eos=True, extra_args=x)
        for x in cases], use_tqdm=False)
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker \
        .model_runner
    for xargs, prompt, out in zip(cases, prompts, outs, strict=True):
        want_kept = None
        if xargs is not None:
            want_kept = reference.select(prompt, resolve_request(CompressionSpec(), xargs))
            log = runner._kvcompress.kept_log
            key = next(k for k in log if k.rsplit("-", 1)[0] == out.request_id)
            assert log[key] == want_kept
        assert list(out.outputs[0].token_ids) == reference.greedy(prompt, 17, want_kept)


def test_key_only_policy_takes_full_prefix_cache_hits(llm: Any, files: dict[str, str]) -> None:
    """It reads no queries, so a repeated prompt is not capped to recompute its window."""
    from vllm import SamplingParams

    prompt = {"prompt_token_ids": list(range(7, 7 + 300))}
    xargs = {"kv_policy": "test-direction", "kv_direction_file": files["good"], "kv_window": 16}
    params = SamplingParams(max_tokens=2, temperature=0.0, extra_args=xargs)
    llm.generate([prompt], SamplingParams(max_tokens=2, extra_args={"kv_policy": "none"}),
                 use_tqdm=False)
    second = llm.generate([prompt], params, use_tqdm=False)[0]
    assert second.num_cached_tokens == 299 // 32 * 32
    capped = llm.generate([prompt], SamplingParams(max_tokens=2, extra_args={
        "kv_policy": "snapkv", "kv_window": 16}), use_tqdm=False)[0]
    assert capped.num_cached_tokens == (300 - 16) // 32 * 32
