"""Admission: a request's raw ``vllm_xargs`` in, one typed and resolved spec out, once.

Clients are untrusted; the operator is trusted. Everything a client may set is checked here,
in the front end (API server or offline ``LLM`` process), before a response starts:

* each ``kv_*`` key against its declared range, narrowed by the deployment (``max_model_len``,
  layer count) and by the operator (``--kv-max-<name>``, ``--kv-min-<name>``), with strict
  types (no bool as an integer, no list as a string, no NaN);
* the operator's allow-list of policies (``--kv-allowed-policies``) and the switch that forbids
  per-request settings altogether (``--kv-request-overrides off``);
* file paths: only names under the operator's ``--kv-allowed-file-dir``, looked up in an index
  that a background thread keeps (no ``stat`` or read in the event loop), with one answer for a
  missing, unreadable, linked-out or outside path (no existence oracle);
* the per-model data of the chosen policy (already loaded and checked by the index).

The result is stored in the request's ``extra_args`` under ``ADMITTED_KEY`` and is all the
engine core reads (``admitted_spec``): nothing user-controlled is parsed, validated or opened
there, so nothing there can raise over a client's setting (msgspec re-runs
``SamplingParams.__post_init__`` when the engine core decodes a request: the plugin's check
does nothing outside a front end).

Importable without vLLM.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import (
    CompressionConfigError,
    CompressionSpec,
    _shown,
    request_names,
    request_values,
    resolve,
)
from .policies.model_data import ModelDataHook, ModelShape
from .policies.params import Bounds, Param
from .policies.registry import NO_POLICY, all_params, get_policy_info, model_data_hook, policy_names

logger = logging.getLogger("vllm.kvcompress")

#: Key of the admitted spec in a request's ``extra_args``. Not a ``kv_*`` key, and its value is
#: a mapping, which ``vllm_xargs`` cannot carry (nested objects are refused by vLLM's request
#: model); a client-set value is refused anyway and the front end always writes its own.
ADMITTED_KEY = "_kvcompress_spec"

#: Most files the allowed directory's index holds (and deepest folder it descends into).
MAX_INDEXED_FILES = 1000
MAX_INDEX_DEPTH = 4
#: Seconds between two scans of the allowed directory (files added later become usable then).
RESCAN_SECONDS = 5.0


#: What the operator decides about clients, declared once: each is a ``--kv-<name>`` flag and
#: a key of the ``kvcompress:`` YAML block (never a request key).
OPERATOR_PARAMS: tuple[Param, ...] = (
    Param("allowed_policies", list, None, "Policies clients may name in kv_policy and "
          "kv_chunk_scorer (comma-separated); default: every registered policy.",
          choices=policy_names),
    Param("request_overrides", str, "on", "on: clients may set kv_* keys per request; off: any "
          "kv_* key gets HTTP 400 and every request uses the server's settings.",
          choices=("on", "off")),
    Param("allowed_file_dir", str, None, "Directory whose files requests may name in path "
          "settings (kv_qfilters_path), relative to it; links leading out of it are ignored. "
          "Unset: requests may name no file."),
)


def operator_params() -> dict[str, Param]:
    """Every operator setting: the declared ones plus a cap per parameter with a
    ``request_max`` (``max_<name>``) and a floor per parameter with a ``request_min``
    (``min_<name>``), generated from the parameters' own declarations."""
    params = {p.name: p for p in OPERATOR_PARAMS}
    for param in all_params().values():
        number = param.type if param.type in (int, float) else None
        if number is None:
            continue
        if param.request_max is not None:
            params["max_" + param.name] = Param(
                "max_" + param.name, number, param.request_max,
                f"Largest {param.request_key} a client request may set (the server's own "
                "setting is not capped).", minimum=param.minimum, maximum=param.maximum)
        if param.request_min is not None:
            params["min_" + param.name] = Param(
                "min_" + param.name, number, param.request_min,
                f"Smallest {param.request_key} a client request may set (the server's own "
                "setting is not limited).", minimum=param.minimum, maximum=param.maximum)
    return params


