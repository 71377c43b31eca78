"""The server's parts without a server: batch collection, one answering call per batch, the
config checks and the entry point's errors."""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import sys
import time
from queue import Queue

import pytest

from qa_lightning.answers.ranking import Answer
from qa_lightning.core.errors import ConfigError
from tests.conftest import run_cli

server = pytest.importorskip("qa_lightning.serving.server", reason="needs the serve extra")


class Limits:
    max_batch_size = 3
    batch_timeout = 0.0
    request_timeout = 30.0


def request(uid: str, age: float = 0.0) -> tuple:
    return (0, uid, time.monotonic() - age, {"question": uid})


def collect(queue: Queue, limits=Limits) -> tuple[list, list]:
    loop = server.GreedyBatchingLoop()
    loop.idle_wait = 0.05
    return loop.get_batch_requests(limits, queue, None)


def test_batch_takes_what_is_queued_up_to_the_limit() -> None:
    queue = Queue()
    for uid in "abcd":
        queue.put(request(uid))
    payloads, timed_out = collect(queue)
    assert [uid for _, uid, _ in payloads] == ["a", "b", "c"] and timed_out == []
    assert [uid for _, uid, _ in collect(queue)[0]] == ["d"]
    assert collect(queue) == ([], [])  # idle: nothing after idle_wait


def test_batch_answers_a_lone_request_at_once_and_times_out_old_ones() -> None:
    queue = Queue()
    queue.put(request("old", age=60))
    queue.put(request("new"))
    started = time.monotonic()
    payloads, timed_out = collect(queue)
    assert time.monotonic() - started < 0.04  # batch_timeout 0: no waiting for more
    assert [uid for _, uid, _ in payloads] == ["new"] and timed_out == [(0, "old")]


def test_batch_timeout_waits_for_more() -> None:
    class Waiting(Limits):
        batch_timeout = 0.3

    queue = Queue()
    queue.put(request("a"))
    started = time.monotonic()
    payloads, _ = collect(queue, Waiting)
    assert len(payloads) == 1 and time.monotonic() - started >= 0.29


def test_sentinel_stops_the_loop() -> None:
    from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError

    queue = Queue()
    queue.put(_SENTINEL_VALUE)
    with pytest.raises(_StopLoopError):
        collect(queue)


