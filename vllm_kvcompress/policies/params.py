"""Declared parameters: each setting is written down once, everything else is generated.

A ``Param`` carries a setting's name, type, range, default and one line of help. From it come
the ``vllm serve`` flag (``--kv-<name>``), the YAML key (``<name>``), the per-request
``vllm_xargs`` key (``kv_<name>``), the validation message (``kv_<name>: must be <allowed>
(got ...)``) and the ``kvcompress policies`` listing. The engine-level settings every policy
shares are in ``COMMON_PARAMS``; each policy declares its own in its module and the registry
collects them (built-in and entry-point policies alike).

Importable without vLLM.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Selection modes: one token set per layer (scores summed over KV heads) or one per KV head.
HEAD_SELECT_MODES = ("shared", "per_head")
#: ``merge``: evicted tokens dropped (off) or folded into kept ones (on).
MERGE_MODES = ("off", "on")
#: ``reuse_prefix``: a compressed prompt is private to its request (off) or published to the
#: prefix cache and reused by later requests with the same settings (on).
REUSE_PREFIX_MODES = ("off", "on")


#: Deployment quantities a parameter's range may be bounded by (``Param.bound``).
DEPLOYMENT_BOUNDS = ("max_model_len", "num_layers")


@dataclass(frozen=True)
class Bounds:
    """The range of each parameter on one deployment, for one kind of caller.

    A declared range (``Param.minimum``/``maximum``) holds everywhere; a deployment narrows it
    (``Param.bound``: nothing larger than the served model's ``max_model_len`` or layer count
    is meaningful), and for client requests the operator narrows it further (``caps`` and
    ``floors``: ``--kv-max-<name>`` / ``--kv-min-<name>``, whose defaults are the parameters'
    ``request_max`` / ``request_min``).

    Attributes:
        deployment: ``max_model_len`` / ``num_layers`` of the served model (absent: unknown).
        caps: parameter name -> largest value allowed.
        floors: parameter name -> smallest value allowed.
    """

    deployment: Mapping[str, int] = field(default_factory=dict)
    caps: Mapping[str, float] = field(default_factory=dict)
    floors: Mapping[str, float] = field(default_factory=dict)

    def maximum(self, param: Param) -> float | None:
        """The largest value ``param`` may take here (``None``: unbounded)."""
        limits = [v for v in (param.maximum, self.deployment.get(param.bound or ""),
                              self.caps.get(param.name)) if v is not None]
        return min(limits) if limits else None

    def minimum(self, param: Param) -> float | None:
        """The smallest value ``param`` may take here (``None``: unbounded)."""
        limits = [v for v in (param.minimum, self.floors.get(param.name)) if v is not None]
        return max(limits) if limits else None

    def exclusive_minimum(self, param: Param) -> bool:
        floor = self.floors.get(param.name)
        return param.exclusive_minimum and (floor is None or floor <= (param.minimum or 0))


#: No deployment, no operator: the declared ranges alone.
DECLARED = Bounds()

#: Longest string value accepted anywhere (policy names, paths): a request cannot make the
#: server hold or log megabytes of one setting.
MAX_STRING_LEN = 1024


@dataclass(frozen=True)
class Param:
    """One setting, declared once.

    Attributes:
        name: the key (``ratio``); flag ``--kv-ratio``, request key ``kv_ratio``.
        type: ``int``, ``float``, ``str``, ``list`` (of strings from ``choices``; a
            comma-separated string is accepted too) or ``Path`` (a file path; whether the file
            may be read is decided by the caller: startup for the operator, the allowed
            directory for requests).
        default: value when no layer sets it (``None``: unset).
        help: one line for ``--help`` and ``kvcompress policies``.
        minimum: smallest allowed value (numbers).
        maximum: largest allowed value anywhere (numbers).
        exclusive_minimum: whether ``minimum`` itself is excluded.
        odd: integers only: the value must be odd.
        choices: allowed strings, or a callable returning them (the live policy list).
        bound: a deployment quantity (``max_model_len``, ``num_layers``) the value may not
            exceed on a served model.
        request_max: the largest value a client request may set unless the operator says
            otherwise (``--kv-max-<name>``); documents why in ``help`` or the module.
        request_min: the smallest value a client request may set unless the operator says
            otherwise (``--kv-min-<name>``).
    """

    name: str
    type: type
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    odd: bool = False
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None
    bound: str | None = None
    request_max: float | None = None
    request_min: float | None = None

    def __post_init__(self) -> None:
        if self.bound is not None and self.bound not in DEPLOYMENT_BOUNDS:
            raise ValueError(f"parameter {self.name!r}: bound must be one of "
                             f"{', '.join(DEPLOYMENT_BOUNDS)}")

    @property
    def flag(self) -> str:
        return "--kv-" + self.name.replace("_", "-")

    @property
    def request_key(self) -> str:
        return "kv_" + self.name

    def allowed_choices(self) -> list[str] | None:
        if self.choices is None:
            return None
        return list(self.choices() if callable(self.choices) else self.choices)

    def allowed(self, bounds: Bounds = DECLARED) -> str:
        """What is allowed, in words (``an odd integer >= 1 and <= 63``, ``one of shared,
        per_head``), with ``bounds`` applied."""
        choices = self.allowed_choices()
        if self.type is list:
            return "a list (or comma-separated string) of " + \
                (", ".join(choices) if choices is not None else "strings")
        if choices is not None:
            return "one of " + ", ".join(choices)
        if self.type is Path:
            return f"a file path (a string of at most {MAX_STRING_LEN} characters)"
        low, high = bounds.minimum(self), bounds.maximum(self)
        exclusive = bounds.exclusive_minimum(self)
        if self.type is int:
            noun = "an odd integer" if self.odd else "an integer"
            return noun + _bounds(low, high, exclusive)
        if self.type is float:
            if low is not None and high is not None:
                sign = "<" if exclusive else "<="
                return f"a number with {_num(low)} {sign} {self.name} <= {_num(high)}"
            return "a number" + _bounds(low, high, exclusive)
        return f"a string of at most {MAX_STRING_LEN} characters"

    def check(self, value: Any, bounds: Bounds = DECLARED) -> Any:
        """Returns the value (ints widened to float for float params; lists as tuples).

        Types are strict: a bool is not an integer, a list is not a string, NaN and infinities
        are not numbers.

        Raises:
            ValueError: the value is not allowed; the message is ``allowed(bounds)``.
        """
        if value is None:
            return None
        ok = True
        if self.type is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif self.type is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and \
                math.isfinite(value)
            value = float(value) if ok else value
        elif self.type in (str, Path):
            ok = isinstance(value, str) and 0 < len(value) <= MAX_STRING_LEN and \
                "\x00" not in value
        elif self.type is list:
            if isinstance(value, str) and len(value) <= MAX_STRING_LEN:
                value = [part.strip() for part in value.split(",") if part.strip()]
            ok = isinstance(value, list | tuple) and len(value) <= 256 and all(
                isinstance(item, str) and 0 < len(item) <= MAX_STRING_LEN for item in value)
            value = tuple(value) if ok else value
        if ok and self.type in (int, float):
            low, high = bounds.minimum(self), bounds.maximum(self)
            if low is not None:
                ok = value > low if bounds.exclusive_minimum(self) else value >= low
            if ok and high is not None:
                ok = value <= high
            if ok and self.odd:
                ok = value % 2 == 1
        choices = self.allowed_choices()
        if ok and choices is not None:
            items = value if self.type is list else (value,)
            ok = all(item in choices for item in items)
        if not ok:
            raise ValueError(self.allowed(bounds))
        return value


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _bounds(low: float | None, high: float | None, exclusive: bool) -> str:
    parts = []
    if low is not None:
        parts.append((" > " if exclusive else " >= ") + _num(low))
    if high is not None:
        parts.append(" <= " + _num(high))
    return " and".join(parts)


def _policy_choices() -> list[str]:
    from .registry import policy_names

    return policy_names()


#: Largest ``kv_window`` a client may ask for by default (``--kv-max-window``): every request
#: that scores with queries holds ``window`` queries of every layer and query head in the
#: worker's query ring (Llama-3-8B, bf16: 256 KiB per window token, so 128 MiB at 512).
REQUEST_MAX_WINDOW = 512
#: Smallest ``kv_decode_interval`` a client may ask for by default (``--kv-min-decode-interval``):
#: a request compacts every ``decode_interval`` generated tokens, and a step carrying a
#: compaction runs the worker's hook for the whole batch (on GPUs: no full CUDA graph), so an
#: interval of 1 would tax every neighbour on every step.
REQUEST_MIN_DECODE_INTERVAL = 16

#: Settings of the engine's compression step, shared by every policy.
COMMON_PARAMS: tuple[Param, ...] = (
    Param("policy", str, "none", "KV-cache compression policy applied after prefill.",
          choices=_policy_choices),
    Param("ratio", float, None, "Fraction of prompt tokens whose KV is kept (default 0.25 once "
          "a policy is set, unless decode_budget is set). Exclusive with budget.", minimum=0,
          maximum=1, exclusive_minimum=True),
    Param("budget", int, None, "Number of prompt tokens whose KV is kept. Exclusive with ratio.",
          minimum=0, bound="max_model_len"),
    Param("window", int, 32, "Observation window: the last N prompt tokens score the others and "
          "are always kept.", minimum=1, bound="max_model_len",
          request_max=REQUEST_MAX_WINDOW),
    Param("sink_tokens", int, 4, "Leading tokens always kept (attention sinks).", minimum=0,
          bound="max_model_len", request_max=1024),
    Param("min_prompt_len", int, 0, "Prompts shorter than this are not compressed.", minimum=0,
          bound="max_model_len"),
    Param("head_select", str, None, "Token selection per layer: shared (one token set for all KV "
          "heads, scores summed) or per_head (each KV head its own tokens, same count, same "
          "memory); default: the policy's own.", choices=HEAD_SELECT_MODES),
    Param("decode_budget", int, None, "KV tokens a request may hold during decoding, prompt and "
          "generated together: when its physical length reaches decode_budget + decode_interval, "
          "the policy compacts it back to decode_budget (unset: only the prompt is compressed).",
          minimum=1, bound="max_model_len"),
    Param("prefill_budget", int, None, "KV tokens a request may hold while its prompt is "
          "prefilled: after each chunked-prefill chunk that leaves it holding more, the policy "
          "compacts it back to prefill_budget (its chunk's last window scores the rest), so its "
          "KV never exceeds prefill_budget + one chunk (unset: the prompt is compressed only "
          "when it ends).", minimum=1, bound="max_model_len"),
    Param("decode_interval", int, 128, "Tokens a decode-compressed request grows by between two "
          "compactions (compaction at decode_budget + decode_interval).", minimum=1,
          bound="max_model_len", request_min=REQUEST_MIN_DECODE_INTERVAL),
    Param("merge", str, "off", "on: evicted tokens' values are folded (window-attention "
          "weighted) into their most similar kept token, per KV head (ZeroMerge-style).",
          choices=MERGE_MODES),
    Param("reuse_prefix", str, "off", "on: compress once, reuse: the compressed prompt is kept in "
          "the prefix cache, and a later request with exactly these settings whose prompt starts "
          "with it prefills only its own new tokens (kept whole) on the compressed KV; send the "
          "context alone first (e.g. max_tokens 1), then context + question. Prompt-end "
          "compression only (not with decode_budget or prefill_budget).",
          choices=REUSE_PREFIX_MODES),
)
