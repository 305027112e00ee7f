"""What every benchmark and ``kvcompress eval`` leave behind: the machine they ran on, the report
as JSON, its rows as CSV, and a headless matplotlib for their PNGs."""

from __future__ import annotations

import csv
import json
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """What the numbers were measured on (CPU model, cores, Python, UTC date)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}


def write_json_csv(out: Path, stem: str, report: dict[str, Any],
                   rows: list[dict[str, Any]]) -> None:
    """``out/<stem>.json`` (the whole report) and ``out/<stem>.csv`` (one line per row; the
    columns are the first row's keys).

    Each file is written beside its name and renamed into place, so a reader (``make results``,
    or the other backend's run reporting on the same store) sees the old file or the new one,
    never half of one.
    """
    out.mkdir(parents=True, exist_ok=True)
    with _replaced_whole(out / f"{stem}.json") as staged:
        staged.write_text(json.dumps(report, indent=2))
    with _replaced_whole(out / f"{stem}.csv") as staged, staged.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@contextmanager
def _replaced_whole(path: Path) -> Iterator[Path]:
    """A file beside ``path`` to write, renamed onto ``path`` when the block ends.

    A block that raises leaves no staged file; one a killed run left (its pid gone) is removed
    by the next write of the same report.
    """
    for stale in path.parent.glob(f".{path.name}.*"):
        if not _running(stale.suffix[1:]):
            stale.unlink(missing_ok=True)
    staged = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        yield staged
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)  # gone already when the rename happened


def _running(pid: str) -> bool:
    """Whether the process that staged a file (its name's suffix) still runs."""
    if not pid.isdigit():
        return True  # not ours: leave it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    return True


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display on servers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
