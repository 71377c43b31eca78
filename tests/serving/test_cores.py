"""The cores shared among a server's workers: threads per busy count, the shared counters across
processes, whose turn a request is, and the threads of each forward pass."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from queue import Queue

import pytest
import torch

from qa_lightning.serving.cores import (
    CoreShare,
    CountedQueue,
    SharedLogits,
    auto_workers,
    threads_for,
)
from tests.serving import cores_child
from tests.serving.test_server_parts import request

server = pytest.importorskip("qa_lightning.serving.server", reason="needs the serve extra")


@pytest.mark.parametrize(
    ("cores", "busy", "threads"),
    [(2, 1, 2), (2, 2, 1), (2, 3, 1), (8, 3, 2), (1, 2, 1), (4, 0, 4)],
)
def test_threads_for(cores, busy, threads) -> None:
    assert threads_for(cores, busy) == threads


@pytest.mark.parametrize(
    ("accelerator", "cores", "workers"),
    [("cpu", 2, 2), ("cpu", 1, 1), ("cpu", 16, 2), ("cuda", 16, 1)],
)
def test_auto_workers(accelerator, cores, workers) -> None:
    assert auto_workers(accelerator, cores) == workers


def test_thread_counts_are_every_share_most_first() -> None:
    assert CoreShare(2, 2).thread_counts() == [2, 1]
    assert CoreShare(8, 3).thread_counts() == [8, 4, 2]
    assert CoreShare(4, 1).thread_counts() == [4]


def test_claims_split_the_cores_and_are_released() -> None:
    share = CoreShare(2, 2)
    assert share.threads_now() == 2
    with share.claim(0):
        assert share.threads_now() == 2  # alone
        with share.claim(1):
            assert (share.threads_now(), share.busy) == (1, 2)
    assert share.busy == 0
    with pytest.raises(RuntimeError), share.claim(0):
        raise RuntimeError("a failed batch releases its claim")
    assert share.busy == 0


def test_the_counter_is_shared_with_spawned_workers() -> None:
    """LitServe spawns its workers with the API (and this) pickled into them."""
    context = multiprocessing.get_context("spawn")
    share = CoreShare(2, 2)
    started, release = context.Event(), context.Event()
    child = context.Process(target=cores_child.hold_claim, args=(share, started, release))
    child.start()
    try:
        assert started.wait(60)
        assert share.busy == 1
        with share.claim(1):
            assert share.threads_now() == 1  # the child answers too
    finally:
        release.set()
        child.join(60)
    assert child.exitcode == 0 and share.busy == 0


def test_a_second_worker_waits_for_a_request_while_the_first_is_busy() -> None:
    share = CoreShare(2, 2)
    queue = CountedQueue(Queue(), share)
    queue.put("a")
    assert share.waiting == 1
    started = time.monotonic()
    assert share.wait_turn(1, timeout=0.1) is False  # idle: worker 0 takes the request
    assert time.monotonic() - started >= 0.09
    assert share.wait_turn(0, timeout=0.0) is True
    with share.claim(0):
        assert share.wait_turn(1, timeout=0.0) is True
        assert queue.get_nowait() == "a" and share.waiting == 0
        woke: list[bool] = []
        waiter = threading.Thread(target=lambda: woke.append(share.wait_turn(1, timeout=30)))
        waiter.start()
        time.sleep(0.2)
        assert not woke  # worker 0 busy, but nothing waits
        queue.put("b")
        waiter.join(5)
        assert woke == [True]  # notified, not polled
    assert queue.get(timeout=1) == "b" and share.waiting == 0


@pytest.mark.parametrize("stop", [signal.SIGSTOP, signal.SIGKILL])
def test_a_stopped_or_killed_worker_holds_up_no_one(stop) -> None:
    """The OOM killer or a SIGSTOP may catch a worker anywhere, also asleep for its turn: a
    request that arrives then (in the API process) and the other workers go on at once."""
    context = multiprocessing.get_context("spawn")
    share = CoreShare(2, 2)
    started = context.Event()
    child = context.Process(target=cores_child.wait_for_turn, args=(share, started))
    child.start()
    try:
        assert started.wait(60)
        time.sleep(0.3)  # asleep in wait_turn
        os.kill(child.pid, stop)
        queue = CountedQueue(Queue(), share)
        went_on = threading.Event()

        def api_and_worker_0() -> None:
            queue.put("a")  # the API process
            with share.claim(0):  # worker 0
                queue.put("b")
            went_on.set()

        threading.Thread(target=api_and_worker_0, daemon=True).start()
        assert went_on.wait(5), "a request waited for a stopped or dead worker"
        assert share.waiting == 2 and share.busy == 0
    finally:
        child.kill()
        child.join(60)


def test_a_restarted_worker_is_not_busy() -> None:
    share = CoreShare(2, 2)
    share.busy_flags[1] = 1  # killed while it answered
    share.wakes[1].release()
    share.started(1)
    assert share.busy == 0 and share.wakes[1].acquire(False) is False


class Limits:
    max_batch_size = 4
    batch_timeout = 0.0
    request_timeout = 30.0

    def __init__(self, cores: CoreShare) -> None:
        self.cores = cores


def test_the_second_worker_takes_requests_only_while_the_first_is_busy() -> None:
    share = CoreShare(2, 2)
    loop = server.GreedyBatchingLoop()
    loop.worker_id, loop.idle_wait, loop.helper_poll = 1, 0.2, 0.0
    queue = CountedQueue(Queue(), share)
    queue.put(request("a"))
    queue.put(request("b"))
    with share.claim(0):  # worker 0 is busy: worker 1 takes what waits, at once
        started = time.monotonic()
        payloads, _ = loop.get_batch_requests(Limits(share), queue, None)
        assert [uid for _, uid, _ in payloads] == ["a", "b"]
        assert time.monotonic() - started < 0.1
        assert loop.get_batch_requests(Limits(share), queue, None) == (
            [],
            [],
        )  # nothing waits: empty
    queue.put(request("c"))
    started = time.monotonic()  # idle: left to worker 0 for idle_wait, then taken (sentinels)
    payloads, _ = loop.get_batch_requests(Limits(share), queue, None)
    assert [uid for _, uid, _ in payloads] == ["c"] and time.monotonic() - started >= 0.19


class Recording:
    """A model function with ``with_threads``: records the threads of each pass."""

    def __init__(self, calls: list, threads: int | None = None, spin: bool = True) -> None:
        self.calls, self.threads, self.spin = calls, threads, spin

    def with_threads(self, threads: int, spin: bool = True) -> Recording:
        return Recording(self.calls, threads, spin)

    def __call__(self, batch):
        self.calls.append((batch, self.threads, self.spin))
        return None, None


def test_each_forward_pass_runs_with_the_threads_of_its_start() -> None:
    share, calls = CoreShare(2, 2), []
    logits_fn = SharedLogits(Recording(calls), share, spin=False)
    assert sorted(logits_fn.by_threads) == [1, 2]
    logits_fn("alone")
    with share.claim(0):
        logits_fn("still alone")
        with share.claim(1):  # another worker starts: the next pass gives up half the cores
            logits_fn("shared")
        logits_fn("alone again")
    assert calls == [
        ("alone", 2, False),
        ("still alone", 2, False),
        ("shared", 1, False),
        ("alone again", 2, False),
    ]


def test_a_batch_counts_as_busy_while_it_is_answered() -> None:
    share = CoreShare(2, 2)
    seen = []

    class Answerer:
        def answer(self, questions, contexts, top_k=1):
            seen.append(share.busy)
            return [[] for _ in questions]

    api = server.QuestionAnsweringAPI(server.ModelSource(backend="torch"), cores=share)
    api.answerer = Answerer()
    api.predict([("q", "c", 1, None, "r")])
    assert seen == [1] and share.busy == 0


def test_torch_logits_with_threads_share_the_model_and_set_the_threads(answerer) -> None:
    logits_fn = answerer.logits_fn
    one = logits_fn.with_threads(1)
    assert one.model is logits_fn.model and one.threads == 1 and logits_fn.threads is None
    batch = answerer.collator([{"input_ids": [2, 5, 6, 3], "attention_mask": [1, 1, 1, 1]}])
    before = torch.get_num_threads()
    try:
        expected = logits_fn(batch)
        got = one(batch)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(e, g) for e, g in zip(expected, got, strict=True))


def test_setup_shares_the_cores_unless_threads_are_fixed(tiny_model_dir) -> None:
    source = server.ModelSource(backend="torch", device="cpu", model_dir=str(tiny_model_dir))
    api = server.QuestionAnsweringAPI(source, cores=CoreShare(2, 2))
    api.setup("cpu")
    shared = api.answerer.logits_fn
    assert isinstance(shared, SharedLogits) and sorted(shared.by_threads) == [1, 2]
    assert {fn.threads for fn in shared.by_threads.values()} == {1, 2}
    fixed = server.ModelSource(
        backend="torch", device="cpu", model_dir=str(tiny_model_dir), threads=1
    )
    api = server.QuestionAnsweringAPI(fixed)
    api.setup("cpu")
    assert api.answerer.logits_fn.threads == 1
