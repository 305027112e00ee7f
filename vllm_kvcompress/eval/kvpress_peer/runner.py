"""The runner's command line and loop: check the inputs, load the model, run every job of every
sample, append one record per job (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .generation import clear_masks, eos_token_ids, generate
from .inputs import QUERY_AGNOSTIC, load_configs, load_samples, turn2_input_ids
from .presses import (
    KVPRESS_MODES,
    MERGE_SUFFIX,
    InputError,
    build_press,
    min_prompt_len,
    replayable,
)
from .replay import SharedPrefill, generate_shared, shared_prefill

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (argparse itself exits with status 2 on bad flags)."""
    ap = argparse.ArgumentParser(prog="python -m kvpress_peer",
                                 description="NVIDIA kvpress presses on HF transformers, greedy")
    ap.add_argument("--model", required=True, type=Path, help="HF safetensors model folder")
    ap.add_argument("--samples", required=True, type=Path,
                    help="the jobs: JSONL, one sample a line")
    ap.add_argument("--configs", required=True, type=Path, help="configs.json")
    ap.add_argument("--out", required=True, type=Path, help="predictions.jsonl (appended)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument(
        "--shared-prefill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="prefill each sample once and replay every press's hook on it (default; a press "
        "that runs the model itself, KVzipPress, always gets a prefill of its own); "
        "--no-shared-prefill: one prefill per (sample, config) with the press active",
    )
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    return args


def load_model(path: Path, dtype: str) -> tuple[Any, Any]:
    """Model (SDPA attention, eval mode) and tokenizer from a local folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # SDPA: kvpress's ChunkKV asserts that the layer returns no attention weights (eager would).
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation="sdpa"
    )
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)



def _check_lengths(samples: list[dict[str, Any]], configs: list[dict[str, Any]], path: Path,
                   agnostic: bool) -> None:
    """Every press gets at least the tokens it needs (kvpress asserts on shorter inputs): the
    whole prompt, or (query-agnostic) the context it compresses."""
    for sample in samples:
        length = sample["context_len"] if agnostic else len(sample["input_ids"])
        what = "context tokens" if agnostic else "prompt tokens"
        for index, _turn in sample["todo"]:
            need = min_prompt_len(configs[index]["spec"])
            if length < need:
                raise InputError(f"--samples {path}: sample {sample['id']!r} has {length} "
                                 f"{what}; {configs[index]['policy']} needs >= {need}")


class _Records:
    """Appends one record per finished job to ``--out`` and advances the progress bar."""

    def __init__(self, sink: Any, bar: Any, tokenizer: Any, setting: str, version: str) -> None:
        self.sink, self.bar, self.tokenizer = sink, bar, tokenizer
        self.setting, self.version = setting, version

    def write(self, sample: dict[str, Any], cfg: dict[str, Any], turn: int,
              input_ids: list[int], result: dict[str, Any], shared: bool) -> None:
        """One job's record; ``shared``: whether it was replayed on a shared prefill."""
        record = {
            "id": sample["id"], "turn": turn, "policy": cfg["policy"], "ratio": cfg["ratio"],
            "setting": self.setting,
            "text": self.tokenizer.decode(result["output_ids"], skip_special_tokens=True),
            "output_ids": result["output_ids"], "prompt_tokens": len(input_ids),
            "kept_tokens": result["kept_tokens"],
            "kept_tokens_per_layer": result["kept_tokens_per_layer"],
            "prefill_s": result["prefill_s"], "decode_s": result["decode_s"],
            "backend": "kvpress", "kvpress_version": self.version,
            "kvpress_mode": KVPRESS_MODES[cfg["policy"].removesuffix(MERGE_SUFFIX)],
            "shared_prefill": shared,
        }
        if self.setting == QUERY_AGNOSTIC:
            record["context_len"] = sample["context_len"]
        if sample["prompt_key"] is not None:
            record["prompt_key"] = sample["prompt_key"]
        if cfg["key"] is not None:
            record["config_key"] = cfg["key"]
        self.sink.write(json.dumps(record) + "\n")
        self.sink.flush()
        self.bar.update(1)
        self.bar.set_postfix_str(
            f"{cfg['policy']} {cfg['ratio']:g} t{turn} prefill {result['prefill_s']:.1f}s")


def replay_plan(configs: list[dict[str, Any]], shared: bool) -> list[bool]:
    """Per config: replayed on a shared prefill (``True``) or run by ``generate``, a prefill of
    its own with the press active (``False``): every config without ``--shared-prefill``, and a
    press that is not replayable (KVzipPress runs the model again to score) in any case."""
    return [shared and replayable(c["spec"]) for c in configs]


