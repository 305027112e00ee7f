"""The ``kvpress`` backend of ``kvcompress eval``, main-venv side: which of our configurations
kvpress has a press for, PyramidKV at our held memory, and the jobs handed to the peer package
(``kvpress_peer``) that runs in the kvpress venv.

The store decides what is left: every (prompt, configuration, turn) whose key it does not hold
becomes a job; a turn 2 whose turn 1 is stored gets that answer with it. The peer runs as
``python -m kvpress_peer`` with this folder on ``PYTHONPATH`` (it imports nothing else of ours).
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from statistics import mean
from typing import Any

from .configs import RunConfig, config_key, held_tokens, make_spec, num_layers
from .kvpress_peer.presses import KVPRESS_MODES, MERGE_SUFFIX, MERGEABLE
from .store import Store, config_hash
from .tasks import EvalSample

BACKEND = "kvpress"


def kvpress_policy(config: RunConfig) -> str | None:
    """The peer's name for a configuration, or ``None`` when kvpress has no press for it
    (SAGE-KV; merging around a press that is not a ScorerPress; other variants)."""
    if config.variant == "merge":
        return config.policy + MERGE_SUFFIX if config.policy in MERGEABLE else None
    if config.variant or config.policy not in KVPRESS_MODES:
        return None
    return config.policy


def held_matched(samples: list[EvalSample], policies: list[str], ratios: list[float],
                 params: dict[str, Any], model: str, known: set[float] | None = None
                 ) -> list[RunConfig]:
    """kvpress PyramidKV configurations at our PyramidKV's held ratio of each nominal ratio.

    Our engine keeps the largest layer budget in every layer, so at a nominal ratio it holds
    more than kvpress's PyramidKV (whose layers average the nominal budget). Running kvpress's
    press at our held ratio (mean over the prompts, 3 decimals) compares the two at the same
    memory. Nothing for ratios whose held ratio is the nominal one, or without ``pyramidkv``.
    A ratio in ``known`` (PyramidKV ratios the store already ran) within 0.005 of the held ratio
    is taken instead, so a study extended by a few prompts does not run a new ratio each time.
    """
    if "pyramidkv" not in policies or not samples:
        return []
    layers = num_layers(model)
    extra = []
    for ratio in ratios:
        if ratio >= 1.0:
            continue
        spec = make_spec(config_key("pyramidkv", ratio), params)
        held = mean(held_tokens(spec, len(s.input_ids), layers) / len(s.input_ids)
                    for s in samples)
        held = round(held, 3)
        near = [k for k in known or () if abs(k - held) <= 0.005 and k not in ratios]
        held = min(near, key=lambda k: abs(k - held)) if near else held
        if abs(held - ratio) > 0.005 and held < 1.0:
            config = config_key("pyramidkv", held)
            if config not in extra:
                extra.append(config)
    return extra


def peer_configs(configs: list[RunConfig]) -> list[RunConfig]:
    """The peer's configurations, each once: its press name (``snapkv+merge``) and ratio."""
    named = [(kvpress_policy(c), c.ratio) for c in configs]
    return [RunConfig(name, ratio, "", "")
            for name, ratio in dict.fromkeys((n, r) for n, r in named if n is not None)]


def jobs(samples: list[EvalSample], configs: list[RunConfig], keys: list[str],
         store: Store) -> list[dict[str, Any]]:
    """The peer's job lines: each sample with the (config index, turn) pairs the store lacks,
    and the stored turn-1 answers its turn-2 jobs need; samples with nothing to do are left
    out."""
    index = store.index(BACKEND)
    lines = []
    for sample in samples:
        turns = (1, 2) if sample.followup is not None else (1,)
        todo = [[i, t] for i, key in enumerate(keys) for t in turns
                if (sample.id, sample.prompt_key, key, t) not in index]
        if not todo:
            continue
        turn1 = {str(i): index[(sample.id, sample.prompt_key, keys[i], 1)]["output_ids"]
                 for i, t in todo if t == 2 and [i, 1] not in todo}
        lines.append({**sample.to_json(), "todo": todo, "turn1_output_ids": turn1})
    return lines


def run(samples: list[EvalSample], configs: list[RunConfig], params: dict[str, Any],
        model: str, store: Store, context: dict[str, Any], setting: str, python: str,
        dtype: str) -> None:
    """Runs the peer on whatever the store lacks of ``samples`` x ``configs`` in ``setting``.

    Args:
        samples: the prompt set (with ``context_len`` for the query-agnostic setting).
        configs: our configurations kvpress runs (``peer_configs`` makes its own of them).
        params: the run's policy parameters.
        model: model folder.
        store: the results store (the peer appends to its ``predictions-kvpress.jsonl``).
        context: the kvpress backend's context (``store.context_of``).
        setting: ``query_aware`` or ``query_agnostic``.
        python: the kvpress venv's interpreter.
        dtype: the model's dtype.

    Raises:
        FileNotFoundError: ``python`` does not exist.
        subprocess.CalledProcessError: the peer failed.
    """
    if not Path(python).exists():
        raise FileNotFoundError(f"--kvpress-python: {python} does not exist; run "
                                "`make kvpress-venv` first")
    mine = peer_configs(configs)
    keys = [config_hash(context, setting, c) for c in mine]
    lines = jobs(samples, mine, keys, store)
    if not lines:
        return
    config_path = store.folder / f"configs-kvpress-{setting}.json"
    jobs_path = store.folder / f"jobs-kvpress-{setting}.jsonl"
    config_path.write_text(json.dumps({
        "setting": setting, "params": params,
        "configs": [{"policy": c.policy, "ratio": c.ratio, "key": k}
                    for c, k in zip(mine, keys, strict=True)]}))
    jobs_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    folder = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)}
    command = [python, "-m", "kvpress_peer", "--model", model, "--samples", str(jobs_path),
               "--configs", str(config_path), "--out", str(store.predictions(BACKEND)),
               "--dtype", dtype]
    run_tied(command, env)


# linux/prctl.h: deliver a signal to this process when its parent dies.
_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> None:
    """In the forked child, before exec: ask the kernel for SIGTERM when ``parent`` dies."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request: nobody will send it
        os._exit(1)


def run_tied(command: list[str], env: dict[str, str]) -> None:
    """Runs ``command`` as a child that ends with this process.

    A ``kill`` of the eval (SIGTERM, SIGKILL) does not reach its children by itself; a peer left
    running would go on appending rows to the store beside the next run. On Linux the kernel
    stops it (``PR_SET_PDEATHSIG``); Ctrl-C reaches the whole process group anyway.

    Raises:
        subprocess.CalledProcessError: the command failed.
    """
    tie = functools.partial(_die_with, os.getpid()) if sys.platform == "linux" else None
    subprocess.run(command, check=True, env=env, preexec_fn=tie)
