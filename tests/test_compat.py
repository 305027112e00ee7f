"""The patch manifest against each supported vLLM release's own sources (``compat.py``).

The ``compat``-marked tests read the release wheels (``pip download vllm==X --no-deps``, once,
into ``~/.cache/vllm-kvcompress/wheels``); a wheel that cannot be downloaded fails them with
the command that failed, never skips them. The others check the manifest against the plugin's
own code (every patch is in it, with the signature its replacement really has) and the rules
on synthetic signatures.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vllm_kvcompress import cli, compat, vllm_patches
from vllm_kvcompress.compat import ReleaseSources, Signature, call_problems, replacement_problems
from vllm_kvcompress.vllm_patches import CHECKED_RELEASES, MANIFEST, Hook

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "vllm_kvcompress"
GET_COMPUTED_BLOCKS = "KVCacheManager.get_computed_blocks"


@pytest.fixture(scope="session")
def release_wheel() -> Callable[[str], Path]:
    """``version -> wheel``, downloading each release once into the wheel cache."""

    def wheel(version: str) -> Path:
        try:
            return compat.cached_wheel(version)
        except compat.WheelDownloadError as err:
            pytest.fail(str(err), pytrace=False)

    return wheel


@pytest.fixture(scope="session")
def release_sources(release_wheel: Callable[[str], Path]) -> dict[str, ReleaseSources]:
    return {version: ReleaseSources.from_wheel(release_wheel(version))
            for version in CHECKED_RELEASES}


def all_hooks() -> dict[str, Hook]:
    return {hook.qualname: hook for patch in MANIFEST for hook in patch.hooks}


# --- against the releases ------------------------------------------------------------------------

@pytest.mark.compat
@pytest.mark.parametrize("version", CHECKED_RELEASES)
def test_manifest_matches_the_release_sources(release_sources: dict[str, ReleaseSources],
                                              version: str) -> None:
    report = compat.check_release(release_sources[version], version)
    assert report.ok, "\n".join(report.lines())
    assert len(report.findings) == (
        sum(len(p.hooks) + len(p.reads) for p in MANIFEST) + len(vllm_patches.SHARED_READS)
        + len(vllm_patches.ENVIRONMENT))


@pytest.mark.compat
def test_an_edited_copy_with_a_renamed_argument_fails(release_wheel: Callable[[str], Path],
                                                      tmp_path: Path) -> None:
    """The real 0.33.0 sources, extracted, pass; renaming one parameter of a wrapped method and
    one attribute the scheduler hook reads makes exactly those two entries fail."""
    root = compat.extract_sources(release_wheel("0.33.0"), tmp_path)
    assert compat.check_release(ReleaseSources.from_directory(root), "copy").ok
    runner = root / "vllm/v1/worker/gpu_model_runner.py"
    text = runner.read_text()
    signature = 'def _update_states(self, scheduler_output: "SchedulerOutput")'
    assert text.count(signature) == 1
    runner.write_text(text.replace(signature,
                                   'def _update_states(self, sched_output: "SchedulerOutput")'))
    scheduler = root / "vllm/v1/core/sched/scheduler.py"
    scheduler.write_text(scheduler.read_text().replace("encoder_cache_mismatch_reqs",
                                                       "encoder_mismatch_reqs"))

    report = compat.check_release(ReleaseSources.from_directory(root), "edited copy")
    failed = {finding.subject: finding.problems for finding in report.failures}
    assert set(failed) == {
        "hook vllm.v1.worker.gpu_model_runner.GPUModelRunner._update_states",
        "read vllm.v1.core.sched.scheduler.Scheduler.encoder_cache_mismatch_reqs"}
    hook_problems = failed["hook vllm.v1.worker.gpu_model_runner.GPUModelRunner._update_states"]
    assert hook_problems[0] == ("parameter 1 is `sched_output` in vLLM but `scheduler_output` "
                                "in the replacement")
    assert "not defined in this release" in failed[
        "read vllm.v1.core.sched.scheduler.Scheduler.encoder_cache_mismatch_reqs"][0]
    assert report.lines()[-1].endswith("; 2 do not")


@pytest.mark.compat
def test_the_032_only_get_computed_blocks_replacement_is_caught_on_033(
        release_sources: dict[str, ReleaseSources]) -> None:
    """The replacement as 0.32 had it, ``get_computed_blocks(self, request)``: fine on 0.32,
    a TypeError on 0.33 (the scheduler passes ``max_cache_hit_length`` by position)."""
    old = Hook("vllm.v1.core.kv_cache_manager", GET_COMPUTED_BLOCKS, "request",
               returns="tuple[KVCacheBlocks, int, int]")
    on_032 = compat.check_hook(compat.Resolver(release_sources["0.32.0"]), old)
    on_033 = compat.check_hook(compat.Resolver(release_sources["0.33.0"]), old)
    assert on_032.ok
    assert not on_033.ok
    assert on_033.problems[0] == ("vLLM's function also takes `max_cache_hit_length` by "
                                  "position, which the replacement neither names nor forwards "
                                  "(*args)")
    current = all_hooks()[GET_COMPUTED_BLOCKS]
    for version in CHECKED_RELEASES:
        assert compat.check_hook(compat.Resolver(release_sources[version]), current).ok


def _vllm_import_groups(path: Path) -> Iterator[tuple[int, list[list[tuple[str, str | None]]]]]:
    """Each vLLM import of a file as ``(line, alternatives)``, an alternative being the
    ``(module, name)`` pairs that must all resolve (``name`` ``None`` for ``import vllm.x``).
    A ``try: ... except ImportError:`` block is one group: its body and each handler are the
    alternatives (one of them must resolve)."""
    tree = ast.parse(path.read_text())
    grouped: set[int] = set()

    def imports(statements: list[ast.stmt]) -> list[tuple[str, str | None]]:
        found = []
        for node in statements:
            for child in ast.walk(node):
                grouped.add(id(child))
                found += _vllm_names(child)
        return found

    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                handler.type is not None and "ImportError" in ast.unparse(handler.type)
                for handler in node.handlers):
            branches = [node.body] + [handler.body for handler in node.handlers]
            alternatives = [found for branch in branches if (found := imports(branch))]
            if alternatives:
                yield node.lineno, alternatives
    for node in ast.walk(tree):
        if id(node) not in grouped:
            for pair in _vllm_names(node):
                yield node.lineno, [[pair]]


def _vllm_names(node: ast.AST) -> list[tuple[str, str | None]]:
    def is_vllm(module: str) -> bool:
        return module == "vllm" or module.startswith("vllm.")

    if isinstance(node, ast.ImportFrom) and not node.level and is_vllm(node.module or ""):
        return [(node.module or "", alias.name) for alias in node.names]
    if isinstance(node, ast.Import):
        return [(alias.name, None) for alias in node.names if is_vllm(alias.name)]
    return []


@pytest.mark.compat
@pytest.mark.parametrize("version", CHECKED_RELEASES)
def test_every_vllm_import_of_the_plugin_and_its_tests_resolves(
        release_sources: dict[str, ReleaseSources], version: str) -> None:
    """Imports the manifest may not list (a test's, a tool's) still exist in the release; a
    ``try/except ImportError`` chain needs one branch that does (``tests/vllm_serve_parser``
    imports ``make_arg_parser`` from where 0.33 moved it, else from 0.32's module)."""
    resolver = compat.Resolver(release_sources[version])
    files = sorted(PACKAGE.rglob("*.py")) + sorted((REPO / "tests").glob("*.py"))
    def resolves(module: str, name: str | None) -> bool:
        if name is None:
            return resolver.sources.module(module) is not None
        return resolver.name(module, name) is not None

    missing, checked = [], 0
    for path in files:
        for line, alternatives in _vllm_import_groups(path):
            checked += 1
            if not any(all(resolves(*pair) for pair in branch) for branch in alternatives):
                missing.append(f"{path.relative_to(REPO)}:{line}: {alternatives}")
    assert checked > 40
    assert not missing, "\n".join(missing)


@pytest.mark.compat
def test_check_vllm_command(release_wheel: Callable[[str], Path],
                            capsys: pytest.CaptureFixture[str]) -> None:
    release_wheel("0.33.0")
    assert cli.main(["check-vllm", "0.33.0"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"vLLM 0\.33\.0 \(vllm-0\.33\.0-.*\.whl\): (\d+)/\1 manifest entries "
                        r"match \(\d+ hooks, \d+ reads and environment variables\)", out[-1])


# --- against the plugin's own code ----------------------------------------------------------------

def _local_defs(function: ast.FunctionDef) -> dict[str, ast.FunctionDef]:
    return {node.name: node for node in ast.walk(function) if isinstance(node, ast.FunctionDef)
            and node is not function}


def _imported_names(function: ast.FunctionDef) -> set[str]:
    return {alias.asname or alias.name for node in ast.walk(function)
            if isinstance(node, ast.ImportFrom) for alias in node.names}


def _classes_bound_to(module: ast.Module, helper: str, parameter: str) -> set[str]:
    """The vLLM classes a helper's class parameter receives at its call sites: an imported
    class name, or the loop variable of a ``for`` over a tuple of them."""
    classes: set[str] = set()
    for caller in module.body:
        if not isinstance(caller, ast.FunctionDef):
            continue
        loops = {node.target.id: [e.id for e in node.iter.elts if isinstance(e, ast.Name)]
                 for node in ast.walk(caller) if isinstance(node, ast.For)
                 and isinstance(node.target, ast.Name) and isinstance(node.iter, ast.Tuple)}
        for call in ast.walk(caller):
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) \
                    and call.func.id == helper and isinstance(call.args[0], ast.Name):
                name = call.args[0].id
                classes.update(loops.get(name, [name]))
    assert classes, f"no call site binds {helper}({parameter})"
    return classes


def patch_assignments() -> list[tuple[str, ast.FunctionDef, bool]]:
    """Every ``Class.attr = replacement`` in vllm_patches.py, as ``(qualname, the
    replacement's def, whether it is wrapped in staticmethod)``."""
    module = ast.parse((PACKAGE / "vllm_patches.py").read_text())
    # Module-level functions that return one of their nested defs (a replacement factory).
    factories, factory_returns = {}, {}
    for function in module.body:
        if isinstance(function, ast.FunctionDef):
            returned = [node.value for node in function.body if isinstance(node, ast.Return)
                        and isinstance(node.value, ast.Name)
                        and node.value.id in _local_defs(function)]
            if returned:
                factories[function.name], factory_returns[function.name] = function, returned[0]
    found = []
    for function in module.body:
        if not isinstance(function, ast.FunctionDef):
            continue
        defs = _local_defs(function)
        parameters = {arg.arg for arg in function.args.args}
        for node in ast.walk(function):
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Attribute)
                    and isinstance(node.targets[0].value, ast.Name)):
                continue
            value, static, replacements = node.value, False, defs
            if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) \
                    and value.func.id in ("staticmethod", "classmethod"):
                static = value.func.id == "staticmethod"
                value = value.args[0]
            elif isinstance(value, ast.Call) and isinstance(value.func, ast.Name) \
                    and value.func.id in factories:  # a module-level function builds it
                replacements = _local_defs(factories[value.func.id])
                value = factory_returns[value.func.id]
            if not (isinstance(value, ast.Name) and value.id in replacements):
                continue  # not a replacement (plain state)
            owner, attribute = node.targets[0].value.id, node.targets[0].attr
            if owner in parameters:
                owners = _classes_bound_to(module, function.name, owner)
            else:
                assert owner in _imported_names(function), f"{owner}.{attribute}: whose class?"
                owners = {owner}
            found += [(f"{cls}.{attribute}", replacements[value.id], static)
                      for cls in sorted(owners)]
    return found