def split_block(block: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits a ``kvcompress:`` block into compression settings and operator settings."""
    operator = operator_params()
    settings = {k: v for k, v in block.items() if k not in operator}
    controls = {k: v for k, v in block.items() if k in operator}
    return settings, controls


def check_operator_values(values: Mapping[str, Any], name_of: Callable[[str], str]
                          ) -> dict[str, Any]:
    """Validates operator settings (one layer).

    Raises:
        CompressionConfigError: a bad value; names the setting as the operator wrote it.
    """
    params = operator_params()
    checked = {}
    for key, value in values.items():
        try:
            checked[key] = params[key].check(value)
        except ValueError as err:
            raise CompressionConfigError(name_of(key), f"must be {err} (got {_shown(value)})"
                                         ) from None
    directory = checked.get("allowed_file_dir")
    if directory is not None and not os.path.isdir(directory):
        raise CompressionConfigError(name_of("allowed_file_dir"),
                                     f"{directory} is not a directory")
    return checked


@dataclass(frozen=True)
class AdmittedSpec:
    """A request's spec as admitted by one front end (stored in ``extra_args``).

    Attributes:
        values: the resolved spec's explicit settings (``CompressionSpec.explicit()``).
        frontend: the admitting front end's token (a spec admitted by another front end,
            e.g. a ``SamplingParams`` reused across two offline engines, is admitted again).
    """

    values: dict[str, Any]
    frontend: str


def admitted_spec(extra_args: Mapping[str, Any] | None, server: CompressionSpec
                  ) -> CompressionSpec:
    """The engine core's view of a request's spec: what its front end admitted, or the server
    default. Never validates, never raises over content: only admission writes the key.

    Args:
        extra_args: the request's ``SamplingParams.extra_args`` (after the front end).
        server: the server default.
    """
    admitted = (extra_args or {}).get(ADMITTED_KEY)
    if isinstance(admitted, AdmittedSpec):  # in-process engine: the object itself
        return CompressionSpec.trusted(admitted.values)
    if isinstance(admitted, Mapping) and isinstance(admitted.get("values"), Mapping):
        return CompressionSpec.trusted(admitted["values"])  # decoded from the wire
    return server


class AllowedFiles:
    """Files under the operator's directory that requests may name, indexed off the event loop.

    The directory is scanned once when the front end starts (at most ``MAX_INDEXED_FILES``
    regular files, ``MAX_INDEX_DEPTH`` folders deep), then again by a daemon thread every
    ``RESCAN_SECONDS``; each file whose real path stays inside the directory is loaded and
    checked by every model-data hook it may serve. Lookups are dictionary reads of the last
    finished scan: no I/O, no waiting.

    Args:
        root: the allowed directory (operator-given).
        hooks: the model-data hooks of the registered policies.
        shape: the served model (files that do not fit it get their own message).
        rescan_seconds: pause between scans (0: scan once, synchronously; tests and tools).
    """

    def __init__(self, root: str, hooks: list[ModelDataHook], shape: ModelShape | None,
                 rescan_seconds: float = RESCAN_SECONDS) -> None:
        self.root = os.path.realpath(root)
        self.hooks = hooks
        self.shape = shape
        #: (hook param, relative name) -> (real path, error or None), from the last scan.
        self._index: dict[tuple[str, str], tuple[str, str | None]] = {}
        self._loaded: dict[tuple[str, str, int], str | None] = {}
        self.scan()  # at startup, before any request
        if rescan_seconds > 0:
            thread = threading.Thread(target=self._run, args=(rescan_seconds,), daemon=True,
                                      name="kvcompress-allowed-files")
            thread.start()

    def _run(self, pause: float) -> None:
        while True:
            time.sleep(pause)
            try:
                self.scan()
            except Exception:  # a scan failure leaves the last index in place
                logger.exception("vllm-kvcompress: scanning %s failed", self.root)

    def scan(self) -> None:
        """Rebuilds the index (blocking I/O: run off the event loop)."""
        index: dict[tuple[str, str], tuple[str, str | None]] = {}
        count = 0
        for folder, dirs, files in os.walk(self.root, followlinks=False):
            depth = os.path.relpath(folder, self.root).count(os.sep)
            if depth >= MAX_INDEX_DEPTH:
                dirs.clear()
            for name in sorted(files):
                if count >= MAX_INDEXED_FILES:
                    break
                path = os.path.join(folder, name)
                real = os.path.realpath(path)
                if os.path.commonpath([real, self.root]) != self.root or \
                        not os.path.isfile(real) or not os.access(real, os.R_OK):
                    continue  # a link leading out, a dangling link, an unreadable file
                count += 1
                relative = os.path.relpath(path, self.root).replace(os.sep, "/")
                for hook in self.hooks:
                    index[(hook.param, relative)] = (real, self._check(hook, real))
        # Results of files (or versions) gone since the last scan are dropped.
        live = {(param, real) for (param, _), (real, _) in index.items()}
        self._loaded = {k: v for k, v in self._loaded.items() if (k[0], k[1]) in live}
        self._index = index  # one assignment: lookups see the old or the new index

    def _check(self, hook: ModelDataHook, real: str) -> str | None:
        """Loads and checks a file once per version; the error's text, or ``None``."""
        try:
            mtime = os.stat(real).st_mtime_ns
        except OSError:
            return "cannot be read"
        key = (hook.param, real, mtime)
        if key not in self._loaded:
            from .policies.model_data import load_model_data

            try:
                load_model_data(hook, real, self.shape)
                self._loaded[key] = None
            except ValueError as err:
                self._loaded[key] = str(err).replace(real, "the file")
            except Exception as err:  # a loader's own failure: this file is unusable
                self._loaded[key] = f"cannot be read as this setting's data ({type(err).__name__})"
        return self._loaded[key]

    def lookup(self, param: str, name: str) -> tuple[str, str | None] | None:
        """``(real path, error or None)`` of a name a request gave, or ``None`` when the
        directory holds no usable file of that name (whatever the reason). No I/O."""
        normal = os.path.normpath(name)
        if os.path.isabs(normal):
            if os.path.commonpath([normal, self.root]) != self.root:
                return None
            normal = os.path.relpath(normal, self.root)
        if normal.startswith(".."):
            return None
        return self._index.get((param, normal.replace(os.sep, "/")))


