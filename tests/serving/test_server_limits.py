"""A server with an API key and a 2 s request timeout: 401 without the key, 504 for a request
that waits past its time, and SIGTERM: no new connections, the requests in flight answered,
exit 0. The model is held up by stopping its inference worker (SIGSTOP) for a while."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.serving.conftest import ServerProcess, httpx
from tests.serving.test_server import CONTEXT, QUESTIONS, assert_same_answers, expected

KEY = "s3cret-key"
BODY = {"question": QUESTIONS[0], "context": CONTEXT}


@pytest.fixture(scope="module")
def locked(tiny_model_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    process = ServerProcess(
        tmp_path_factory.mktemp("locked"),
        f"model_dir={tiny_model_dir}",
        "serve.timeout=2",
        "serve.max_batch_size=4",
        "serve.workers_per_device=1",  # the one worker these tests stop
        "serve.access_log=json",
        env={"LIT_SERVER_API_KEY": KEY},
    )
    process.wait_ready()
    yield process
    process.stop()


def post(server, body=BODY, key: str | None = KEY, headers=None) -> httpx.Response:
    headers = {**({"X-API-Key": key} if key is not None else {}), **(headers or {})}
    return httpx.post(f"{server.url}/predict", json=body, headers=headers, timeout=60)


def test_api_key(locked, answerer) -> None:
    for key in (None, "wrong"):
        response = post(locked, key=key)
        assert response.status_code == 401 and "X-API-Key" in response.json()["detail"]
    assert httpx.get(f"{locked.url}/info").status_code == 401
    assert httpx.get(f"{locked.url}/info", headers={"X-API-Key": KEY}).json()["model"]["serve"][
        "api_key"
    ]
    # the page and the health check are open; the page sends the key its user types
    assert httpx.get(f"{locked.url}/health").status_code == 200
    assert httpx.get(f"{locked.url}/").status_code == 200
    response = post(locked)
    assert response.status_code == 200
    assert_same_answers(response.json()["answers"], expected(answerer, **BODY))


def test_metrics_need_the_key_and_the_access_log_is_json(locked) -> None:
    assert httpx.get(f"{locked.url}/metrics").status_code == 401
    scraped = httpx.get(f"{locked.url}/metrics", headers={"X-API-Key": KEY})
    assert scraped.status_code == 200 and "qa_http_requests_total" in scraped.text
    assert httpx.get(f"{locked.url}/livez").status_code == 200  # open, as /health
    response = post(locked, headers={"X-Request-ID": "req-7"})
    assert response.status_code == 200
    deadline = time.monotonic() + 10  # the server's log reaches its file after the response
    while True:
        lines = [json.loads(line) for line in locked.log().splitlines() if line.startswith("{")]
        mine = [line for line in lines if line["request_id"] == "req-7"]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(mine) == 1 and mine[0]["path"] == "/predict" and mine[0]["status"] == 200
    assert mine[0]["method"] == "POST" and mine[0]["duration_ms"] > 0
    assert {line["status"] for line in lines if line["path"] == "/metrics"} == {200, 401}
    assert '"POST /predict HTTP/1.1"' not in locked.log()  # not uvicorn's text lines too


def test_request_past_its_time_gets_504(locked) -> None:
    (worker,) = locked.inference_workers()
    with ThreadPoolExecutor(1) as pool:
        os.kill(worker, signal.SIGSTOP)
        try:
            waiting = pool.submit(post, locked)
            time.sleep(3)
        finally:
            os.kill(worker, signal.SIGCONT)
        response = waiting.result()
    assert response.status_code == 504
    assert "serve.timeout=2 s" in response.json()["detail"]
    assert post(locked).status_code == 200  # and the server goes on


def test_sigterm_finishes_requests_in_flight_and_exits_0(locked, answerer) -> None:
    (worker,) = locked.inference_workers()
    bodies = [{"question": q, "context": CONTEXT} for q in QUESTIONS[:3]]
    with ThreadPoolExecutor(3) as pool:
        os.kill(worker, signal.SIGSTOP)
        try:
            in_flight = [pool.submit(post, locked, body) for body in bodies]
            time.sleep(0.5)
            locked.process.send_signal(signal.SIGTERM)
            refused = False
            for _ in range(50):  # new connections are refused once the API server stops
                try:
                    httpx.get(f"{locked.url}/health", timeout=0.2)
                except httpx.ConnectError:
                    refused = True
                    break
                except httpx.HTTPError:
                    pass
                time.sleep(0.02)
        finally:
            os.kill(worker, signal.SIGCONT)
        responses = [future.result() for future in in_flight]
    assert refused
    for body, response in zip(bodies, responses, strict=True):
        assert response.status_code == 200, response.text
        assert_same_answers(response.json()["answers"], expected(answerer, **body))
    assert locked.process.wait(60) == 0, locked.log()[-3000:]
    assert "leaked semaphore" not in locked.log()  # each worker's tqdm lock was one