def overrides() -> list[tuple[str, ast.FunctionDef]]:
    """The methods the plugin's ``FullAttentionManager`` subclass overrides."""
    module = ast.parse((PACKAGE / "engine" / "scheduler_side.py").read_text())
    classes = [node for node in ast.walk(module) if isinstance(node, ast.ClassDef)
               and node.name == "CompressedFullAttentionManager"]
    assert len(classes) == 1
    return [(f"FullAttentionManager.{node.name}", node) for node in classes[0].body
            if isinstance(node, ast.FunctionDef)]


def instance_patches() -> list[tuple[str, ast.FunctionDef]]:
    """``dispatcher.dispatch = dispatch`` (engine/gpu_modes.py), on vLLM's CudagraphDispatcher
    instance of the runner (the manifest's model-runner patch)."""
    module = ast.parse((PACKAGE / "engine" / "gpu_modes.py").read_text())
    found = []
    for function in module.body:
        if isinstance(function, ast.FunctionDef):
            defs = _local_defs(function)
            for node in ast.walk(function):
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute) \
                        and isinstance(node.value, ast.Name) and node.value.id in defs:
                    assert node.targets[0].attr == "dispatch", ast.unparse(node)
                    found.append(("CudagraphDispatcher.dispatch", defs[node.value.id]))
    assert found
    return found