def request_bounds(controls: Mapping[str, Any] | None = None,
                   deployment: Mapping[str, int] | None = None) -> Bounds:
    """The ranges clients get: the operator's caps and floors (``max_<name>`` /
    ``min_<name>``; unset ones are the parameters' ``request_max`` / ``request_min``), on a
    deployment with these limits."""
    controls = controls or {}
    params = operator_params()

    def value(name: str) -> Any:
        return controls[name] if controls.get(name) is not None else params[name].default

    return Bounds(deployment=dict(deployment or {}),
                  caps={n[4:]: value(n) for n in params if n.startswith("max_")},
                  floors={n[4:]: value(n) for n in params if n.startswith("min_")})


@dataclass(frozen=True)
class RequestRules:
    """What clients may ask for on this deployment.

    Attributes:
        bounds: every parameter's range for requests (deployment and operator applied; by
            default the declared request caps and floors, no deployment limits).
        allowed_policies: policies a request may name, or ``None`` for all.
        overrides: whether requests may set ``kv_*`` keys at all.
        files: the allowed directory's index, or ``None`` (requests may name no file).
    """

    bounds: Bounds = field(default_factory=request_bounds)
    allowed_policies: tuple[str, ...] | None = None
    overrides: bool = True
    files: AllowedFiles | None = None

    @classmethod
    def from_operator(cls, controls: Mapping[str, Any], deployment: Mapping[str, int],
                      shape: ModelShape | None, rescan_seconds: float = RESCAN_SECONDS
                      ) -> RequestRules:
        """Rules from validated operator settings and the served model's limits."""
        params = operator_params()

        def value(name: str) -> Any:
            return controls[name] if controls.get(name) is not None else params[name].default

        directory = value("allowed_file_dir")
        files = None
        if directory is not None:
            hooks = _model_data_hooks()
            files = AllowedFiles(directory, hooks, shape, rescan_seconds)
        allowed = value("allowed_policies")
        return cls(bounds=request_bounds(controls, deployment),
                   allowed_policies=tuple(allowed) if allowed is not None else None,
                   overrides=value("request_overrides") == "on", files=files)


def _model_data_hooks() -> list[ModelDataHook]:
    hooks: dict[str, ModelDataHook] = {}
    for name in policy_names():
        if name == NO_POLICY:
            continue
        hook = get_policy_info(name).model_data
        if hook is not None:
            hooks.setdefault(hook.param, hook)
    return list(hooks.values())


@dataclass(frozen=True)
class Frontend:
    """What one front end knows at startup, for admitting requests.

    Attributes:
        server: the server default spec.
        shape: the served model's shape (per-model data).
        unsupported: why this deployment cannot compress, or ``None``.
        rules: what clients may ask for.
        server_files: path -> error (``None``: fits) of the server's own data files, checked
            at startup (requests that pick a policy reading them use these results).
        token: identifies this front end in ``AdmittedSpec``.
        policy_unsupported: policy -> why it cannot run on this deployment (``kvzip``).
    """

    server: CompressionSpec
    shape: ModelShape | None
    unsupported: str | None
    rules: RequestRules = field(default_factory=RequestRules)
    server_files: Mapping[str, str | None] = field(default_factory=dict)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    policy_unsupported: Mapping[str, str] = field(default_factory=dict)


