"""Signals that reach every process of the server at once: Ctrl-C in a terminal (SIGINT to the
foreground group) and SIGTERM to the whole group (systemd's default ``KillMode``, ``kill --
-PGID``). The server stops, exit 0, with no traceback from any of its processes; SIGTERM to the
main process alone (which drains) is tested in test_server_limits.py."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.serving.conftest import ServerProcess

server_module = pytest.importorskip("qa_lightning.serving.server", reason="needs the serve extra")
process_runs = server_module.process_runs


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_to_every_process_stops_the_server_cleanly(tiny_model_dir, tmp_path, signum):
    server = ServerProcess(tmp_path / "run", f"model_dir={tiny_model_dir}")
    server.wait_ready()
    workers = server.inference_workers()
    assert workers
    os.killpg(server.process.pid, signum)
    try:
        assert server.process.wait(60) == 0
    finally:
        server.stop()
    log = server.log()
    assert "Traceback" not in log and "KeyboardInterrupt\n" not in log, log[-3000:]
    if signum == signal.SIGTERM:
        assert "send it to the main process only" in log
    assert not any(process_runs(pid) for pid in workers)  # none is left behind


def test_sigterm_to_the_processes_of_its_command_line_stops_the_server_cleanly(
    tiny_model_dir, tmp_path
):
    """``pkill -f qa_lightning.serve``: SIGTERM to the main process and to those forked from it
    (LitServe's manager, the HTTP server), which share its command line, but not to the spawned
    workers: they find the request queue gone and end without a traceback."""
    server = ServerProcess(tmp_path / "run", f"model_dir={tiny_model_dir}")
    server.wait_ready()
    workers = server.inference_workers()
    command = Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
    forked = [p for p in server.children() if Path(f"/proc/{p}/cmdline").read_bytes() == command]
    assert workers and len(forked) >= 2 and not set(forked) & set(workers)
    for pid in (server.process.pid, *forked):
        os.kill(pid, signal.SIGTERM)
    try:
        assert server.process.wait(60) == 0
    finally:
        server.stop()
    log = server.log()
    assert "Traceback" not in log, log[-3000:]
    assert not any(process_runs(pid) for pid in workers)  # none is left behind
