"""The offline API with the plugin, through a real in-process engine on the tiny model:
`LLM(additional_config=...)` and `SamplingParams(extra_args=...)`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

ENGINE_KWARGS = {"max_model_len": 1024, "block_size": 32, "enforce_eager": True,
                 "kv_cache_memory_bytes": 64 << 20, "max_num_seqs": 8}


@pytest.fixture(scope="module")
def llm(tiny_model: Path) -> Iterator[object]:
    from vllm import LLM

    engine = LLM(model=str(tiny_model), seed=0,
                 additional_config={"kvcompress": {"policy": "chunkkv", "ratio": 0.5}},
                 **ENGINE_KWARGS)
    yield engine
    del engine


def test_bad_extra_args_fail_when_params_are_built(llm: object) -> None:
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError) as info:
        SamplingParams(max_tokens=4, extra_args={"kv_ratio": 2.0})
    assert info.value.parameter == "vllm_xargs.kv_ratio"
    assert str(info.value).startswith("kv_ratio: must be a number with 0 < ratio <= 1")
    with pytest.raises(VLLMValidationError, match="kv_polcy: unknown key"):
        SamplingParams(max_tokens=4, extra_args={"kv_polcy": "snapkv"})


def test_params_built_before_the_plugin_loaded_are_checked_at_admission(llm: object) -> None:
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    params = SamplingParams(max_tokens=4)
    params.extra_args = {"kv_budget": -5}  # bypasses construction-time checks
    with pytest.raises(VLLMValidationError, match=r"^kv_budget: must be an integer >= 0"):
        llm.generate(["hello"], params, use_tqdm=False)
    assert len(llm.generate(["hello"], SamplingParams(max_tokens=3), use_tqdm=False)) == 1


def test_mixed_per_request_settings_in_one_batch(llm: object) -> None:
    from vllm import SamplingParams

    prompts = [f"the secret number is {n} remember it" for n in range(4)]
    per_request = [{"kv_policy": "snapkv"}, {"kv_policy": "none"}, None,
                   {"kv_budget": 40, "kv_policy": "streamingllm", "other": "x"}]
    params = [SamplingParams(max_tokens=6, temperature=0.0, extra_args=x) for x in per_request]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [6, 6, 6, 6]


def test_bad_additional_config_fails_at_construction(tiny_model: Path) -> None:
    from vllm import LLM

    from vllm_kvcompress.config import CompressionConfigError

    with pytest.raises(CompressionConfigError,
                       match=r"^additional_config.kvcompress:ratio: must be a number"):
        LLM(model=str(tiny_model), additional_config={"kvcompress": {"policy": "snapkv",
                                                                     "ratio": 0.0}},
            **ENGINE_KWARGS)
