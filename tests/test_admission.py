"""Admission of untrusted ``vllm_xargs``: bounds generated from the declarations, strict types,
operator controls, per-request files without an oracle, and a fuzz of the whole object.

Pure (no engine): the server-level suite is tests/test_hostile_server.py.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest

from vllm_kvcompress.admission import (
    ADMITTED_KEY,
    AdmittedSpec,
    AllowedFiles,
    Frontend,
    RequestRules,
    admit,
    admitted_spec,
    operator_params,
    remember,
)
from vllm_kvcompress.config import CompressionConfigError, CompressionSpec
from vllm_kvcompress.policies.model_data import ModelShape
from vllm_kvcompress.policies.params import Bounds
from vllm_kvcompress.policies.registry import all_params

#: The served model of these tests: 4 layers, 2 KV heads of 64, 4 query heads, 1024 tokens.
SHAPE = ModelShape("tiny", 4, 2, 4, 64)
DEPLOYMENT = {"max_model_len": 1024, "num_layers": 4}


def frontend(server: CompressionSpec | None = None, unsupported: str | None = None,
             files: AllowedFiles | None = None, **controls: Any) -> Frontend:
    rules = RequestRules.from_operator(controls, DEPLOYMENT, SHAPE, rescan_seconds=0)
    if files is not None:
        rules = RequestRules(rules.bounds, rules.allowed_policies, rules.overrides, files)
    return Frontend(server or CompressionSpec(), SHAPE, unsupported, rules)


def refused(xargs: dict[str, Any], front: Frontend | None = None) -> CompressionConfigError:
    with pytest.raises(CompressionConfigError) as info:
        admit(xargs, front or frontend())
    return info.value


def request_range(name: str) -> tuple[float | None, float | None]:
    """(smallest, largest) value a client may set, from the declarations alone."""
    param = all_params()[name]
    bounds = frontend().rules.bounds
    return bounds.minimum(param), bounds.maximum(param)


NUMERIC = [name for name, p in all_params().items() if p.type in (int, float)]


def test_every_numeric_parameter_is_bounded_for_clients() -> None:
    """No size a client sets is unbounded: each has a deployment bound, a request cap or a
    declared maximum (ratio: 1)."""
    for name in NUMERIC:
        low, high = request_range(name)
        assert low is not None and high is not None and high <= 1 << 20, name


@pytest.mark.parametrize("name", NUMERIC)
def test_each_parameter_at_and_past_its_bounds(name: str) -> None:
    """At each end of its range a value is admitted; one step past it is a 400 that names the
    key, the value and the range."""
    param = all_params()[name]
    low, high = request_range(name)
    policy = "chunkkv" if name in ("chunk_size", "reuse_layers") else "snapkv"
    step = 1 if param.type is int else 1e-3
    edges = [high] if param.exclusive_minimum else [high, low]
    for value in edges:
        if param.odd and value % 2 == 0:
            value -= 1
        value = param.type(value)
        xargs = {"kv_policy": policy, param.request_key: value}
        # The decode settings also obey the room rule (budget >= sinks + window + interval,
        # tested in test_config): pair each with a partner that leaves room where it can.
        if name == "decode_budget":
            xargs["kv_decode_interval"] = 16
            if value < 4 + 32 + 16:
                continue
        if name == "decode_interval":
            xargs["kv_decode_budget"] = 1024
            if value > 1024 - 36:
                continue
        if name == "prefill_budget" and value < 4 + 32:
            continue
        admit(xargs, frontend())
    past = [high + step, low - step if not param.exclusive_minimum else low]
    for value in past:
        value = param.type(value)
        err = refused({param.request_key: value})
        assert err.field == param.request_key
        assert f"(got {value!r})" in str(err)
        assert str(err).startswith(f"{param.request_key}: must be ")


@pytest.mark.parametrize(("value", "why"), [
    (True, "bool as integer"), (False, "bool as integer"), ("32", "string"), ([32], "list"),
    (32.0, "float as integer"), (None.__class__, "type object"), (2**70, "huge"),
    (-(2**63), "huge negative"), (math.nan, "nan"), (math.inf, "inf")])
def test_window_types_are_strict(value: Any, why: str) -> None:
    err = refused({"kv_window": value})
    assert err.field == "kv_window", why


@pytest.mark.parametrize("value", [True, "0.5", [0.5], math.nan, -math.inf, math.inf, 0, 1.0001])
def test_ratio_types_are_strict(value: Any) -> None:
    assert refused({"kv_ratio": value}).field == "kv_ratio"


@pytest.mark.parametrize("value", [["snapkv"], "x" * 5000, "", "snapkv\x00", "SNAPKV", 1,
                                   "snapkv ", "\u0073napkv\u200b", "🙂"])
def test_policy_strings_are_strict(value: Any) -> None:
    err = refused({"kv_policy": value})
    assert err.field == "kv_policy"
    assert len(str(err)) < 1000  # a megabyte value is never echoed back whole


def test_the_issue_example_is_refused_before_anything_allocates() -> None:
    err = refused({"kv_policy": "snapkv", "kv_window": 100000000,
                   "kv_decode_budget": 100000200})
    assert err.field == "kv_window"
    assert "<= 512" in str(err)


def test_deployment_bounds_follow_the_served_model() -> None:
    """max_model_len and the layer count bound sizes; the operator's caps bound them further
    for clients only."""
    assert "<= 1024" in str(refused({"kv_budget": 1025}))
    assert "<= 4" in str(refused({"kv_policy": "chunkkv", "kv_reuse_layers": 5}))
    front = frontend(max_window=2000)
    assert "<= 1024" in str(refused({"kv_window": 1025}, front))  # max_model_len wins
    admit({"kv_window": 1024}, front)


def test_operator_caps_and_floors() -> None:
    front = frontend(max_window=64, min_decode_interval=32, max_chunk_size=20)
    admit({"kv_policy": "snapkv", "kv_window": 64}, front)
    assert "<= 64" in str(refused({"kv_window": 65}, front))
    assert ">= 32" in str(refused({"kv_decode_budget": 500, "kv_decode_interval": 31}, front))
    assert "<= 20" in str(refused({"kv_policy": "chunkkv", "kv_chunk_size": 21}, front))
    # The operator's own default is not capped by the request caps.
    own = frontend(CompressionSpec(policy="snapkv", window=600))
    assert admit({"kv_ratio": 0.5}, own).window == 600


def test_default_request_floor_refuses_compaction_every_step() -> None:
    err = refused({"kv_decode_budget": 200, "kv_decode_interval": 1})
    assert err.field == "kv_decode_interval" and ">= 16" in str(err)


def test_allowed_policies() -> None:
    front = frontend(allowed_policies=("snapkv", "chunkkv"))
    assert admit({"kv_policy": "snapkv"}, front).policy == "snapkv"
    assert admit({"kv_policy": "none"}, front).policy == "none"
    err = refused({"kv_policy": "tova"}, front)
    assert err.field == "kv_policy" and "none, snapkv, chunkkv on this server" in str(err)
    err = refused({"kv_policy": "chunkkv", "kv_chunk_scorer": "qfilters"}, front)
    assert err.field == "kv_chunk_scorer"


def test_overrides_off_refuses_any_kv_key_and_keeps_other_keys_working() -> None:
    front = frontend(CompressionSpec(policy="chunkkv"), request_overrides="off")
    for xargs in ({"kv_policy": "none"}, {"kv_ratio": 0.5}, {"kv_bogus": 1}):
        err = refused(xargs, front)
        assert err.field == next(iter(xargs))
    assert admit({"other_plugin": 1}, front) is None


def test_client_cannot_set_the_admitted_spec() -> None:
    for forged in ({"values": {"policy": "snapkv", "window": 10**9}}, "x", 1):
        err = refused({ADMITTED_KEY: forged, "kv_policy": "snapkv"})
        assert err.field == ADMITTED_KEY


def test_admitted_spec_round_trip_and_engine_view() -> None:
    """The engine reads only what admission stored: the object in process, a mapping after
    msgspec; kv_* keys without an admitted spec are never parsed there."""
    front = frontend(CompressionSpec(policy="snapkv", ratio=0.5))
    args: dict[str, Any] = {"kv_window": 16}
    remember(args, admit(args, front), front)
    assert isinstance(args[ADMITTED_KEY], AdmittedSpec)
    spec = admitted_spec(args, front.server)
    assert (spec.policy, spec.ratio, spec.window) == ("snapkv", 0.5, 16)
    wire = {**args, ADMITTED_KEY: {"values": args[ADMITTED_KEY].values, "frontend": "x"}}
    assert admitted_spec(wire, front.server) == spec
    server = CompressionSpec(policy="tova")
    assert admitted_spec({"kv_window": 10**12}, server) is server


def test_unsupported_deployment_refuses_policies() -> None:
    front = frontend(unsupported="KV connectors (kv_transfer_config) are not supported")
    err = refused({"kv_policy": "snapkv"}, front)
    assert err.field == "kv_policy" and "kv_transfer_config" in str(err)
    assert admit({"kv_policy": "none"}, front).policy == "none"


# --- per-request files -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def allowed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An allowed folder with good and wrong Q-Filters, a subfolder, a link out and a dangling
    link; and a good file outside it."""
    import torch

    from vllm_kvcompress.policies.qfilters import save_filters

    root = tmp_path_factory.mktemp("allowed")
    outside = tmp_path_factory.mktemp("outside")
    save_filters(root / "good.safetensors", torch.randn(4, 2, 64), model="tiny", num_q_heads=4,
                 tokens=1)
    save_filters(root / "wrong.safetensors", torch.randn(30, 3, 64), model="x", num_q_heads=9,
                 tokens=1)
    (root / "sub").mkdir()
    save_filters(root / "sub" / "nested.safetensors", torch.randn(4, 2, 64), model="tiny",
                 num_q_heads=4, tokens=1)
    save_filters(outside / "secret.safetensors", torch.randn(4, 2, 64), model="tiny",
                 num_q_heads=4, tokens=1)
    os.symlink(outside / "secret.safetensors", root / "link-out.safetensors")
    os.symlink(root / "missing.safetensors", root / "dangling.safetensors")
    (root / "a-directory.safetensors").mkdir()
    return root, outside


