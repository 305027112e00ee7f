"""The ``vllm`` backend of ``kvcompress eval``: the real engine (offline, in process, batched).

Every (sample, policy, ratio, head selection, variant) is one request with its policy in
``extra_args``, exactly what a ``vllm_xargs`` request does through the server. A variant
overrides some policy parameters for its configuration only (``VARIANTS``: ChunkKV's chunk grid
from token 0), so an ablation shares the run's prompts and baseline prefills.

Prefix reuse: with prefix caching on (the default), samples run in groups: first the full-KV
baseline (policy ``none``) of every sample in the group, then every other configuration of the
group in one batch. Those requests hit the prompt's cached, uncompressed blocks and recompute
only the policy's observation window (the engine caps prefix hits so the window gets queries),
then compress as usual. It is the engine's ordinary path for a repeated prompt and saves one full
prefill per configuration; ``--no-prefix-reuse`` prefills every request from scratch. Where the
results store already holds a prompt's baseline but not all its other configurations (a run that
adds ratios or policies), the prompt is prefilled once more without a row (one output token) so
those configurations still hit the cache.

The results store decides what runs (``done``: the rows it holds under the current keys) and
stamps every row (``row_fields``: its keys); every row records its ``setting``. This backend runs
the settings in ``SETTINGS``.

Multi-turn samples (``EvalSample.followup``): once a configuration's turn 1 has finished, its
turn 2 is a new request whose prompt is turn 1's prompt, turn 1's generated tokens as they came
out, and the template's turn-2 tokens (``tasks.turn2_input_ids``), under the same configuration.
Turn 2 runs after the group's turn-1 passes, with prefix caching on: the turn-1 part hits the
cache, and the whole turn-2 prompt is compressed (query-aware, turn 2's question in the window).

Query-agnostic setting (``QUERY_AGNOSTIC``): the context is compressed before the question
exists, through the engine's compress-once-reuse path (``kv_reuse_prefix: on``, docs/
ARCHITECTURE.md). For each compressed configuration, request 1 sends the sample's first
``context_len`` ids alone (one token, unrecorded) with the configuration's settings; its
compressed context is published to the prefix cache. Request 2 sends the whole prompt with the
same settings: it starts on the compressed context, prefills the question (and answer prefix)
whole, and its answer is the prediction. ``none`` needs no request 1. Each row records whether
request 2 really started on the compressed context (``context_reused``; a miss, e.g. the context
evicted before request 2 ran, was compressed query-aware instead and is counted on stderr), and
its ``kept_tokens`` / ``held_tokens`` are the context's plus the rest of the prompt. A turn 2
starts with the same context and reuses it too.

Memory held: each row records ``held_tokens``, the prompt tokens every layer keeps in the paged
cache. One block table per request means every layer keeps the LARGEST layer budget, which for
PyramidKV is more than its nominal ratio (``held_tokens``).
"""

from __future__ import annotations

import gc
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from tqdm import tqdm

from .configs import (
    DEFAULT_HEAD_SELECT,
    QUERY_AGNOSTIC,
    QUERY_AWARE,
    VARIANTS,
    RunConfig,
    config_key,
    config_label,
    config_params,
    head_select_supported,
    held_tokens,
    make_spec,
    num_layers,
)
from .store import open_to_append
from .tasks import EvalSample, turn2_input_ids

#: The configuration names scripts that drive this backend use with it (scripts/method_audit.py,
#: scripts/defaults_ablation.py), next to the backend's own.
__all__ = ["SETTINGS", "VARIANTS", "RunConfig", "config_key", "config_label", "max_model_len",
           "operator_settings", "read_done", "request_args", "run"]

BACKEND = "vllm"
#: The settings this backend runs (``configs.SETTINGS``): query-aware (one request per prompt)
#: and query-agnostic (request 1: the context alone, compressed and published; request 2: the
#: whole prompt, reusing it).
SETTINGS = (QUERY_AWARE, QUERY_AGNOSTIC)

#: A finished request's row: (sample id, configuration, turn).
DoneKey = tuple[str, RunConfig, int]
#: Extra fields of a row (the results store's keys), given the sample, configuration and turn.
RowFields = Callable[[EvalSample, RunConfig, int], dict[str, Any]]


def operator_settings(params: dict[str, Any]) -> dict[str, Any]:
    """The engine's ``additional_config``: the eval is the operator, so its requests may name
    the per-model data files it was given (their folder is the allowed directory)."""
    paths = [str(value) for name, value in params.items() if name.endswith("_path") and value]
    if not paths:
        return {}
    return {"kvcompress": {"allowed_file_dir": str(Path(paths[0]).resolve().parent)}}


