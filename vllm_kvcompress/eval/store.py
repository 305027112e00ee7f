"""The results store of ``kvcompress eval``: one folder of append-only files that runs extend.

Files in the folder:

- ``samples.jsonl``: the prompt set both backends answer, one line per prompt (``EvalSample``
  JSON with its ``prompt_key``). A run appends the prompts it builds that the file does not hold
  yet; the last line of an id is that id's current prompt.
- ``predictions-<backend>.jsonl``: one row per (prompt, configuration, setting, turn), appended
  and flushed as each request finishes (an interrupted run loses nothing finished).
- ``settings-<backend>.json``: the latest run of that backend: its options, its ``context`` (what
  decides the meaning of a row besides the prompt) and the earlier runs whose rows the folder
  holds (``resumed_from``).
- ``.samples.lock``: held while a run checks and appends ``samples.jsonl``, so both backends may
  run at once on one store (``make -j2 bench-eval bench-peer``); their other files are their own.

Keys. Every row carries ``prompt_key`` (``tasks.samples.prompt_key``: the token ids that go into
the model) and ``config_key`` (``config_hash``: backend, model, dtype, tasks version, prefix
reuse, setting, policy, ratio, head selection, variant and the parameters that change what the
policy keeps). A run skips what the store holds under the same keys and runs the rest, so
raising ``--samples-per-cell``/``--limit`` or adding tasks, ratios, policies, head modes or
settings runs only what is missing; a row made on another prompt or under another context
(model, dtype, parameters, tasks version, prefix reuse) never counts, and the report says how
many it ignores. Nothing is deleted but by ``--fresh``.

Rows written before keys existed (no ``prompt_key``) get theirs computed when read: the prompt
from the file's first line of their id (lines without a key, the prompt set they were made on)
and the context from the settings they were made under (``settings-<backend>.legacy.json``, kept
when a keyed run first replaces that file).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .configs import DEFAULT_HEAD_SELECT, QUERY_AWARE, RunConfig, config_params, policy_params
from .tasks.samples import KEY_DIGITS, EvalSample, prompt_key

BACKENDS = ("vllm", "kvpress")
#: kvpress's ``MergingPress`` around a press: the runner's policy name ``snapkv+merge``.
MERGE_SUFFIX = "+merge"
#: (sample id, prompt key, config key, turn): a row's identity in the store.
RowKey = tuple[str, str, str, int]


def context_of(backend: str, settings: dict[str, Any] | None) -> dict[str, Any]:
    """What gives a backend's rows their meaning besides the prompt, from a settings file.

    Args:
        backend: ``vllm`` or ``kvpress``.
        settings: ``settings-<backend>.json`` (a keyed run's ``context``, or an older file's
            fields), or None when there is none.

    Returns:
        ``backend``, ``model``, ``dtype``, ``tasks_version``, ``prefix_reuse`` (None for
        kvpress, which has none) and ``params``.
    """
    settings = settings or {}
    if "context" in settings:
        return settings["context"]
    return {"backend": backend, "model": settings.get("model"), "dtype": settings.get("dtype"),
            "tasks_version": settings.get("tasks_version"),
            "prefix_reuse": settings.get("prefix_reuse") if backend == "vllm" else None,
            "params": settings.get("params") or {}}


def config_hash(context: dict[str, Any], setting: str, config: RunConfig) -> str:
    """A configuration's key under ``context`` (sha256 of the JSON, ``KEY_DIGITS`` hex digits).

    Only the parameters that change what the policy keeps count (``policy_params``, after the
    variant's overrides), so adding a policy with its own parameters to a run leaves the keys of
    the others alone. For kvpress, ``config.policy`` is its runner's name (``snapkv+merge``) and
    the selection mode is the press's own (not part of the key).
    """
    base = config.policy.removesuffix(MERGE_SUFFIX)
    material = {**{k: context.get(k) for k in ("backend", "model", "dtype", "tasks_version",
                                                 "prefix_reuse")},
                "setting": setting, "policy": config.policy, "ratio": float(config.ratio),
                "head_select": config.head_select, "variant": config.variant,
                "params": policy_params(base, config_params(config, context.get("params") or {}))}
    text = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_DIGITS]


def row_config(backend: str, row: dict[str, Any]) -> tuple[str, RunConfig]:
    """A row's setting and configuration as ``config_hash`` names them (rows written before
    settings existed are query-aware; kvpress's carry no selection mode or variant)."""
    setting = row.get("setting") or QUERY_AWARE
    if backend == "kvpress":
        return setting, RunConfig(row["policy"], float(row["ratio"]), "", "")
    if row["policy"] == "none":
        return setting, RunConfig("none", 1.0, DEFAULT_HEAD_SELECT, "")
    return setting, RunConfig(row["policy"], float(row["ratio"]),
                              row.get("head_select") or DEFAULT_HEAD_SELECT,
                              row.get("variant") or "")


def open_to_append(path: Path) -> TextIO:
    """``path`` opened for appending JSON lines; a last line cut short by a crash is ended
    first, so it cannot swallow the next line (it stays unparsable and skipped)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cut_short = False
    if path.exists() and path.stat().st_size > 0:
        with path.open("rb") as raw:
            raw.seek(-1, 2)
            cut_short = raw.read(1) != b"\n"
    sink = path.open("a")
    if cut_short:
        sink.write("\n")
    return sink


def _read_jsonl(path: Path) -> Iterable[dict[str, Any]]:
    """The lines of a JSONL file that parse (a line cut short by a crash is skipped)."""
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


@dataclass(frozen=True)
class Rows:
    """A backend's rows that count under the current prompts and context.

    Attributes:
        rows: each row once (the first of duplicates), in file order.
        ignored: rows made on other prompts or under another context.
    """

    rows: list[dict[str, Any]]
    ignored: int


@dataclass(frozen=True)
class Store:
    """The store in ``folder`` (see the module docstring).

    Attributes:
        folder: the ``--out`` folder.
    """

    folder: Path

    def predictions(self, backend: str) -> Path:
        return self.folder / f"predictions-{backend}.jsonl"

    def settings_path(self, backend: str) -> Path:
        return self.folder / f"settings-{backend}.json"

    def settings(self, backend: str) -> dict[str, Any] | None:
        """The latest run's settings of ``backend``, or None."""
        path = self.settings_path(backend)
        return json.loads(path.read_text()) if path.exists() else None

    def _legacy_settings(self, backend: str) -> dict[str, Any] | None:
        """The settings the rows without keys were made under."""
        kept = self.folder / f"settings-{backend}.legacy.json"
        if kept.exists():
            return json.loads(kept.read_text())
        current = self.settings(backend)
        return None if current is not None and "context" in current else current

    def write_settings(self, backend: str, settings: dict[str, Any]) -> None:
        """Replaces ``settings-<backend>.json``, first keeping an older file that rows without
        keys still need (``settings-<backend>.legacy.json``)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.settings_path(backend)
        legacy = self.folder / f"settings-{backend}.legacy.json"
        previous = self.settings(backend)
        if previous is not None and "context" not in previous and not legacy.exists():
            legacy.write_text(json.dumps(previous, indent=2))
        path.write_text(json.dumps(settings, indent=2))

    def forget(self, backend: str) -> None:
        """``--fresh``: this backend's rows and settings go; the prompt set stays (the other
        backend's rows are made on it)."""
        for path in (self.predictions(backend), self.settings_path(backend),
                     self.folder / f"settings-{backend}.legacy.json"):
            path.unlink(missing_ok=True)

    def samples(self) -> dict[str, dict[str, Any]]:
        """Each id's current prompt (its last line), with its ``prompt_key``."""
        latest: dict[str, dict[str, Any]] = {}
        for line in _read_jsonl(self.folder / "samples.jsonl"):
            latest[line["id"]] = {**line, "prompt_key": _line_key(line)}
        return latest

    def add_samples(self, samples: list[EvalSample]) -> int:
        """Appends the prompts whose current line differs (new, or changed); returns how many.

        Reads and appends under the store's lock: two runs starting together on one store (the
        two backends) would otherwise both find a prompt missing and interleave their appends
        (a line is longer than one buffered write), cutting prompts in two.
        """
        with self._samples_locked():
            latest = self.samples()
            new = [s.to_json() for s in samples]
            new = [line for line in new if latest.get(line["id"]) != line]
            if new:
                with open_to_append(self.folder / "samples.jsonl") as sink:
                    sink.writelines(json.dumps(line) + "\n" for line in new)
        return len(new)

    @contextmanager
    def _samples_locked(self) -> Iterator[None]:
        """An exclusive ``flock`` on ``.samples.lock`` (released when the process dies)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / ".samples.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def keyed_rows(self, backend: str) -> list[dict[str, Any]]:
        """Every parsable row of ``backend``, each with its ``prompt_key`` and ``config_key``
        (computed for rows written before keys existed; None where its prompt is unknown)."""
        rows = list(_read_jsonl(self.predictions(backend)))
        if all("config_key" in r for r in rows):
            return rows
        first: dict[str, str] = {}
        for line in _read_jsonl(self.folder / "samples.jsonl"):
            if "prompt_key" not in line:
                first.setdefault(line["id"], _line_key(line))
        context = context_of(backend, self._legacy_settings(backend))
        keyed = []
        for row in rows:
            if "config_key" not in row:
                setting, config = row_config(backend, row)
                row = {**row, "prompt_key": first.get(row["id"]),
                       "config_key": config_hash(context, setting, config)}
            keyed.append(row)
        return keyed

    def index(self, backend: str) -> dict[RowKey, dict[str, Any]]:
        """The rows of ``backend`` by (sample id, prompt key, config key, turn); the first of
        duplicates."""
        index: dict[RowKey, dict[str, Any]] = {}
        for row in self.keyed_rows(backend):
            index.setdefault(_row_key(row), row)
        return index

    def current(self, backend: str) -> Rows:
        """The rows of ``backend`` made on the current prompts under the latest run's context."""
        context = context_of(backend, self.settings(backend))
        prompts = {sid: line["prompt_key"] for sid, line in self.samples().items()}
        kept: dict[RowKey, dict[str, Any]] = {}
        ignored = 0
        for row in self.keyed_rows(backend):
            setting, config = row_config(backend, row)
            if (row["prompt_key"] != prompts.get(row["id"])
                    or row["config_key"] != config_hash(context, setting, config)):
                ignored += 1
            else:
                kept.setdefault(_row_key(row), row)
        return Rows(list(kept.values()), ignored)


    def merge_from(self, source: Store) -> dict[str, MergeCount]:
        """Appends the rows that count in ``source`` and mean the same here: a row whose
        configuration key under this store's context is the key it was made under (same model,
        dtype, tasks version, prefix reuse and the parameters that change what its policy
        keeps), on a prompt this store holds with the same key or lacks (then the prompt is
        added). So two runs made apart (two machines, two sessions, a run in a copy of the
        folder) become one store; nothing is rewritten, and a row already here is not added
        twice. A backend this store has no settings for takes the source's settings file.

        Returns:
            Per backend: rows added, already here, made under another context, or on another
            prompt than this store's for the same id.
        """
        # Under the samples lock from the first read: a run starting beside the merge adds its
        # prompts before or after it, never between the check and the append.
        with self._samples_locked():
            return self._merge_locked(source)

    def _merge_locked(self, source: Store) -> dict[str, MergeCount]:
        """``merge_from``'s work, with the samples lock held."""
        counts: dict[str, MergeCount] = {}
        mine = self.samples()
        theirs = source.samples()
        new_samples: dict[str, dict[str, Any]] = {}
        for backend in BACKENDS:
            rows = source.current(backend).rows
            if not rows:
                continue
            if self.settings(backend) is None:
                self.write_settings(backend, source.settings(backend) or {})
            context = context_of(backend, self.settings(backend))
            index = self.index(backend)
            count = MergeCount()
            added: list[dict[str, Any]] = []
            for row in rows:
                setting, config = row_config(backend, row)
                prompt = mine.get(row["id"]) or new_samples.get(row["id"])
                if row["config_key"] != config_hash(context, setting, config):
                    count.other_context += 1
                elif prompt is not None and prompt["prompt_key"] != row["prompt_key"]:
                    count.other_prompt += 1
                elif _row_key(row) in index:
                    count.already_here += 1
                else:
                    if prompt is None:
                        new_samples[row["id"]] = theirs[row["id"]]
                    index[_row_key(row)] = row
                    added.append(row)
            count.added = len(added)
            counts[backend] = count
            if new_samples:
                with open_to_append(self.folder / "samples.jsonl") as sink:
                    sink.writelines(json.dumps(line) + "\n" for line in new_samples.values())
                mine.update(new_samples)
                new_samples = {}
            with open_to_append(self.predictions(backend)) as sink:
                sink.writelines(json.dumps(row) + "\n" for row in added)
        return counts


@dataclass
class MergeCount:
    """What ``Store.merge_from`` did with one backend's rows."""

    added: int = 0
    already_here: int = 0
    other_context: int = 0
    other_prompt: int = 0


def _line_key(line: dict[str, Any]) -> str:
    return line.get("prompt_key") or prompt_key(line.get("input_ids"), line.get("max_tokens"),
                                                line.get("followup"))


def _row_key(row: dict[str, Any]) -> RowKey:
    return row["id"], row["prompt_key"], row["config_key"], int(row.get("turn", 1))


def say_ignored(backend: str, rows: Rows, out: Path) -> None:
    """One line on stderr when rows of the folder do not count (never deleted)."""
    if rows.ignored:
        print(f"kvcompress eval: {rows.ignored} {backend} rows in {out} were made on other "
              "prompts or under other settings (model, dtype, parameters, tasks version, prefix "
              "reuse); ignored, kept in the file", file=sys.stderr)
