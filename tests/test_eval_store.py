"""The results store of `kvcompress eval`: keys, rows written before keys existed, and runs that
extend a folder.

A row counts when its prompt (token ids) and its configuration's context (model, dtype, tasks
version, prefix reuse, setting, the parameters its policy uses) are the current ones. Raising the
limit keeps every earlier row and runs only the new prompts; a changed parameter ignores the rows
of the policies it changes (said in one line, never deleted) and keeps the others. The engine
test runs the tiny model for real; the live Qwen folder (as the old code wrote it) is read from a
copy and resumes without redoing a row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from vllm_kvcompress.eval import run as eval_run
from vllm_kvcompress.eval.configs import QUERY_AGNOSTIC, QUERY_AWARE, RunConfig
from vllm_kvcompress.eval.store import Store, config_hash, context_of, open_to_append
from vllm_kvcompress.eval.tasks import EvalSample
from vllm_kvcompress.eval.tasks.samples import prompt_key

REPO = Path(__file__).resolve().parents[1]
LIVE = REPO / "runs" / "qwen-eval"


def _context(**changes: Any) -> dict[str, Any]:
    params = {"window": 32, "pool_kernel": 5, "chunk_size": 10, "sink_tokens": 4,
              "future_positions": 512, **changes.pop("params", {})}
    return {**context_of("vllm", None), "model": "m", "dtype": "bfloat16", "tasks_version": 2,
            "prefix_reuse": True, "params": params, **changes}


def test_keys_change_with_what_changes_a_prediction() -> None:
    base = _context()
    snap, chunk, none = (RunConfig("snapkv", 0.5), RunConfig("chunkkv", 0.5),
                         RunConfig("none", 1.0))
    key = config_hash(base, QUERY_AWARE, snap)
    assert key == config_hash(_context(), QUERY_AWARE, RunConfig("snapkv", 0.5))
    # What the policy keeps depends on it: another key.
    for changed in (_context(model="other"), _context(dtype="float32"),
                    _context(tasks_version=3), _context(prefix_reuse=False),
                    _context(params={"window": 64}), _context(params={"pool_kernel": 7})):
        assert config_hash(changed, QUERY_AWARE, snap) != key
    assert config_hash(base, QUERY_AGNOSTIC, snap) != key
    assert config_hash(base, QUERY_AWARE, RunConfig("snapkv", 0.25)) != key
    assert config_hash(base, QUERY_AWARE, RunConfig("snapkv", 0.5, "per_head")) != key
    # A parameter only another policy uses, or one the run adds for another policy: same key.
    assert config_hash(_context(params={"chunk_size": 20}), QUERY_AWARE, snap) == key
    assert config_hash(_context(params={"qfilters_path": "f"}), QUERY_AWARE, snap) == key
    assert config_hash(_context(params={"chunk_size": 20}), QUERY_AWARE, chunk) != \
        config_hash(base, QUERY_AWARE, chunk)
    # Full KV depends on no policy parameter.
    assert config_hash(_context(params={"window": 64}), QUERY_AWARE, none) == \
        config_hash(base, QUERY_AWARE, none)
    # The prompt key: the token ids that go into the model, nothing else.
    follow = {"suffix_ids": [1], "stop_ids": [2], "max_tokens": 4, "question": "q"}
    assert prompt_key([1, 2], 8, follow) == prompt_key([1, 2], 8, {**follow, "question": "x"})
    assert prompt_key([1, 2], 8, None) != prompt_key([1, 3], 8, None)
    assert prompt_key([1, 2], 8, None) != prompt_key([1, 2], 9, None)
    assert prompt_key([1, 2], 8, follow) != prompt_key([1, 2], 8, {**follow, "suffix_ids": [5]})


def _legacy_folder(folder: Path) -> None:
    """A folder as the code before the store wrote it: samples without keys, rows without
    keys, the settings they were made under."""
    folder.mkdir(parents=True)
    samples = [{"id": f"s{i}", "task": "niah_single", "length": 512, "depth": 0.0,
                "input_ids": [7, i, 9], "answers": ["42"], "match": "any", "max_tokens": 4,
                "needle_offsets": [1]} for i in range(3)]
    (folder / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    rows = [{"id": s["id"], "policy": p, "ratio": r, "head_select": "shared", "variant": "",
             "turn": 1, "text": " 42", "prompt_tokens": 3, "kept_tokens": 3, "held_tokens": 3}
            for s in samples for p, r in (("none", 1.0), ("snapkv", 0.5))]
    (folder / "predictions-vllm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows)
                                                   + '{"id": "s0", "pol')  # cut by a crash
    (folder / "settings-vllm.json").write_text(json.dumps({
        "model": "m", "dtype": "bfloat16", "tasks_version": 2, "prefix_reuse": True,
        "params": {"window": 32, "pool_kernel": 5, "chunk_size": 10, "sink_tokens": 4}}))


def test_rows_without_keys_count_until_the_context_changes(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    from vllm_kvcompress.eval.grading import load_rows
    from vllm_kvcompress.eval.tasks import EvalSample

    folder = tmp_path / "run"
    _legacy_folder(folder)
    store = Store(folder)
    assert len(store.current("vllm").rows) == 6 and store.current("vllm").ignored == 0
    # A keyed run extending it: the same prompts add lines once (with their keys) and every
    # old row is found under the key the new run computes.
    sample = EvalSample(id="s1", task="niah_single", length=512, depth=0.0, input_ids=[7, 1, 9],
                        answers=["42"], match="any", max_tokens=4, needle_offsets=[1],
                        context_len=2)
    assert store.add_samples([sample]) == 1 and store.add_samples([sample]) == 0
    context = {**context_of("vllm", store.settings("vllm"))}
    index = store.index("vllm")
    for config in (RunConfig("none", 1.0), RunConfig("snapkv", 0.5)):
        assert ("s1", sample.prompt_key, config_hash(context, QUERY_AWARE, config), 1) in index
    # The new run's settings replace the file; the old ones are kept for the old rows.
    store.write_settings("vllm", {"context": {**context, "params": {
        **context["params"], "window": 64}}})
    assert json.loads((folder / "settings-vllm.legacy.json").read_text())["model"] == "m"
    current = store.current("vllm")
    assert sorted((r["id"], r["policy"]) for r in current.rows) == [
        ("s0", "none"), ("s1", "none"), ("s2", "none")]  # snapkv used window 32
    assert current.ignored == 3
    rows, ignored = load_rows(store)
    assert len(rows) == 3 and ignored == {"vllm": 3, "kvpress": 0}
    assert "3 vllm rows" in capsys.readouterr().err
    # A changed prompt under the same id: its old rows stop counting.
    store.add_samples([EvalSample(id="s2", task="niah_single", length=512, depth=0.0,
                                  input_ids=[7, 2, 8], answers=["42"], match="any",
                                  max_tokens=4, context_len=2)])
    assert sorted(r["id"] for r in store.current("vllm").rows) == ["s0", "s1"]
    assert len((folder / "predictions-vllm.jsonl").read_text().splitlines()) == 7  # kept


def test_two_runs_starting_together_add_each_prompt_once(tmp_path: Path) -> None:
    """Both backends on one store (``make -j2 bench-eval bench-peer``): a run checks and appends
    the prompt set under the store's lock, so the one that waits sees the other's lines instead
    of appending (or interleaving) its own copy."""
    folder = tmp_path / "run"
    samples = [EvalSample(id=f"s{i}", task="niah_single", length=4096, depth=0.0,
                          input_ids=list(range(i, i + 3000)), answers=["42"], match="any",
                          max_tokens=4, context_len=2) for i in range(3)]
    added: list[int] = []
    with Store(folder)._samples_locked():  # the other run, between its check and its append
        waiting = threading.Thread(target=lambda: added.append(Store(folder).add_samples(samples)))
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive() and not added  # blocked on the lock, nothing appended yet
        with open_to_append(folder / "samples.jsonl") as sink:
            sink.writelines(json.dumps(s.to_json()) + "\n" for s in samples)
    waiting.join(10)
    assert added == [0]
    lines = (folder / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["s0", "s1", "s2"]


def test_a_merge_beside_a_starting_run_adds_each_prompt_once(tmp_path: Path) -> None:
    """A merge takes the store's lock before it looks for missing prompts: a run that added
    them meanwhile (it held the lock) is seen, and the merge appends no second copy."""
    source, target = tmp_path / "source", tmp_path / "target"
    _legacy_folder(source)
    lines = (source / "samples.jsonl").read_text()
    counts: list[dict[str, Any]] = []
    with Store(target)._samples_locked():  # the run, between its check and its append
        merging = threading.Thread(target=lambda: counts.append(
            Store(target).merge_from(Store(source))))
        merging.start()
        merging.join(0.5)
        assert merging.is_alive() and not counts  # waits for the lock
        with open_to_append(target / "samples.jsonl") as sink:
            sink.write(lines)
    merging.join(10)
    assert counts and counts[0]["vllm"].added == 6
    ids = [json.loads(line)["id"] for line in (target / "samples.jsonl").read_text().splitlines()]
    assert ids == ["s0", "s1", "s2"]


def test_stores_made_apart_merge_into_one(tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    """Two copies of a store extended apart (another prompt, another window) merge back: rows
    that mean the same here are added once, with their prompts; rows made under another
    context or on another prompt for the same id are not; merging twice adds nothing."""
    target, source = tmp_path / "target", tmp_path / "source"
    _legacy_folder(target)
    shutil.copytree(target, source)
    src = Store(source)
    context = context_of("vllm", src.settings("vllm"))
    extra = {"id": "s3", "task": "niah_single", "length": 512, "depth": 0.0,
             "input_ids": [7, 3, 9], "answers": ["42"], "match": "any", "max_tokens": 4,
             "needle_offsets": [1]}
    changed = {**extra, "id": "s2", "input_ids": [7, 2, 8]}  # s2 rebuilt differently there
    with (source / "samples.jsonl").open("a") as sink:
        sink.writelines(json.dumps(line) + "\n" for line in (extra, changed))
    rows = []
    for sample, policy, ratio, head in ((extra, "none", 1.0, "shared"),
                                        (extra, "snapkv", 0.5, "per_head"),
                                        (changed, "none", 1.0, "shared")):
        key = prompt_key(sample["input_ids"], 4, None)
        config = RunConfig(policy, ratio, head)
        rows.append({"id": sample["id"], "policy": policy, "ratio": ratio, "head_select": head,
                     "variant": "", "turn": 1, "text": " 42", "prompt_tokens": 3,
                     "kept_tokens": 3, "held_tokens": 3, "prompt_key": key,
                     "config_key": config_hash(context, QUERY_AWARE, config)})
    with (source / "predictions-vllm.jsonl").open("a") as sink:
        sink.write("\n")  # after the line the crash cut short
        sink.writelines(json.dumps(r) + "\n" for r in rows)
    out = Store(target)
    counts = out.merge_from(src)["vllm"]
    # s3's two rows and its prompt come over; s2's row is on another prompt than the target's
    # s2; the legacy rows both hold are there already (s2's old rows no longer count there).
    assert (counts.added, counts.already_here, counts.other_context, counts.other_prompt) == (
        2, 4, 0, 1)
    current = out.current("vllm").rows
    assert sorted((r["id"], r["policy"], r["head_select"]) for r in current
                  if r["id"] == "s3") == [("s3", "none", "shared"), ("s3", "snapkv", "per_head")]
    assert out.samples()["s3"]["prompt_key"] == prompt_key([7, 3, 9], 4, None)
    assert out.samples()["s2"]["input_ids"] == [7, 2, 9]  # the target's prompt stays
    assert out.merge_from(src)["vllm"].added == 0  # twice: nothing more
    # The target moved on to window 64: the source's SnapKV rows (window 32) mean something
    # else there and stay out; full KV depends on no window.
    wide = {**context, "params": {**context["params"], "window": 64}}
    out.write_settings("vllm", {"context": wide})
    counts = out.merge_from(src)["vllm"]
    assert (counts.added, counts.already_here, counts.other_context) == (0, 3, 3)
    # Through the command line: the same merge, said on stderr, then the report.
    result = eval_run.run(_args(out=str(target), merge_from=[str(source)], bootstrap=20))
    assert "0 rows added, 3 already here, 3 made under another context" in \
        capsys.readouterr().err
    assert {(s["policy"], s["samples"]) for s in result["summary"]} == {("none", 4)}


def _args(**overrides: Any) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    eval_run.add_arguments(parser)
    args = parser.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    eval_run.validate(args)
    return args


@pytest.mark.engine
def test_a_run_extends_the_store_and_runs_only_what_is_missing(
        tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import gc

    out = tmp_path / "store"
    predictions = out / "predictions-vllm.jsonl"
    common = dict(model=str(tiny_model), out=str(out), tasks=["niah_single"], lengths=[512],
                  depths=[0.0], policies=["snapkv"], ratios=[1.0, 0.5], bootstrap=50)
    gc.collect()
    eval_run.run(_args(**common, samples_per_cell=1, limit=1))
    first = predictions.read_text()
    assert len(first.splitlines()) == 2  # one prompt: none and snapkv
    # Twice the prompts: the first prompt's rows stay as they are, only the new one runs.
    gc.collect()
    result = eval_run.run(_args(**common, samples_per_cell=2, limit=2))
    second = predictions.read_text()
    assert second.startswith(first) and len(second.splitlines()) == 4
    assert all(s["samples"] == 2 for s in result["summary"])
    rows = [json.loads(line) for line in second.splitlines()]
    assert len({(r["id"], r["policy"]) for r in rows}) == 4
    assert all(r["setting"] == QUERY_AWARE and r["prompt_key"] and r["config_key"]
               for r in rows)
    # A changed window: snapkv's rows no longer count and run again; full KV's still count.
    # The query-agnostic setting is asked for too: full KV and snapkv run in it (the context
    # compressed first, then reused by the whole prompt: engine_backend).
    capsys.readouterr()
    gc.collect()
    result = eval_run.run(_args(**common, samples_per_cell=2, limit=2, window=8,
                                setting=[QUERY_AWARE, QUERY_AGNOSTIC]))
    third = predictions.read_text()
    assert third.startswith(second) and len(third.splitlines()) == 10
    added = [json.loads(line) for line in third.splitlines()[4:]]
    assert sorted((r["setting"], r["policy"]) for r in added) == sorted(
        [(QUERY_AWARE, "snapkv")] * 2 + [(QUERY_AGNOSTIC, "none")] * 2
        + [(QUERY_AGNOSTIC, "snapkv")] * 2)
    assert all(r["context_reused"] for r in added
               if (r["setting"], r["policy"]) == (QUERY_AGNOSTIC, "snapkv"))
    assert result["ignored_rows"] == {"vllm": 2, "kvpress": 0}
    err = capsys.readouterr().err
    assert "2 vllm rows" in err and "ignored, kept in the file" in err
    assert result["not_run"] == []
    assert {(s["setting"], s["policy"], s["samples"]) for s in result["summary"]} == {
        (setting, policy, 2) for setting in (QUERY_AWARE, QUERY_AGNOSTIC)
        for policy in ("none", "snapkv")}
    gc.collect()


def _live_copy(tmp_path: Path) -> Path:
    if not (LIVE / "samples.jsonl").is_file():
        pytest.skip("runs/qwen-eval is not here (make bench-eval makes it)")
    copy = tmp_path / "qwen-eval"
    shutil.copytree(LIVE, copy)
    return copy


def test_the_live_qwen_folder_is_read_as_it_is(tmp_path: Path) -> None:
    """The folder the old code is writing (settings-*.json, samples.jsonl, rows without keys):
    every readable row counts or is said not to; the report and the results page show it."""
    from vllm_kvcompress.bench.results.page import build

    copy = _live_copy(tmp_path)
    store = Store(copy)
    total = {b: len(store.keyed_rows(b)) for b in ("vllm", "kvpress")}
    if not sum(total.values()):
        pytest.skip("runs/qwen-eval holds no predictions yet")
    result = eval_run.report(copy, resamples=50)
    counted = {b: len(store.current(b).rows) for b in ("vllm", "kvpress")}
    assert {b: counted[b] + result["ignored_rows"][b] for b in total} == total
    for backend in ("vllm", "kvpress"):
        settings = store.settings(backend)
        if settings is not None and "context" not in settings:  # as the old code left it
            assert result["ignored_rows"][backend] == 0
    assert {s["backend"] for s in result["summary"]} == {b for b in total if counted[b]}
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "qwen-eval").symlink_to(copy)
    text = build(runs, tmp_path / "docs" / "results.md")
    assert "## Qwen2.5 study" in text and "### Query-aware" in text
    assert "dequantized from the Q4_K_M GGUF" in text
    assert (tmp_path / "docs" / "img" / "results" /
            "qwen_accuracy_by_task_query_aware.png").is_file()


def test_the_live_qwen_folder_resumes_without_redoing_a_row(tmp_path: Path) -> None:
    """A run of the new code with the live run's options finds every row the old code wrote
    as done (the same prompts, the same keys): nothing of it is redone."""
    from transformers import AutoTokenizer

    from vllm_kvcompress.eval import kvpress_backend
    from vllm_kvcompress.eval.configs import configurations
    from vllm_kvcompress.eval.options import run_params
    from vllm_kvcompress.eval.tasks import build_samples, limit_samples

    copy = _live_copy(tmp_path)
    store = Store(copy)
    settings = store.settings("vllm")
    if settings is None or "context" in settings or not store.keyed_rows("vllm"):
        pytest.skip("runs/qwen-eval holds no rows of the old code")
    model = REPO / settings["model"]
    if not (model / "config.json").is_file():
        pytest.skip(f"{settings['model']} is not here (make models)")
    argv = [*(copy / "args.txt").read_text().split(), "--out", str(copy)]
    parser = argparse.ArgumentParser()
    eval_run.add_arguments(parser)
    args = parser.parse_args(argv)
    args.model = str(model.relative_to(REPO)) if not Path(args.model).exists() else args.model
    eval_run.validate(args)
    samples = limit_samples(build_samples(AutoTokenizer.from_pretrained(model), args.tasks,
                                          args.lengths, args.depths, args.samples_per_cell,
                                          args.seed), args.limit)
    latest = store.samples()
    assert all(latest[s.id]["prompt_key"] == s.prompt_key for s in samples)
    params = run_params(args)
    for backend in ("vllm", "kvpress"):
        args.backend = backend
        if backend == "vllm":
            configs = configurations(args.policies, args.ratios, args.head_select)
        else:
            configs = [c for c in configurations(args.policies, args.ratios)
                       if kvpress_backend.kvpress_policy(c) is not None]
            configs += kvpress_backend.held_matched(samples, args.policies, args.ratios,
                                                    params, args.model)
            configs = kvpress_backend.peer_configs(configs)
        context = eval_run._settings(args, store, params, samples, configs)["context"]
        keys = {config_hash(context, QUERY_AWARE, c) for c in configs}
        ids = {(s.id, s.prompt_key) for s in samples}
        rows = store.keyed_rows(backend)
        assert all(r["config_key"] in keys and (r["id"], r["prompt_key"]) in ids
                   for r in rows), backend
