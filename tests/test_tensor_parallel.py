"""Tensor parallelism on this CPU machine (TP=2, one core per rank): one token set.

With ``shared`` selection every rank sees the scores of every KV head (fp32, all-reduced before
selection), so both ranks keep the same tokens, and those are TP=1's; with ``per_head`` each
rank selects for its own heads, which must equal those heads' selection at TP=1. Greedy output
equals TP=1's, blocks are freed, and a fault on rank 1 fails that request alone (on every rank).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.engine

SCRIPT = Path(__file__).with_name("tp_script.py")
ENGINE = {"max_model_len": 1024, "block_size": 32, "enforce_eager": True, "dtype": "float32",
          "seed": 0, "max_num_batched_tokens": 128, "max_num_seqs": 8,
          "num_gpu_blocks_override": 128}
CASES = [
    {"kv_policy": "snapkv", "kv_ratio": 0.25, "kv_window": 16, "kv_head_select": "shared"},
    {"kv_policy": "snapkv", "kv_ratio": 0.25, "kv_window": 16, "kv_head_select": "per_head"},
    {"kv_policy": "chunkkv", "kv_ratio": 0.3, "kv_window": 16, "kv_head_select": "shared"},
    {"kv_policy": "chunkkv", "kv_ratio": 0.3, "kv_window": 16, "kv_head_select": "per_head",
     "kv_reuse_layers": 2},
    {"kv_policy": "pyramidkv", "kv_ratio": 0.3, "kv_window": 16},
    {"kv_policy": "none"},
]
#: The methods issue's scorers under TP: keys read per rank, RoPE per rank, merged values per
#: head, and per-head model data indexed by the GLOBAL KV head (rank 1 must use filter 1).
METHOD_CASES = [
    {"kv_policy": "knorm", "kv_ratio": 0.3, "kv_window": 16, "kv_head_select": "per_head"},
    {"kv_policy": "expected_attention", "kv_ratio": 0.3, "kv_window": 16,
     "kv_head_select": "per_head"},
    {"kv_policy": "snapkv", "kv_ratio": 0.25, "kv_window": 16, "kv_head_select": "shared",
     "kv_merge": "on"},
    {"kv_policy": "qfilters", "kv_ratio": 0.3, "kv_window": 16, "kv_head_select": "per_head",
     "kv_qfilters_path": "<tiny_qfilters>"},
    # Decode-time compression: cut to 100 when the prefill ends, then every 8 generated tokens
    # (the query ring per rank; shared selection all-reduced at every compaction).
    {"kv_policy": "snapkv", "kv_window": 16, "kv_decode_budget": 100, "kv_decode_interval": 8,
     "kv_head_select": "shared"},
    {"kv_policy": "chunkkv", "kv_window": 16, "kv_decode_budget": 100, "kv_decode_interval": 8,
     "kv_head_select": "per_head"},
    # Compression while prefilling (chunks of 128): cut to 96 after the first chunk, then at
    # the prompt's end; shared selection all-reduced at every cut.
    {"kv_policy": "snapkv", "kv_window": 16, "kv_prefill_budget": 96, "kv_head_select": "shared"},
    {"kv_policy": "knorm", "kv_window": 16, "kv_prefill_budget": 96, "kv_head_select": "per_head"},
]
MAX_TOKENS = 17


def run(tiny_model: Path, tp: int, cases: list[dict[str, Any]],
        prompts: list[list[int]], then: list[list[int]] | None = None) -> dict[str, Any]:
    """The script's result; ``then``: prompts sent with the same ``cases`` once the first ones
    finished (``then_tokens``, ``then_cached``)."""
    env = {**os.environ, "VLLM_KVCOMPRESS_RECORD_KEPT": "1", "OMP_NUM_THREADS": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    if tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
    # The operator allows the Q-Filters file's folder and compactions every 8 tokens (clients
    # get at least 16 by default).
    qfilters = next((c["kv_qfilters_path"] for c in cases if "kv_qfilters_path" in c), None)
    operator: dict[str, Any] = {"min_decode_interval": 8}
    if qfilters is not None:
        operator["allowed_file_dir"] = str(Path(qfilters).parent)
    engine = {**ENGINE, "additional_config": {"kvcompress": operator}}
    config = {"model": str(tiny_model), "tp": tp, "engine": engine, "cases": cases,
              "prompts": prompts, "max_tokens": MAX_TOKENS, "then": then}
    proc = subprocess.run([sys.executable, str(SCRIPT), json.dumps(config)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT=")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1].removeprefix("RESULT="))


@pytest.fixture(scope="module")
def cases(tiny_qfilters: Path) -> list[dict[str, Any]]:
    return CASES + [{k: str(tiny_qfilters) if v == "<tiny_qfilters>" else v
                     for k, v in case.items()} for case in METHOD_CASES]


@pytest.fixture(scope="module")
def prompts(cases: list[dict[str, Any]]) -> list[list[int]]:
    rng = random.Random(21)
    return [[rng.randrange(4, 1000) for _ in range(rng.randrange(200, 300))] for _ in cases]


@pytest.fixture(scope="module")
def tp1(tiny_model: Path, cases: list[dict[str, Any]], prompts: list[list[int]]
        ) -> dict[str, Any]:
    return run(tiny_model, 1, cases, prompts)


def test_tp2_keeps_tp1s_tokens_and_output(tiny_model: Path, cases: list[dict[str, Any]],
                                          prompts: list[list[int]],
                                          tp1: dict[str, Any]) -> None:
    one = tp1
    two = run(tiny_model, 2, cases, prompts)
    assert two["tokens"] == one["tokens"]
    assert two["blocks_freed"] == one["blocks_freed"] > 0
    assert two["free_after"] == two["free_before"]  # nothing leaked
    (ref,) = one["kept"]
    rank0, rank1 = two["kept"]
    for case, rid1, rid2 in zip(cases, one["ids"], two["ids"], strict=True):
        if case["kv_policy"] == "none":
            assert rid1 not in ref and rid2 not in rank0
            continue
        for layer, heads in ref[rid1].items():
            # Two KV heads: rank 0 holds head 0, rank 1 head 1; together they are TP=1's.
            assert [*rank0[rid2][layer], *rank1[rid2][layer]] == heads, (case, layer)
            if case.get("kv_head_select") == "per_head":
                assert heads[0] != heads[1]
            else:
                assert heads[0] == heads[1]
        if "kv_decode_budget" in case or "kv_prefill_budget" in case:
            # Every decode-time / prefill-time compaction, not just the first: ranks together
            # keep TP=1's.
            (ref_all,) = one["compactions"]
            all0, all1 = two["compactions"]
            assert len(ref_all[rid1]) >= (3 if "kv_decode_budget" in case else 2)
            for mine, zero, first in zip(ref_all[rid1], all0[rid2], all1[rid2], strict=True):
                assert (zero["source_len"], zero["kept"]) == (mine["source_len"], mine["kept"])
                for layer, heads in mine["layers"].items():
                    assert [*zero["layers"][layer], *first["layers"][layer]] == heads, case


def test_fault_on_rank_one_fails_that_request_alone(tiny_model: Path,
                                                    prompts: list[list[int]],
                                                    tp1: dict[str, Any]) -> None:
    """Scoring raises on rank 1 only: rank 0 learns it through the step's collective, both
    ranks drop the compaction, the scheduler finishes that request with an error; its batch
    neighbours are exact (TP=1's tokens) and no block leaks."""
    cases = [{"kv_policy": "test-rank-one-fails", "kv_ratio": 0.3, "kv_window": 16}, CASES[2],
             CASES[5]]
    two = run(tiny_model, 2, cases, [prompts[0], prompts[2], prompts[5]])
    assert two["finish"][0] == "error"
    assert two["finish"][1:] == ["length", "length"]
    assert two["tokens"][1:] == [tp1["tokens"][2], tp1["tokens"][5]]
    assert two["free_after"] == two["free_before"]
