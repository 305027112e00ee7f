"""The kvpress peer backend: the policy mapping and selection modes (pure), the multi-turn prompt
(the same as the package's), the peer package end to end in .kvpress-venv (`python -m
kvpress_peer`), turn 2 and job lists included, and the query-agnostic setting against kvpress's
own pipeline on SmolLM2."""

from __future__ import annotations

import ast
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from vllm_kvcompress.eval.kvpress_peer import inputs, presses

REPO = Path(__file__).resolve().parents[1]
#: The peer runs as `python -m kvpress_peer` with this folder on PYTHONPATH.
PEER_PATH = REPO / "vllm_kvcompress" / "eval"
KVPRESS_PYTHON = REPO / ".kvpress-venv" / "bin" / "python"
SMOLLM2 = REPO / "models" / "smollm2"
PARAMS = {"window": 32, "pool_kernel": 5, "chunk_size": 10, "sink_tokens": 4}


# --- the mapping (no kvpress here) ---


def test_peer_defaults_are_the_servers() -> None:
    """The peer cannot import the policy layer (it runs in kvpress's venv), so its defaults are
    written twice: a press given no parameter must still build what our server runs."""
    from vllm_kvcompress.eval import options
    from vllm_kvcompress.policies.chunkkv import CHUNK_SIZE
    from vllm_kvcompress.policies.params import COMMON_PARAMS
    from vllm_kvcompress.policies.snapkv import POOL_KERNEL

    common = {p.name: p.default for p in COMMON_PARAMS}
    server = {"window": common["window"], "sink_tokens": common["sink_tokens"],
              "chunk_size": CHUNK_SIZE.default, "pool_kernel": POOL_KERNEL.default}
    assert {k: presses.DEFAULT_PARAMS[k] for k in server} == server
    import argparse

    parser = argparse.ArgumentParser()
    options.add_arguments(parser)
    args = parser.parse_args([])
    assert {k: getattr(args, k) for k in server} == server


def test_peer_imports_without_kvpress() -> None:
    # The modules imported above (the main venv has no kvpress): kvpress is imported lazily.
    from vllm_kvcompress.eval.kvpress_peer import generation, replay, runner

    assert "kvpress" not in sys.modules
    for module in (presses, inputs, generation, replay, runner):
        assert "kvpress" not in vars(module)
    # It imports nothing of vllm_kvcompress outside its own package.
    for path in (PEER_PATH / "kvpress_peer").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1 and "vllm_kvcompress" not in (node.module or ""), path
            elif isinstance(node, ast.Import):
                assert all("vllm_kvcompress" not in a.name for a in node.names), path


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_eval_takes_its_peer_with_it(tmp_path: Path) -> None:
    # Found 2026-12-07: `kill` of a running `kvcompress eval --backend kvpress` left its peer
    # appending rows to the store beside the next run. The eval here is a stand-in parent that
    # launches the peer the way the backend does; it is SIGKILLed (no handler can run).
    pid_file = tmp_path / "peer.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    parent = subprocess.Popen([sys.executable, "-c", (
        "from vllm_kvcompress.eval.kvpress_backend import run_tied; import os, sys; "
        f"run_tied([sys.executable, '-c', {child!r}], dict(os.environ))")])
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert parent.poll() is None and time.monotonic() < deadline, "the peer never started"
            time.sleep(0.05)
        peer = int(pid_file.read_text())
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while _alive(peer):
        assert time.monotonic() < deadline, f"peer {peer} outlived the killed eval"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, reaped by init later, counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.9])
def test_compression_ratio_is_one_minus_kept_ratio(ratio: float) -> None:
    for policy in ("streamingllm", "snapkv", "pyramidkv"):
        spec = presses.press_spec(policy, ratio, PARAMS)
        assert spec is not None
        assert spec[1]["compression_ratio"] == pytest.approx(1 - ratio)
    name, kwargs = presses.press_spec("chunkkv", ratio, PARAMS)
    assert name == "ChunkKVPress"
    assert kwargs["press"][1]["compression_ratio"] == pytest.approx(1 - ratio)


def test_press_classes_and_params() -> None:
    params = {"window": 16, "pool_kernel": 7, "chunk_size": 8, "sink_tokens": 2}
    assert presses.press_spec("streamingllm", 0.25, params) == (
        "StreamingLLMPress",
        {"compression_ratio": 0.75, "n_sink": 2},
    )
    snap = {"compression_ratio": 0.75, "window_size": 16, "kernel_size": 7}
    assert presses.press_spec("snapkv", 0.25, params) == ("SnapKVPress", snap)
    assert presses.press_spec("pyramidkv", 0.25, params) == ("PyramidKVPress", snap)
    assert presses.press_spec("chunkkv", 0.25, params) == (
        "ChunkKVPress",
        {"press": ("SnapKVPress", snap), "chunk_length": 8},
    )
    # Missing params take the defaults (the engine's).
    assert presses.press_spec("snapkv", 0.5, {})[1] == {
        "compression_ratio": 0.5,
        "window_size": 32,
        "kernel_size": 5,
    }


@pytest.mark.parametrize("policy", ["none", "snapkv", "chunkkv", "streamingllm", "pyramidkv"])
def test_none_and_full_ratio_are_no_press(policy: str) -> None:
    assert presses.press_spec(policy, 1.0, PARAMS) is None
    assert presses.press_spec("none", 0.25, PARAMS) is None
    assert presses.build_press(None) is None


def test_selection_mode_per_press() -> None:
    """kvpress's ScorerPress picks a top-k per KV head; ChunkKVPress one set for all heads."""
    from vllm_kvcompress.eval import grading

    assert presses.KVPRESS_MODES == {
        "none": "shared",
        "streamingllm": "per_head",
        "snapkv": "per_head",
        "chunkkv": "shared",
        "pyramidkv": "per_head",
        "tova": "shared",  # TOVAPress averages over heads: every head keeps the same tokens
        "knorm": "per_head",
        "keydiff": "per_head",
        "expected_attention": "per_head",
        "qfilters": "per_head",
        # KVzipPress(layerwise=True): one bottom-k over each layer's (KV head, token) pairs.
        "kvzip": "joint_heads",
    }
    assert set(presses.KVPRESS_MODES) == set(presses.POLICIES)
    assert grading.KVPRESS_MODES is presses.KVPRESS_MODES  # the report reads the peer's table


