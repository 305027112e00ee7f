"""The built wheel, installed non-editable into a throwaway environment, is complete and works.

An editable install reads everything from the source tree, so it hides files the wheel forgets
(``vllm_kvcompress/eval/``, which ``kvcompress --help`` imports; the CUDA sources the on-demand
build needs). Here the wheel is built from a copy of the checkout (so no ``build/`` or egg-info
lands in the shared tree), checked file by file, installed with ``--no-deps`` into a fresh venv
and exercised from a folder outside the repository: the CLI, the CUDA source path, and one
offline ``LLM`` generation that really compresses.

The throwaway venv reuses ``.venv``'s heavy dependencies (vLLM, torch) without copying them: a
``.pth`` file adds a folder of symlinks to every entry of ``.venv``'s site-packages except the
plugin's own (``vllm_kvcompress*`` and the ``__editable__*`` finder), so neither the editable
finder nor its ``vllm.general_plugins`` entry point can be picked up; paths added by a ``.pth``
are not scanned for further ``.pth`` files anyway. The vLLM CPU build's ``vllm-*.dist-info`` shim
(scripts/setup.sh) is among the linked entries, so vLLM's version checks pass.
"""

from __future__ import annotations

import email.parser
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
POLICIES = ("chunkkv", "snapkv", "streamingllm", "pyramidkv")
# Top-level entries of the checkout that are never part of a build (venvs, models, outputs).
_NOT_SOURCE = {"models", "runs", "build", "dist"}


