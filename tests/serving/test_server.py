"""The server on a tiny model: its answers are ``QuestionAnswerer``'s (``predict``'s), alone and
batched; every endpoint; bad requests get a JSON 4xx naming the problem, and the server goes on.
"""

from __future__ import annotations

import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import pytest
import torch

from qa_lightning import __version__
from qa_lightning.model.logits import resolve_precision
from qa_lightning.serving.cores import auto_workers
from tests.serving.conftest import SETTINGS, httpx

CONTEXT = (
    "The committee met in Geneva in March 1998. After two weeks of talks the report was "
    "written by the committee's secretary, Zoë Martin, and published in Kraków in 1999. "
    "It ran to 412 pages and was translated into French, German and Polish. "
) * 4
QUESTIONS = [
    "Who wrote the report?",
    "Where was it published?",
    "How many pages did it have?",
    "When did the committee meet?",
    "Into which languages was it translated?",
]


def post(server, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}/predict", timeout=60, **({"json": body} | kwargs))


def expected(answerer, question: str, context: str, top_k: int = 1) -> list[dict]:
    return [a.as_dict() for a in answerer.answer([question], [context], top_k)[0]]


def assert_same_answers(got: list[dict], want: list[dict]) -> None:
    assert [(a["answer"], a["start"], a["end"]) for a in got] == [
        (a["answer"], a["start"], a["end"]) for a in want
    ]
    assert [a["score"] for a in got] == pytest.approx([a["score"] for a in want], abs=1e-5)


def test_serving_is_logged_once_health_answers(server, tiny_model_dir) -> None:
    line = f"serving {tiny_model_dir} (torch, "
    deadline = time.monotonic() + 10  # logged by a thread polling /health as the tests do
    while line not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = server.log()
    serving = log.index(line)
    assert f"at http://127.0.0.1:{server.port}/" in log[serving:]
    assert log.rindex('"GET /health" 200 OK', 0, serving) > log.rindex("Uvicorn running")
    assert "Loading weights" not in log  # neither the start-up check nor a worker shows a bar
    # the workers log as the main process does, to the same places
    assert re.search(r"\]\[INFO\] - inference worker 0 \(process \d+\) answers on cpu", log), log


def test_health_and_info(server, tiny_model_dir) -> None:
    health = httpx.get(f"{server.url}/health")
    assert (health.status_code, health.text) == (200, "ok")
    info = httpx.get(f"{server.url}/info").json()
    model = info["model"]
    assert model["model"] == str(tiny_model_dir) and model["backend"] == "torch"
    assert model["precision"] == resolve_precision("auto", "cpu")
    assert model["settings"] == asdict(SETTINGS) and model["version"] == __version__
    assert model["serve"]["host"] == "127.0.0.1" and model["serve"]["api_key"] is False
    assert model["serve"]["max_top_k"] == 5 and info["server"]["timeout"] == 30.0
    # workers_per_device: auto on the CPU, the cores shared among them
    cores = torch.get_num_threads()
    workers = auto_workers("cpu", cores)
    assert model["workers"] == workers == len(server.inference_workers())
    assert model["threads"] == f"shared: {cores} cores among {workers} worker(s)"


@pytest.mark.parametrize("top_k", [1, 3])
def test_answers_are_predicts(server, answerer, top_k) -> None:
    response = post(server, {"question": QUESTIONS[0], "context": CONTEXT, "top_k": top_k, "id": 7})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == 7 and len(body["answers"]) == top_k
    assert_same_answers(body["answers"], expected(answerer, QUESTIONS[0], CONTEXT, top_k))
    for answer in body["answers"]:
        assert CONTEXT[answer["start"] : answer["end"]] == answer["answer"]


def test_id_and_top_k_are_optional(server, answerer) -> None:
    body = post(server, {"question": QUESTIONS[1], "context": CONTEXT}).json()
    assert body["id"] is None and len(body["answers"]) == 1
    assert_same_answers(body["answers"], expected(answerer, QUESTIONS[1], CONTEXT))


def test_concurrent_requests_batched_answer_as_alone(server, answerer) -> None:
    """24 requests at once (batched by the server, of different contexts, lengths and top_k)
    each get the answers of their own question alone."""
    requests = [
        {
            "question": QUESTIONS[i % len(QUESTIONS)],
            "context": CONTEXT[: 150 + 37 * i],
            "top_k": 1 + i % 3,
            "id": f"q{i}",
        }
        for i in range(24)
    ]
    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(lambda body: post(server, body), requests))
    for request, response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        assert response.json()["id"] == request["id"]
        want = expected(answerer, request["question"], request["context"], request["top_k"])
        assert_same_answers(response.json()["answers"], want)