def test_kvzip_is_kvzip_press_run_per_config() -> None:
    """Our kvzip is KVzipPress with our per-layer budget (layerwise), sinks and chunk size; the
    main venv's backend names it; the runner never replays it on a shared prefill (it runs the
    model again to score), in either setting, while the other presses still share one."""
    from vllm_kvcompress.eval.configs import RunConfig
    from vllm_kvcompress.eval.kvpress_backend import kvpress_policy, peer_configs
    from vllm_kvcompress.eval.kvpress_peer import runner

    assert presses.press_spec("kvzip", 0.25, {**PARAMS, "sink_tokens": 2}) == (
        "KVzipPress",
        {"compression_ratio": 0.75, "layerwise": True, "n_sink": 2, "chunk_size": 2048},
    )
    spec = presses.press_spec("kvzip", 0.5, {"kvzip_chunk_size": 100})
    assert spec[1]["chunk_size"] == 100 and spec[1]["n_sink"] == 4
    assert presses.press_spec("kvzip", 1.0, PARAMS) is None
    with pytest.raises(presses.InputError, match="ScorerPress"):
        presses.press_spec("kvzip+merge", 0.25, PARAMS)
    assert not presses.replayable(spec)
    assert presses.replayable(None) and presses.replayable(presses.press_spec("snapkv", 0.5, {}))
    assert presses.replayable(presses.press_spec("chunkkv", 0.5, {}))  # a wrapper: its press
    assert kvpress_policy(RunConfig("kvzip", 0.25, "shared", "")) == "kvzip"
    assert peer_configs([RunConfig("kvzip", 0.25, "per_head", "")]) == [
        RunConfig("kvzip", 0.25, "", "")]

    configs = [{"policy": p, "ratio": r, "spec": presses.press_spec(p, r, PARAMS), "key": None}
               for p, r in (("none", 1.0), ("kvzip", 0.25), ("snapkv", 0.25))]
    assert runner.replay_plan(configs, True) == [True, False, True]
    assert runner.replay_plan(configs, False) == [False, False, False]

    log: list[tuple[str, Any]] = []

    class Records:
        def write(self, sample: Any, cfg: dict[str, Any], turn: int, prompt: list[int],
                  result: dict[str, Any], shared: bool) -> None:
            log.append(("record", (cfg["policy"], shared)))

    patched = {
        "shared_prefill": lambda model, ids: log.append(("shared", len(ids))) or "SP",
        "generate": lambda model, press, ids, max_tokens, eos, context_len=None: log.append(
            ("generate", (press, context_len))) or {"output_ids": [1]},
        "generate_shared": lambda model, press, shared, max_tokens, eos, question=None: (
            log.append(("replay", (press, shared, question))) or {"output_ids": [1]}),
        "clear_masks": lambda model: None,
    }
    sample = {"input_ids": list(range(4, 104)), "context_len": 80, "turn1": {},
              "max_tokens": 2, "followup": None, "todo": [(0, 1), (1, 1), (2, 1)]}
    names = ["none", "KVZIP", "SNAP"]  # stand-ins for the built presses
    plan = runner.replay_plan(configs, True)
    saved = {name: getattr(runner, name) for name in patched}
    try:
        for name, fn in patched.items():
            setattr(runner, name, fn)
        for agnostic in (False, True):
            context = 80 if agnostic else None
            question = list(range(84, 104)) if agnostic else None
            log.clear()
            runner._run_sample(None, sample, configs, names, set(), agnostic, plan, Records())
            assert log == [
                ("shared", 80 if agnostic else 100),
                ("replay", ("none", "SP", question)), ("record", ("none", True)),
                # kvzip: a prefill of its own with the press active (the context's alone when
                # query-agnostic), between two replays of the shared one.
                ("generate", ("KVZIP", context)), ("record", ("kvzip", False)),
                ("replay", ("SNAP", "SP", question)), ("record", ("snapkv", True)),
            ], agnostic
            # kvzip alone: no shared prefill is made at all.
            log.clear()
            runner._run_sample(None, {**sample, "todo": [(1, 1)]}, configs, names, set(),
                               agnostic, plan, Records())
            assert log == [("generate", ("KVZIP", context)), ("record", ("kvzip", False))]
    finally:
        for name, fn in saved.items():
            setattr(runner, name, fn)


@pytest.mark.parametrize(
    ("output_ids", "answer"),
    [([7, 8, 3], [7, 8]), ([7, 8], [7, 8]), ([7, 3, 3], [7]), ([3], []), ([], [])],
)
def test_turn2_ids_are_the_packages(output_ids: list[int], answer: list[int]) -> None:
    from vllm_kvcompress.eval.tasks import turn2_input_ids

    prompt, suffix, stops = [1, 2, 5], [3, 9, 10], [3, 0]
    ids = inputs.turn2_input_ids(prompt, output_ids, suffix, stops)
    assert ids == [*prompt, *answer, *suffix]
    assert ids == turn2_input_ids(prompt, output_ids, suffix, stops)


def test_unknown_policy_error_names_it() -> None:
    with pytest.raises(presses.InputError, match=r"'h2o'.*allowed: none, streamingllm, snapkv"):
        presses.press_spec("h2o", 0.25, PARAMS)


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, "0.5", True, None])
def test_ratio_outside_range(ratio: Any) -> None:
    with pytest.raises(presses.InputError, match="ratio"):
        presses.press_spec("snapkv", ratio, PARAMS)