def test_every_patch_is_in_the_manifest() -> None:
    """A replacement installed in vllm_patches.py (or a method the compressed manager overrides,
    or the dispatcher's instance patch) without a manifest hook fails here; so does a hook that
    nothing installs."""
    hooks = all_hooks()
    installed = ([name for name, _, _ in patch_assignments()] + [n for n, _ in overrides()]
                 + [n for n, _ in instance_patches()])
    assert len(installed) >= 25
    missing = sorted(set(installed) - set(hooks))
    assert not missing, f"patched but not in vllm_patches.MANIFEST: {missing}"
    assert sorted(set(hooks) - set(installed)) == []


def test_each_hook_states_its_replacements_own_signature() -> None:
    """``Hook.accepts`` is what the source check compares; it must be the replacement's real
    parameter list (``self``/``cls`` dropped; a staticmethod or instance patch has none)."""
    hooks = all_hooks()
    pairs = ([(name, node, not static) for name, node, static in patch_assignments()]
             + [(name, node, True) for name, node in overrides()]
             + [(name, node, False) for name, node in instance_patches()])
    for name, node, binds_self in pairs:
        real = Signature.of(node.args, drop_first=binds_self)
        assert real == Signature.parse(hooks[name].accepts), (name, ast.unparse(node.args))