def request_args(config: RunConfig, params: dict[str, Any],
                 prompt_tokens: int | None = None) -> dict[str, Any]:
    """``SamplingParams.extra_args`` of a request of ``config`` (``prompt_tokens``: the
    request's prompt length, which the ``prefill`` variant's budget is taken from).

    ``kv_head_select`` is always sent where the policy layer knows it (a policy's default may
    differ from ``shared``); an engine without it only runs ``shared``, its one behaviour.
    """
    xargs: dict[str, Any] = {"kv_policy": config.policy}
    if config.policy == "none":
        return xargs
    xargs.update({"kv_ratio": config.ratio,
                  **{f"kv_{k}": v
                     for k, v in config_params(config, params, prompt_tokens).items()}})
    for key, value in list(xargs.items()):
        if key.endswith("_path") and value:
            # Inside the allowed folder (operator_settings), by its real path: admission looks
            # a name up relative to that folder, or as a full path inside it.
            xargs[key] = str(Path(value).resolve())
    if head_select_supported():
        xargs["kv_head_select"] = config.head_select
    elif config.head_select != DEFAULT_HEAD_SELECT:
        raise ValueError(f"--head-select {config.head_select}: this build's policy layer has no "
                         "head_select setting (kv_head_select)")
    return xargs


def setting_args(setting: str, config: RunConfig, params: dict[str, Any],
                 prompt_tokens: int | None = None) -> dict[str, Any]:
    """``request_args`` in a setting: query-agnostic compressed requests also ask the engine to
    publish and reuse the compressed context (``kv_reuse_prefix``)."""
    xargs = request_args(config, params, prompt_tokens)
    if setting == QUERY_AGNOSTIC and config.policy != "none":
        xargs["kv_reuse_prefix"] = "on"
    return xargs


def context_length(sample: EvalSample) -> int:
    """The sample's context length for the query-agnostic setting.

    Raises:
        ValueError: the sample has no ``context_len`` (a prompt file from before it existed), or
            one that leaves no question after the context; names the sample.
    """
    length = getattr(sample, "context_len", None)
    if length is None or not 0 < length < len(sample.input_ids):
        raise ValueError(f"sample {sample.id}: the query-agnostic setting needs context_len "
                         f"between 1 and the prompt length - 1 = {len(sample.input_ids) - 1} "
                         f"(got {length}); rebuild the prompts (--fresh)")
    return length


def read_done(path: Path, setting: str = QUERY_AWARE) -> dict[DoneKey, dict[str, Any]]:
    """The rows already in a predictions file by (sample id, config, turn) for one setting: what
    ``run`` skips when it is driven without the results store (``done=None``: scripts). Lines
    written before head selection, turns and settings existed read as ``shared``, turn 1,
    query-aware; a line cut short is redone.
    """
    done: dict[DoneKey, dict[str, Any]] = {}
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("setting", QUERY_AWARE) != setting:
                continue
            key = config_key(row["policy"], row["ratio"],
                             row.get("head_select", DEFAULT_HEAD_SELECT), row.get("variant", ""))
            done[(row["id"], key, int(row.get("turn", 1)))] = row
    return done


def _groups(samples: list[EvalSample], max_tokens: int) -> Iterable[list[EvalSample]]:
    """Consecutive samples whose prompts fit ``max_tokens`` together (the cache must hold them
    between the baseline pass and the compressed pass)."""
    group: list[EvalSample] = []
    used = 0
    for sample in samples:
        if group and used + len(sample.input_ids) > max_tokens:
            yield group
            group, used = [], 0
        group.append(sample)
        used += len(sample.input_ids)
    if group:
        yield group


def max_model_len(samples: list[EvalSample]) -> int:
    """Longest prompt plus answer over both turns of every sample."""
    longest = 0
    for s in samples:
        longest = max(longest, len(s.input_ids) + s.max_tokens)
        if s.followup is not None:
            longest = max(longest, len(s.input_ids) + s.max_tokens + len(s.followup.suffix_ids)
                          + s.followup.max_tokens)
    return longest


class _Request(NamedTuple):
    """One request: ``record`` False for a warm-up whose only job is to fill the prefix cache."""

    sample: EvalSample
    config: RunConfig
    turn: int
    input_ids: list[int]
    max_tokens: int
    record: bool = True


