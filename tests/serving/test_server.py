"""The server on a tiny model: its answers are ``QuestionAnswerer``'s (``predict``'s), alone and
batched; every endpoint; bad requests get a JSON 4xx naming the problem, and the server goes on.
"""

from __future__ import annotations

import json
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
