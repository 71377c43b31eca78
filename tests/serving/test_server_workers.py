"""A server whose inference workers are stopped (SIGSTOP) or killed (SIGKILL, as the OOM killer
does): the others go on answering, ``/health`` says how many answer within seconds, no request
waits past ``serve.timeout``, and a killed worker is started again."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from tests.serving.conftest import ServerProcess, httpx
from tests.serving.test_server import CONTEXT, QUESTIONS, assert_same_answers, expected

TIMEOUT_S = 4
BODY = {"question": QUESTIONS[0], "context": CONTEXT}


@pytest.fixture(scope="module")
def two_workers(tiny_model_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    process = ServerProcess(
        tmp_path_factory.mktemp("workers"),
        f"model_dir={tiny_model_dir}",
        f"serve.timeout={TIMEOUT_S}",
        "serve.workers_per_device=2",
    )
    process.wait_ready()
    yield process
    process.stop()


def post(server, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{server.url}/predict", json=BODY, timeout=timeout)


def health(server) -> httpx.Response:
    return httpx.get(f"{server.url}/health", timeout=3)


def health_within(server, seconds: float, says) -> httpx.Response:
    """``/health`` once ``says(response)``, polled for ``seconds``; each call answers at once."""
    deadline = time.monotonic() + seconds
    while True:
        response = health(server)
        if says(response) or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


def test_a_stopped_worker_holds_up_no_request(two_workers, answerer) -> None:
    """Worker 1 asleep for its turn, then stopped: requests are answered by worker 0 (they
    used to block the API process's event loop, /health too)."""
    _, helper = sorted(two_workers.inference_workers())
    os.kill(helper, signal.SIGSTOP)
    try:
        for _ in range(3):
            response = post(two_workers, timeout=TIMEOUT_S + 2)
            assert response.status_code == 200, response.text
            assert_same_answers(response.json()["answers"], expected(answerer, **BODY))
        response = health_within(two_workers, 3, lambda r: r.text != "ok")
        assert response.status_code == 200 and response.text.startswith("ok: 1 of 2 inference")
    finally:
        os.kill(helper, signal.SIGCONT)
    assert health_within(two_workers, 3, lambda r: r.text == "ok").text == "ok"


def test_no_request_waits_past_the_timeout(two_workers) -> None:
    """Every worker stopped: a request gets its 504 after serve.timeout from the API process,
    and /health says 503 in JSON."""
    workers = two_workers.inference_workers()
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        response = post(two_workers)
        waited = time.monotonic() - started
        assert response.status_code == 504 and f"serve.timeout={TIMEOUT_S}" in response.text
        assert TIMEOUT_S - 0.5 < waited < TIMEOUT_S + 2
        response = health(two_workers)
        assert response.status_code == 503
        assert "none of the 2 inference workers answers" in response.json()["detail"]
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    assert health_within(two_workers, 3, lambda r: r.text == "ok").text == "ok"
    assert post(two_workers).status_code == 200


def test_a_killed_worker_leaves_the_others_answering(two_workers, answerer) -> None:
    first, _ = sorted(two_workers.inference_workers())
    os.kill(first, signal.SIGKILL)
    response = health_within(two_workers, 3, lambda r: r.text != "ok")
    assert response.status_code == 200 and response.text.startswith("ok: 1 of 2 inference")
    time.sleep(1.5)  # a request sent at the kill may be lost with it (504 after the timeout)
    for _ in range(3):
        response = post(two_workers, timeout=TIMEOUT_S + 2)
        assert response.status_code == 200, response.text
        assert_same_answers(response.json()["answers"], expected(answerer, **BODY))


@pytest.mark.slow
def test_a_killed_worker_is_started_again(two_workers, answerer) -> None:
    """LitServe's monitor starts a dead worker again; /health is "ok" once it has loaded."""
    ok = health_within(two_workers, 120, lambda r: r.text == "ok")  # after the test above
    assert ok.text == "ok" and len(two_workers.inference_workers()) == 2
    first, _ = sorted(two_workers.inference_workers())
    os.kill(first, signal.SIGKILL)
    # "ok: 1 of 2" while it is away (the test above); a tiny model's worker, forked from the
    # fork server, may be back before a first look: wait for its successor instead
    deadline = time.monotonic() + 120
    while first in two_workers.inference_workers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert health_within(two_workers, 120, lambda r: r.text == "ok").text == "ok"
    assert len(two_workers.inference_workers()) == 2
    assert first not in two_workers.inference_workers()
    response = post(two_workers)
    assert response.status_code == 200
    assert_same_answers(response.json()["answers"], expected(answerer, **BODY))