class FakeAnswerer:
    """Answers each question with its own text as the span; records the calls."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls = []
        self.fail_on = fail_on

    def answer(self, questions, contexts, top_k=1):
        self.calls.append((list(questions), top_k))
        if self.fail_on in questions:
            raise RuntimeError("boom")
        return [
            [Answer(f"{q}-{rank}", 0.5, rank, rank + 1) for rank in range(top_k)] for q in questions
        ]


def api_with(answerer) -> server.QuestionAnsweringAPI:
    api = server.QuestionAnsweringAPI(server.ModelSource(backend="torch"), max_batch_size=8)
    api.answerer = answerer
    return api


def test_one_answering_call_per_batch_with_each_top_k() -> None:
    answerer = FakeAnswerer()
    api = api_with(answerer)
    batch = api.batch(
        [("q1", "c1", 1, "a", "r1"), ("q2", "c2", 3, None, "r2"), ("q3", "c3", 2, 5, "r3")]
    )
    outputs = api.unbatch(api.predict(batch))
    assert answerer.calls == [(["q1", "q2", "q3"], 3)]
    bodies = [api.encode_response(output) for output in outputs]
    assert [body["id"] for body in bodies] == ["a", None, 5]
    assert [[a["answer"] for a in body["answers"]] for body in bodies] == [
        ["q1-0"],
        ["q2-0", "q2-1", "q2-2"],
        ["q3-0", "q3-1"],
    ]


def test_a_request_the_model_fails_on_does_not_fail_its_batch(caplog) -> None:
    from qa_lightning.serving.metrics import tag_log_records

    tag_log_records()
    api = api_with(FakeAnswerer(fail_on="bad"))
    with caplog.at_level("ERROR", logger="qa_lightning.serving.server"):
        outputs = api.predict([("good", "c", 1, 1, "req-g"), ("bad", "c", 1, 2, "req-b")])
    good, bad = (api.encode_response(output) for output in outputs)
    assert good["answers"][0]["answer"] == "good-0"
    assert bad.status_code == 500 and b"could not answer" in bad.body
    # every line names the requests it is about: the batch's, then the one that failed alone
    assert [record.getMessage() for record in caplog.records] == [
        "answering a batch of 2 failed; answering one by one [request req-g,req-b]",
        "answering one request failed [request req-b]",
    ]
    logging_after = logging.getLogger("qa_lightning").makeRecord("x", 20, "f", 1, "m", (), None)
    assert logging_after.getMessage() == "m"  # outside a request, lines are as they were


def test_the_request_id_travels_with_the_request_to_the_worker() -> None:
    import pickle

    request = server.AnswerRequest(question="q", context="c", id=3)
    request._request_id = "trace-9"
    api = api_with(FakeAnswerer())
    assert api.decode_request(pickle.loads(pickle.dumps(request))) == ("q", "c", 1, 3, "trace-9")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("host", "localhost"),
        ("port", 80),
        ("max_batch_size", 0),
        ("timeout", 0),
        ("batch_timeout", 31.0),
        ("max_context_chars", -1),
        ("max_top_k", True),
        ("workers_per_device", 0),
        ("workers_per_device", "two"),
        ("drain_timeout", 29.0),
        ("drain_timeout", "long"),
    ],
)
def test_serve_settings_checked(key, value) -> None:
    with pytest.raises(ConfigError, match=rf"serve\.{key}="):
        server.ServeSettings(**{key: value})
    assert server.ServeSettings(workers_per_device="auto").problems() == []


@pytest.mark.parametrize("key", ["", "clé-secrète", "two words", "tab\tkey"])
def test_an_api_key_that_cannot_match_is_refused_without_showing_it(key) -> None:
    """Empty (LIT_SERVER_API_KEY= would turn the key off while /info said one is set), or not
    sendable in a latin-1 header as it is (non-ASCII, spaces)."""
    with pytest.raises(ConfigError, match=r"serve\.api_key=\.\.\.; must be a non-empty") as error:
        server.ServeSettings(api_key=key)
    assert key == "" or key not in str(error.value)
    assert server.ServeSettings(api_key="s3cret-Key_!~").problems() == []


@pytest.mark.parametrize("threads", [-1, 0, 1.5, True])
def test_threads_checked(threads) -> None:
    with pytest.raises(ConfigError, match=rf"threads={threads!r}; must be an integer > 0"):
        server.ModelSource(backend="torch", threads=threads)
    assert server.ModelSource(backend="torch", threads=2).threads == 2


def test_drain_window_is_at_least_the_request_timeout(tmp_path) -> None:
    source = server.ModelSource(backend="torch", device="cpu", model_dir=str(tmp_path))
    for settings, drain in [
        (server.ServeSettings(timeout=45.0), 45.0),
        (server.ServeSettings(timeout=5.0, drain_timeout=60.0), 60.0),
    ]:
        assert (
            server.build_server(source, settings, server.ModelFacts()).uvicorn_graceful_timeout
            == drain
        )


@pytest.mark.parametrize(
    ("device", "gpus", "devices"),
    [("cuda:1", 2, ("cuda", [1])), ("cuda", 2, ("cuda", 1)), ("cuda:0", 1, ("cuda", [0]))],
)
def test_the_device_index_is_served(monkeypatch, device, gpus, devices) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert server._devices(server.ModelSource(backend="torch", device=device)) == devices
    assert server._devices(server.ModelSource(backend="onnx", device=device)) == ("cpu", 1)
    with pytest.raises(ConfigError, match=rf"device='cuda:{gpus}' but this machine has {gpus}"):
        server._devices(server.ModelSource(backend="torch", device=f"cuda:{gpus}"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model_dir=a", "ckpt_path=b"], "give exactly one of model_dir=PATH"),
        (["onnx_path=a.onnx", "precision=bf16-mixed"], "precision='bf16-mixed' with onnx_path"),
        (["model_dir=/nonexistent/dir"], "model_dir='/nonexistent/dir' is not a directory"),
        (["model_dir=x", "serve.host=localhost"], "serve.host='localhost'"),
        (["model_dir=x", "serve.batch_timeout=40"], "serve.batch_timeout=40"),
        (["model_dir=x", "serve.drain_timeout=10"], "serve.drain_timeout=10"),
    ],
)
def test_serve_config_checked_before_serving(compose_train, overrides, message) -> None:
    from qa_lightning.serve import serve

    with pytest.raises(ConfigError, match=re.escape(message)):
        serve(compose_train(overrides, config_name="serve"))


def test_threads_checked_before_the_model_loads(compose_train, tiny_model_dir) -> None:
    from qa_lightning.serve import serve

    cfg = compose_train([f"model_dir={tiny_model_dir}", "threads=-1"], config_name="serve")
    with pytest.raises(ConfigError, match=re.escape("threads=-1; must be an integer > 0")):
        serve(cfg)


def test_serve_error_is_one_paragraph_exit_2(tmp_path) -> None:
    result = run_cli("qa_lightning.serve", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "give exactly one of model_dir=PATH" in result.stderr
    assert "Traceback" not in result.stderr and "answering with" not in result.stdout


def test_a_busy_port_is_named_before_the_model_loads(tmp_path, tiny_model_dir) -> None:
    """The port in use: exit 2 naming serve.port, before the model is loaded."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(
            "qa_lightning.serve",
            f"model_dir={tiny_model_dir}",
            f"serve.port={port}",
            f"hydra.run.dir={tmp_path}/run",
        )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"serve.port={port} cannot be used on 127.0.0.1" in result.stderr
    assert "Traceback" not in result.stderr and "answering with" not in result.stdout