class Installed:
    """The wheel and the throwaway environment it is installed in."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.wheel: Path = root
        self.venv = root / "venv"
        self.python = self.venv / "bin" / "python"
        self.site = root / "unset"
        self.outside = root / "outside"  # cwd of every command: not the repository

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
        env.update(PYTHONNOUSERSITE="1", PATH=f"{self.venv / 'bin'}:{env.get('PATH', '')}",
                   VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                   VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
        return env

    def run(self, *cmd: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(c) for c in cmd], cwd=self.outside, env=self.env(),
                              capture_output=True, text=True, timeout=timeout, check=False)
        assert proc.returncode == 0, (
            f"{cmd} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
            f"--- stderr\n{proc.stderr[-6000:]}")
        return proc

    def python_json(self, code: str, *args: str, timeout: float = 120) -> Any:
        """Runs ``code`` in the throwaway venv; its last stdout line is JSON."""
        proc = self.run(self.python, "-c", textwrap.dedent(code), *args, timeout=timeout)
        return json.loads(proc.stdout.strip().splitlines()[-1])


def _ignore(folder: str, names: list[str]) -> set[str]:
    ignored = {n for n in names if n in ("__pycache__",) or n.endswith(".pyc")}
    if Path(folder) == REPO:
        ignored |= {n for n in names
                    if n.startswith(".") or n in _NOT_SOURCE or n.endswith(".egg-info")}
    return ignored


def _build_wheel(out: Path) -> Path:
    src = out / "src"
    shutil.copytree(REPO, src, ignore=_ignore, symlinks=True)
    dist = out / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                    "--no-build-isolation", "--no-index", "--no-cache-dir",
                    "--disable-pip-version-check", "-q", "-w", str(dist)],
                   check=True, timeout=300, cwd=out)
    wheels = list(dist.glob("vllm_kvcompress-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _link_dependencies(deps: Path) -> None:
    """Symlinks to this interpreter's site-packages entries, minus the plugin itself."""
    deps.mkdir()
    paths = sysconfig.get_paths()
    for site in dict.fromkeys((paths["purelib"], paths["platlib"])):
        for entry in Path(site).iterdir():
            name = entry.name
            if (name.startswith(("__editable__", "vllm_kvcompress", "vllm-kvcompress"))
                    or name.endswith(".pth") or (deps / name).exists()):
                continue
            (deps / name).symlink_to(entry)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    inst = Installed(tmp_path_factory.mktemp("wheel"))
    inst.outside.mkdir()
    inst.wheel = _build_wheel(inst.root)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(inst.venv)], check=True,
                   timeout=120)
    inst.site = Path(subprocess.run(
        [inst.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, env=inst.env()).stdout.strip())
    deps = inst.root / "deps"
    _link_dependencies(deps)
    (inst.site / "_kvcompress_test_deps.pth").write_text(f"{deps}\n")
    # pip comes from the linked dependencies; it installs into the venv (sys.prefix) and writes
    # the `kvcompress` console script to venv/bin.
    inst.run(inst.python, "-m", "pip", "install", "--no-deps", "--no-index",
             "--disable-pip-version-check", "-q", inst.wheel, timeout=300)
    return inst


def _wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def _wheel_metadata(wheel: Path) -> tuple[Any, str]:
    with zipfile.ZipFile(wheel) as zf:
        info = next(n.split("/")[0] for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(zf.read(f"{info}/METADATA").decode())
        return meta, zf.read(f"{info}/entry_points.txt").decode()


def test_source_checkout_finds_csrc() -> None:
    from vllm_kvcompress.kernels import cuda_ext

    if Path(cuda_ext.__file__).resolve().is_relative_to(REPO):  # editable / source checkout
        assert cuda_ext.CSRC == REPO / "csrc"
    for name in (*cuda_ext.SOURCES, "paged_compaction.cuh", "paged_compaction_launch.h"):
        assert (cuda_ext.CSRC / name).is_file(), name


def test_wheel_has_every_module_and_the_cuda_sources(installed: Installed) -> None:
    names = _wheel_names(installed.wheel)
    expected = {"vllm_kvcompress/eval/run.py", "vllm_kvcompress/cli.py",
                "vllm_kvcompress/kernels/cuda_ext.py", "vllm_kvcompress/kernels/compaction.py",
                "vllm_kvcompress/csrc/paged_compaction.cu",
                "vllm_kvcompress/csrc/paged_compaction_binding.cpp",
                "vllm_kvcompress/csrc/paged_compaction_launch.h",
                "vllm_kvcompress/csrc/paged_compaction.cuh"}
    # Every Python file of the package and of kernels/ (shipped as vllm_kvcompress.kernels).
    for src, dest in ((REPO / "vllm_kvcompress", "vllm_kvcompress"),
                      (REPO / "kernels", "vllm_kvcompress/kernels")):
        expected |= {f"{dest}/{p.relative_to(src).as_posix()}" for p in src.rglob("*.py")
                     if "__pycache__" not in p.parts}
    expected |= {f"vllm_kvcompress/csrc/{p.name}" for p in (REPO / "csrc").iterdir()
                 if p.suffix in (".cu", ".cuh", ".cpp", ".h")}
    assert expected - names == set()
    # Nothing else at the top level (no stray `kernels` or `csrc` package).
    top = {n.split("/")[0] for n in names}
    assert top == {"vllm_kvcompress", "vllm_kvcompress-0.1.0.dist-info"}, top
    assert installed.wheel.name == "vllm_kvcompress-0.1.0-py3-none-any.whl"


def test_wheel_metadata(installed: Installed) -> None:
    meta, entry_points = _wheel_metadata(installed.wheel)
    assert meta["Name"] == "vllm-kvcompress"
    assert meta["Version"] == "0.1.0"
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["Requires-Python"]
    classifiers = set(meta.get_all("Classifier"))
    assert {"Environment :: GPU :: NVIDIA CUDA", "Programming Language :: Python :: 3.11",
            "Topic :: Scientific/Engineering :: Artificial Intelligence"} <= classifiers
    assert any(c.startswith("Development Status :: ") for c in classifiers)
    runtime = {}
    for line in meta.get_all("Requires-Dist"):
        req = Requirement(line)
        if req.marker is None or "extra" not in str(req.marker):
            runtime[req.name.lower()] = req
    assert set(runtime) == {"vllm", "torch", "pyyaml"}, runtime
    assert str(runtime["vllm"].specifier) in (">=0.32,<0.34", "<0.34,>=0.32")
    # Unpinned: pip keeps the torch (and its triton) that the installed vLLM pins.
    assert not runtime["torch"].specifier
    assert "vllm_kvcompress.plugin:register" in entry_points
    assert "vllm_kvcompress.cli:main" in entry_points


def test_installed_package_is_the_wheel_copy(installed: Installed) -> None:
    probe = installed.python_json("""
        import importlib.metadata as md, json, sys
        import vllm_kvcompress
        from vllm_kvcompress.kernels import cuda_ext
        print(json.dumps({
            "file": vllm_kvcompress.__file__,
            "cuda_ext": cuda_ext.__file__,
            "csrc": str(cuda_ext.CSRC),
            "sources": sorted(p.name for p in cuda_ext.CSRC.glob("*")),
            "dist": str(md.distribution("vllm-kvcompress")._path),
            "plugins": [(ep.name, ep.value, str(ep.dist._path))
                        for ep in md.entry_points(group="vllm.general_plugins")],
            "vllm": md.version("vllm"),
            "editable": [m for m in sys.modules if m.startswith("__editable__")],
        }))
    """)
    site = str(installed.site)
    for key in ("file", "cuda_ext", "csrc", "dist"):
        assert probe[key].startswith(site + "/"), (key, probe[key])
        assert not Path(probe[key]).resolve().is_relative_to(REPO), (key, probe[key])
    assert probe["csrc"] == f"{site}/vllm_kvcompress/csrc"
    assert {"paged_compaction.cu", "paged_compaction.cuh", "paged_compaction_binding.cpp",
            "paged_compaction_launch.h"} <= set(probe["sources"])
    ours = [p for p in probe["plugins"] if p[1].startswith("vllm_kvcompress")]
    assert len(ours) == 1 and ours[0][2].startswith(site + "/"), probe["plugins"]
    assert probe["vllm"].startswith("0.32"), probe["vllm"]
    assert probe["editable"] == []


def test_installed_cli(installed: Installed) -> None:
    kvcompress = installed.venv / "bin" / "kvcompress"
    assert str(installed.python) in kvcompress.read_text()  # the venv's script, not .venv's
    helped = installed.run(kvcompress, "--help")
    assert "usage: kvcompress" in helped.stdout
    for command in ("prepare-model", "policies", "bench", "eval", "check-vllm"):
        assert command in helped.stdout
    listed = installed.run(kvcompress, "policies").stdout
    for policy in POLICIES:
        assert f"\n{policy}: " in listed, listed


@pytest.mark.engine
def test_installed_wheel_compresses_in_vllm(installed: Installed, tiny_model: Path) -> None:
    rng = random.Random(0)
    prompt = [rng.randrange(4, 1000) for _ in range(300)]
    result = installed.python_json("""
        import json, sys
        from vllm import LLM, SamplingParams

        llm = LLM(model=sys.argv[1], max_model_len=1024, block_size=32, enforce_eager=True,
                  dtype="float32", num_gpu_blocks_override=128)
        params = SamplingParams(max_tokens=4, temperature=0.0,
                                extra_args={"kv_policy": "chunkkv", "kv_ratio": 0.25})
        out = llm.generate([{"prompt_token_ids": json.loads(sys.argv[2])}], params)
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        print(json.dumps({
            "tokens": list(out[0].outputs[0].token_ids),
            "stats": scheduler._kvcompress.stats.as_dict(),
            "modules": {name: getattr(mod, "__file__", None) for name, mod in sys.modules.items()
                        if name.startswith("vllm_kvcompress")},
        }))
    """, str(tiny_model), json.dumps(prompt), timeout=300)
    assert len(result["tokens"]) == 4
    stats = result["stats"]
    assert stats["requests_compressed"] == 1, stats
    assert stats["tokens_kept"] + stats["tokens_evicted"] == len(prompt), stats
    assert stats["tokens_kept"] == 75, stats  # ceil(0.25 * 300)
    assert stats["blocks_freed"] > 0 and stats["failed"] == 0, stats
    # The engine ran the wheel's plugin (scheduler and worker sides), not the checkout's.
    modules = result["modules"]
    assert "vllm_kvcompress.engine.scheduler_side" in modules
    assert "vllm_kvcompress.engine.worker_side" in modules
    for name, file in modules.items():
        if file is not None:
            assert file.startswith(f"{installed.site}/"), (name, file)
