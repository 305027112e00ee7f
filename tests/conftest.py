"""Shared fixtures: offline environment and the tiny random Llama built once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Before anything imports vLLM: no hub, in-process engine, one OpenMP thread (two fight over the
# two cores of the CI machine and slow generation 30-100x).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# PyPI triton has no CPU backend: kernels run under its interpreter unless a GPU is present. The
# flag is read when a @triton.jit function is defined, so it must be set before kernels import.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama folder (4 layers, GQA 2, head_dim 64), built in seconds."""
    from vllm_kvcompress.models.prepare import prepare_tiny_llama

    return prepare_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_qfilters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Q-Filters of the tiny model, calibrated by the real command path (about a second)."""
    from vllm_kvcompress.calibrate import calibrate

    out = tmp_path_factory.mktemp("qfilters") / "tiny-qfilters.safetensors"
    calibrate(tiny_model, out, sequences=2, seq_len=256, progress=False)
    return out


@pytest.fixture(scope="session")
def allowed_dir(tiny_qfilters: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The served test model's allowed directory for per-request files: the tiny model's
    Q-Filters (``tiny.safetensors``), filters of another model (``other-model.safetensors``),
    a link leading out of the folder and a subfolder."""
    import shutil

    import torch

    from vllm_kvcompress.policies.qfilters import save_filters

    folder = tmp_path_factory.mktemp("allowed-files")
    shutil.copy(tiny_qfilters, folder / "tiny.safetensors")
    save_filters(folder / "other-model.safetensors", torch.randn(30, 3, 64), model="smollm2",
                 num_q_heads=9, tokens=1)
    outside = tmp_path_factory.mktemp("outside-files")
    shutil.copy(tiny_qfilters, outside / "secret.safetensors")
    os.symlink(outside / "secret.safetensors", folder / "link-out.safetensors")
    (folder / "a-folder").mkdir()
    return folder


@pytest.fixture(scope="session")
def server(tiny_model: Path, allowed_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[object]:
    """One real ``vllm serve`` of the tiny model with the chunkkv deployment and per-request
    files allowed under ``allowed_dir`` (tests/test_server.py, tests/test_hostile_server.py)."""
    from vllm_kvcompress.local_server import LocalServer

    log = tmp_path_factory.mktemp("server") / "serve.log"
    args = ["--config", str(REPO / "configs" / "chunkkv.yaml"), "--enforce-eager",
            "--max-model-len", "1024", "--block-size", "32", "--max-num-seqs", "8",
            "--kv-allowed-file-dir", str(allowed_dir)]
    with LocalServer(str(tiny_model), args, log, env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> object:
    """The plain-transformers reference (``kv_reference.ReferenceModel``) of the tiny model."""
    from kv_reference import ReferenceModel

    return ReferenceModel(tiny_model)
