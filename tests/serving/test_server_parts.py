"""The server's parts without a server: batch collection, one answering call per batch, the
config checks and the entry point's errors."""

from __future__ import annotations

import re
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
    batch = api.batch([("q1", "c1", 1, "a"), ("q2", "c2", 3, None), ("q3", "c3", 2, 5)])
    outputs = api.unbatch(api.predict(batch))
    assert answerer.calls == [(["q1", "q2", "q3"], 3)]
    bodies = [api.encode_response(output) for output in outputs]
    assert [body["id"] for body in bodies] == ["a", None, 5]
    assert [[a["answer"] for a in body["answers"]] for body in bodies] == [
        ["q1-0"],
        ["q2-0", "q2-1", "q2-2"],
        ["q3-0", "q3-1"],
    ]


def test_a_request_the_model_fails_on_does_not_fail_its_batch() -> None:
    api = api_with(FakeAnswerer(fail_on="bad"))
    outputs = api.predict([("good", "c", 1, 1), ("bad", "c", 1, 2)])
    good, bad = (api.encode_response(output) for output in outputs)
    assert good["answers"][0]["answer"] == "good-0"
    assert bad.status_code == 500 and b"could not answer" in bad.body


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
    ],
)
def test_serve_settings_checked(key, value) -> None:
    with pytest.raises(ConfigError, match=rf"serve\.{key}="):
        server.ServeSettings(**{key: value})
    assert server.ServeSettings(workers_per_device="auto").problems() == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model_dir=a", "ckpt_path=b"], "give exactly one of model_dir=PATH"),
        (["onnx_path=a.onnx", "precision=bf16-mixed"], "precision='bf16-mixed' with onnx_path"),
        (["model_dir=/nonexistent/dir"], "model_dir='/nonexistent/dir' is not a directory"),
        (["model_dir=x", "serve.host=localhost"], "serve.host='localhost'"),
        (["model_dir=x", "serve.batch_timeout=40"], "serve.batch_timeout=40"),
    ],
)
def test_serve_config_checked_before_serving(compose_train, overrides, message) -> None:
    from qa_lightning.serve import serve

    with pytest.raises(ConfigError, match=re.escape(message)):
        serve(compose_train(overrides, config_name="serve"))


def test_serve_error_is_one_paragraph_exit_2() -> None:
    result = run_cli("qa_lightning.serve", "hydra.run.dir=/tmp/qa_serve_errors")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "give exactly one of model_dir=PATH" in result.stderr
    assert "Traceback" not in result.stderr


def test_equal_length_setting_rebuilds_the_answerer_batching(tokenizer) -> None:
    from qa_lightning.serving.answerer import QuestionAnswerer

    base = QuestionAnswerer(tokenizer, FakeAnswerer(), equal_length=True)
    assert server.ModelSource(backend="torch")._batching(base) is base
    padded = server.ModelSource(backend="torch", equal_length=False)._batching(base)
    assert padded.equal_length is False and padded.logits_fn is base.logits_fn
    assert (padded.settings, padded.batch_size) == (base.settings, base.batch_size)
