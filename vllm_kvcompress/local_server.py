"""Start and stop a real ``vllm serve`` on 127.0.0.1 (demo, server tests, benchmarks).

The server runs in its own process group so stopping it also stops the engine-core process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

#: Environment every local CPU server needs (see shared/notes/vllm-0.32-facts.md).
CPU_SERVER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class ServerStartError(RuntimeError):
    """``vllm serve`` exited or did not become healthy in time; carries the log tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalServer:
    """``vllm serve MODEL ARGS...`` on 127.0.0.1, as a context manager.

    Args:
        model: model folder or name.
        args: extra ``vllm serve`` arguments.
        log_path: where the server's stdout/stderr go.
        env: extra environment (on top of ``CPU_SERVER_ENV`` and this process's).
        startup_timeout: seconds to wait for ``/health``.
    """

    def __init__(self, model: str, args: list[str], log_path: Path,
                 env: dict[str, str] | None = None, startup_timeout: float = 240.0) -> None:
        self.model = model
        self.args = args
        self.log_path = log_path
        self.env = {**os.environ, **CPU_SERVER_ENV, **(env or {})}
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def start(self) -> LocalServer:
        vllm = Path(sys.executable).with_name("vllm")
        cmd = [str(vllm), "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port),
               *self.args]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(f"vllm serve exited with {self.proc.returncode}:\n"
                                       f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop()
        raise ServerStartError(f"vllm serve not healthy after {self.startup_timeout:.0f} s:\n"
                               f"{self.log_tail()}")

    def metrics(self) -> str:
        """The raw Prometheus text of ``/metrics``."""
        with urllib.request.urlopen(f"{self.base_url}/metrics", timeout=10) as resp:
            return resp.read().decode()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def metric_values(text: str, name: str) -> list[float]:
    """All sample values of metric ``name`` in Prometheus text (any labels)."""
    values = []
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            values.append(float(line.rsplit(" ", 1)[1]))
    return values
