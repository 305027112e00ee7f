"""The runner's two input files, checked before torch or kvpress is imported; every error names
the file, the line or config index and the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .presses import DEFAULT_PARAMS, InputError, press_spec

#: Integer params and their smallest allowed value.
INT_PARAMS = {"window": 1, "pool_kernel": 1, "chunk_size": 1, "sink_tokens": 0,
              "future_positions": 1, "kvzip_chunk_size": 1}
QUERY_AWARE = "query_aware"
QUERY_AGNOSTIC = "query_agnostic"
SETTINGS = (QUERY_AWARE, QUERY_AGNOSTIC)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)



def load_configs(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """Read and check configs.json.

    Args:
        path: the file.

    Returns:
        The configs (``policy``, ``ratio``, ``spec``, ``key``: a string or None), the merged
        params and the setting.

    Raises:
        InputError: missing file, bad JSON, or a bad field (named in the message).
    """
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise InputError(f"--configs {path}: cannot read: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise InputError(f"--configs {path}: bad JSON: {e}") from e
    if not isinstance(data, dict):
        raise InputError(f"--configs {path}: expected a JSON object")
    setting = data.get("setting", QUERY_AWARE)
    if setting not in SETTINGS:
        raise InputError(f"--configs {path}: 'setting' must be one of {', '.join(SETTINGS)}, "
                         f"got {setting!r}")
    params = data.get("params", {})
    if not isinstance(params, dict):
        raise InputError(f"--configs {path}: 'params' must be an object")
    for key, lowest in INT_PARAMS.items():
        value = params.get(key, DEFAULT_PARAMS[key])
        if not _is_int(value) or value < lowest:
            raise InputError(
                f"--configs {path}: params.{key} must be an int >= {lowest}, got {value!r}"
            )
    if params.get("pool_kernel", DEFAULT_PARAMS["pool_kernel"]) % 2 == 0:
        raise InputError(f"--configs {path}: params.pool_kernel must be odd")
    qfilters_path = params.get("qfilters_path")
    if qfilters_path is not None and not (isinstance(qfilters_path, str) and
                                          Path(qfilters_path).is_file()):
        raise InputError(f"--configs {path}: params.qfilters_path must be an existing file, got "
                         f"{qfilters_path!r}")
    merged = {**DEFAULT_PARAMS, **{k: v for k, v in params.items() if k in DEFAULT_PARAMS}}
    configs = data.get("configs")
    if not isinstance(configs, list) or not configs:
        raise InputError(f"--configs {path}: 'configs' must be a non-empty list")
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, float]] = set()
    for i, cfg in enumerate(configs):
        where = f"--configs {path}: configs[{i}]"
        if not isinstance(cfg, dict) or "policy" not in cfg or "ratio" not in cfg:
            raise InputError(f"{where}: expected an object with 'policy' and 'ratio'")
        policy, ratio, key = cfg["policy"], cfg["ratio"], cfg.get("key")
        try:
            spec = press_spec(policy, ratio, merged)
        except InputError as e:
            raise InputError(f"{where}: {e}") from e
        if key is not None and not isinstance(key, str):
            raise InputError(f"{where}: 'key' must be a string, got {key!r}")
        if (policy, float(ratio)) in seen:
            raise InputError(f"{where}: duplicate config {policy} {ratio}")
        seen.add((policy, float(ratio)))
        out.append({"policy": policy, "ratio": float(ratio), "spec": spec, "key": key})
    return out, merged, setting


def load_samples(path: Path, configs: int, setting: str = QUERY_AWARE) -> list[dict[str, Any]]:
    """Read and check the jobs file (keys other than those below are ignored).

    Args:
        path: the file.
        configs: how many configs configs.json holds (``todo`` indexes them).
        setting: the configs' setting (``query_agnostic`` needs ``context_len``).

    Returns:
        Per sample, in file order: ``id``, ``input_ids``, ``max_tokens``, ``followup`` (None for
        a single-turn sample), ``context_len`` (None if absent), ``prompt_key`` (None if
        absent), ``todo`` (sorted (config index, turn) pairs) and ``turn1`` (config index ->
        recorded turn-1 output ids).

    Raises:
        InputError: missing file, bad JSON, or a bad field (named with its line number).
    """
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise InputError(f"--samples {path}: cannot read: {e.strerror or e}") from e
    samples: list[dict[str, Any]] = []
    ids: set[str] = set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--samples {path} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: bad JSON: {e}") from e
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected a JSON object")
        sid, input_ids, max_tokens = obj.get("id"), obj.get("input_ids"), obj.get("max_tokens")
        if not isinstance(sid, str) or not sid:
            raise InputError(f"{where}: 'id' must be a non-empty string, got {sid!r}")
        if sid in ids:
            raise InputError(f"{where}: duplicate id {sid!r}")
        if not _token_ids(input_ids):
            raise InputError(f"{where}: 'input_ids' must be a non-empty list of ints >= 0")
        if not _is_int(max_tokens) or max_tokens < 1:
            raise InputError(f"{where}: 'max_tokens' must be an int >= 1, got {max_tokens!r}")
        followup = _check_followup(obj.get("followup"), where)
        context_len = obj.get("context_len")
        if context_len is not None and not (_is_int(context_len)
                                            and 0 < context_len < len(input_ids)):
            raise InputError(f"{where}: 'context_len' must be an int in [1, {len(input_ids)}), "
                             f"got {context_len!r}")
        if setting == QUERY_AGNOSTIC and context_len is None:
            raise InputError(f"{where}: 'context_len' is required by the query_agnostic setting")
        prompt_key = obj.get("prompt_key")
        if prompt_key is not None and not isinstance(prompt_key, str):
            raise InputError(f"{where}: 'prompt_key' must be a string, got {prompt_key!r}")
        todo = _check_todo(obj.get("todo"), configs, followup is not None, where)
        turn1 = _check_turn1(obj.get("turn1_output_ids"), configs, where)
        missing = [c for c, turn in todo if turn == 2 and (c, 1) not in todo and c not in turn1]
        if missing:
            raise InputError(f"{where}: 'todo' has turn 2 of configs {missing} without their "
                             "turn 1 in 'todo' or 'turn1_output_ids'")
        ids.add(sid)
        samples.append({"id": sid, "input_ids": input_ids, "max_tokens": max_tokens,
                        "followup": followup, "context_len": context_len,
                        "prompt_key": prompt_key, "todo": todo, "turn1": turn1})
    if not samples:
        raise InputError(f"--samples {path}: no samples")
    return samples


def _token_ids(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(_is_int(t) and t >= 0 for t in value))


def _check_todo(value: Any, configs: int, two_turns: bool, where: str
                ) -> list[tuple[int, int]]:
    """A sample's ``todo``, checked; absent means every config, every turn the sample has."""
    turns = (1, 2) if two_turns else (1,)
    if value is None:
        return [(c, t) for c in range(configs) for t in turns]
    if not isinstance(value, list):
        raise InputError(f"{where}: 'todo' must be a list of [config index, turn] pairs")
    todo: set[tuple[int, int]] = set()
    for item in value:
        if (not isinstance(item, list) or len(item) != 2 or not all(_is_int(x) for x in item)
                or not 0 <= item[0] < configs or item[1] not in turns):
            raise InputError(f"{where}: 'todo' item {item!r} is not [config index in [0, "
                             f"{configs}), turn in {list(turns)}]")
        todo.add((item[0], item[1]))
    return sorted(todo)