def _write_inputs(
    folder: Path, samples: list[dict[str, Any]], configs: list[dict[str, Any]],
    setting: str = "query_aware", **params: Any
) -> tuple[Path, Path]:
    samples_path, configs_path = folder / "samples.jsonl", folder / "configs.json"
    samples_path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    configs_path.write_text(json.dumps({"configs": configs, "params": {**PARAMS, **params},
                                        "setting": setting}))
    return samples_path, configs_path


def _run(
    python: Path | str, model: Path, folder: Path, out: Path, *extra: str
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(PEER_PATH)}
    cmd = [
        str(python), "-m", "kvpress_peer", "--model", str(model), "--out", str(out),
        "--samples", str(folder / "samples.jsonl"), "--configs", str(folder / "configs.json"),
        *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          cwd=folder)


def _sample(n: int = 64, **fields: Any) -> list[dict[str, Any]]:
    return [{"id": "a", "input_ids": [5] * n, "max_tokens": 4, **fields}]


def _config(policy: str = "snapkv", ratio: Any = 0.5) -> list[dict[str, Any]]:
    return [{"policy": policy, "ratio": ratio}]


@pytest.mark.parametrize(
    ("samples", "configs", "params", "message"),
    [
        (_sample(), _config("h2o"), {}, "configs[0]: unknown policy 'h2o'"),
        (_sample(), _config(ratio=0), {}, "configs[0]: ratio must be"),
        (_sample(max_tokens=None), _config(), {}, "line 1: 'max_tokens'"),
        (_sample(id=7), _config(), {}, "line 1: 'id'"),
        (_sample(0), _config("none", 1), {}, "line 1: 'input_ids'"),
        (_sample(), _config(), {"pool_kernel": 4}, "params.pool_kernel must be odd"),
        (_sample(20), _config(), {}, "has 20 prompt tokens; snapkv needs >= 33"),
        (
            _sample(followup={"suffix_ids": [], "stop_ids": [], "max_tokens": 4}),
            _config(),
            {},
            "line 1: 'followup.suffix_ids' must not be empty",
        ),
        (
            _sample(followup={"suffix_ids": [1], "stop_ids": "2", "max_tokens": 4}),
            _config(),
            {},
            "line 1: 'followup.stop_ids'",
        ),
        (
            _sample(followup={"suffix_ids": [1], "stop_ids": [2], "max_tokens": 0}),
            _config(),
            {},
            "line 1: 'followup.max_tokens'",
        ),
        (_sample(followup=[1]), _config(), {}, "line 1: 'followup' must be an object"),
        (_sample(todo=[[1, 1]]), _config(), {}, "line 1: 'todo' item [1, 1]"),
        (_sample(todo=[[0, 2]]), _config(), {}, "line 1: 'todo' item [0, 2]"),
        (
            _sample(followup={"suffix_ids": [1], "stop_ids": [2], "max_tokens": 4},
                    todo=[[0, 2]]),
            _config(),
            {},
            "turn 2 of configs [0] without their turn 1",
        ),
        (_sample(context_len=64), _config(), {}, "line 1: 'context_len' must be an int"),
        (_sample(), _config(), {"setting": "query_agnostic"}, "'context_len' is required"),
        (_sample(context_len=20), _config(), {"setting": "query_agnostic"},
         "has 20 context tokens; snapkv needs >= 33"),
        (_sample(), _config(), {"setting": "later"}, "'setting' must be one of"),
    ],
)
def test_bad_input_exits_2(
    tmp_path: Path,
    samples: list[dict[str, Any]],
    configs: list[dict[str, Any]],
    params: dict[str, Any],
    message: str,
) -> None:
    # Inputs are checked before torch or kvpress is imported: the main venv's Python will do.
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    _write_inputs(tmp_path, samples, configs, **params)
    proc = _run(sys.executable, model, tmp_path, tmp_path / "out.jsonl")
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.jsonl").exists()


def test_missing_files_and_bad_json_exit_2(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    _write_inputs(tmp_path, [], [{"policy": "none", "ratio": 1}])
    (tmp_path / "samples.jsonl").write_text('{"id": "a", "input_ids": [1, 2\n')
    proc = _run(sys.executable, model, tmp_path, tmp_path / "out.jsonl")
    assert proc.returncode == 2 and "samples.jsonl line 1: bad JSON" in proc.stderr
    (tmp_path / "configs.json").unlink()
    proc = _run(sys.executable, model, tmp_path, tmp_path / "out.jsonl")
    assert proc.returncode == 2 and "--configs" in proc.stderr and "cannot read" in proc.stderr
    proc = _run(sys.executable, tmp_path / "nowhere", tmp_path, tmp_path / "out.jsonl")
    assert proc.returncode == 2 and "--model" in proc.stderr


# --- end to end in .kvpress-venv ---

# Run with the kvpress venv's Python: transformers' own greedy `generate` (the reference for
# policy none) and, for StreamingLLM, greedy decoding over the FULL cache with the evicted
# positions masked out: the same attention as the compressed cache, so it checks that decoded
# tokens get positions continuing from the original prompt length.
REFERENCE = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, DynamicCache

torch.set_num_threads(1)
model_dir, samples_path = sys.argv[1], sys.argv[2]
n_sink, kept_ratio = int(sys.argv[3]), float(sys.argv[4])
model = AutoModelForCausalLM.from_pretrained(
    model_dir, dtype=torch.float32, attn_implementation="sdpa"
)
model.eval()
eos = model.generation_config.eos_token_id
eos = set([eos] if isinstance(eos, int) else eos)
result = {}
with torch.inference_mode():
    for line in open(samples_path):
        s = json.loads(line)
        ids = torch.tensor([s["input_ids"]])
        L = ids.shape[1]
        gen = model.generate(ids, max_new_tokens=s["max_tokens"], do_sample=False)
        # kvpress StreamingLLM keeps int(L * (1 - compression_ratio)) tokens: the n_sink first and
        # the most recent rest; it drops [n_sink, n_sink + n_pruned).
        n_pruned = L - int(L * (1 - (1 - kept_ratio)))
        keep = torch.ones(L, dtype=torch.long)
        keep[n_sink:n_sink + n_pruned] = 0
        cache = DynamicCache()
        out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
        token = int(out.logits[0, -1].argmax())
        masked = [token]
        mask = keep.clone()
        while len(masked) < s["max_tokens"] and token not in eos:
            mask = torch.cat([mask, torch.ones(1, dtype=torch.long)])
            out = model(
                input_ids=torch.tensor([[token]]), past_key_values=cache,
                attention_mask=mask[None], position_ids=torch.tensor([[L + len(masked) - 1]]),
            )
            token = int(out.logits[0, -1].argmax())
            masked.append(token)
        result[s["id"]] = {"generate": gen[0, L:].tolist(), "streamingllm_masked": masked}
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def kvpress_python() -> Path:
    """The .kvpress-venv interpreter, built (about a minute) when missing or stale."""
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "kvpress_venv.sh")],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert KVPRESS_PYTHON.exists()
    return KVPRESS_PYTHON


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


