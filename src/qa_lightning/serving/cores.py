"""The CPU cores of a server, shared among its inference workers.

On a CPU a forward pass of a small encoder does not get much faster in larger batches, but two
workers overlap: one runs its forward pass while the other tokenises, decodes and hands answers
back. Each worker's pass uses as many threads as there are cores *for it*: a worker answering
alone uses every core (an idle server answers a lone request as fast as one process would), and
``k`` workers answering at once use ``cores // k`` each, so that the cores are never
oversubscribed for longer than one pass (oversubscribed OpenMP and onnxruntime thread pools spin
against each other). A counter in shared memory, created before the workers are spawned, says
how many answer at the moment, and also which worker takes the next request (see
:meth:`CoreShare.wait_turn`); it takes no lock, so that a worker stopped or killed at any moment
holds up no other process.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from qa_lightning.model.logits import LogitsFn

#: ``serve.workers_per_device: auto`` on a CPU (at most; one per core below that). Measured on a
#: 2-core CPU (docs/serving.md); more cores give each worker more threads, not more workers.
CPU_WORKERS = 2


def threads_for(cores: int, busy: int) -> int:
    """Intra-op threads of a worker while ``busy`` workers (itself included) answer."""
    return max(1, cores // max(1, busy))


def auto_workers(accelerator: str, cores: int) -> int:
    """Workers per device for ``serve.workers_per_device: auto``: one on a GPU (its batches are
    where the speed is), :data:`CPU_WORKERS` on a CPU with that many cores."""
    return 1 if accelerator != "cpu" else max(1, min(CPU_WORKERS, cores))


class CoreShare:
    """``cores`` shared among ``workers`` processes: :meth:`claim` around each batch counts a
    worker as answering, :meth:`threads_now` gives a forward pass its threads.

    Nothing here takes a lock or waits for another process: a worker that is stopped or killed
    (the OOM killer) at any moment must not hold up the others, nor the API process that calls
    :meth:`arrived` on each request. Each count has a single writer (a worker's busy flag and
    its count of requests taken: that worker; the requests queued: the one API process), and a
    waiting worker is woken by a semaphore, whose release never blocks."""

    def __init__(self, cores: int, workers: int) -> None:
        self.cores = cores
        self.workers = workers
        # spawn-context objects: LitServe spawns its workers and pickles this with the API
        context = multiprocessing.get_context("spawn")
        #: 1 while worker k answers a batch
        self.busy_flags = context.RawArray("i", workers)
        #: requests put on the queue (by :class:`CountedQueue` in the API process)
        self.arrivals = context.RawValue("q", 0)
        #: requests worker k took from the queue
        self.taken_by = context.RawArray("q", workers)
        #: released to wake worker k > 0 when it may be its turn (see :meth:`wait_turn`)
        self.wakes = [context.Semaphore(0) for _ in range(workers)]

    @property
    def busy(self) -> int:
        """Workers answering now."""
        return sum(self.busy_flags)

    @property
    def waiting(self) -> int:
        """Requests in the queue."""
        return self.arrivals.value - sum(self.taken_by)

    def thread_counts(self) -> list[int]:
        """Every thread count a batch may be given, most first."""
        counts = {threads_for(self.cores, busy) for busy in range(1, self.workers + 1)}
        return sorted(counts, reverse=True)

    def started(self, worker: int) -> None:
        """Worker ``worker`` (re)started: it answers nothing (a killed one may have been)."""
        self.busy_flags[worker] = 0
        while self.wakes[worker].acquire(False):
            pass

    def wait_turn(self, worker: int, timeout: float) -> bool:
        """Wait (up to ``timeout`` s, without polling) until a request waits while at least
        ``worker`` others answer: worker 0 takes every request that finds the server idle,
        worker 1 only those that arrive while worker 0 is busy, and so on. A lone request so
        meets no other worker's activity. ``True`` when it is ``worker``'s turn."""
        deadline = time.monotonic() + timeout
        while not (self.busy >= worker and self.waiting > 0):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.wakes[worker].acquire(timeout=remaining):
                return self.busy >= worker and self.waiting > 0
            while self.wakes[worker].acquire(False):  # one look serves every wake so far
                pass
        return True

    def _wake(self) -> None:
        """Wake the workers whose turn it may be now (a release never blocks)."""
        for worker in range(1, min(self.busy, self.workers - 1) + 1):
            self.wakes[worker].release()

    def arrived(self) -> None:
        """A request was queued (:class:`CountedQueue`, in the API process)."""
        self.arrivals.value += 1
        self._wake()

    def taken(self, worker: int) -> None:
        """Worker ``worker`` took a request from the queue."""
        self.taken_by[worker] += 1

    def threads_now(self) -> int:
        """The threads of a pass that starts now."""
        return threads_for(self.cores, self.busy)

    @contextlib.contextmanager
    def claim(self, worker: int) -> Iterator[None]:
        """Count worker ``worker`` as answering while the block runs."""
        self.busy_flags[worker] = 1
        if self.waiting > 0:
            self._wake()
        try:
            yield
        finally:
            self.busy_flags[worker] = 0


class SharedLogits:
    """A model function whose every forward pass runs with the threads the share gives at its
    start (a batch of requests is several passes: a worker that started alone gives up half
    its cores at its next pass when another starts)."""

    def __init__(self, logits_fn: LogitsFn, share: CoreShare, spin: bool) -> None:
        self.share = share
        #: the model with each thread count (the model shared; a session each for ONNX)
        self.by_threads = {n: logits_fn.with_threads(n, spin) for n in share.thread_counts()}

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.by_threads[self.share.threads_now()](batch)


class CountedQueue:
    """A worker queue (LitServe's request queue) that counts the requests waiting in it in a
    :class:`CoreShare`, so that a worker waiting for its turn wakes when one arrives. Its
    ``worker`` is the index of the worker that takes from it (set in each worker)."""

    def __init__(self, queue: Any, share: CoreShare) -> None:
        self.queue = queue
        self.share = share
        self.worker = 0

    def put(self, item: Any, *args: Any, **kwargs: Any) -> None:
        self.queue.put(item, *args, **kwargs)
        self.share.arrived()

    def put_nowait(self, item: Any) -> None:
        self.put(item, block=False)

    def get(self, *args: Any, **kwargs: Any) -> Any:
        item = self.queue.get(*args, **kwargs)
        self.share.taken(self.worker)
        return item

    def get_nowait(self) -> Any:
        return self.get(block=False)
