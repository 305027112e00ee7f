"""What benchmarks and ``kvcompress eval`` leave behind: reports replaced whole, never half."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_nothing_staged_is_left_behind_by_a_failed_or_killed_write(tmp_path: Path) -> None:
    """A report that fails mid-write leaves no staged file beside it; the staged file a
    killed run left (its process gone) is cleared by the next write; another running
    process's is not touched."""
    write_json_csv(tmp_path, "results", {"n": 1}, [{"policy": "none", "accuracy": 1.0}])
    with pytest.raises(ValueError):
        write_json_csv(tmp_path, "results", {"n": 2}, [{"policy": "none"}, {"other": 1}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.json"]
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as alive:
        try:
            (tmp_path / f".results.json.{gone}").write_text('{"n": ')
            (tmp_path / f".results.json.{alive.pid}").write_text('{"n": ')
            write_json_csv(tmp_path, "results", {"n": 3}, [{"policy": "none", "accuracy": 1.0}])
            assert sorted(p.name for p in tmp_path.iterdir()) == [
                f".results.json.{alive.pid}", "results.csv", "results.json"]
        finally:
            alive.kill()
