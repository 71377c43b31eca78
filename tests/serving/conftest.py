"""A real server process (``python -m qa_lightning.serve``) on a free port with a random tiny
model, started once per session and stopped with SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qa_lightning.answers.settings import InferenceSettings
from qa_lightning.serving.answerer import QuestionAnswerer
from tests.conftest import ROOT

pytest.importorskip("litserve", reason="serving needs the serve extra (litserve)")
httpx = pytest.importorskip("httpx", reason="the server tests call it with httpx")

#: Short windows, so that a context of a few sentences spans several of them.
SETTINGS = InferenceSettings(max_length=128, stride=32)
STARTUP_S = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m qa_lightning.serve`` in a process of its own (its own session, so that a
    signal reaches only the server's main process), on a free port of 127.0.0.1."""

    def __init__(self, run_dir: Path, *overrides: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = run_dir / "server.log"
        run_dir.mkdir(parents=True, exist_ok=True)
        environ = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        environ.pop("LIT_SERVER_API_KEY", None)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qa_lightning.serve",
                *overrides,
                f"serve.port={self.port}",
                "device=cpu",
                f"hydra.run.dir={run_dir}",
            ],
            cwd=ROOT,
            env={**environ, **(env or {})},
            stdout=self.log_path.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited: {self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"the server did not start in {STARTUP_S} s: {self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[int]:
        """The server's child processes (API server, inference workers, LitServe's manager),
        of every thread (LitServe's monitor thread starts a worker again)."""
        tasks = Path(f"/proc/{self.process.pid}/task")
        found = []
        for path in tasks.glob("*/children"):
            with contextlib.suppress(OSError):  # the thread ended
                found += [int(pid) for pid in path.read_text().split()]
        return found

    def inference_workers(self) -> list[int]:
        """The inference workers: spawned children of the server (one worker), or the children
        of its fork server (several)."""
        commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in self.children()}
        found = [pid for pid, command in commands.items() if b"spawn_main" in command]
        forkserver = [
            p for p, command in commands.items() if b"multiprocessing.forkserver" in command
        ]
        for pid in forkserver:
            for path in Path(f"/proc/{pid}/task").glob("*/children"):
                with contextlib.suppress(OSError):
                    found += [int(child) for child in path.read_text().split()]
        return sorted(found)

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="session")
def tiny_model_dir(model_dir: Path) -> Path:
    """The tests' tiny model directory (``model_dir`` of tests/conftest.py)."""
    return model_dir


@pytest.fixture(scope="session")
def answerer(tiny_model_dir) -> QuestionAnswerer:
    """What ``predict model_dir=... device=cpu`` answers with (the server's settings)."""
    return QuestionAnswerer.from_model_dir(tiny_model_dir, "cpu")


@pytest.fixture(scope="session")
def server(tiny_model_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    """The default server (batching, no API key) on the tiny model."""
    process = ServerProcess(
        tmp_path_factory.mktemp("server"), f"model_dir={tiny_model_dir}", "serve.max_top_k=5"
    )
    process.wait_ready()
    yield process
    assert process.stop() == 0, process.log()[-3000:]
    assert "leaked semaphore" not in process.log()
