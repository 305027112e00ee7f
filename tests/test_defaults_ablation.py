"""scripts/defaults_ablation.py: it departs from the server's own defaults, grades and pairs its
rows per prompt, and refuses a folder whose rows were made under other defaults (its rows are
found again by name, not by parameters, so reusing them would silently mislabel them)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from vllm_kvcompress.config import CompressionSpec

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "defaults_ablation.py"


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("defaults_ablation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_default_is_what_a_server_runs(ablation) -> None:
    server = CompressionSpec(policy="chunkkv", ratio=0.25)
    expected = {"window": server.window, "pool_kernel": server.pool_kernel,
                "chunk_size": server.chunk_size, "sink_tokens": server.sink_tokens}
    assert expected == ablation.DEFAULT_PARAMS
    # No variant repeats the default (it would be compared with itself).
    for overrides in ablation.ABLATION_VARIANTS.values():
        assert any(ablation.DEFAULT_PARAMS[k] != v for k, v in overrides.items())


def _samples(path: Path) -> None:
    rows = [{"id": f"niah_multikey-4096-d0-{i}", "task": "niah_multikey", "length": 4096,
             "depth": 0.0, "input_ids": [1, 2, 3], "answers": [str(1000 + i)], "match": "all",
             "max_tokens": 8, "needle_offsets": [1], "followup": None, "context_len": None}
            for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _row(i: int, variant: str, right: bool) -> str:
    return json.dumps({"id": f"niah_multikey-4096-d0-{i}", "turn": 1, "policy": "chunkkv",
                       "ratio": 0.25, "head_select": "shared", "variant": variant,
                       "text": f" {1000 + i}." if right else " 42."}) + "\n"


def test_rows_are_graded_and_paired_per_prompt(ablation, tmp_path: Path) -> None:
    _samples(tmp_path / "samples.jsonl")
    predictions = tmp_path / "predictions-vllm.jsonl"
    # The default right on prompts 0 and 1; c10 right on prompt 0 only.
    predictions.write_text("".join([_row(0, "", True), _row(1, "", True), _row(2, "", False),
                                    _row(0, "c10", True), _row(1, "c10", False),
                                    _row(2, "c10", False)]))
    samples = ablation.load_samples(tmp_path / "samples.jsonl")
    rows = {r["label"]: r for r in ablation.table(ablation.grade(samples, predictions), [0.25])}
    default, smaller = rows["chunkkv"], rows["chunkkv(c10)"]
    assert (default["n"], default["mean"]) == (3, pytest.approx(2 / 3))
    assert default["diff"] is None
    assert smaller["diff"] == pytest.approx(-1 / 3)
    assert smaller["diff_ci"][0] <= -1 / 3 <= smaller["diff_ci"][1]


def test_a_folder_made_under_other_defaults_is_refused(ablation, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    _samples(tmp_path / "samples.jsonl")
    out = tmp_path / "ablation"
    out.mkdir()
    older = {**ablation.DEFAULT_PARAMS, "chunk_size": ablation.DEFAULT_PARAMS["chunk_size"] + 1}
    (out / "ablation.json").write_text(json.dumps({"params": older,
                                                   "variants": ablation.ABLATION_VARIANTS}))
    rc = ablation.main(["--samples", str(tmp_path / "samples.jsonl"), "--model", "unused",
                        "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--out" in err and "other defaults" in err
    assert not (out / "predictions-vllm.jsonl").exists()