# --- the rules ------------------------------------------------------------------------------------

def sig(text: str) -> Signature:
    return Signature.parse(text)


def test_a_forwarding_replacement_survives_an_added_optional_parameter() -> None:
    assert replacement_problems(sig("request, hit_length=None"), sig("request, *args, **kw")) == []
    assert replacement_problems(sig("a, *, extra=1"), sig("a, *args, **kwargs")) == []
    assert replacement_problems(sig("request"), sig("request, limit=None, *a, **k"),
                                passes_if_present=("limit",)) == []
    assert replacement_problems(sig("request, limit=None"), sig("request, limit=None, *a, **k"),
                                passes_if_present=("limit",)) == []


def test_rules_name_each_incompatibility() -> None:
    assert replacement_problems(sig("sched_output"), sig("scheduler_output, *a, **k")) == [
        "parameter 1 is `sched_output` in vLLM but `scheduler_output` in the replacement"]
    assert replacement_problems(sig("a, b=1"), sig("a, b, *args, **kwargs")) == [
        "`b` is optional in vLLM but required by the replacement"]
    assert replacement_problems(sig("a, *, flag=False"), sig("a, *args")) == [
        "vLLM's function takes `flag` by keyword, which the replacement neither names nor "
        "forwards (**kwargs)"]
    assert replacement_problems(sig("a, b"), sig("a, b, c")) == [
        "the replacement passes `c` (parameter 3) that vLLM's function does not take"]
    assert replacement_problems(sig("a, b, limit=None"), sig("a, limit=None, *args, **kwargs"),
                                passes_if_present=("limit",))[0] == (
        "parameter 2 is `b` in vLLM but `limit` in the replacement")
    assert replacement_problems(sig("n, modes=None"), sig("*args, invalid_modes=None, **kw")) == [
        "the replacement passes `invalid_modes=` which vLLM's function does not take"]