@pytest.mark.peer
def test_runner_end_to_end(kvpress_python: Path, tiny_model: Path, tmp_path: Path) -> None:
    rng = random.Random(0)
    max_tokens = 8
    samples = [
        {"id": f"s{n}", "input_ids": [rng.randrange(4, 1000) for _ in range(n)],
         "max_tokens": max_tokens, "question": "ignored"}
        for n in (200, 150)
    ]  # fmt: skip
    configs = [
        {"policy": "none", "ratio": 1.0},
        {"policy": "snapkv", "ratio": 0.25},
        {"policy": "streamingllm", "ratio": 0.25},
        {"policy": "chunkkv", "ratio": 0.25},
        {"policy": "pyramidkv", "ratio": 0.25},
    ]
    _write_inputs(tmp_path, samples, configs)
    out = tmp_path / "predictions.jsonl"
    proc = _run(kvpress_python, tiny_model, tmp_path, out)
    assert proc.returncode == 0, proc.stderr
    assert "kvpress: 100%" in proc.stderr  # the tqdm bar, on stderr
    records = _records(out)
    assert len(records) == len(samples) * len(configs)
    by_key = {(r["id"], r["policy"]): r for r in records}

    ref = subprocess.run(
        [str(kvpress_python), "-c", REFERENCE, str(tiny_model), str(tmp_path / "samples.jsonl"),
         str(PARAMS["sink_tokens"]), "0.25"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert ref.returncode == 0, ref.stderr
    reference = json.loads(ref.stdout.strip().splitlines()[-1])

    for sample in samples:
        prompt_len = len(sample["input_ids"])
        none = by_key[(sample["id"], "none")]
        assert none["output_ids"] == reference[sample["id"]]["generate"]
        assert none["kept_tokens"] == prompt_len
        for r in (by_key[(sample["id"], c["policy"])] for c in configs):
            assert r["backend"] == "kvpress" and r["kvpress_version"] == "0.5.5"
            assert r["turn"] == 1 and r["kvpress_mode"] == presses.KVPRESS_MODES[r["policy"]]
            assert r["prompt_tokens"] == prompt_len and r["prefill_s"] > 0
            ids = r["output_ids"]
            assert len(ids) == max_tokens or (0 < len(ids) < max_tokens and ids[-1] == 3)
            # The press evicts after each layer's prefill attention, which saw the whole prompt:
            # the first token is the uncompressed one.
            assert ids[0] == none["output_ids"][0]
        # kvpress keeps max(1, int(L * (1 - compression_ratio))) tokens per layer (and per head)
        # for SnapKV and StreamingLLM: int(0.25 * L), window and sinks included in the count.
        for policy in ("snapkv", "streamingllm"):
            r = by_key[(sample["id"], policy)]
            assert r["kept_tokens"] == int(prompt_len * 0.25)
            assert r["kept_tokens_per_layer"] == [int(prompt_len * 0.25)] * 4
        # ChunkKV keeps whole chunks: max(1, int(n_chunks * 0.25)) of chunk_size (prompts here are
        # multiples of chunk_size, so no partial chunk).
        n_chunks = prompt_len // PARAMS["chunk_size"]
        chunk = by_key[(sample["id"], "chunkkv")]
        assert chunk["kept_tokens"] == int(n_chunks * 0.25) * PARAMS["chunk_size"]
        # PyramidKV's pyramid needs min_num >= window; for such short prompts kvpress falls back to
        # a uniform round(L * 0.25) per layer.
        pyramid = by_key[(sample["id"], "pyramidkv")]
        assert pyramid["kept_tokens_per_layer"] == [round(prompt_len * 0.25)] * 4
        # StreamingLLM's compressed cache decodes like the full cache with the evicted positions
        # masked, RoPE positions continuing from the original prompt length.
        streaming = by_key[(sample["id"], "streamingllm")]
        assert streaming["output_ids"] == reference[sample["id"]]["streamingllm_masked"]

    # A crash left the last two records missing and the one before cut short; the results
    # store hands the peer those two jobs only (`todo`): they are redone, identically, after the
    # cut line (which stays; the store skips it).
    before = out.read_text()
    lines = before.splitlines(keepends=True)
    out.write_text("".join(lines[:-3]) + lines[-3][:25])
    last = samples[-1]
    jobs = [{**sample, "todo": []} for sample in samples[:-1]]
    _write_inputs(tmp_path, [*jobs, {**last, "todo": [[3, 1], [4, 1]]}], configs)
    proc = _run(kvpress_python, tiny_model, tmp_path, out)
    assert proc.returncode == 0, proc.stderr
    assert "kvpress: 100%" in proc.stderr and "2/2" in proc.stderr
    text = out.read_text()
    cut = lines[-3][:25]
    assert text.startswith("".join(lines[:-3]) + cut + "\n")
    strip = ("prefill_s", "decode_s")
    redone = [json.loads(line) for line in text.splitlines()[len(lines) - 2:]]
    assert [{k: v for k, v in r.items() if k not in strip} for r in redone] == [
        {k: v for k, v in r.items() if k not in strip} for r in records[-2:]
    ]


@pytest.mark.peer
def test_runner_multiturn(kvpress_python: Path, tiny_model: Path, tmp_path: Path) -> None:
    """Turn 2 = turn 1's prompt + its answer as generated + the template's turn 2, run fresh
    (query-aware) under the same press; `none`'s turn 2 is transformers' own `generate` on it."""
    rng = random.Random(3)
    stop = 3  # the tiny model's EOS (<|im_end|>)
    samples = [
        {"id": "multi", "input_ids": [rng.randrange(4, 1000) for _ in range(180)],
         "max_tokens": 6,
         "followup": {"suffix_ids": [stop, 202, 2, 966, 262, 202], "stop_ids": [stop],
                      "max_tokens": 5}},
        {"id": "single", "input_ids": [rng.randrange(4, 1000) for _ in range(120)],
         "max_tokens": 6},
    ]  # fmt: skip
    configs = [
        {"policy": "none", "ratio": 1.0},
        {"policy": "snapkv", "ratio": 0.25},
        {"policy": "chunkkv", "ratio": 0.25},
    ]
    _write_inputs(tmp_path, samples, configs)
    out = tmp_path / "predictions.jsonl"
    proc = _run(kvpress_python, tiny_model, tmp_path, out)
    assert proc.returncode == 0, proc.stderr
    records = _records(out)
    assert len(records) == (len(samples) + 1) * len(configs)  # turn 2 of "multi" only
    by_key = {(r["id"], r["policy"], r["turn"]): r for r in records}
    assert {k for k in by_key if k[2] == 2} == {("multi", c["policy"], 2) for c in configs}
    follow = samples[0]["followup"]
    turn2_prompts = []
    for cfg in configs:
        first, second = by_key[("multi", cfg["policy"], 1)], by_key[("multi", cfg["policy"], 2)]
        ids = inputs.turn2_input_ids(
            samples[0]["input_ids"], first["output_ids"], follow["suffix_ids"], follow["stop_ids"]
        )
        assert second["prompt_tokens"] == len(ids)
        assert len(second["output_ids"]) <= follow["max_tokens"]
        assert second["kvpress_mode"] == presses.KVPRESS_MODES[cfg["policy"]]
        if cfg["policy"] == "snapkv":  # the press ran on the turn-2 prompt
            assert second["kept_tokens"] == int(len(ids) * 0.25)
        turn2_prompts.append({"id": cfg["policy"], "input_ids": ids, "max_tokens": 5})

    # `none`'s turn 2 is plain greedy generation on the turn-2 prompt.
    (tmp_path / "turn2.jsonl").write_text("".join(json.dumps(t) + "\n" for t in turn2_prompts))
    ref = subprocess.run(
        [str(kvpress_python), "-c", REFERENCE, str(tiny_model), str(tmp_path / "turn2.jsonl"),
         str(PARAMS["sink_tokens"]), "0.25"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert ref.returncode == 0, ref.stderr
    reference = json.loads(ref.stdout.strip().splitlines()[-1])
    assert by_key[("multi", "none", 2)]["output_ids"] == reference["none"]["generate"]

    # Turn-2 jobs whose turn 1 is recorded (the store hands over its answers) are redone from
    # those answers, identically.
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(line for line in lines if '"turn": 2' not in line))
    answers = {str(i): by_key[("multi", c["policy"], 1)]["output_ids"]
               for i, c in enumerate(configs)}
    _write_inputs(tmp_path, [{**samples[0], "todo": [[i, 2] for i in range(len(configs))],
                              "turn1_output_ids": answers}, {**samples[1], "todo": []}],
                  configs)
    proc = _run(kvpress_python, tiny_model, tmp_path, out)
    assert proc.returncode == 0, proc.stderr
    strip = ("prefill_s", "decode_s")
    redone = {(r["id"], r["policy"], r["turn"]): {k: v for k, v in r.items() if k not in strip}
              for r in _records(out)}  # fmt: skip
    assert redone == {k: {f: v for f, v in r.items() if f not in strip} for k, r in by_key.items()}


# --- shared prefill (the default) vs one prefill per config (--no-shared-prefill) ---

# Run with the kvpress venv's Python: for every config, the cache right after compression from a
# real prefill with the press active (`prefill`) and from the press's hook replayed on one shared
# press-free prefill (`replay_press`), all layers, then greedy decoding from each.
EQUIVALENCE = r"""
import json, random, sys
from pathlib import Path
import torch

sys.path.insert(0, sys.argv[1])
from kvpress_peer import generation, presses, replay
from kvpress_peer.runner import load_model

torch.set_num_threads(1)
model, _ = load_model(Path(sys.argv[2]), "float32")
prompt_len, params = int(sys.argv[3]), json.loads(sys.argv[4])
rng = random.Random(1)
input_ids = [rng.randrange(4, 1000) for _ in range(prompt_len)]
eos = generation.eos_token_ids(model)
shared = replay.shared_prefill(model, input_ids)
snapshot = [(c.keys.clone(), c.values.clone(), c.kwargs["hidden_states"].clone(),
             c.output[0].clone()) for c in shared.calls]
results = []
for policy in [*presses.POLICIES, "snapkv+merge"]:
    if not presses.replayable(presses.press_spec(policy, 0.5, params)):
        continue  # KVzipPress: scored by running the model again, never replayed
    for ratio in [1.0] if policy == "none" else [0.5, 0.25, 0.1]:
        press = presses.build_press(presses.press_spec(policy, ratio, params))
        old, old_logits, _ = generation.prefill(model, press, input_ids)
        new, _ = replay.replay_press(model, press, shared)
        layers = []
        for a, b in zip(old.layers, new.layers, strict=True):
            layer = {"kept": [a.keys.shape[-2], b.keys.shape[-2]], "bitwise": True, "max_diff": 0.0}
            for x, y in ((a.keys, b.keys), (a.values, b.values)):
                if x.shape != y.shape:
                    layer["bitwise"], layer["max_diff"] = False, None
                elif not torch.equal(x, y):
                    layer["bitwise"] = False
                    layer["max_diff"] = max(layer["max_diff"], float((x - y).abs().max()))
            layers.append(layer)
        old_ids = generation.decode(model, old, int(old_logits.argmax()), prompt_len, 8, eos)
        new_ids = generation.decode(model, new, int(shared.logits.argmax()), prompt_len, 8, eos)
        results.append({
            "policy": policy, "ratio": ratio, "layers": layers, "n_layers": len(old.layers),
            "logits_bitwise": bool(torch.equal(old_logits, shared.logits)),
            "old_ids": old_ids, "new_ids": new_ids,
        })
intact = all(
    torch.equal(k, c.keys) and torch.equal(v, c.values)
    and torch.equal(h, c.kwargs["hidden_states"]) and torch.equal(o, c.output[0])
    for (k, v, h, o), c in zip(snapshot, shared.calls, strict=True)
)
print(json.dumps({"results": results, "shared_intact": intact, "n_calls": len(shared.calls)}))
"""


RAGGED = r"""
import copy, json, random, sys
from pathlib import Path
import torch

sys.path.insert(0, sys.argv[1])
from kvpress_peer import generation, presses
from kvpress_peer.runner import load_model

torch.set_num_threads(1)
model, _ = load_model(Path(sys.argv[2]), "float32")
params = json.loads(sys.argv[3])
rng = random.Random(2)
context = [rng.randrange(4, 1000) for _ in range(1703)]
question = [rng.randrange(4, 1000) for _ in range(9)]
report = {}
# Equal layer lengths: the per-token path against the one pass kvpress's pipeline makes.
cache, _, _ = generation.prefill(model, None, context)
one = generation.prefill_question(model, copy.deepcopy(cache), question, len(context))
per_token = generation.prefill_question_per_token(model, copy.deepcopy(cache), question,
                                                  len(context))
report["max_diff"] = float((one - per_token).abs().max())
report["same_argmax"] = int(one.argmax()) == int(per_token.argmax())
# PyramidKVPress: layers of different lengths.
press = presses.build_press(presses.press_spec("pyramidkv", 0.25, params))
cache, _, _ = generation.prefill(model, press, context)
report["lengths"] = [int(layer.keys.shape[-2]) for layer in cache.layers]
positions = torch.arange(len(context), len(context) + len(question)).unsqueeze(0)
try:
    with torch.inference_mode():
        model(input_ids=torch.tensor([question]), past_key_values=copy.deepcopy(cache),
              position_ids=positions, logits_to_keep=1)
    report["one_pass_error"] = None
except RuntimeError as error:
    report["one_pass_error"] = str(error)
logits = generation.prefill_question(model, cache, question, len(context))
report["finite"] = bool(torch.isfinite(logits).all())
report["grown"] = [int(layer.keys.shape[-2]) for layer in cache.layers]
print(json.dumps(report))
"""


@pytest.mark.peer
def test_a_question_is_prefilled_on_layers_of_different_lengths(kvpress_python: Path,
                                                               tiny_model: Path) -> None:
    """Query-agnostic PyramidKV: kvpress's per-layer budgets leave layers of different lengths,
    on which kvpress's one-pass question prefill fails (transformers' mask follows layer 0);
    the peer prefills such a question token by token, which computes what the one pass does
    on a cache it can take (fp32, same logits to rounding, same next token)."""
    params = {**PARAMS, "window": 8}  # a real pyramid at 1703 tokens (see the replay test)
    proc = subprocess.run(
        [str(kvpress_python), "-c", RAGGED, str(PEER_PATH), str(tiny_model), json.dumps(params)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["max_diff"] < 1e-4 and report["same_argmax"], report
    assert len(set(report["lengths"])) > 1, report["lengths"]
    assert report["one_pass_error"] and "must match" in report["one_pass_error"]
    assert report["finite"]
    assert report["grown"] == [n + 9 for n in report["lengths"]]


@pytest.mark.peer
def test_shared_prefill_replay_is_bit_identical(kvpress_python: Path, tiny_model: Path,
                                                tiny_qfilters: Path) -> None:
    # PyramidKV uses its pyramid only when min_num = L * ratio / beta(20) >= window (else a uniform
    # fallback): window 8 and 1703 tokens give real per-layer budgets at 0.5, 0.25 and 0.1 (window
    # 32 would need 6400+ tokens at 0.1). 1703 is no multiple of chunk_size: ChunkKV has a partial
    # chunk.
    prompt_len = 1703
    params = {**PARAMS, "window": 8, "future_positions": 64, "qfilters_path": str(tiny_qfilters)}
    proc = subprocess.run(
        [str(kvpress_python), "-c", EQUIVALENCE, str(PEER_PATH), str(tiny_model), str(prompt_len),
         json.dumps(params)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    results = report["results"]
    # Every press the runner replays (the methods issue's included, MergingPress around SnapKV;
    # not KVzipPress, which always gets a prefill of its own).
    replayed = [p for p in presses.POLICIES
                if presses.replayable(presses.press_spec(p, 0.5, params))]
    assert "kvzip" not in replayed
    assert len(results) == 1 + (len(replayed) - 1 + 1) * 3
    assert report["n_calls"] == 4  # every attention layer recorded once
    for r in results:
        where = f"{r['policy']} {r['ratio']}"
        assert r["n_layers"] == 4, where
        # The cache right after compression, every layer: same kept tokens, bit for bit.
        for layer in r["layers"]:
            assert layer["kept"][0] == layer["kept"][1], where
            assert layer["bitwise"], f"{where}: max |diff| {layer['max_diff']}"
        # The press leaves the forward pass alone: the last prompt token's logits are the same.
        assert r["logits_bitwise"], where
        assert r["old_ids"] == r["new_ids"], where
        assert len(r["old_ids"]) == 8 or r["old_ids"][-1] == 3, where
    kept = {(r["policy"], r["ratio"]): [layer["kept"][0] for layer in r["layers"]] for r in results}
    assert kept[("none", 1.0)] == [prompt_len] * 4
    for ratio in (0.5, 0.25, 0.1):
        for policy in ("snapkv", "tova", "knorm", "keydiff", "qfilters", "snapkv+merge"):
            assert kept[(policy, ratio)] == [int(prompt_len * ratio)] * 4, policy
        # Real pyramid: strictly decreasing budgets, the last layer's >= the window.
        pyramid = kept[("pyramidkv", ratio)]
        assert pyramid == sorted(set(pyramid), reverse=True) and pyramid[-1] >= 8, pyramid
        # The partial chunk (3 tokens) is among ChunkKV's chunks or not: kept % 10 is 0 or 3.
        assert kept[("chunkkv", ratio)][0] % PARAMS["chunk_size"] in (0, 3)
    # Replays read the shared prefill and never write to it.
    assert report["shared_intact"]


@pytest.mark.peer
def test_shared_prefill_matches_per_config_prefill_end_to_end(
    kvpress_python: Path, tiny_model: Path, tmp_path: Path
) -> None:
    # The runner's default (shared prefill) and --no-shared-prefill write the same records but
    # for the timings and the shared_prefill flag; default params (window 32): 700 tokens give
    # PyramidKV real budgets at 0.5. KVzip (first, so the replayed presses after it would decode
    # through any key masks it left behind) takes a prefill of its own in both runs.
    rng = random.Random(2)
    samples = [
        {"id": f"s{n}", "input_ids": [rng.randrange(4, 1000) for _ in range(n)], "max_tokens": 6}
        for n in (700, 333)
    ]
    configs = [{"policy": "none", "ratio": 1.0}] + [
        {"policy": p, "ratio": r}
        for p in ("kvzip", "streamingllm", "snapkv", "chunkkv", "pyramidkv")
        for r in (0.5, 0.1)
    ]
    _write_inputs(tmp_path, samples, configs, kvzip_chunk_size=256)
    shared_out, per_config_out = tmp_path / "shared.jsonl", tmp_path / "per_config.jsonl"
    proc = _run(kvpress_python, tiny_model, tmp_path, shared_out)
    assert proc.returncode == 0, proc.stderr
    assert "kvpress: 100%" in proc.stderr and f"{len(samples) * len(configs)}/" in proc.stderr
    proc = _run(kvpress_python, tiny_model, tmp_path, per_config_out, "--no-shared-prefill")
    assert proc.returncode == 0, proc.stderr
    shared, per_config = _records(shared_out), _records(per_config_out)
    assert len(shared) == len(per_config) == len(samples) * len(configs)
    assert all(r["shared_prefill"] is (r["policy"] != "kvzip") for r in shared)
    assert all(r["shared_prefill"] is False for r in per_config)
    # KVzipPress(layerwise=True) masks int(kv_heads * L * (1 - ratio)) entries in every layer,
    # ranked over the layer's heads together: L - that / kv_heads kept per layer, on average.
    for r in shared:
        if r["policy"] == "kvzip":
            length = r["prompt_tokens"]
            kept = length - int(2 * length * (1 - r["ratio"])) / 2
            assert r["kept_tokens_per_layer"] == [pytest.approx(kept)] * 4, r["ratio"]
            assert r["kvpress_mode"] == "joint_heads"
    strip = ("prefill_s", "decode_s", "shared_prefill")
    assert [{k: v for k, v in r.items() if k not in strip} for r in shared] == [
        {k: v for k, v in r.items() if k not in strip} for r in per_config
    ]
    pyramid = next(r for r in shared if r["id"] == "s700" and r["policy"] == "pyramidkv"
                   and r["ratio"] == 0.5)  # fmt: skip
    assert len(set(pyramid["kept_tokens_per_layer"])) == 4


# --- the methods issue's presses ---


def test_method_presses_map_to_kvpress_classes(tmp_path: Path) -> None:
    filters = tmp_path / "f.safetensors"
    filters.write_bytes(b"x")
    params = {**PARAMS, "future_positions": 64, "qfilters_path": str(filters)}
    assert presses.press_spec("tova", 0.25, params) == ("TOVAPress", {"compression_ratio": 0.75})
    assert presses.press_spec("knorm", 0.1, params)[0] == "KnormPress"
    assert presses.press_spec("keydiff", 0.1, params)[0] == "KeyDiffPress"
    assert presses.press_spec("expected_attention", 0.25, params) == (
        "ExpectedAttentionPress",
        {"compression_ratio": 0.75, "n_future_positions": 64, "n_sink": 4},
    )
    assert presses.press_spec("qfilters", 0.25, params) == (
        "QFilterPress", {"compression_ratio": 0.75, "qfilters_path": str(filters)})
    with pytest.raises(presses.InputError, match="qfilters_path"):
        presses.press_spec("qfilters", 0.25, PARAMS)
    assert set(presses.KVPRESS_MODES) == set(presses.POLICIES)


@pytest.mark.peer
def test_runner_method_presses_end_to_end(kvpress_python: Path, tiny_model: Path,
                                          tiny_qfilters: Path, tmp_path: Path) -> None:
    """TOVA, Knorm, KeyDiff, ExpectedAttention, QFilter (with OUR calibrated filters: its
    own loader would reach for a model hub and fail) and MergingPress(SnapKV) run on kvpress,
    keep int(0.25 L) tokens per layer, and start from the uncompressed first token."""
    rng = random.Random(1)
    samples = [{"id": "m", "input_ids": [rng.randrange(4, 1000) for _ in range(160)],
                "max_tokens": 6}]
    methods = ("tova", "knorm", "keydiff", "expected_attention", "qfilters", "snapkv+merge")
    configs = [{"policy": "none", "ratio": 1.0}] + [{"policy": m, "ratio": 0.25} for m in methods]
    _write_inputs(tmp_path, samples, configs, future_positions=64,
                  qfilters_path=str(tiny_qfilters))
    out = tmp_path / "predictions.jsonl"
    proc = _run(kvpress_python, tiny_model, tmp_path, out)
    assert proc.returncode == 0, proc.stderr
    by_policy = {r["policy"]: r for r in _records(out)}
    assert set(by_policy) == {"none", *methods}
    for method in methods:
        record = by_policy[method]
        assert record["kvpress_mode"] == presses.KVPRESS_MODES[method.removesuffix("+merge")]
        assert record["kept_tokens_per_layer"] == [int(160 * 0.25)] * 4
        assert record["output_ids"][0] == by_policy["none"]["output_ids"][0]


# --- the query-agnostic setting, through the results store, against kvpress's own pipeline ---

# Run with the kvpress venv's Python: kvpress's own pipeline (`KVPressTextGenerationPipeline.
# _forward`, what `pipeline(context=..., question=...)` runs after tokenizing) on the context ids
# and the question ids of each job the store handed the peer, with the same press.
PIPELINE = r"""
import json, sys
from pathlib import Path
import torch

sys.path.insert(0, sys.argv[1])
from kvpress import KVPressTextGenerationPipeline
from kvpress_peer import presses
from kvpress_peer.runner import load_model

torch.set_num_threads(1)
model, tokenizer = load_model(Path(sys.argv[2]), "float32")
pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
configs = json.loads(Path(sys.argv[4]).read_text())
answers = {}
for line in Path(sys.argv[3]).read_text().splitlines():
    job = json.loads(line)
    ids, n = job["input_ids"], job["context_len"]
    for c in configs["configs"]:
        press = presses.build_press(presses.press_spec(c["policy"], c["ratio"], configs["params"]))
        inputs = {"context_ids": torch.tensor([ids[:n]]),
                  "questions_ids": [torch.tensor([ids[n:]])]}
        with torch.inference_mode():
            answers[job["id"] + "|" + c["policy"]] = pipe._forward(
                inputs, max_new_tokens=job["max_tokens"], press=press)[0]
print(json.dumps(answers))
"""


@pytest.mark.peer
def test_query_agnostic_is_kvpress_pipeline_with_a_question(kvpress_python: Path,
                                                             tmp_path: Path) -> None:
    """`kvcompress eval --backend kvpress --setting query_aware query_agnostic` on SmolLM2:
    query-agnostic answers are kvpress's own pipeline's (context compressed, then the question
    prefilled on it); with no press both settings answer the same, turn 2 included; every row
    carries its setting and keys; a second run finds everything done."""
    import argparse

    from vllm_kvcompress.eval import run as eval_run

    if not (SMOLLM2 / "config.json").is_file():
        pytest.skip("models/smollm2 is not here (make models)")
    out = tmp_path / "store"
    parser = argparse.ArgumentParser()
    eval_run.add_arguments(parser)
    args = parser.parse_args([
        "--model", str(SMOLLM2), "--out", str(out), "--backend", "kvpress",
        "--kvpress-python", str(kvpress_python), "--tasks", "niah_single", "niah_multiturn",
        "--lengths", "512", "--depths", "0.5", "--samples-per-cell", "1",
        "--policies", "snapkv", "knorm", "--ratios", "1.0", "0.25",
        "--setting", "query_aware", "query_agnostic", "--bootstrap", "50"])
    eval_run.validate(args)
    result = eval_run.run(args)
    predictions = out / "predictions-kvpress.jsonl"
    rows = _records(predictions)
    samples = {s["id"]: s for s in map(json.loads, (out / "samples.jsonl").read_text().split(
        "\n")[:-1])}
    by_key = {(r["id"], r["policy"], r["setting"], r["turn"]): r for r in rows}
    # 2 samples, 3 configs, 2 settings, and the multi-turn sample's turn 2.
    assert len(rows) == len(by_key) == 3 * 3 * 2
    assert all(r["prompt_key"] == samples[r["id"]]["prompt_key"] and r["config_key"]
               for r in rows)
    for sid, sample in samples.items():
        n, length = sample["context_len"], len(sample["input_ids"])
        for turn in (1, 2) if sample["followup"] else (1,):
            assert (by_key[(sid, "none", "query_agnostic", turn)]["output_ids"]
                    == by_key[(sid, "none", "query_aware", turn)]["output_ids"]), (sid, turn)
        # The press ran on the context only; the question is held in full after it.
        agnostic = by_key[(sid, "snapkv", "query_agnostic", 1)]
        assert agnostic["context_len"] == n
        assert agnostic["kept_tokens_per_layer"] == [int(n * 0.25) + length - n] * 30
        assert by_key[(sid, "snapkv", "query_aware", 1)]["kept_tokens"] == int(length * 0.25)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    ref = subprocess.run(
        [str(kvpress_python), "-c", PIPELINE, str(PEER_PATH), str(SMOLLM2),
         str(out / "jobs-kvpress-query_agnostic.jsonl"),
         str(out / "configs-kvpress-query_agnostic.json")],
        capture_output=True, text=True, timeout=900, env=env)  # fmt: skip
    assert ref.returncode == 0, ref.stderr
    pipeline = json.loads(ref.stdout.strip().splitlines()[-1])
    assert len(pipeline) == 2 * 3
    for key, text in pipeline.items():
        sid, policy = key.split("|")
        assert by_key[(sid, policy, "query_agnostic", 1)]["text"] == text, key
    assert {(s["setting"], s["policy"]) for s in result["summary"]} == {
        (setting, p) for setting in ("query_aware", "query_agnostic")
        for p in ("none", "snapkv", "knorm")}
    # Everything is in the store: a second run runs nothing.
    before = predictions.read_text()
    eval_run.run(args)
    assert predictions.read_text() == before