JSON = {"content-type": "application/json"}
BAD_REQUESTS = [
    (
        {"content": b"{not json", "headers": {"content-type": "application/json"}},
        422,
        "not valid JSON",
    ),
    (
        {"content": b"question=a", "headers": {"content-type": "text/plain"}},
        422,
        "Content-Type: application/json",
    ),
    ({"content": b""}, 422, "the body is empty"),
    ({"json": [1, 2]}, 422, "the body is an array, not a JSON object"),
    ({"json": {"context": "x"}}, 422, "the question is missing"),
    ({"json": {"question": "Who?"}}, 422, "the context is missing"),
    ({"json": {"question": "", "context": "x"}}, 422, "the question is empty"),
    ({"json": {"question": "Who?", "context": " \n"}}, 422, "the context is only whitespace"),
    ({"json": {"question": 5, "context": "x"}}, 422, "question must be a string, not a number"),
    (
        {"json": {"question": "Who?", "context": ["x"]}},
        422,
        "context must be a string, not an array",
    ),
    (
        {"json": {"question": "Who?", "context": "x", "top_k": "2"}},
        422,
        "top_k must be an integer, not a string",
    ),
    (
        {"json": {"question": "Who?", "context": "x", "top_k": True}},
        422,
        "top_k must be an integer, not a boolean",
    ),
    (
        {"json": {"question": "Who?", "context": "x", "top_k": 0}},
        422,
        "top_k=0 is out of range; give an integer from 1 to 5",
    ),
    ({"json": {"question": "Who?", "context": "x", "top_k": 6}}, 422, "top_k=6 is out of range"),
    (
        {"json": {"question": "Who?", "context": "x" * 100_001}},
        413,
        "serve.max_context_chars=100000",
    ),
    (
        {"json": {"question": "Who?", "context": "x" * 1_100_000}},
        413,
        "serve.max_body_bytes=1000000",
    ),
    # text the tokenizer cannot take (a lone surrogate, which JSON's \u escapes can send)
    (
        {"content": rb'{"question": "Who \ud800?", "context": "x"}', "headers": JSON},
        422,
        "the question is not valid Unicode text (a lone surrogate \\ud800 at character 4)",
    ),
    (
        {"content": rb'{"question": "Who?", "context": "x \udfff"}', "headers": JSON},
        422,
        "the context is not valid Unicode text",
    ),
    # the id is echoed: a string, an integer or null
    (
        {"content": rb'{"question": "Who?", "context": "x", "id": NaN}', "headers": JSON},
        422,
        "id must be a string, an integer or null, not a number",
    ),
    (
        {"json": {"question": "Who?", "context": "x", "id": 1.5}},
        422,
        "id must be a string, an integer or null, not a number",
    ),
    (
        {"json": {"question": "Who?", "context": "x", "id": True}},
        422,
        "id must be a string, an integer or null, not a boolean",
    ),
    (
        {
            "content": b'{"question": "Who?", "context": "x", "id": '
            + b"[" * 300
            + b"]" * 300
            + b"}",
            "headers": JSON,
        },
        422,
        "id must be a string, an integer or null, not an array",
    ),
    (
        {"json": {"question": "Who?", "context": "x", "id": {"a": 1}}},
        422,
        "id must be a string, an integer or null, not an object",
    ),
    (
        {"content": rb'{"question": "Who?", "context": "x", "id": "q\udc80"}', "headers": JSON},
        422,
        "the id is not valid Unicode text",
    ),
]