def file_frontend(root: Path) -> Frontend:
    files = AllowedFiles(str(root), [_qfilters_hook()], SHAPE, rescan_seconds=0)
    return frontend(files=files)


def _qfilters_hook() -> Any:
    from vllm_kvcompress.policies.qfilters import QFILTERS_DATA

    return QFILTERS_DATA


def test_files_under_the_allowed_folder_are_admitted(allowed: tuple[Path, Path]) -> None:
    root, _ = allowed
    front = file_frontend(root)
    for name in ("good.safetensors", "sub/nested.safetensors", str(root / "good.safetensors"),
                 "./sub/../good.safetensors"):
        spec = admit({"kv_policy": "qfilters", "kv_qfilters_path": name}, front)
        assert spec.qfilters_path.startswith(os.path.realpath(root)), name


def test_one_answer_for_every_unusable_path(allowed: tuple[Path, Path]) -> None:
    """Missing, outside, linked out, dangling, a directory, traversal, /proc, a 300-character
    name, NUL bytes: all the same message, so a client learns nothing about the filesystem."""
    root, outside = allowed
    front = file_frontend(root)
    names = ["missing.safetensors", str(outside / "secret.safetensors"),
             "link-out.safetensors", "dangling.safetensors", "a-directory.safetensors",
             "../" + outside.name + "/secret.safetensors", "/proc/self/environ",
             "/etc/passwd", "x" * 300, "sub", "", "sub/../../" + outside.name]
    messages = set()
    for name in names:
        if not name:
            continue
        err = refused({"kv_policy": "qfilters", "kv_qfilters_path": name}, front)
        assert err.field == "kv_qfilters_path"
        messages.add(str(err))
    assert len(messages) == 1, messages
    assert "no usable file of that name" in messages.pop()
    no_dir = refused({"kv_policy": "qfilters", "kv_qfilters_path": "good.safetensors"})
    assert "per-request files are disabled" in str(no_dir)