def _check_turn1(value: Any, configs: int, where: str) -> dict[int, list[int]]:
    """A sample's ``turn1_output_ids``: config index (a string in JSON) -> ids."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{where}: 'turn1_output_ids' must be an object")
    turn1: dict[int, list[int]] = {}
    for index, ids in value.items():
        if not (isinstance(index, str) and index.isdigit() and int(index) < configs):
            raise InputError(f"{where}: 'turn1_output_ids' key {index!r} is no config index")
        if not isinstance(ids, list) or not all(_is_int(t) and t >= 0 for t in ids):
            raise InputError(f"{where}: 'turn1_output_ids[{index}]' must be a list of ints >= 0")
        turn1[int(index)] = ids
    return turn1


def _check_followup(value: Any, where: str) -> dict[str, Any] | None:
    """A sample's ``followup`` (None when absent), checked; errors name the field."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InputError(f"{where}: 'followup' must be an object")
    for key in ("suffix_ids", "stop_ids"):
        ids = value.get(key)
        if not isinstance(ids, list) or not all(_is_int(t) and t >= 0 for t in ids):
            raise InputError(f"{where}: 'followup.{key}' must be a list of ints >= 0")
    if not value["suffix_ids"]:
        raise InputError(f"{where}: 'followup.suffix_ids' must not be empty")
    max_tokens = value.get("max_tokens")
    if not _is_int(max_tokens) or max_tokens < 1:
        raise InputError(
            f"{where}: 'followup.max_tokens' must be an int >= 1, got {max_tokens!r}"
        )
    return {"suffix_ids": value["suffix_ids"], "stop_ids": value["stop_ids"],
            "max_tokens": max_tokens}  # fmt: skip


def turn2_input_ids(
    input_ids: list[int], output_ids: list[int], suffix_ids: list[int], stop_ids: list[int]
) -> list[int]:
    """Turn 2's prompt: turn 1's prompt, turn 1's answer token for token, the template's rest.

    The same as ``vllm_kvcompress.eval.tasks.turn2_input_ids`` (tested), written again here
    because this package imports nothing else of ``vllm_kvcompress``.

    Args:
        input_ids: turn 1's prompt.
        output_ids: the ids turn 1 generated.
        suffix_ids: the template's tokens after the answer (end of turn, question, prefix).
        stop_ids: trailing ids dropped from the answer (EOS, end of turn).

    Returns:
        ``input_ids + answer + suffix_ids``.
    """
    answer = list(output_ids)
    stops = set(stop_ids)
    while answer and answer[-1] in stops:
        answer.pop()
    return [*input_ids, *answer, *suffix_ids]

