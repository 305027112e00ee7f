"""What benchmarks and ``kvcompress eval`` leave behind: reports replaced whole, never half."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from vllm_kvcompress.bench.artifacts import write_json_csv


def test_a_report_is_replaced_whole(tmp_path: Path) -> None:
    """A reader holding the old report (the other backend's run, ``make results``) still reads
    all of it while a new one is written; afterwards the new one is there and nothing staged is
    left beside it."""
    write_json_csv(tmp_path, "results", {"n": 1}, [{"policy": "none", "accuracy": 1.0}])
    with (tmp_path / "results.json").open() as old_json:
        write_json_csv(tmp_path, "results", {"n": 2, "pad": "x" * 100_000},
                       [{"policy": "snapkv", "accuracy": 0.5}] * 3)
        assert json.load(old_json) == {"n": 1}
    assert json.loads((tmp_path / "results.json").read_text())["n"] == 2
    with (tmp_path / "results.csv").open() as fh:
        assert [row["policy"] for row in csv.DictReader(fh)] == ["snapkv"] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.json"]