def test_a_file_that_does_not_fit_names_the_shapes(allowed: tuple[Path, Path]) -> None:
    root, _ = allowed
    err = refused({"kv_policy": "qfilters", "kv_qfilters_path": "wrong.safetensors"},
                  file_frontend(root))
    assert "(30, 3, 64)" in str(err) and str(root) not in str(err)


def test_lookup_does_no_file_io(allowed: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
                                ) -> None:
    """Admission runs in the API server's event loop: after the background scan, a lookup
    touches no file (every os call that would is made to fail)."""
    root, _ = allowed
    front = file_frontend(root)

    def no_io(*args: object, **kwargs: object) -> None:
        raise AssertionError("file I/O during admission")

    for name in ("stat", "lstat", "open", "access", "listdir", "scandir"):
        monkeypatch.setattr(os, name, no_io)
    monkeypatch.setattr(os.path, "realpath", no_io)
    monkeypatch.setattr(os.path, "exists", no_io)
    spec = admit({"kv_policy": "qfilters", "kv_qfilters_path": "good.safetensors"}, front)
    assert spec.policy == "qfilters"
    with pytest.raises(CompressionConfigError):
        admit({"kv_policy": "qfilters", "kv_qfilters_path": "/proc/self/environ"}, front)


def test_files_added_later_are_found_by_a_rescan(tmp_path: Path) -> None:
    import torch

    from vllm_kvcompress.policies.qfilters import save_filters

    files = AllowedFiles(str(tmp_path), [_qfilters_hook()], SHAPE, rescan_seconds=0)
    front = frontend(files=files)
    refused({"kv_policy": "qfilters", "kv_qfilters_path": "late.safetensors"}, front)
    save_filters(tmp_path / "late.safetensors", torch.randn(4, 2, 64), model="tiny",
                 num_q_heads=4, tokens=1)
    files.scan()
    admit({"kv_policy": "qfilters", "kv_qfilters_path": "late.safetensors"}, front)