def run(samples: list[EvalSample], configs: list[RunConfig] | list[tuple[str, float]],
        params: dict[str, Any], model: str, out: Path, dtype: str = "float32",
        prefix_reuse: bool = True, group_tokens: int = 40_000, setting: str = QUERY_AWARE,
        done: Mapping[DoneKey, dict[str, Any]] | None = None,
        row_fields: RowFields | None = None, max_num_batched_tokens: int = 8192) -> Path:
    """Runs every (sample, config, turn) not in ``done`` and appends one JSON line each to ``out``.

    Args:
        samples: the prompts (token ids) with their answer lengths; those with a ``followup``
            get a second turn per config.
        configs: ``RunConfig`` or (policy, kept ratio) pairs; ``none`` is added if missing (the
            baseline).
        params: policy parameters shared by all configs (window, pool_kernel, chunk_size,
            sink_tokens), as ``kv_*`` extra args.
        model: model folder.
        out: the predictions JSONL (appended).
        dtype: engine dtype (``float32`` matches the kvpress side).
        prefix_reuse: see the module docstring.
        group_tokens: prompt tokens per group under prefix reuse.
        setting: one of ``SETTINGS``; every row records it.
        done: rows the results store already holds for these prompts and configurations, by
            (sample id, config, turn): skipped; a turn-1 row also gives turn 2 its answer.
            None: the rows already in ``out`` (``read_done``), for scripts without a store.
        row_fields: extra fields of every row (the store's keys).
        max_num_batched_tokens: the engine's prefill chunk (tokens one step computes): where
            the ``prefill`` variant cuts.

    Raises:
        ValueError: ``setting`` is not one this backend runs; query-agnostic without prefix
            caching, with the ``prefill`` variant (a published context cannot be cut while
            prefilling), or on a sample without a usable ``context_len``.
    """
    if setting not in SETTINGS:
        raise ValueError(f"--setting {setting}: the engine backend runs {', '.join(SETTINGS)}")
    if setting == QUERY_AGNOSTIC:
        if not prefix_reuse:
            raise ValueError("--setting query_agnostic: the compressed context is reused through "
                             "the prefix cache; drop --no-prefix-reuse")
        for sample in samples:
            context_length(sample)
        if any(config_key(*c).variant == "prefill" for c in configs):
            raise ValueError("--setting query_agnostic: the prefill variant runs query-aware "
                             "only (kv_reuse_prefix is refused with kv_prefill_budget)")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The pool must hold a group's full prompts plus the compressed copies.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

    configs = [config_key(*c) for c in configs]
    baseline = config_key("none", 1.0)
    if baseline not in configs:
        configs.insert(0, baseline)
    for config in configs:
        request_args(config, params)  # fails before the engine starts
    done = read_done(out, setting) if done is None else dict(done)

    def todo(sample: EvalSample, config: RunConfig, turn: int) -> bool:
        return (sample.id, config, turn) not in done

    total = sum(todo(s, c, 1) + (s.followup is not None and todo(s, c, 2))
                for s in samples for c in configs)
    if not total:
        return out
    from vllm import LLM, SamplingParams

    # An engine of an earlier call (another setting) still waiting for the garbage collector
    # would tear down vLLM's process-wide parallel state while this one starts.
    gc.collect()
    llm = LLM(model=model, max_model_len=max(max_model_len(samples), 1024), enforce_eager=True,
              seed=0, dtype=dtype, block_size=32, enable_prefix_caching=prefix_reuse,
              max_num_seqs=64, max_num_batched_tokens=max_num_batched_tokens,
              additional_config=operator_settings(params))
    bar = tqdm(total=total, desc="eval (vllm-kvcompress)", unit="req")
    out.parent.mkdir(parents=True, exist_ok=True)
    runner = _BatchRunner(llm.llm_engine, SamplingParams, params, num_layers(model), bar,
                          setting, row_fields)
    hits_before = _reuse_hits(llm)
    with open_to_append(out) as sink:

        def write(rows: Iterable[dict[str, Any]]) -> None:
            for row in rows:  # each as soon as it is done: an interrupted run loses nothing
                done[(row["id"], config_key(row["policy"], row["ratio"], row["head_select"],
                                            row["variant"]), row["turn"])] = row
                sink.write(json.dumps(row) + "\n")
                sink.flush()

        groups = _groups(samples, group_tokens) if prefix_reuse else [samples]
        for group in groups:
            first = [_Request(s, c, 1, s.input_ids, s.max_tokens)
                     for s in group for c in configs if todo(s, c, 1)]
            base = [r for r in first if r.config == baseline]
            rest = [r for r in first if r.config != baseline]
            if prefix_reuse:
                # A prompt whose baseline is already in the store is prefilled once, unrecorded,
                # so its compressed configurations still hit the cache (an extended run).
                cached = {r.sample.id for r in base}
                warm = {r.sample.id: r.sample for r in rest if r.sample.id not in cached}
                base += [_Request(s, baseline, 1, s.input_ids, 1, record=False)
                         for s in warm.values()]
            batches = (base, rest) if prefix_reuse else (base + rest,)
            if setting == QUERY_AGNOSTIC:
                # Request 1 of each compressed configuration: the context alone, compressed and
                # published; then request 2 (``rest``) reuses it.
                contexts = [_Request(r.sample, r.config, 1,
                                     r.input_ids[:context_length(r.sample)], 1, record=False)
                            for r in rest]
                batches = (base, contexts, rest)
            for batch in batches:
                write(runner.run(batch))
            second = []
            for s in group:
                if s.followup is None:
                    continue
                for c in configs:
                    if not todo(s, c, 2):
                        continue
                    turn1 = done[(s.id, c, 1)]
                    ids = turn2_input_ids(s.input_ids, turn1["output_ids"],
                                          s.followup.suffix_ids, s.followup.stop_ids)
                    second.append(_Request(s, c, 2, ids, s.followup.max_tokens))
            write(runner.run(second))
    bar.close()
    if runner.context_misses:
        print(f"kvcompress eval: {runner.context_misses} query-agnostic request(s) did not start "
              "on their compressed context (evicted before they ran) and were compressed "
              "query-aware; their rows say context_reused: false", file=sys.stderr)
    hits_after = _reuse_hits(llm)
    hits = None if hits_after is None else hits_after - (hits_before or 0)
    if setting == QUERY_AGNOSTIC and hits is not None and hits != runner.context_reuses:
        # The rows read a hit off num_cached_tokens == context_len; the engine counts its own.
        print(f"kvcompress eval: the engine counted {hits} compressed-context hits, the rows "
              f"{runner.context_reuses}; context_reused is unreliable in this run",
              file=sys.stderr)
    return out