def _run_sample(model: Any, sample: dict[str, Any], configs: list[dict[str, Any]],
                presses: list[Any], eos: set[int], agnostic: bool, replay: list[bool],
                records: _Records) -> None:
    """Runs a sample's turn-1 jobs, then its turn-2 jobs (from the turn-1 answers just made or
    recorded before); ``replay``: ``replay_plan``'s."""
    ids, context_len = sample["input_ids"], sample["context_len"]
    turn1 = dict(sample["turn1"])
    # Query-agnostic: one press-free prefill of the context serves every replayed job of both
    # turns.
    context = (shared_prefill(model, ids[:context_len])
               if agnostic and any(replay[c] for c, _t in sample["todo"]) else None)

    def run_turn(jobs: list[tuple[int, list[int]]], max_tokens: int, turn: int) -> None:
        by_prompt: dict[tuple[int, ...], list[int]] = {}
        for index, prompt in jobs:
            by_prompt.setdefault(tuple(prompt), []).append(index)
        for prompt_key, indexes in by_prompt.items():
            prompt = list(prompt_key)
            # Query-aware: per prompt, not per config; freed before the next prompt's prefill.
            whole = (shared_prefill(model, prompt)
                     if not agnostic and any(replay[i] for i in indexes) else None)
            for index in indexes:
                prefilled = (whole or context) if replay[index] else None
                result = _one(model, presses[index], prompt, max_tokens, eos,
                              context_len if agnostic else None, prefilled)
                records.write(sample, configs[index], turn, prompt, result,
                              prefilled is not None)
                if turn == 1:
                    turn1[index] = result["output_ids"]
            del whole

    run_turn([(c, ids) for c, t in sample["todo"] if t == 1], sample["max_tokens"], 1)
    followup = sample["followup"]
    second = [c for c, t in sample["todo"] if t == 2]
    if followup is not None and second:
        run_turn([(c, turn2_input_ids(ids, turn1[c], followup["suffix_ids"],
                                      followup["stop_ids"])) for c in second],
                 followup["max_tokens"], 2)


def _one(model: Any, press: Any, prompt: list[int], max_tokens: int, eos: set[int],
         context_len: int | None, shared: SharedPrefill | None) -> dict[str, Any]:
    """One job: from the shared prefill (of the prompt, or of the context when
    ``context_len`` is set) or, without one, from a prefill of its own."""
    clear_masks(model)  # a KVzipPress job's masks must not reach the next job's cache
    if shared is None:
        return generate(model, press, prompt, max_tokens, eos, context_len)
    question = None if context_len is None else prompt[context_len:]
    return generate_shared(model, press, shared, max_tokens, eos, question)


def run(args: argparse.Namespace) -> int:
    """Check the inputs, then run every job."""
    if not (args.model / "config.json").is_file():
        raise InputError(f"--model {args.model}: no config.json (not a HF model folder)")
    configs, _params, setting = load_configs(args.configs)
    samples = load_samples(args.samples, len(configs), setting)
    agnostic = setting == QUERY_AGNOSTIC
    _check_lengths(samples, configs, args.samples, agnostic)
    try:
        import kvpress  # noqa: F401  (checked here: the mapping works without it)
    except ImportError as e:
        print(f"kvpress_peer: error: cannot import kvpress ({e}); run it with "
              ".kvpress-venv/bin/python (make kvpress-venv)", file=sys.stderr)
        return 1
    import importlib.metadata

    import torch
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, args.dtype)
    vocab = model.get_input_embeddings().weight.shape[0]
    for sample in samples:
        followup = sample["followup"] or {"suffix_ids": []}
        if max([*sample["input_ids"], *followup["suffix_ids"]]) >= vocab:
            raise InputError(f"--samples {args.samples}: sample {sample['id']!r} input_ids has a "
                             f"token id >= the model's vocabulary size {vocab}")
    eos = eos_token_ids(model)
    presses = [build_press(c["spec"]) for c in configs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # A line cut short by a crash must not swallow the next record.
    cut_short = False
    if args.out.exists() and args.out.stat().st_size > 0:
        with args.out.open("rb") as raw:
            raw.seek(-1, 2)
            cut_short = raw.read(1) != b"\n"
    with (args.out.open("a") as sink,
          tqdm(total=sum(len(s["todo"]) for s in samples), file=sys.stderr,
               desc="kvpress") as bar):
        if cut_short:
            sink.write("\n")
        records = _Records(sink, bar, tokenizer, setting, importlib.metadata.version("kvpress"))
        replay = replay_plan(configs, args.shared_prefill)
        for sample in samples:
            _run_sample(model, sample, configs, presses, eos, agnostic, replay, records)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input)."""
    args = parse_args(argv)
    try:
        return run(args)
    except InputError as e:
        print(f"kvpress_peer: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