# --- operator settings -------------------------------------------------------------------------

def test_operator_settings_are_declared_once_and_validated() -> None:
    from vllm_kvcompress.admission import check_operator_values

    params = operator_params()
    assert {"allowed_policies", "request_overrides", "allowed_file_dir", "max_window",
            "min_decode_interval", "max_chunk_size"} <= set(params)
    assert params["max_window"].flag == "--kv-max-window"
    with pytest.raises(CompressionConfigError, match=r"^--kv-allowed-policies: must be a list"):
        check_operator_values({"allowed_policies": "snapkv,h2o"},
                              lambda k: "--kv-" + k.replace("_", "-"))
    with pytest.raises(CompressionConfigError, match=r"is not a directory"):
        check_operator_values({"allowed_file_dir": "/nonexistent-dir"}, lambda k: k)
    assert check_operator_values({"allowed_policies": "snapkv, chunkkv"}, lambda k: k) == {
        "allowed_policies": ("snapkv", "chunkkv")}


# --- fuzz ----------------------------------------------------------------------------------------

def test_fuzzed_vllm_xargs_are_refused_cleanly_or_admitted_within_bounds() -> None:
    """Any object a client can send: admission either raises CompressionConfigError naming a
    field, or returns a spec every value of which is inside the request bounds."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    keys = [p.request_key for p in all_params().values()] + ["kv_", "kv_bogus", "other",
                                                             ADMITTED_KEY]
    scalar = st.one_of(
        st.integers(min_value=-(2**64), max_value=2**64),
        st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
        st.text(max_size=40),
        st.sampled_from(["snapkv", "chunkkv", "qfilters", "none", "per_head", "on", "off",
                         "from_zero", "/proc/self/environ", "good.safetensors"]))
    value = st.one_of(scalar, st.lists(scalar, max_size=3))
    front = frontend(max_window=64)
    bounds: Bounds = front.rules.bounds

    @settings(max_examples=400, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.dictionaries(st.sampled_from(keys), value, max_size=6))
    def check(xargs: dict[str, Any]) -> None:
        try:
            spec = admit(xargs, front)
        except CompressionConfigError as err:
            assert err.field in keys or " and " in err.field, err
            return
        if spec is None:
            return
        for name, param in all_params().items():
            given_value = xargs.get(param.request_key)
            if given_value is not None and param.type in (int, float):
                param.check(getattr(spec, name), bounds)  # raises if out of bounds

    check()


def test_the_evals_own_requests_name_files_admission_accepts(allowed: tuple[Path, Path],
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """`kvcompress eval` is the operator: it allows its Q-Filters file's folder and its
    requests name the file by a path admission finds there, however it was given (relative)."""
    from vllm_kvcompress.eval.engine_backend import RunConfig, operator_settings, request_args

    root, _ = allowed
    monkeypatch.chdir(root.parent)
    params = {"qfilters_path": f"{root.name}/good.safetensors", "window": 16}
    folder = operator_settings(params)["kvcompress"]["allowed_file_dir"]
    front = frontend(files=AllowedFiles(folder, [_qfilters_hook()], SHAPE, rescan_seconds=0))
    xargs = request_args(RunConfig("qfilters", 0.25, "per_head"), params)
    assert admit(xargs, front).qfilters_path == os.path.realpath(root / "good.safetensors")
