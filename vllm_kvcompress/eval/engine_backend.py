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
prefill per configuration; ``--no-prefix-reuse`` prefills every request from scratch.

Multi-turn samples (``EvalSample.followup``): once a configuration's turn 1 has finished, its
turn 2 is a new request whose prompt is turn 1's prompt, turn 1's generated tokens as they came
out, and the template's turn-2 tokens (``tasks.turn2_input_ids``), under the same configuration.
Turn 2 runs after the group's turn-1 passes, with prefix caching on: the turn-1 part hits the
cache, and the whole turn-2 prompt is compressed (query-aware, turn 2's question in the window).

Memory held: each row records ``held_tokens``, the prompt tokens every layer keeps in the paged
cache. One block table per request means every layer keeps the LARGEST layer budget, which for
PyramidKV is more than its nominal ratio (``held_tokens``).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from tqdm import tqdm

from ..config import CompressionSpec
from .tasks import EvalSample, turn2_input_ids

BACKEND = "vllm"
HEAD_SELECT = ("shared", "per_head")
DEFAULT_HEAD_SELECT = "shared"


#: Per-configuration parameter overrides: ChunkKV's chunk-grid ablation runs next to the default
#: in the same engine, on the same prompts, sharing the baseline prefill. ``grid0``: chunks from
#: token 0 (kvpress's grid), the sinks kept; ``sink0``: no sink tokens, so chunks also start at
#: token 0 (the first cut's ablation, which changes two things at once).
#: ``merge``: evicted tokens folded into kept ones (``kv_merge=on``), next to the same policy
#: without it; kvpress's ``MergingPress`` runs as its peer.
VARIANTS: dict[str, dict[str, Any]] = {"": {}, "grid0": {"chunk_grid": "from_zero"},
                                       "sink0": {"sink_tokens": 0}, "merge": {"merge": "on"}}


class RunConfig(NamedTuple):
    """One configuration of the study.

    Attributes:
        policy: a registered policy, or ``none`` (always ratio 1.0).
        ratio: kept ratio of the prompt.
        head_select: ``shared`` (one token set per layer) or ``per_head`` (each KV head keeps its
            own tokens); for the kvpress backend, the mode of the press (``kvpress_mode``).
        variant: a key of ``VARIANTS`` (``""``: the run's parameters as given).
    """

    policy: str
    ratio: float
    head_select: str = DEFAULT_HEAD_SELECT
    variant: str = ""


def config_key(policy: str, ratio: float, head_select: str = DEFAULT_HEAD_SELECT,
               variant: str = "") -> RunConfig:
    """How a configuration is named in files; ``none`` is always ratio 1.0, ``shared``."""
    if policy == "none":
        return RunConfig("none", 1.0, DEFAULT_HEAD_SELECT, "")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    return RunConfig(policy, float(ratio), head_select, variant)


def config_label(policy: str, head_select: str | None, variant: str = "") -> str:
    """``chunkkv`` (shared, the default), ``chunkkv[per_head]``, ``chunkkv(grid0)``."""
    label = policy
    if policy != "none" and head_select not in (None, DEFAULT_HEAD_SELECT):
        label += f"[{head_select}]"
    if variant:
        label += f"({variant})"
    return label


def config_params(config: RunConfig, params: dict[str, Any]) -> dict[str, Any]:
    """The run's policy parameters with the configuration's variant applied."""
    return {**params, **VARIANTS[config.variant]}


@functools.cache
def head_select_supported() -> bool:
    """Whether this build's policy layer takes ``head_select`` (``kv_head_select``)."""
    try:
        CompressionSpec(policy="snapkv", ratio=0.5, head_select="per_head")
    except Exception:  # pydantic or the plugin's own error: both mean "no"
        return False
    return True


def make_spec(config: RunConfig, params: dict[str, Any]) -> CompressionSpec:
    """The spec a request of ``config`` resolves to (``head_select`` only where supported)."""
    if config.policy == "none":
        return CompressionSpec(policy="none")
    extra = {"head_select": config.head_select} if head_select_supported() else {}
    return CompressionSpec(policy=config.policy, ratio=config.ratio,
                           **config_params(config, params), **extra)


def operator_settings(params: dict[str, Any]) -> dict[str, Any]:
    """The engine's ``additional_config``: the eval is the operator, so its requests may name
    the per-model data files it was given (their folder is the allowed directory)."""
    paths = [str(value) for name, value in params.items() if name.endswith("_path") and value]
    if not paths:
        return {}
    return {"kvcompress": {"allowed_file_dir": str(Path(paths[0]).resolve().parent)}}


def request_args(config: RunConfig, params: dict[str, Any]) -> dict[str, Any]:
    """``SamplingParams.extra_args`` of a request of ``config``.

    ``kv_head_select`` is always sent where the policy layer knows it (a policy's default may
    differ from ``shared``); an engine without it only runs ``shared``, its one behaviour.
    """
    xargs: dict[str, Any] = {"kv_policy": config.policy}
    if config.policy == "none":
        return xargs
    xargs.update({"kv_ratio": config.ratio,
                  **{f"kv_{k}": v for k, v in config_params(config, params).items()}})
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


def held_tokens(spec: CompressionSpec, prompt_len: int, num_layers: int) -> int:
    """Prompt tokens every layer holds in the paged cache after compression.

    The largest layer budget (one block table per request), as the engine's scheduler
    computes it: ``max over layers of policy.layer_budget(kept, layer, num_layers, L,
    protected)`` with ``protected = min(sink_tokens + window, L)``; the whole prompt when the
    request is not compressed.

    Args:
        spec: the request's resolved settings.
        prompt_len: prompt tokens ``L``.
        num_layers: the model's decoder layers.
    """
    kept = spec.kept_tokens(prompt_len)
    if kept is None:
        return prompt_len
    from ..policies import build_policy

    policy = build_policy(spec)
    if policy is None:
        return prompt_len
    protected = min(spec.sink_tokens + spec.window, prompt_len)
    largest = max(policy.layer_budget(kept, layer, num_layers, prompt_len, protected)
                  for layer in range(num_layers))
    return min(largest, prompt_len)


def num_layers(model: str) -> int:
    """Decoder layers of a HF model folder (``config.json``, ``text_config`` if nested)."""
    config = json.loads((Path(model) / "config.json").read_text())
    config = config.get("text_config", config)
    return int(config["num_hidden_layers"])


def read_done(path: Path) -> dict[tuple[str, RunConfig, int], dict[str, Any]]:
    """Predictions already in a file, by (sample id, config, turn), for resuming.

    Lines written before head selection and turns existed read as ``shared``, turn 1.
    """
    if not path.exists():
        return {}
    done = {}
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash: redone
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
    sample: EvalSample
    config: RunConfig
    turn: int
    input_ids: list[int]
    max_tokens: int


def run(samples: list[EvalSample], configs: list[RunConfig] | list[tuple[str, float]],
        params: dict[str, Any], model: str, out: Path, dtype: str = "float32",
        prefix_reuse: bool = True, group_tokens: int = 40_000) -> Path:
    """Runs every (sample, config, turn) not already in ``out`` and appends one JSON line each.

    Args:
        samples: the prompts (token ids) with their answer lengths; those with a ``followup``
            get a second turn per config.
        configs: ``RunConfig`` or (policy, kept ratio) pairs; ``none`` is added if missing (the
            baseline).
        params: policy parameters shared by all configs (window, pool_kernel, chunk_size,
            sink_tokens), as ``kv_*`` extra args.
        model: model folder.
        out: the predictions JSONL (appended; existing lines are kept and skipped).
        dtype: engine dtype (``float32`` matches the kvpress side).
        prefix_reuse: see the module docstring.
        group_tokens: prompt tokens per group under prefix reuse.
    """
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
    done = read_done(out)

    def todo(sample: EvalSample, config: RunConfig, turn: int) -> bool:
        return (sample.id, config, turn) not in done

    total = sum(todo(s, c, 1) + (s.followup is not None and todo(s, c, 2))
                for s in samples for c in configs)
    if not total:
        return out
    from vllm import LLM, SamplingParams

    layers = num_layers(model)
    llm = LLM(model=model, max_model_len=max(max_model_len(samples), 1024), enforce_eager=True,
              seed=0, dtype=dtype, block_size=32, enable_prefix_caching=prefix_reuse,
              max_num_seqs=64, max_num_batched_tokens=8192,
              additional_config=operator_settings(params))
    engine = llm.llm_engine
    bar = tqdm(total=total, desc="eval (vllm-kvcompress)", unit="req")
    out.parent.mkdir(parents=True, exist_ok=True)
    runner = _BatchRunner(engine, SamplingParams, params, layers, bar)
    with out.open("a") as sink:
        groups = _groups(samples, group_tokens) if prefix_reuse else [samples]
        for group in groups:
            first = [_Request(s, c, 1, s.input_ids, s.max_tokens)
                     for s in group for c in configs if todo(s, c, 1)]
            base = [r for r in first if r.config == baseline]
            rest = [r for r in first if r.config != baseline]
            for batch in ((base, rest) if prefix_reuse else (base + rest,)):
                for row in runner.run(batch):
                    done[(row["id"], config_key(row["policy"], row["ratio"],
                                                row["head_select"], row["variant"]), 1)] = row
                    sink.write(json.dumps(row) + "\n")
                    sink.flush()
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
            for row in runner.run(second):
                sink.write(json.dumps(row) + "\n")
                sink.flush()
    bar.close()
    return out


class _BatchRunner:
    """Adds a batch of requests to the engine and steps it until they are all finished."""

    def __init__(self, engine: Any, sampling_params: Any, params: dict[str, Any],
                 layers: int, bar: tqdm) -> None:
        self.engine = engine
        self.sampling_params = sampling_params
        self.params = params
        self.layers = layers
        self.bar = bar
        self.count = 0

    def run(self, batch: list[_Request]) -> Iterable[dict[str, Any]]:
        """Yields one prediction row per request, in completion order."""
        pending: dict[str, _Request] = {}
        for request in batch:
            self.count += 1
            config = request.config
            request_id = (f"{request.sample.id}|{config.policy}|{config.ratio}|"
                          f"{config.head_select}|{config.variant}|t{request.turn}|{self.count}")
            self.engine.add_request(
                request_id, {"prompt_token_ids": request.input_ids},
                self.sampling_params(max_tokens=request.max_tokens, temperature=0.0,
                                     extra_args=request_args(config, self.params)))
            pending[request_id] = request
        while pending:
            for output in self.engine.step():
                if not output.finished or output.request_id not in pending:
                    continue
                request = pending.pop(output.request_id)
                yield self._row(request, output.outputs[0])
                self.bar.update(1)

    def _row(self, request: _Request, completion: Any) -> dict[str, Any]:
        config = request.config
        spec = make_spec(config, self.params)
        prompt_tokens = len(request.input_ids)
        kept = spec.kept_tokens(prompt_tokens)
        return {
            "id": request.sample.id, "turn": request.turn, "policy": config.policy,
            "ratio": config.ratio, "head_select": config.head_select, "variant": config.variant,
            "text": completion.text, "output_ids": list(completion.token_ids),
            "prompt_tokens": prompt_tokens,
            "kept_tokens": prompt_tokens if kept is None else min(kept, prompt_tokens),
            "held_tokens": held_tokens(spec, prompt_tokens, self.layers),
            "finish_reason": completion.finish_reason, "backend": BACKEND}