@pytest.mark.parametrize(("kwargs", "status", "problem"), BAD_REQUESTS)
def test_bad_request_named_then_server_goes_on(server, answerer, kwargs, status, problem):
    response = httpx.post(f"{server.url}/predict", timeout=60, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert problem in response.json()["detail"]
    good = post(server, {"question": QUESTIONS[2], "context": CONTEXT})
    assert good.status_code == 200
    assert_same_answers(good.json()["answers"], expected(answerer, QUESTIONS[2], CONTEXT))


def test_a_body_announced_too_large_is_refused_before_it_is_sent(server) -> None:
    """413 from the Content-Length header alone: the server does not wait for the body."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000001\r\n\r\n"
        )
        reply = b""
        while chunk := sock.recv(65536):  # the server closes the connection after its reply
            reply += chunk
    head = reply.decode()
    assert head.startswith("HTTP/1.1 413"), head
    assert "serve.max_body_bytes=1000000" in head and "application/json" in head


def test_other_hosts_get_400(server) -> None:
    """DNS rebinding: a page of evil.example whose name resolves to 127.0.0.1 sends its own
    name in the Host header."""
    for path in ("/info", "/predict", "/"):
        response = httpx.get(f"{server.url}{path}", headers={"Host": f"evil.example:{server.port}"})
        assert response.status_code == 400, path
        assert "not a name of this server (serve.allowed_hosts: " in response.json()["detail"]
    for host in (f"localhost:{server.port}", f"[::1]:{server.port}", "127.0.0.1"):
        assert httpx.get(f"{server.url}/info", headers={"Host": host}).status_code == 200
    health = httpx.get(f"{server.url}/health", headers={"Host": "probe.internal"})
    assert health.status_code == 200  # probes name the address they reach


def scrape(server, **kwargs) -> dict[tuple, float]:
    """``/metrics`` as ``{(sample name, sorted labels): value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{server.url}/metrics", **kwargs)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_metrics_count_known_traffic_exactly(server, answerer, tiny_model_dir) -> None:
    passes = []  # the windows of each forward pass of one good request

    def counted(batch):
        passes.append(len(batch["input_ids"]))
        return answerer.logits_fn(batch)

    answerer.replaced(counted).answer([QUESTIONS[0]], [CONTEXT], 1)
    assert sum(passes) > 1  # the context is longer than a window
    before = scrape(server)
    good = {"question": QUESTIONS[0], "context": CONTEXT}
    for body, times in [(good, 3), ({"question": ""}, 2)]:
        for _ in range(times):
            post(server, body)
    httpx.get(f"{server.url}/nope")
    httpx.get(f"{server.url}/info", headers={"Host": "evil.example"})
    after = scrape(server)

    def added(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    requests = "qa_http_requests_total"
    assert added(requests, route="/predict", status="200") == 3
    assert added(requests, route="/predict", status="422") == 2
    assert added(requests, route="other", status="404") == 1
    assert added(requests, route="/info", status="400") == 1
    assert added(requests, route="/metrics", status="200") == 1  # the first scrape
    # the 422s never reached a worker; the three good requests each waited in the queue once
    assert added("qa_queue_wait_seconds_count") == 3
    assert added("qa_queue_wait_seconds_bucket", le="+Inf") == 3
    assert added("qa_batch_requests_sum") == 3  # sent one after another: batches of one
    assert added("qa_batch_requests_bucket", le="1.0") == 3
    assert added("qa_forward_windows_count") == 3 * len(passes)
    assert added("qa_forward_windows_sum") == 3 * sum(passes)
    durations = "qa_http_request_duration_seconds"
    assert added(f"{durations}_count", route="/predict") == 5
    assert added(f"{durations}_bucket", route="/predict", le="+Inf") == 5
    assert added(f"{durations}_sum", route="/predict") > 0
    workers = after[("qa_workers", ())]
    assert after[("qa_workers_answering", ())] == workers >= 1
    precision = resolve_precision("auto", "cpu")
    labels = (("backend", "torch"), ("model", str(tiny_model_dir)), ("precision", precision))
    assert after[("qa_model_info", labels)] == 1


def test_request_ids_are_taken_or_made_and_sent_back(server) -> None:
    good = {"question": QUESTIONS[0], "context": CONTEXT}
    sent = post(server, good, headers={"X-Request-ID": "trace-42.a"})
    assert sent.headers["x-request-id"] == "trace-42.a"
    bad = post(server, {"question": ""}, headers={"X-Request-ID": "x" * 200})
    made = [bad.headers["x-request-id"], post(server, good).headers["x-request-id"]]
    assert all(len(rid) == 32 and int(rid, 16) >= 0 for rid in made) and made[0] != made[1]
    # the access log's line of each (uvicorn's own access log is off)
    deadline = time.monotonic() + 10
    while f"[request {made[1]}]" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = server.log().splitlines()
    for rid, status in [("trace-42.a", "200 OK"), (made[0], "422 Unprocessable"), (made[1], "200")]:
        mine = [line for line in lines if line.endswith(f"[request {rid}]")]
        assert len(mine) == 1 and f'"POST /predict" {status}' in mine[0], mine
    assert '"POST /predict HTTP/1.1"' not in server.log()


def test_liveness_beside_readiness(server) -> None:
    response = httpx.get(f"{server.url}/livez", headers={"Host": "probe.internal"})
    assert (response.status_code, response.text) == (200, "ok")


def test_ids_are_echoed_exactly(server) -> None:
    for qid in ["q-1", "Zoë 🙂", 0, -7, 2**70, None]:
        body = post(server, {"question": QUESTIONS[0], "context": CONTEXT, "id": qid}).json()
        assert body["id"] == qid


def test_every_problem_of_a_body_is_named(server) -> None:
    body = {"question": "", "context": 5, "top_k": 9}
    detail = post(server, body).json()["detail"]
    assert "the question is empty" in detail and "context must be a string" in detail
    assert "top_k=9 is out of range" in detail


def test_bad_requests_in_a_batch_do_not_fail_the_good(server, answerer) -> None:
    bodies = [
        {"question": QUESTIONS[i % 5], "context": CONTEXT} if i % 3 else {"question": i}
        for i in range(18)
    ]
    with ThreadPoolExecutor(18) as pool:
        responses = list(pool.map(lambda body: post(server, body), bodies))
    for body, response in zip(bodies, responses, strict=True):
        if "context" in body:
            assert response.status_code == 200
            want = expected(answerer, body["question"], CONTEXT)
            assert_same_answers(response.json()["answers"], want)
        else:
            assert response.status_code == 422 and "context is missing" in response.text


def test_unknown_path_and_method(server) -> None:
    assert httpx.get(f"{server.url}/nope").status_code == 404
    response = httpx.get(f"{server.url}/predict")
    assert response.status_code == 405 and "detail" in response.json()


def test_page_is_self_contained(server) -> None:
    response = httpx.get(f"{server.url}/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    for element in ('id="question"', 'id="context"', 'id="ask"', 'id="answers"', 'id="error"'):
        assert element in page
    assert "http://" not in page and "https://" not in page  # no assets from the internet
    assert json.dumps("predict") in page  # it posts to the server's own /predict