def test_call_rules() -> None:
    assert call_problems(sig("blocks"), "(blocks)") == []
    assert call_problems(sig("message, *, parameter=None"), "(text, parameter=name)") == []
    assert call_problems(sig("blocks"), "(blocks, row)") == [
        "the plugin passes 2 positional argument(s), vLLM's function takes 1"]
    assert call_problems(sig("message, *, param=None"), "(text, parameter=name)") == [
        "the plugin passes `parameter=`, which vLLM's function does not take"]
    assert call_problems(sig("blocks, row, *, flag"), "(blocks, row)") == [
        "vLLM's function also requires `flag`"]


# --- the prefix-cache hit cap on either release (no engine: vLLM 0.33 cannot run on CPU) ----------

class FakeBlocks:
    def __init__(self, blocks: tuple[list[int], ...]) -> None:
        self.blocks = blocks


class FakeManager:
    """What ``_capped_cache_hits`` reads of vLLM's ``KVCacheManager``."""

    def __init__(self, cap_blocks: int | None, block_size: int = 16) -> None:
        self._kvcompress_hit_cap = lambda request: cap_blocks
        manager = type("FullAttentionManager", (), {"block_size": block_size})()
        self.coordinator = type("Coordinator", (), {"single_type_managers": [manager]})()

    def create_kv_cache_blocks(self, blocks: tuple[list[int], ...]) -> FakeBlocks:
        return FakeBlocks(blocks)


class FakeRequest:
    num_tokens = 100


def test_the_hit_cap_goes_through_max_cache_hit_length_where_vllm_has_it() -> None:
    bounds: list[int | None] = []

    def get_computed_blocks(self: object, request: object,
                            max_cache_hit_length: int | None = None) -> tuple:  # 0.33's shape
        bounds.append(max_cache_hit_length)
        return FakeBlocks(([],)), 0, 0

    replacement = vllm_patches._capped_cache_hits(get_computed_blocks)
    request = FakeRequest()
    replacement(FakeManager(None), request)  # no cap: vLLM's default stays vLLM's
    replacement(FakeManager(None), request, 40)
    replacement(FakeManager(3), request)  # 3 blocks of 16 < num_tokens - 1
    replacement(FakeManager(3), request, 32)  # the scheduler's positional bound is smaller
    replacement(FakeManager(3), request, max_cache_hit_length=64)
    replacement(FakeManager(10), request)  # 160 > num_tokens - 1
    assert bounds == [None, 40, 48, 32, 48, 99]


def test_the_hit_cap_trims_the_hit_on_032() -> None:
    def get_computed_blocks(self: object, request: object) -> tuple:  # 0.32's shape
        return FakeBlocks(([1, 2, 3, 4, 5],)), 80, 0

    replacement = vllm_patches._capped_cache_hits(get_computed_blocks)
    blocks, num_hit, boundary = replacement(FakeManager(3), FakeRequest())
    assert (blocks.blocks, num_hit, boundary) == (([1, 2, 3],), 48, 0)
    blocks, num_hit, _ = replacement(FakeManager(None), FakeRequest())
    assert (blocks.blocks, num_hit) == (([1, 2, 3, 4, 5],), 80)
    blocks, num_hit, _ = replacement(FakeManager(6), FakeRequest())
    assert num_hit == 80
