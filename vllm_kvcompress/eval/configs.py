"""Configurations of ``kvcompress eval``: (policy, kept ratio, head selection, variant), the
settings they run in, and what each one holds in our engine.

A configuration is one line of every table. ``--head-select shared per_head`` runs every
(policy, ratio) in both modes (``default``: each policy in its own default mode, listed once);
``--chunk-grid-ablation`` adds ChunkKV with its chunk grid from token 0 (``grid0``: sinks kept;
``sink0``: no sinks); ``--merge`` adds every policy with evicted tokens merged (``merge``);
``--prefill-variant`` every policy compressed while prefilling to its final budget
(``prefill``). A variant overrides some policy parameters for its configuration only
(``VARIANTS``), so an ablation shares the run's prompts and baseline prefills.

Settings (``SETTINGS``): ``query_aware`` prefills the whole prompt, question included, and
compresses at the end of prefill; ``query_agnostic`` compresses the context before the question
exists (the sample's first ``context_len`` ids), then the question is prefilled on the
compressed cache.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, NamedTuple

from ..config import CompressionSpec

QUERY_AWARE = "query_aware"
QUERY_AGNOSTIC = "query_agnostic"
SETTINGS = (QUERY_AWARE, QUERY_AGNOSTIC)
HEAD_SELECT = ("shared", "per_head")
DEFAULT_HEAD_SELECT = "shared"
#: ``--head-select default``: each policy in its registered default mode.
DEFAULT_MODE = "default"

#: Per-configuration parameter overrides: ChunkKV's chunk-grid ablation runs next to the default
#: in the same engine, on the same prompts, sharing the baseline prefill. ``grid0``: chunks from
#: token 0 (kvpress's grid), the sinks kept; ``sink0``: no sink tokens, so chunks also start at
#: token 0 (the first cut's ablation, which changes two things at once).
#: ``merge``: evicted tokens folded into kept ones (``kv_merge=on``), next to the same policy
#: without it; kvpress's ``MergingPress`` runs as its peer.
#: ``prefill``: compressed while prefilling (``kv_prefill_budget``, issue 25) down to the
#: configuration's own final budget (``PREFILL_AT_KEPT``: the tokens the ratio keeps of the
#: prompt), so it ends holding what the end-of-prefill configuration holds, chosen chunk by chunk.
PREFILL_AT_KEPT = "kept"
VARIANTS: dict[str, dict[str, Any]] = {"": {}, "grid0": {"chunk_grid": "from_zero"},
                                       "sink0": {"sink_tokens": 0}, "merge": {"merge": "on"},
                                       "prefill": {"prefill_budget": PREFILL_AT_KEPT}}
#: Policies the ``prefill`` variant cannot run (refused with ``prefill_budget``: their budgets
#: are shares of the whole prompt, or their score needs the whole context).
NO_PREFILL_BUDGET = frozenset({"pyramidkv", "kvzip"})


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


def config_params(config: RunConfig, params: dict[str, Any],
                  prompt_tokens: int | None = None) -> dict[str, Any]:
    """The run's policy parameters with the configuration's variant applied.

    Args:
        config: the configuration.
        params: the run's policy parameters.
        prompt_tokens: the request's prompt length, which resolves ``PREFILL_AT_KEPT`` (left
            as is without it: the results store's keys name the variant, not the number).
    """
    merged = {**params, **VARIANTS[config.variant]}
    if merged.get("prefill_budget") == PREFILL_AT_KEPT and prompt_tokens is not None:
        rest = {k: v for k, v in merged.items() if k != "prefill_budget"}
        spec = CompressionSpec(policy=config.policy, ratio=config.ratio, **rest)
        kept = spec.kept_tokens(prompt_tokens)
        floor = spec.sink_tokens + spec.window  # the smallest budget a request may set
        merged["prefill_budget"] = max(prompt_tokens if kept is None else kept, floor)
    return merged


def configurations(policies: list[str], ratios: list[float],
                   head_selects: list[str] | None = None,
                   chunk_grid_ablation: bool = False, merge: bool = False,
                   prefill: bool = False) -> list[RunConfig]:
    """Configurations to run: the single ``none`` (ratio 1.0 keeps everything), then every
    (policy, ratio < 1, head selection), then the chunk-grid variants of shared ChunkKV, then
    (``merge``) every policy in its default mode with evicted tokens merged, then (``prefill``)
    every policy that can compress while prefilling, in its default mode, at its final budget."""
    from ..policies.registry import get_policy_info

    modes = head_selects or [DEFAULT_HEAD_SELECT]
    configs = [config_key("none", 1.0)]
    for policy in policies:
        own = get_policy_info(policy).default_head_select
        resolved = list(dict.fromkeys(own if m == DEFAULT_MODE else m for m in modes))
        configs += [config_key(policy, r, h) for r in ratios if r < 1.0 for h in resolved]
    if chunk_grid_ablation:
        configs += [config_key("chunkkv", r, DEFAULT_HEAD_SELECT, v) for v in ("grid0", "sink0")
                    for r in ratios if r < 1.0]
    if merge:
        configs += [config_key(p, r, get_policy_info(p).default_head_select, "merge")
                    for p in policies for r in ratios if r < 1.0]
    if prefill:
        configs += [config_key(p, r, get_policy_info(p).default_head_select, "prefill")
                    for p in policies if p not in NO_PREFILL_BUDGET for r in ratios if r < 1.0]
    return configs


def policy_params(policy: str, params: dict[str, Any]) -> dict[str, Any]:
    """The run parameters that change what ``policy`` keeps: the window and sinks (every policy
    keeps them), and the policy's own declared parameters (``PolicyInfo.parameters``); nothing
    for ``none``. Unset (None) parameters are left out, so a results-store key does not change
    when a parameter another policy uses is added to the run.

    Args:
        policy: a registered policy or ``none``.
        params: the run's parameters (``window``, ``pool_kernel``, ...).
    """
    if policy == "none":
        return {}
    from ..policies.registry import get_policy_info

    names = {"window", "sink_tokens", *(p.name for p in get_policy_info(policy).parameters)}
    return {k: v for k, v in sorted(params.items()) if k in names and v is not None}


@functools.cache
def head_select_supported() -> bool:
    """Whether this build's policy layer takes ``head_select`` (``kv_head_select``)."""
    try:
        CompressionSpec(policy="snapkv", ratio=0.5, head_select="per_head")
    except Exception:  # pydantic or the plugin's own error: both mean "no"
        return False
    return True


def make_spec(config: RunConfig, params: dict[str, Any],
              prompt_tokens: int | None = None) -> CompressionSpec:
    """The spec a request of ``config`` resolves to (``head_select`` only where supported;
    ``prompt_tokens``: see ``config_params``, needed by the ``prefill`` variant)."""
    if config.policy == "none":
        return CompressionSpec(policy="none")
    extra = {"head_select": config.head_select} if head_select_supported() else {}
    return CompressionSpec(policy=config.policy, ratio=config.ratio,
                           **config_params(config, params, prompt_tokens), **extra)


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