def _reuse_hits(llm: Any) -> int | None:
    """Requests the engine started on a published compressed prefix so far (``None``: the
    engine core runs in another process, so its counters are not readable here)."""
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)
    planner = getattr(getattr(core, "scheduler", None), "_kvcompress", None)
    return None if planner is None else planner.stats.prefix_reuse_hits


class _BatchRunner:
    """Adds a batch of requests to the engine and steps it until they are all finished."""

    def __init__(self, engine: Any, sampling_params: Any, params: dict[str, Any],
                 layers: int, bar: tqdm, setting: str, row_fields: RowFields | None) -> None:
        self.engine = engine
        self.sampling_params = sampling_params
        self.params = params
        self.layers = layers
        self.bar = bar
        self.setting = setting
        self.row_fields = row_fields
        self.count = 0
        #: Query-agnostic requests that did (not) start on their compressed context.
        self.context_reuses = self.context_misses = 0

    def run(self, batch: list[_Request]) -> Iterable[dict[str, Any]]:
        """Yields one prediction row per recorded request, in completion order."""
        pending: dict[str, _Request] = {}
        for request in batch:
            self.count += 1
            config = request.config
            request_id = (f"{request.sample.id}|{config.policy}|{config.ratio}|"
                          f"{config.head_select}|{config.variant}|t{request.turn}|{self.count}")
            self.engine.add_request(
                request_id, {"prompt_token_ids": request.input_ids},
                self.sampling_params(max_tokens=request.max_tokens, temperature=0.0,
                                     extra_args=setting_args(self.setting, config,
                                                             self.params,
                                                             len(request.input_ids))))
            pending[request_id] = request
        while pending:
            for output in self.engine.step():
                if not output.finished or output.request_id not in pending:
                    continue
                request = pending.pop(output.request_id)
                if request.record:
                    yield self._row(request, output)
                    self.bar.update(1)

    def _row(self, request: _Request, output: Any) -> dict[str, Any]:
        """The prediction row of a finished request (``output``: vLLM's ``RequestOutput``)."""
        config = request.config
        completion = output.outputs[0]
        prompt_tokens = len(request.input_ids)
        spec = make_spec(config, self.params, prompt_tokens)
        kept = spec.kept_tokens(prompt_tokens)
        kept = prompt_tokens if kept is None else min(kept, prompt_tokens)
        held = held_tokens(spec, prompt_tokens, self.layers)
        agnostic = {}
        if self.setting == QUERY_AGNOSTIC and spec.enabled:
            # The context as compressed on its own, the rest of the prompt whole.
            context = context_length(request.sample)
            reused = output.num_cached_tokens == context
            self.context_misses += not reused
            self.context_reuses += reused
            agnostic = {"context_tokens": context, "context_reused": reused}
            if reused:
                context_kept = spec.kept_tokens(context)
                kept = (context if context_kept is None else context_kept) + prompt_tokens - \
                    context
                held = held_tokens(spec, context, self.layers) + prompt_tokens - context
        extra = {} if self.row_fields is None else self.row_fields(request.sample, config,
                                                                    request.turn)
        return {
            "id": request.sample.id, "turn": request.turn, "policy": config.policy,
            "ratio": config.ratio, "head_select": config.head_select, "variant": config.variant,
            "setting": self.setting, "text": completion.text,
            "output_ids": list(completion.token_ids), "prompt_tokens": prompt_tokens,
            "kept_tokens": kept, "held_tokens": held, **agnostic,
            "finish_reason": completion.finish_reason, "backend": BACKEND, **extra}
