"""Compression settings: one immutable spec, generated from the declared parameters, resolved in
layers.

Precedence (later wins): defaults < YAML (``--kv-compress-config`` or the ``kvcompress:`` block of
``vllm serve --config`` / ``additional_config``) < CLI flags (``--kv-*``) < per-request
``vllm_xargs`` (``kv_*`` keys). A layer that sets ``ratio`` or ``budget`` replaces both from the
layers below it; setting both in one layer is an error. The keys and what each allows come
from the ``Param`` declarations (``policies/params.py`` and each policy's module).

Importable without vLLM.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from typing import Any

from .policies.params import DECLARED, Bounds, Param
from .policies.registry import NO_POLICY, all_params

#: Kept ratio used when a policy is chosen but neither ratio nor budget is given.
DEFAULT_RATIO = 0.25

#: Prefix of per-request keys in ``vllm_xargs`` / ``SamplingParams.extra_args``.
REQUEST_PREFIX = "kv_"

#: Key of the plugin's block inside vLLM's ``additional_config``.
ADDITIONAL_CONFIG_KEY = "kvcompress"

#: Settings whose combination ``_check_decode_room`` checks.
DECODE_FIELDS = frozenset({"decode_budget", "decode_interval", "prefill_budget", "sink_tokens",
                           "window", "reuse_prefix"})


class CompressionConfigError(ValueError):
    """A compression setting is invalid.

    Attributes:
        field: the name as the user wrote it (``kv_ratio``, ``--kv-ratio``, ``ratio``).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _check_values(values: Mapping[str, Any], name_of: Mapping[str, str],
                  bounds: Bounds = DECLARED) -> dict[str, Any]:
    """Validates one layer of settings against the declared parameters.

    Args:
        values: field -> value, only what the layer sets.
        name_of: field -> the name the user wrote (for messages); missing fields use the field.
        bounds: the ranges on this deployment for this kind of caller (declared ranges when
            no deployment is known).

    Raises:
        CompressionConfigError: unknown key, bad value, or ratio and budget together; the
            message names the key as the user wrote it and what is allowed.
    """
    params = all_params()
    checked: dict[str, Any] = {}
    for key, value in values.items():
        param = params.get(key)
        if param is None:
            allowed = ", ".join(name_of.get(f, f) for f in params)
            # Spell the unknown key the way this layer spells known ones ("file:" + key).
            prefix = name_of.get("policy", "policy").removesuffix("policy")
            raise CompressionConfigError(prefix + key, f"unknown key; allowed keys: {allowed}")
        try:
            checked_value = param.check(value, bounds)
        except ValueError as err:
            raise CompressionConfigError(name_of.get(key, key),
                                         f"must be {err} (got {_shown(value)})") from None
        if checked_value is None and param.default is not None:
            continue  # None means "not set here" (``kv_policy: None`` is not a policy named None)
        checked[key] = checked_value
    if checked.get("ratio") is not None and checked.get("budget") is not None:
        fields = " and ".join(name_of.get(f, f) for f in ("ratio", "budget"))
        raise CompressionConfigError(fields, "give one of them, not both")
    return checked


def _check_decode_room(values: Mapping[str, Any], name_of: Mapping[str, str]) -> None:
    """``decode_budget`` must hold the sinks, the window and one interval of new tokens;
    ``prefill_budget`` the sinks and the window; ``reuse_prefix: on`` goes with neither.

    Cross-field rules, so they are checked on the merged settings (every layer's values),
    naming the setting as the deciding layer spells it.

    Raises:
        CompressionConfigError: ``decode_budget < sink_tokens + window + decode_interval``,
            ``prefill_budget < sink_tokens + window``, ``prefill_budget`` with PyramidKV,
            ``prefill_budget`` or ``decode_budget`` with KVzip, or ``reuse_prefix: on`` with
            ``decode_budget`` or ``prefill_budget``.
    """
    params = all_params()

    def value(name: str) -> int:
        return values[name] if values.get(name) is not None else params[name].default

    prefill = values.get("prefill_budget")
    if prefill is not None and prefill < value("sink_tokens") + value("window"):
        raise CompressionConfigError(
            name_of.get("prefill_budget", "prefill_budget"),
            f"must be an integer >= sink_tokens + window = {value('sink_tokens')} + "
            f"{value('window')} = {value('sink_tokens') + value('window')} (got {prefill})")
    if prefill is not None and values.get("policy") == "pyramidkv":
        raise CompressionConfigError(
            name_of.get("prefill_budget", "prefill_budget"),
            "is not supported with policy 'pyramidkv' (its per-layer budgets are shares of the "
            "whole prompt, which a chunk does not know)")
    budget = values.get("decode_budget")
    if values.get("policy") == "kvzip":
        for name in ("prefill_budget", "decode_budget"):
            if values.get(name) is not None:
                raise CompressionConfigError(
                    name_of.get(name, name),
                    "is not supported with policy 'kvzip' (it scores a whole prompt once, "
                    "by reconstructing it after the prompt's forward)")
    if values.get("reuse_prefix") == "on" and (budget is not None or prefill is not None):
        # A published prefix must be a function of the context and the settings alone.
        raise CompressionConfigError(
            name_of.get("reuse_prefix", "reuse_prefix"),
            "'on' cannot be combined with decode_budget or prefill_budget (a published "
            "compressed prefix must depend on the context and the settings only; those "
            "compactions depend on generated tokens and on where prefill chunks end)")
    if budget is None:
        return
    sinks, window, interval = value("sink_tokens"), value("window"), value("decode_interval")
    if budget < sinks + window + interval:
        raise CompressionConfigError(
            name_of.get("decode_budget", "decode_budget"),
            f"must be an integer >= sink_tokens + window + decode_interval = {sinks} + {window} "
            f"+ {interval} = {sinks + window + interval} (got {budget})")


