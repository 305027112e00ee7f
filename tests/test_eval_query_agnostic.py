"""`kvcompress eval`'s engine backend in the query-agnostic setting (tiny Llama, fp32): the context
is compressed before the question exists through the engine's compress-once-reuse path
(``kv_reuse_prefix``), and the prediction is the answer of the request that reuses it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kv_reference import ReferenceModel

pytestmark = pytest.mark.engine


def test_eval_query_agnostic_setting(tiny_model: Path, reference: ReferenceModel,
                                     tmp_path: Path) -> None:
    """`kvcompress eval`'s engine backend in the query-agnostic setting: per compressed
    configuration, the context alone first (unrecorded), then the whole prompt, which starts on
    the compressed context; its answer equals the reference that compresses the context alone
    and prefills the question on it; turn 2 of a multi-turn sample reuses the context too;
    `none` gives the query-aware baseline's tokens; every row says its setting."""
    from transformers import AutoTokenizer

    from vllm_kvcompress.eval import engine_backend
    from vllm_kvcompress.eval.tasks import build_samples

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    samples = build_samples(tokenizer, ["niah_single", "qa_squad"], [768], [0.5], 1, 0)
    samples += build_samples(tokenizer, ["niah_multiturn"], [768], [0.5], 1, 0)
    configs = [("knorm", 0.25), ("snapkv", 0.25)]
    params = {"window": 16, "sink_tokens": 4}

    def rows_of(path: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in path.read_text().splitlines()]

    agnostic = rows_of(engine_backend.run(samples, configs, params, str(tiny_model),
                                          tmp_path / "agnostic.jsonl",
                                          setting="query_agnostic"))
    aware = rows_of(engine_backend.run(samples, [], params, str(tiny_model),
                                       tmp_path / "aware.jsonl"))
    assert len(agnostic) == (len(samples) + 1) * 3  # + turn 2 of the multi-turn sample
    assert {r["setting"] for r in agnostic} == {"query_agnostic"}
    baseline = {(r["id"], r["turn"]): r["output_ids"] for r in aware}
    by_id = {s.id: s for s in samples}
    for row in agnostic:
        sample = by_id[row["id"]]
        if row["policy"] == "none":
            assert row["output_ids"] == baseline[(row["id"], row["turn"])]
            continue
        context = sample.context_len
        assert row["context_reused"] and row["context_tokens"] == context, row["id"]
        spec = engine_backend.make_spec(engine_backend.config_key(row["policy"], row["ratio"]),
                                        params)
        assert row["kept_tokens"] == spec.kept_tokens(context) + row["prompt_tokens"] - context
        if row["turn"] == 2:
            continue
        ids = sample.input_ids
        kept = reference.select(ids[:context], spec)
        want = reference.greedy_on_compressed_prefix(ids[:context], kept, ids[context:],
                                                     sample.max_tokens)
        got = row["output_ids"]
        assert got == want[:len(got)], (row["id"], row["policy"])
        assert len(got) == sample.max_tokens or row["finish_reason"] == "stop"
