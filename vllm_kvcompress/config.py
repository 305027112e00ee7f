"""Compression settings: one pydantic model, resolved in layers.

Precedence (later wins): defaults < YAML (``--kv-compress-config`` or the ``kvcompress:`` block of
``vllm serve --config`` / ``additional_config``) < CLI flags (``--kv-*``) < per-request
``vllm_xargs`` (``kv_*`` keys). A layer that sets ``ratio`` or ``budget`` replaces both from the
layers below it; setting both in one layer is an error.

Importable without vLLM.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .policies.registry import NO_POLICY, policy_names

#: Kept ratio used when a policy is chosen but neither ratio nor budget is given.
DEFAULT_RATIO = 0.25

#: Prefix of per-request keys in ``vllm_xargs`` / ``SamplingParams.extra_args``.
REQUEST_PREFIX = "kv_"

#: Key of the plugin's block inside vLLM's ``additional_config``.
ADDITIONAL_CONFIG_KEY = "kvcompress"

ALLOWED = {
    "policy": "one of {policies}",
    "ratio": "a number with 0 < ratio <= 1 (fraction of prompt tokens kept)",
    "budget": "an integer >= 0 (prompt tokens kept)",
    "window": "an integer >= 1 (observation window, in tokens)",
    "pool_kernel": "an odd integer >= 1",
    "chunk_size": "an integer >= 1",
    "reuse_layers": "an integer >= 1",
    "sink_tokens": "an integer >= 0",
    "min_prompt_len": "an integer >= 0",
}


class CompressionConfigError(ValueError):
    """A compression setting is invalid.

    Attributes:
        field: the name as the user wrote it (``kv_ratio``, ``--kv-ratio``, ``ratio``).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class CompressionSpec(BaseModel):
    """Validated, frozen compression settings for a server default or one request.

    Attributes:
        policy: registered policy name, or ``none``.
        ratio: fraction of prompt tokens kept, ``0 < ratio <= 1``; exclusive with ``budget``.
        budget: prompt tokens kept; exclusive with ``ratio``.
        window: observation window: the last ``window`` prompt tokens score the rest and are kept.
        pool_kernel: SnapKV average-pooling width (odd).
        chunk_size: ChunkKV chunk length in tokens.
        reuse_layers: ChunkKV layer-wise index reuse group size (1 = no reuse).
        sink_tokens: leading tokens always kept.
        min_prompt_len: prompts shorter than this are not compressed.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    policy: str = NO_POLICY
    ratio: float | None = Field(default=None, gt=0, le=1)
    budget: int | None = Field(default=None, ge=0)
    window: int = Field(default=32, ge=1)
    pool_kernel: int = Field(default=5, ge=1)
    chunk_size: int = Field(default=10, ge=1)
    reuse_layers: int = Field(default=1, ge=1)
    sink_tokens: int = Field(default=4, ge=0)
    min_prompt_len: int = Field(default=0, ge=0)

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in policy_names():
            raise ValueError(f"unknown policy {value!r}")
        return value

    @field_validator("pool_kernel")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"pool_kernel must be odd, got {value}")
        return value

    @model_validator(mode="after")
    def _ratio_xor_budget(self) -> CompressionSpec:
        if self.ratio is not None and self.budget is not None:
            raise ValueError("ratio and budget are exclusive: give one of them")
        return self

    @property
    def enabled(self) -> bool:
        return self.policy != NO_POLICY

    def kept_tokens(self, prompt_len: int) -> int | None:
        """How many prompt tokens a request keeps, or ``None`` when it is not compressed.

        Deterministic in ``prompt_len`` and the spec, so the scheduler and the workers agree
        without a round trip. The sinks and the window are always kept, so a tiny ratio or budget
        keeps ``sink_tokens + window`` tokens; a budget at or above the prompt compresses nothing.
        """
        if not self.enabled or prompt_len < self.min_prompt_len:
            return None
        protected = min(self.sink_tokens + self.window, prompt_len)
        if self.budget is not None:
            kept = self.budget
        else:
            ratio = DEFAULT_RATIO if self.ratio is None else self.ratio
            kept = math.ceil(ratio * prompt_len - 1e-9)
        kept = max(kept, protected)
        return kept if kept < prompt_len else None


def _format_error(err: ValidationError, name_of: dict[str, str]) -> CompressionConfigError:
    """One line naming the first bad field as the user wrote it and what is allowed."""
    first = err.errors()[0]
    loc = first["loc"][0] if first["loc"] else ""
    key = str(loc)
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(name_of.get(f, f) for f in CompressionSpec.model_fields)
        # Spell the unknown key the way this layer spells known ones ("kvcompress:" + key).
        prefix = name_of.get("policy", "policy").removesuffix("policy")
        return CompressionConfigError(prefix + key, f"unknown key; allowed keys: {allowed}")
    if not key:  # model-level check (ratio and budget together)
        fields = " and ".join(name_of.get(f, f) for f in ("ratio", "budget"))
        return CompressionConfigError(fields, "give one of them, not both")
    allowed = ALLOWED.get(key, "").format(policies=", ".join(policy_names()))
    got = first.get("input")
    return CompressionConfigError(
        name_of.get(key, key), f"must be {allowed} (got {got!r})" if allowed else first["msg"])


def _validate_layer(values: Mapping[str, Any], name_of: dict[str, str]) -> dict[str, Any]:
    """Validates one layer alone (so errors name that layer's keys); returns the set fields."""
    try:
        CompressionSpec.model_validate(dict(values))
    except ValidationError as err:
        raise _format_error(err, name_of) from None
    return dict(values)


def resolve(*layers: tuple[Mapping[str, Any], dict[str, str]]) -> CompressionSpec:
    """Merges layers (lowest precedence first) into one spec.

    Args:
        layers: ``(values, name_of)`` pairs; ``values`` maps spec field -> value (only what that
            layer sets); ``name_of`` maps field -> the name the user wrote, for error messages.

    Raises:
        CompressionConfigError: a layer is invalid; the message names the field and what is
            allowed.
    """
    merged: dict[str, Any] = {}
    for values, name_of in layers:
        checked = _validate_layer(values, name_of)
        if "ratio" in checked or "budget" in checked:
            merged.pop("ratio", None)
            merged.pop("budget", None)
        merged.update(checked)
    return CompressionSpec.model_validate(merged)


def request_names() -> dict[str, str]:
    """Field -> per-request key (``ratio`` -> ``kv_ratio``)."""
    return {f: REQUEST_PREFIX + f for f in CompressionSpec.model_fields}


def cli_names() -> dict[str, str]:
    """Field -> CLI flag (``ratio`` -> ``--kv-ratio``)."""
    return {f: "--kv-" + f.replace("_", "-") for f in CompressionSpec.model_fields}


def yaml_names(source: str) -> dict[str, str]:
    """Field -> ``source:field`` for errors in a YAML file or config block."""
    return {f: f"{source}:{f}" for f in CompressionSpec.model_fields}


def request_values(extra_args: Mapping[str, Any] | None) -> dict[str, Any]:
    """Picks the ``kv_*`` keys out of a request's ``extra_args`` (other keys belong to others).

    Raises:
        CompressionConfigError: an unknown ``kv_*`` key.
    """
    values: dict[str, Any] = {}
    for key, value in (extra_args or {}).items():
        if not key.startswith(REQUEST_PREFIX):
            continue
        field = key[len(REQUEST_PREFIX):]
        if field not in CompressionSpec.model_fields:
            allowed = ", ".join(request_names().values())
            raise CompressionConfigError(key, f"unknown key; allowed keys: {allowed}")
        values[field] = value
    return values


def validate_request(extra_args: Mapping[str, Any] | None) -> None:
    """Checks a request's ``kv_*`` keys on their own, before any server default is known.

    Each layer is valid on its own and layers only replace fields, so a request that passes here
    always resolves against any valid server default.

    Raises:
        CompressionConfigError: an unknown ``kv_*`` key or a bad value; names the key.
    """
    values = request_values(extra_args)
    if values:
        _validate_layer(values, request_names())


def resolve_request(server: CompressionSpec, extra_args: Mapping[str, Any] | None
                    ) -> CompressionSpec:
    """The spec of one request: the server default overridden by its ``kv_*`` extra args."""
    values = request_values(extra_args)
    if not values:
        return server
    base = server.model_dump(exclude_none=True)
    return resolve((base, {}), (values, request_names()))