def _shown(value: Any) -> str:
    """A value as an error message quotes it: at most 80 characters (a client's megabyte
    string is not echoed back or logged)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class CompressionSpec(Mapping[str, Any]):
    """Validated, immutable compression settings for a server default or one request.

    Every declared parameter (``COMMON_PARAMS`` and each registered policy's own) is an
    attribute: ``spec.ratio``, ``spec.chunk_size``; unset ones read as their declared default.
    Hashable and comparable, so policies built from it can be cached.

    Common attributes:
        policy: registered policy name, or ``none``.
        ratio: fraction of prompt tokens kept, ``0 < ratio <= 1``; exclusive with ``budget``.
        budget: prompt tokens kept; exclusive with ``ratio``.
        window: observation window: the last ``window`` prompt tokens score the rest and are kept.
        sink_tokens: leading tokens always kept.
        min_prompt_len: prompts shorter than this are not compressed.
        head_select: ``shared``, ``per_head``, or ``None`` for the policy's default.
        decode_budget: tokens a request may hold while decoding (``None``: prompt only).
        decode_interval: growth between decode-time compactions.

    Raises:
        CompressionConfigError: on construction with a bad value (names the field).
    """

    __slots__ = ("_values",)

    def __init__(self, **values: Any) -> None:
        checked = _check_values(values, {})
        _check_decode_room(checked, {})
        object.__setattr__(self, "_values", checked)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CompressionSpec:
        return cls(**dict(values))

    @classmethod
    def trusted(cls, values: Mapping[str, Any]) -> CompressionSpec:
        """A spec from values this deployment already validated (``resolve``, admission),
        without checking them again: the engine core and the workers receive specs only from
        the front end's admission, so nothing user-controlled is parsed there and nothing there
        touches a file or raises over a setting."""
        spec = object.__new__(cls)
        object.__setattr__(spec, "_values", dict(values))
        return spec

    # --- attribute access -------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        param: Param | None = all_params().get(name)
        if param is None:
            raise AttributeError(f"no compression setting named {name!r}")
        return param.default

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("CompressionSpec is immutable; use replace()")

    def __getitem__(self, key: str) -> Any:
        if key not in all_params():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(all_params())

    def __len__(self) -> int:
        return len(all_params())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompressionSpec):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash(self.key())

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in self.as_dict(exclude_none=True).items())
        return f"CompressionSpec({items})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Specs cross to the engine core and the workers already validated (see trusted()).
        return (CompressionSpec.trusted, (dict(self._values),))

    # --- views ------------------------------------------------------------------------------

    def as_dict(self, exclude_none: bool = False) -> dict[str, Any]:
        """Every setting (defaults included), in declaration order."""
        values = {name: getattr(self, name) for name in all_params()}
        if exclude_none:
            values = {k: v for k, v in values.items() if v is not None}
        return values

    def explicit(self) -> dict[str, Any]:
        """Only the settings given explicitly (what a layer passes on)."""
        return dict(self._values)

    def key(self) -> str:
        """A stable text key (cache keys, logs)."""
        return json.dumps(self.as_dict(), sort_keys=True)

    def replace(self, **changes: Any) -> CompressionSpec:
        """A copy with some settings changed (validated like any layer)."""
        return CompressionSpec(**{**self._values, **changes})

    # --- derived ----------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.policy != NO_POLICY

    def kept_tokens(self, prompt_len: int) -> int | None:
        """How many prompt tokens a request keeps, or ``None`` when it is not compressed.

        With ``decode_budget`` set and neither ``ratio`` nor ``budget``, the prompt policy keeps
        everything (``DEFAULT_RATIO`` does not apply): the decode budget alone bounds the request
        (``compaction_target`` cuts a prompt of ``decode_budget + decode_interval`` or more).

        Deterministic in ``prompt_len`` and the spec, so the scheduler and the workers agree
        without a round trip. The sinks and the window are always kept, so a tiny ratio or budget
        keeps ``sink_tokens + window`` tokens; a budget at or above the prompt compresses nothing.
        """
        if not self.enabled or prompt_len < self.min_prompt_len:
            return None
        protected = min(self.sink_tokens + self.window, prompt_len)
        if self.budget is not None:
            kept = self.budget
        elif self.ratio is None and (self.decode_budget is not None
                                     or self.prefill_budget is not None):
            return None  # the decode / prefill budget alone bounds the request
        else:
            ratio = DEFAULT_RATIO if self.ratio is None else self.ratio
            kept = math.ceil(ratio * prompt_len - 1e-9)
        kept = max(kept, protected)
        return kept if kept < prompt_len else None

    def compaction_target(self, physical_len: int, prompt_kept: int | None = None
                          ) -> int | None:
        """Tokens to keep when a request holds ``physical_len`` tokens, or ``None`` for none.

        The one rule of decode-time compression, shared by the scheduler, the workers and the
        reference: a request with ``decode_budget`` that holds (or, at the end of a prefill,
        would keep) at least ``decode_budget + decode_interval`` tokens is compacted to
        ``decode_budget``; otherwise the prompt policy's ``prompt_kept`` stands (``None`` on
        decode steps).

        Args:
            physical_len: tokens in the paged cache after this step's forward.
            prompt_kept: what prompt compression keeps on this step (prefill end only).
        """
        if not self.enabled or self.decode_budget is None:
            return prompt_kept
        held = physical_len if prompt_kept is None else prompt_kept
        if held >= self.decode_budget + self.decode_interval:
            return self.decode_budget
        return prompt_kept

    def prefill_target(self, physical_len: int) -> int | None:
        """Tokens to keep after a (not final) prefill chunk, or ``None``: ``prefill_budget``
        once the request holds more than that."""
        if not self.enabled or self.prefill_budget is None or \
                physical_len <= self.prefill_budget:
            return None
        return self.prefill_budget

    def prompt_end_target(self, physical_len: int, prompt_kept: int | None) -> int | None:
        """Tokens to keep when the prompt's last chunk is prefilled, or ``None``: the smaller of
        the prompt policy's ``prompt_kept`` and ``prefill_budget`` (each where it is below what
        the request holds), then the decode rule (``compaction_target``).

        Args:
            physical_len: tokens in the paged cache after the last chunk (the prompt length
                minus what earlier prefill compactions evicted).
            prompt_kept: what the prompt policy keeps of the whole (logical) prompt.
        """
        target = prompt_kept if prompt_kept is not None and prompt_kept < physical_len else None
        budget = self.prefill_target(physical_len)
        if budget is not None:
            target = budget if target is None else min(target, budget)
        return self.compaction_target(physical_len, target)


def request_footprint(spec: CompressionSpec, prompt_len: int, max_tokens: int, chunk: int
                      ) -> int:
    """The most KV tokens a request holds at once under ``spec`` (an upper bound; the
    deterministic rules, no policy run): what the pool must hold for it to ever finish.

    Args:
        spec: the request's resolved settings.
        prompt_len: its prompt tokens.
        max_tokens: tokens it may generate.
        chunk: the engine's chunked-prefill chunk (``max_num_batched_tokens``).
    """
    if not spec.enabled:
        return prompt_len + max_tokens
    prefill_peak = held = prompt_len
    if spec.prefill_budget is not None:
        # Cut back to the budget after every chunk that leaves more, and at the prompt's end.
        prefill_peak = min(prompt_len, spec.prefill_budget + chunk)
        held = min(prompt_len, spec.prefill_budget)
    kept = spec.kept_tokens(prompt_len)
    if kept is not None:
        held = min(held, kept)
    if spec.decode_budget is not None and held >= spec.decode_budget + spec.decode_interval:
        held = spec.decode_budget
    grown = held + max_tokens
    if spec.decode_budget is not None:
        grown = min(grown, max(held, spec.decode_budget + spec.decode_interval))
    return max(prefill_peak, grown)


def resolve(*layers: tuple[Mapping[str, Any], Mapping[str, str]]
            | tuple[Mapping[str, Any], Mapping[str, str], Bounds]) -> CompressionSpec:
    """Merges layers (lowest precedence first) into one spec.

    Args:
        layers: ``(values, name_of)`` or ``(values, name_of, bounds)``; ``values`` maps spec
            field -> value (only what that layer sets); ``name_of`` maps field -> the name the
            user wrote, for error messages; ``bounds``: the ranges that layer's author may use
            (declared ranges when absent).

    Raises:
        CompressionConfigError: a layer is invalid; the message names the field and what is
            allowed.
    """
    merged: dict[str, Any] = {}
    names: Mapping[str, str] = {}
    for values, name_of, *rest in layers:
        checked = _check_values(values, name_of, *rest)
        if "ratio" in checked or "budget" in checked:
            merged.pop("ratio", None)
            merged.pop("budget", None)
        merged.update(checked)
        if checked.keys() & DECODE_FIELDS:
            names = name_of  # the layer that last touched the decode settings is named
    _check_decode_room(merged, names)
    return CompressionSpec.trusted(merged)


def request_names() -> dict[str, str]:
    """Field -> per-request key (``ratio`` -> ``kv_ratio``)."""
    return {name: p.request_key for name, p in all_params().items()}


def cli_names() -> dict[str, str]:
    """Field -> CLI flag (``ratio`` -> ``--kv-ratio``)."""
    return {name: p.flag for name, p in all_params().items()}


def yaml_names(source: str) -> dict[str, str]:
    """Field -> ``source:field`` for errors in a YAML file or config block."""
    return {f: f"{source}:{f}" for f in all_params()}


def request_values(extra_args: Mapping[str, Any] | None) -> dict[str, Any]:
    """Picks the ``kv_*`` keys out of a request's ``extra_args`` (other keys belong to others).

    Raises:
        CompressionConfigError: an unknown ``kv_*`` key (or a non-string key).
    """
    values: dict[str, Any] = {}
    params = all_params()
    for key, value in (extra_args or {}).items():
        if not isinstance(key, str):
            raise CompressionConfigError("vllm_xargs", "keys must be strings")
        if not key.startswith(REQUEST_PREFIX):
            continue
        field = key[len(REQUEST_PREFIX):]
        if field not in params:
            allowed = ", ".join(request_names().values())
            raise CompressionConfigError(_shown(key).strip("'\""),
                                         f"unknown key; allowed keys: {allowed}")
        values[field] = value
    return values


def resolve_request(server: CompressionSpec, extra_args: Mapping[str, Any] | None,
                    bounds: Bounds = DECLARED) -> CompressionSpec:
    """The spec of one request: the server default overridden by its ``kv_*`` extra args.

    Args:
        server: the server default.
        extra_args: the request's ``extra_args`` (``vllm_xargs``).
        bounds: the ranges clients may use on this deployment (``admission.RequestRules``).

    Raises:
        CompressionConfigError: an unknown ``kv_*`` key or a bad value; names the key.
    """
    values = request_values(extra_args)
    if not values:
        return server
    return resolve((server.explicit(), {}), (values, request_names(), bounds))


def check_model_data(spec: CompressionSpec, shape: Any, name_of: Mapping[str, str]) -> None:
    """Loads and checks the per-model data a spec's policy asks for (once per file version).

    Args:
        spec: a resolved spec.
        shape: ``policies.model_data.ModelShape`` of the served model.
        name_of: field -> the name the user wrote (``kv_<name>``, ``--kv-<name>``, ...).

    Raises:
        CompressionConfigError: the file is missing, unreadable or does not fit the model; the
            message names the path setting.
    """
    from .policies.model_data import load_model_data
    from .policies.registry import model_data_hook

    if not spec.enabled:
        return
    hook = model_data_hook(spec)
    if hook is None:
        return
    field = name_of.get(hook.param, hook.param)
    path = getattr(spec, hook.param)
    if path is None:
        raise CompressionConfigError(field, f"policy {spec.policy!r} needs this file (its "
                                            "per-model data)")
    try:
        load_model_data(hook, path, shape)
    except ValueError as err:
        raise CompressionConfigError(field, f"{path}: {err}") from None