def _policy_fields() -> list[str]:
    """Settings whose value names a policy (``policy``, ChunkKV's ``chunk_scorer``, ...)."""
    fields = ["policy"]
    for name in policy_names():
        if name != NO_POLICY:
            scorer = get_policy_info(name).scorer_param
            if scorer is not None and scorer not in fields:
                fields.append(scorer)
    return fields


def admit(extra_args: Mapping[str, Any] | None, frontend: Frontend) -> CompressionSpec | None:
    """Admits one request: validates its ``kv_*`` keys for this deployment and resolves them
    against the server default, in one pass.

    Args:
        extra_args: the request's ``extra_args`` (``vllm_xargs``), client-controlled.
        frontend: the admitting front end.

    Returns:
        The request's resolved spec, or ``None`` when it sets no ``kv_*`` key (the server
        default applies).

    Raises:
        CompressionConfigError: names the key (as the client wrote it) and what is allowed.
    """
    if not extra_args:
        return None
    if ADMITTED_KEY in extra_args and not isinstance(extra_args[ADMITTED_KEY], AdmittedSpec):
        raise CompressionConfigError(ADMITTED_KEY, "reserved for the server; remove it")
    values = request_values(extra_args)
    if not values:
        return None
    names = request_names()
    rules = frontend.rules
    if not rules.overrides:
        raise CompressionConfigError(names[next(iter(values))], "per-request compression "
                                     "settings are disabled on this server; it uses its own")
    spec = resolve((frontend.server.explicit(), {}), (values, names, rules.bounds))
    if rules.allowed_policies is not None:
        allowed = [NO_POLICY, *rules.allowed_policies]
        for name in _policy_fields():
            if values.get(name) is not None and values[name] not in allowed:
                raise CompressionConfigError(names[name], "must be one of "
                                             f"{', '.join(allowed)} on this server "
                                             f"(got {_shown(values[name])})")
    if values.get("policy") not in (None, NO_POLICY) and frontend.unsupported:
        raise CompressionConfigError(names["policy"], "compression is not available on this "
                                     f"deployment: {frontend.unsupported}")
    if values.get("policy") in frontend.policy_unsupported:
        raise CompressionConfigError(names["policy"], f"{values['policy']!r} is not available "
                                     f"here: {frontend.policy_unsupported[values['policy']]}")
    params = all_params()
    paths = {name: spec[name] for name in values if params[name].type is Path}
    replaced = {}
    for name, given in paths.items():
        found = rules.files.lookup(name, given) if rules.files is not None else None
        if found is None:
            where = ("under the server's allowed directory (names are relative to it)"
                     if rules.files is not None else
                     "(per-request files are disabled on this server: the operator allows a "
                     "directory with --kv-allowed-file-dir)")
            raise CompressionConfigError(names[name], f"no usable file of that name {where}")
        replaced[name] = found
    if replaced:
        spec = CompressionSpec.trusted({**spec.explicit(),
                                        **{n: real for n, (real, _) in replaced.items()}})
    if spec.enabled:
        _check_data(spec, values, replaced, frontend)
    return spec


def _check_data(spec: CompressionSpec, values: Mapping[str, Any],
                replaced: Mapping[str, tuple[str, str | None]], frontend: Frontend) -> None:
    """The chosen policy's per-model data must exist and fit the model (from the index or the
    startup check: no file is opened here)."""
    hook = model_data_hook(spec)
    if hook is None:
        return
    key = request_names()[hook.param]
    path = spec[hook.param]
    if path is None:
        raise CompressionConfigError(key, f"policy {spec.policy!r} needs this file (its "
                                          "per-model data)")
    if hook.param in replaced:
        error = replaced[hook.param][1]
        shown = values[hook.param]
    else:
        error = frontend.server_files.get(path, "was not checked at startup")
        shown = path
    if error is not None:
        raise CompressionConfigError(key, f"{_shown(shown)}: {error}")


def remember(extra_args: dict[str, Any], spec: CompressionSpec | None, frontend: Frontend
             ) -> None:
    """Stores the admitted spec where the engine core reads it (``admitted_spec``)."""
    if spec is None:
        extra_args.pop(ADMITTED_KEY, None)
    else:
        extra_args[ADMITTED_KEY] = AdmittedSpec(spec.explicit(), frontend.token)


def is_admitted_by(extra_args: Mapping[str, Any] | None, frontend: Frontend) -> bool:
    """Whether this front end already admitted the request (the second check is skipped)."""
    admitted = (extra_args or {}).get(ADMITTED_KEY)
    return isinstance(admitted, AdmittedSpec) and admitted.frontend == frontend.token