def test_every_error_is_json(tmp_path) -> None:
    """An unexpected exception is a JSON 500, and /health's 503 while the workers load is JSON
    (Starlette's and LitServe's are plain text)."""
    from fastapi.testclient import TestClient

    source = server.ModelSource(backend="torch", device="cpu", model_dir=str(tmp_path))
    app = server.build_server(source, server.ServeSettings(), server.ModelFacts()).app

    async def fails() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/fails", fails)
    client = TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False)
    response = client.get("/fails")
    assert response.status_code == 500
    assert response.json() == {
        "detail": "the server failed on this request (RuntimeError); see its log"
    }
    response = client.get("/health")
    assert response.status_code == 503 and "workers are loading" in response.json()["detail"]
    for path, status in [("/nope", 404), ("/predict", 405)]:
        response = client.get(path)
        assert response.status_code == status and response.json()["detail"]


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("127.0.0.1:8000", "127.0.0.1"),
        ("LocalHost", "localhost"),
        ("[::1]:80", "[::1]"),
        ("example.com.:8000", "example.com"),
        ("", ""),
    ],
)
def test_host_name(header, name) -> None:
    assert server.host_name(header) == name


def test_allowed_hosts_by_default() -> None:
    assert server.ServeSettings().hosts() == ("127.0.0.1", "localhost", "[::1]")
    assert server.ServeSettings(host="0.0.0.0", api_key="k").hosts() == ("*",)
    open_to_all = server.ServeSettings(host="::").hosts()
    assert "*" not in open_to_all and socket.gethostname().lower() in open_to_all
    assert server.ServeSettings(allowed_hosts=["QA.example.", "*"]).hosts() == ("qa.example", "*")
    for bad in ([], [""], "qa.example", ["a b"]):
        with pytest.raises(ConfigError, match=r"serve\.allowed_hosts="):
            server.ServeSettings(allowed_hosts=bad)


def test_openapi_pages_are_off_with_a_key(tmp_path) -> None:
    from fastapi.testclient import TestClient

    source = server.ModelSource(backend="torch", device="cpu", model_dir=str(tmp_path))
    for key, status in [(None, 200), ("k", 404)]:
        app = server.build_server(
            source, server.ServeSettings(api_key=key), server.ModelFacts()
        ).app
        client = TestClient(app, base_url="http://127.0.0.1")
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == status, (key, path)


def test_shared_histogram_adds_up_the_workers_rows() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from qa_lightning.serving.metrics import SharedHistogram

    histogram = SharedHistogram("qa_test_seconds", "a test", (0.1, 1.0), workers=2)
    for worker, value in [(0, 0.05), (1, 0.5), (1, 0.1), (0, 3.0)]:
        histogram.observe(worker, value)
    registry = CollectorRegistry()
    registry.register(histogram)
    text = generate_latest(registry).decode()
    for line in [
        'qa_test_seconds_bucket{le="0.1"} 2.0',  # 0.05 and 0.1 (le: less or equal)
        'qa_test_seconds_bucket{le="1.0"} 3.0',
        'qa_test_seconds_bucket{le="+Inf"} 4.0',
        "qa_test_seconds_count 4.0",
        "qa_test_seconds_sum 3.65",
    ]:
        assert line in text, text


def test_equal_length_setting_rebuilds_the_answerer_batching(tokenizer) -> None:
    from qa_lightning.serving.answerer import QuestionAnswerer

    base = QuestionAnswerer(tokenizer, FakeAnswerer(), equal_length=True)
    assert server.ModelSource(backend="torch")._batching(base) is base
    padded = server.ModelSource(backend="torch", equal_length=False)._batching(base)
    assert padded.equal_length is False and padded.logits_fn is base.logits_fn
    assert (padded.settings, padded.batch_size) == (base.settings, base.batch_size)


@pytest.mark.parametrize("verbose", [False, True])
def test_a_worker_quiets_transformers_unless_verbose(verbose: bool) -> None:
    """A worker's logging set-up (as ``serve`` captures it) turns transformers' progress bars
    off, but with ``verbose=true`` (in a fresh interpreter: the switch is global)."""
    code = (
        "from qa_lightning.serving.server import WorkerLogging\n"
        f"WorkerLogging.capture(verbose={verbose}).apply()\n"
        "from transformers.utils import logging\n"
        "print(logging.is_progress_bar_enabled())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.split()[-1] == str(verbose)
