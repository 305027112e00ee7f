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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Selection modes: one token set per layer (scores summed over KV heads) or one per KV head.
HEAD_SELECT_MODES = ("shared", "per_head")
#: ``merge``: evicted tokens dropped (off) or folded into kept ones (on).
MERGE_MODES = ("off", "on")


@dataclass(frozen=True)
class Param:
    """One setting, declared once.

    Attributes:
        name: the key (``ratio``); flag ``--kv-ratio``, request key ``kv_ratio``.
        type: ``int``, ``float``, ``str`` or ``Path`` (a file that must exist).
        default: value when no layer sets it (``None``: unset).
        help: one line for ``--help`` and ``kvcompress policies``.
        minimum: smallest allowed value (numbers).
        maximum: largest allowed value (numbers).
        exclusive_minimum: whether ``minimum`` itself is excluded.
        odd: integers only: the value must be odd.
        choices: allowed strings, or a callable returning them (the live policy list).
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

    def allowed(self) -> str:
        """What is allowed, in words (``an odd integer >= 1``, ``one of shared, per_head``)."""
        choices = self.allowed_choices()
        if choices is not None:
            return "one of " + ", ".join(choices)
        if self.type is Path:
            return "the path of an existing file"
        if self.type is int:
            noun = "an odd integer" if self.odd else "an integer"
            return noun + _bounds(self)
        if self.type is float:
            if self.minimum is not None and self.maximum is not None:
                low = "<" if self.exclusive_minimum else "<="
                return f"a number with {_num(self.minimum)} {low} {self.name} <= " \
                       f"{_num(self.maximum)}"
            return "a number" + _bounds(self)
        return "a string"

    def check(self, value: Any) -> Any:
        """Returns the value (ints widened to float for float params; paths as ``str``).

        Raises:
            ValueError: the value is not allowed; the message is ``allowed()``.
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
            ok = isinstance(value, str) and bool(value)
        if ok and self.type in (int, float):
            if self.minimum is not None:
                ok = value > self.minimum if self.exclusive_minimum else value >= self.minimum
            if ok and self.maximum is not None:
                ok = value <= self.maximum
            if ok and self.odd:
                ok = value % 2 == 1
        choices = self.allowed_choices()
        if ok and choices is not None:
            ok = value in choices
        if ok and self.type is Path:
            ok = Path(value).is_file()
        if not ok:
            raise ValueError(self.allowed())
        return value


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _bounds(param: Param) -> str:
    parts = []
    if param.minimum is not None:
        parts.append((" > " if param.exclusive_minimum else " >= ") + _num(param.minimum))
    if param.maximum is not None:
        parts.append(" <= " + _num(param.maximum))
    return " and".join(parts)


def _policy_choices() -> list[str]:
    from .registry import policy_names

    return policy_names()


#: Settings of the engine's compression step, shared by every policy.
COMMON_PARAMS: tuple[Param, ...] = (
    Param("policy", str, "none", "KV-cache compression policy applied after prefill.",
          choices=_policy_choices),
    Param("ratio", float, None, "Fraction of prompt tokens whose KV is kept (default 0.25 once "
          "a policy is set, unless decode_budget is set). Exclusive with budget.", minimum=0,
          maximum=1, exclusive_minimum=True),
    Param("budget", int, None, "Number of prompt tokens whose KV is kept. Exclusive with ratio.",
          minimum=0),
    Param("window", int, 32, "Observation window: the last N prompt tokens score the others and "
          "are always kept.", minimum=1),
    Param("sink_tokens", int, 4, "Leading tokens always kept (attention sinks).", minimum=0),
    Param("min_prompt_len", int, 0, "Prompts shorter than this are not compressed.", minimum=0),
    Param("head_select", str, None, "Token selection per layer: shared (one token set for all KV "
          "heads, scores summed) or per_head (each KV head its own tokens, same count, same "
          "memory); default: the policy's own.", choices=HEAD_SELECT_MODES),
    Param("decode_budget", int, None, "KV tokens a request may hold during decoding, prompt and "
          "generated together: when its physical length reaches decode_budget + decode_interval, "
          "the policy compacts it back to decode_budget (unset: only the prompt is compressed).",
          minimum=1),
    Param("decode_interval", int, 128, "Tokens a decode-compressed request grows by between two "
          "compactions (compaction at decode_budget + decode_interval).", minimum=1),
    Param("merge", str, "off", "on: evicted tokens' values are folded (window-attention "
          "weighted) into their most similar kept token, per KV head (ZeroMerge-style).",
          choices=MERGE_MODES),
)
