"""The HTTP server: a LitServe API on :class:`~qa_lightning.serving.answerer.QuestionAnswerer`,
so that its answers are ``predict``'s (same windowing, decoding, null answers and settings).

``POST /predict`` answers ``{"question", "context", "top_k"?, "id"?}`` with ``{"id",
"answers": [{"answer", "score", "start", "end"}]}``; ``GET /health`` (readiness: how many
workers can answer) and ``GET /livez`` (liveness); ``GET /metrics`` (Prometheus, see
:mod:`~qa_lightning.serving.metrics`); ``GET /info`` (LitServe's, with the model's description
as its ``model``); ``GET /`` a page to ask questions in a browser.

A worker stopped or killed holds up nothing: LitServe starts a killed one again, the others
answer meanwhile, and every request gets its answer or a 504 within ``serve.timeout``
(:class:`DeadlineRequestHandler`).

Requests are checked by FastAPI against :class:`AnswerRequest` in the API server process, before
they reach the model's queue, so that a bad request is answered 422/413 on its own and never
fails the batch it would have joined. Batches are formed by :class:`GreedyBatchingLoop`: the
inference worker takes every request already waiting (up to ``max_batch_size``, waiting at most
``batch_timeout`` for more), and one :meth:`QuestionAnswerer.answer` call runs their windows
together. An idle server answers a lone request at once.

No ``from __future__ import annotations`` here: LitServe reads the request model from
:meth:`QuestionAnsweringAPI.decode_request`'s annotation at run time.
"""

import asyncio
import contextlib
import logging
import multiprocessing
import os
import secrets
import signal
import socket
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from queue import Empty
from typing import TYPE_CHECKING, Any, ClassVar

import litserve as ls
from fastapi import Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from litserve.callbacks.base import EventTypes
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop
from litserve.server import RegularRequestHandler
from litserve.utils import LitAPIStatus, ResponseBufferItem, WorkerSetupStatus
from pydantic import BaseModel, ConfigDict, PrivateAttr, StrictInt, StrictStr, field_validator
from pydantic_core import PydanticCustomError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from tqdm import tqdm

from qa_lightning.answers.ranking import Answer
from qa_lightning.core.errors import ConfigError
from qa_lightning.serving.cores import CoreShare, CountedQueue, SharedLogits, auto_workers
from qa_lightning.serving.metrics import (
    ACCESS_LOGS,
    REQUEST_IDS,
    Observed,
    ServerMetrics,
    SharedHistogram,
    WorkerMetrics,
    tag_log_records,
)

if TYPE_CHECKING:  # the model's modules (torch) are imported where a model is loaded
    from qa_lightning.serving.answerer import QuestionAnswerer

log = logging.getLogger(__name__)

#: Hosts LitServe binds: the loopback address (the default), or every interface.
HOSTS = ("127.0.0.1", "0.0.0.0", "::")
#: Paths that answer without the API key: the page (it holds no data; it sends the key its user
#: types) and the health check (for load balancers and probes).
OPEN_PATHS = ("/", "/health", "/livez")
#: Paths that answer whatever the ``Host`` header (probes of load balancers name the address
#: they reach; what they read is no secret).
ANY_HOST_PATHS = ("/health", "/livez")
#: ``serve.allowed_hosts`` of a server on the loopback address: the names of that address.
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
API_KEY_HEADER = "X-API-Key"
#: pydantic error types of :class:`AnswerRequest` that make a request too large (413), not
#: malformed (422).
TOO_LARGE = {"context_too_long"}
#: pydantic error types raised by :class:`AnswerRequest`'s checks, whose messages are sentences
OUR_ERRORS = {"blank", "context_too_long", "top_k_range", "id_type", "not_unicode"}


# -- requests ----------------------------------------------------------------------------------


class AnswerRequest(BaseModel):
    """The body of ``POST /predict``; FastAPI checks it before the request is queued."""

    model_config = ConfigDict(extra="ignore")

    question: StrictStr
    context: StrictStr
    top_k: StrictInt | None = None
    id: Any = None
    #: the request's id (``X-Request-ID``), set in the HTTP process for the worker's log lines
    _request_id: str = PrivateAttr(default="")

    #: limits, set by :func:`build_server` in the process that checks requests
    max_context_chars: ClassVar[int] = 100_000
    max_top_k: ClassVar[int] = 20

    @field_validator("question", "context")
    @classmethod
    def _text(cls, value: str, info: Any) -> str:
        name = info.field_name
        _check_unicode(name, value)
        if not value.strip():
            what = "empty" if not value else "only whitespace"
            raise PydanticCustomError("blank", f"the {name} is {what}; give a non-empty {name}")
        if name == "context" and len(value) > cls.max_context_chars:
            raise PydanticCustomError(
                "context_too_long",
                f"the context is {len(value)} characters, more than the server's limit "
                f"serve.max_context_chars={cls.max_context_chars}; send a shorter context",
            )
        return value

    @field_validator("id")
    @classmethod
    def _id(cls, value: Any) -> Any:
        """Echoed as sent: a string, an integer or null (JSON can carry them back unchanged)."""
        if value is not None and not isinstance(value, str) and not _is_int(value):
            raise PydanticCustomError(
                "id_type",
                f"id must be a string, an integer or null, not {json_type(value)}",
            )
        if isinstance(value, str):
            _check_unicode("id", value)
        return value

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= cls.max_top_k:
            raise PydanticCustomError(
                "top_k_range",
                f"top_k={value} is out of range; give an integer from 1 to {cls.max_top_k}",
            )
        return value


def _check_unicode(name: str, value: str) -> None:
    """Text the tokenizer (and a JSON response) can encode: UTF-8, so no lone surrogate (JSON
    lets a body send ``"\\ud800"``, which decodes to one)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise PydanticCustomError(
            "not_unicode",
            f"the {name} is not valid Unicode text (a lone surrogate "
            f"\\u{ord(value[error.start]):04x} at character {error.start}); send UTF-8 text",
        ) from None


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def problem_text(error: dict[str, Any]) -> str:
    """One pydantic error of a ``POST /predict`` body as a sentence naming the field."""
    kind, message = error["type"], error["msg"]
    where = [str(part) for part in error["loc"] if part != "body"]
    if kind == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", message)
        return f"the body is not valid JSON ({detail})"
    if not where:
        if isinstance(error.get("input"), bytes):  # a Content-Type other than JSON
            return (
                "the body is not JSON: send a JSON object with the header "
                "Content-Type: application/json"
            )
        if kind == "missing":
            return 'the body is empty; send a JSON object {"question": ..., "context": ...}'
        return (
            f"the body is {json_type(error.get('input'))}, not a JSON object "
            '{"question": ..., "context": ...}'
        )
    name = where[0]
    if kind == "missing":
        return f"the {name} is missing"
    if kind in ("string_type", "int_type"):
        expected = "a string" if kind == "string_type" else "an integer"
        return f"{name} must be {expected}, not {json_type(error.get('input'))}"
    if kind.startswith("int_"):
        return f"top_k must be an integer from 1 to {AnswerRequest.max_top_k}"
    return message if kind in OUR_ERRORS else f"{name}: {message}"


async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """422 (or 413 for a context over the limit) with ``detail`` naming every problem."""
    errors = error.errors()
    problems = list(dict.fromkeys(problem_text(e) for e in errors))
    status = 413 if any(e["type"] in TOO_LARGE for e in errors) else 422
    return JSONResponse({"detail": "; ".join(problems) + "."}, status_code=status)


def http_error(messages: dict[int, str]) -> Any:
    """An exception handler: LitServe's and Starlette's HTTP errors as JSON ``{"detail"}``,
    with ``messages`` replacing the terse texts of some statuses (413, 504)."""

    async def handler(request: Request, error: StarletteHTTPException) -> JSONResponse:
        detail = messages.get(error.status_code, error.detail)
        return JSONResponse(
            {"detail": detail}, status_code=error.status_code, headers=error.headers
        )

    return handler


async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
    """A 500 as JSON (Starlette's is plain text); the traceback is logged by Starlette."""
    return JSONResponse(
        {"detail": f"the server failed on this request ({type(error).__name__}); see its log"},
        status_code=500,
    )


class BodyLimit:
    """ASGI middleware: a request whose ``Content-Length`` is over ``max_bytes`` gets its 413
    from the headers, before any of its body is read (LitServe's ``MaxSizeMiddleware``, behind
    this, still counts the bytes of a body sent without a length)."""

    def __init__(self, app: Any, max_bytes: int, detail: str) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.detail = detail

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            length = Headers(scope=scope).get("content-length", "")
            if length.isdigit() and int(length) > self.max_bytes:
                # the body is not read: the connection cannot carry another request
                response = JSONResponse(
                    {"detail": self.detail}, status_code=413, headers={"Connection": "close"}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def host_name(header: str) -> str:
    """The name of a ``Host`` header, lower case, without its port or a trailing dot
    (``[::1]:8000`` -> ``[::1]``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1]
    return (header.rpartition(":")[0] if ":" in header else header).rstrip(".")


class HostCheck:
    """ASGI middleware: a request whose ``Host`` header names none of ``allowed`` gets a 400
    (a page of another site that reaches this server by DNS rebinding names its own host)."""

    def __init__(self, app: Any, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.allowed = frozenset(allowed)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in ANY_HOST_PATHS:
            name = host_name(Headers(scope=scope).get("host", ""))
            if name not in self.allowed:
                detail = (
                    f"the Host header names {name or 'nothing'!r}, not a name of this server "
                    f"(serve.allowed_hosts: {', '.join(sorted(self.allowed))}); call it by one "
                    "of those, or add the name to serve.allowed_hosts."
                )
                await JSONResponse({"detail": detail}, status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def machine_names() -> list[str]:
    """This machine's host name, its fully qualified name and their addresses."""
    names = {socket.gethostname().lower(), socket.getfqdn().lower()}
    with contextlib.suppress(OSError):
        for *_, address in socket.getaddrinfo(socket.gethostname(), None):
            names.add(f"[{address[0]}]" if ":" in address[0] else address[0])
    return sorted(names)


# -- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """What the server answers with: a Hugging Face directory (``model_dir``), a training
    checkpoint (``ckpt_path``) or an ONNX export (``onnx_path``), with the settings of
    ``predict`` (``batch_size``, ``precision``, and windowing/decoding overrides)."""

    backend: str
    device: str = "auto"
    model_dir: str | None = None
    ckpt_path: str | None = None
    onnx_path: str | None = None
    batch_size: int = 32
    precision: str = "auto"
    trust_checkpoint: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    #: intra-op threads of each forward pass (``None``: the server shares the cores among its
    #: workers, see :mod:`qa_lightning.serving.cores`)
    threads: int | None = None
    #: batch only windows of one length, unpadded (``None``: as ``predict``, on CPUs); ``False``
    #: pads windows of several lengths into one batch: fewer, larger forward passes
    equal_length: bool | None = None

    def __post_init__(self) -> None:
        if self.threads is not None and not (_is_int(self.threads) and self.threads > 0):
            raise ConfigError(
                f"invalid config: threads={self.threads!r}; must be an integer > 0, or null to "
                "share the cores among the workers (see conf/serve.yaml)."
            )

    def load(self, device: str = "cpu") -> "QuestionAnswerer":
        """The answerer, on ``device`` (the PyTorch backends), with ``threads`` if given."""
        answerer = self._load(device)
        if self.threads:
            answerer = answerer.replaced(answerer.logits_fn.with_threads(self.threads))
        return answerer

    def _load(self, device: str) -> "QuestionAnswerer":
        from qa_lightning.serving.model_keys import GivenModel, load_answerer

        if self.backend == "onnx":
            tokenizer_dir = Path(self.model_dir) if self.model_dir else None
            model = GivenModel("onnx_path", Path(str(self.onnx_path)), tokenizer_dir)
        elif self.ckpt_path:
            model = GivenModel("ckpt_path", Path(self.ckpt_path))
        else:
            model = GivenModel("model_dir", Path(str(self.model_dir)))
        answerer = load_answerer(
            model, device, self.batch_size, self.precision, self.trust_checkpoint, **self.settings
        )
        return self._batching(answerer)

    def _batching(self, answerer: "QuestionAnswerer") -> "QuestionAnswerer":
        if self.equal_length is None or self.equal_length == answerer.equal_length:
            return answerer
        return answerer.replaced(equal_length=self.equal_length)


def describe(answerer: "QuestionAnswerer", source: "ModelSource") -> dict[str, Any]:
    """``/info``'s ``model``: the model, backend, precision, settings and version."""
    from importlib.metadata import version

    from qa_lightning.model.logits import resolve_device, resolve_precision

    if source.backend == "torch":
        precision = resolve_precision(source.precision, resolve_device(source.device))
    else:
        precision = "int8" if getattr(answerer.logits_fn, "quantization", None) else "fp32"
    return {
        "model": source.onnx_path or source.ckpt_path or source.model_dir,
        "backend": source.backend,
        "precision": precision,
        "settings": asdict(answerer.settings),
        "batch_size": answerer.batch_size,
        "version": version("qa-lightning"),
    }


# -- batching ----------------------------------------------------------------------------------


class GreedyBatchingLoop(BatchedLoop):
    """LitServe's batched loop, collecting a batch the way a dynamic batcher with a queue
    delay does: it waits (without polling) for a first request, then takes the requests already
    queued, waiting up to ``batch_timeout`` for more, up to ``max_batch_size``. With
    ``batch_timeout=0`` a request that finds the worker idle is answered at once, and requests
    that arrive while a batch runs form the next one."""

    #: how long the worker blocks on an empty queue before it looks again (for the shutdown)
    idle_wait = 1.0
    #: LitServe's index of this worker; with a :class:`CoreShare`, worker ``k`` takes a first
    #: request only while ``k`` others answer (:meth:`CoreShare.wait_turn`)
    worker_id = 0
    #: how long such a worker sleeps when its turn found the queue empty (another took it)
    helper_poll = 0.002

    def __call__(
        self, lit_api: ls.LitAPI, device: str, worker_id: int, request_queue: Any, *args, **kwargs
    ) -> None:
        self.worker_id = worker_id
        if isinstance(request_queue, CountedQueue):
            request_queue.worker = worker_id  # this worker's copy counts what it takes
        try:
            super().__call__(lit_api, device, worker_id, request_queue, *args, **kwargs)
        except (EOFError, ConnectionError):
            # LitServe's manager, which holds the queues, is gone: the server is stopping
            # (``pkill -f qa_lightning.serve`` signals it but not this spawned worker); the
            # main process says what happened
            log.debug("inference worker %d: the request queue is gone; stopping", worker_id)

    def get_batch_requests(self, lit_api: ls.LitAPI, request_queue: Any, transport: Any):
        timed_out, payloads = [], []
        deadline = None
        cores = getattr(lit_api, "cores", None)
        observed = getattr(lit_api, "observed", None)
        helper = cores is not None and self.worker_id > 0
        if helper:
            # its turn, or idle_wait passed (a look at the queue now and then, for a stop
            # sentinel): take what is queued without waiting in the queue (nor for
            # batch_timeout), where an idle server's next request would find this worker
            # instead of worker 0
            cores.wait_turn(self.worker_id, self.idle_wait)
            deadline = time.monotonic()
        while len(payloads) < lit_api.max_batch_size:
            try:
                if deadline is None:
                    request = request_queue.get(timeout=self.idle_wait)
                else:
                    remaining = deadline - time.monotonic()
                    if remaining > 0:
                        request = request_queue.get(timeout=remaining)
                    else:
                        request = request_queue.get_nowait()
            except Empty:
                break
            if request == _SENTINEL_VALUE:
                raise _StopLoopError()
            queue_id, uid, submitted, body = request
            if observed is not None:  # the clock is the machine's: the API process's too
                observed.queue_wait.observe(self.worker_id, time.monotonic() - submitted)
            limit = lit_api.request_timeout
            if limit not in (None, False, -1) and time.monotonic() - submitted > limit:
                timed_out.append((queue_id, uid))
            else:
                payloads.append((queue_id, uid, body))
            if deadline is None:
                deadline = time.monotonic() + lit_api.batch_timeout
        if helper and not payloads and not timed_out:
            time.sleep(self.helper_poll)
        if observed is not None and payloads:
            observed.batch_requests.observe(self.worker_id, len(payloads))
        return payloads, timed_out


class CountedWindows:
    """A model function that counts the windows of each forward pass in ``histogram`` (as
    worker ``worker``), for ``qa_forward_windows``."""

    def __init__(self, logits_fn: Any, histogram: SharedHistogram, worker: int) -> None:
        self.logits_fn, self.histogram, self.worker = logits_fn, histogram, worker

    def __call__(self, batch: dict[str, Any]) -> Any:
        self.histogram.observe(self.worker, len(batch["input_ids"]))
        return self.logits_fn(batch)


#: What the processes that load the model quiet (:func:`~qa_lightning.core.quiet.
#: quiet_libraries`): transformers, which they use; not datasets, which they would import.
QUIETED_IN_WORKERS = ("transformers",)


@dataclass(frozen=True)
class WorkerLogging:
    """Where and how the main process logs (its root handlers: the console and Hydra's
    ``serve.log``), captured when the server is built and set up again in each inference worker
    (a spawned process, which starts with no logging), so that the workers' lines look like the
    main process's and go to the same places; the worker quiets :data:`QUIETED_IN_WORKERS`
    unless ``verbose``."""

    #: ``(stream name or file path, format, date format)`` of each handler
    handlers: tuple[tuple[str, str | None, str | None], ...] = ()
    level: int = logging.INFO
    verbose: bool = False

    @classmethod
    def capture(cls, verbose: bool = False) -> "WorkerLogging":
        root = logging.getLogger()
        found = []
        for handler in root.handlers:
            formatter = handler.formatter or logging.Formatter()
            fmt, datefmt = formatter._fmt, formatter.datefmt
            if isinstance(handler, logging.FileHandler):
                found.append((handler.baseFilename, fmt, datefmt))
            elif isinstance(handler, logging.StreamHandler):
                name = "stdout" if handler.stream is sys.stdout else "stderr"
                found.append((name, fmt, datefmt))
        return cls(tuple(found), root.level, verbose)

    def apply(self) -> None:
        from qa_lightning.core.quiet import quiet_libraries

        root = logging.getLogger()
        for where, fmt, datefmt in self.handlers:
            if where in ("stdout", "stderr"):
                handler: logging.Handler = logging.StreamHandler(getattr(sys, where))
            else:
                handler = logging.FileHandler(where, encoding="utf-8")  # appends
            handler.setFormatter(logging.Formatter(fmt, datefmt))
            root.addHandler(handler)
        root.setLevel(self.level)
        quiet_libraries(self.verbose, QUIETED_IN_WORKERS)
        tag_log_records()


class WorkerPids:
    """The process ids of the inference workers in shared memory: each worker writes its own
    at set-up (one LitServe restarts, too), and the API process reads them to tell which run."""

    def __init__(self, workers: int) -> None:
        self.pids = multiprocessing.get_context("spawn").RawArray("i", workers)

    def register(self, worker: int) -> None:
        self.pids[worker] = os.getpid()

    def running(self) -> list[bool]:
        """Whether each worker's process runs (not killed, exited or stopped)."""
        return [pid > 0 and process_runs(pid) for pid in self.pids]


def process_runs(pid: int) -> bool:
    """Whether process ``pid`` exists and is neither stopped (SIGSTOP) nor a zombie."""
    if not Path("/proc/self/stat").exists():  # not Linux: whether it exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "TtZXx"  # the state, after "pid (name) "


#: a request as the worker takes it: question, context, top_k, the echoed id, the request id
Decoded = tuple[str, str, int, Any, str]


class QuestionAnsweringAPI(ls.LitAPI):
    """The LitServe API: a request is ``(question, context, top_k, id)``; a batch of them is
    answered by one :meth:`QuestionAnswerer.answer` call (their windows batched together), with
    the threads ``cores`` gives it (``None``: the source's ``threads``, or the runtime's)."""

    def __init__(
        self,
        source: ModelSource,
        max_batch_size: int = 16,
        batch_timeout: float = 0.0,
        api_key: str | None = None,
        cores: CoreShare | None = None,
        pids: WorkerPids | None = None,
    ) -> None:
        super().__init__(
            max_batch_size=max_batch_size,
            batch_timeout=batch_timeout,
            api_path="/predict",
            loop=GreedyBatchingLoop(),
        )
        self.source = source
        self.api_key = api_key or None
        self.cores = cores
        self.pids = pids
        #: what the workers measure for ``/metrics`` (set by :func:`build_server`)
        self.observed: WorkerMetrics | None = None
        #: LitServe's index of the worker this copy runs in (set in :meth:`setup`)
        self.worker_id = 0
        #: how the worker logs (set by :func:`build_server`)
        self.logging = WorkerLogging()

    def setup(self, device: str) -> None:
        from transformers.utils import logging as hf_logging

        self.logging.apply()
        if multiprocessing.parent_process() is not None:  # a worker process (not a test's)
            # Ctrl-C reaches every process of the terminal's group: the main process stops the
            # workers (SIGTERM), which would otherwise each print a KeyboardInterrupt traceback
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.worker_id = int(os.environ.get("LITSERVE_WORKER_ID", "0"))
        if self.pids is not None:
            self.pids.register(self.worker_id)
        if self.cores is not None:
            self.cores.started(self.worker_id)
        hf_logging.disable_progress_bar()  # the start-up check showed the model's loading once
        # tqdm's default lock (taken even by a disabled bar, in every answer call) is a
        # multiprocessing one: a named semaphore this worker would leak when it is stopped
        tqdm.set_lock(threading.RLock())
        self.answerer = self.source.load(device)
        log.info(
            "inference worker %d (process %d) answers on %s", self.worker_id, os.getpid(), device
        )
        logits_fn = self.answerer.logits_fn
        if self.cores is not None:
            # pools that spin after a pass would take the cores from the other workers
            logits_fn = SharedLogits(logits_fn, self.cores, spin=self.cores.workers == 1)
        if self.observed is not None:
            logits_fn = CountedWindows(logits_fn, self.observed.forward_windows, self.worker_id)
        self.answerer = self.answerer.replaced(logits_fn)

    def authorize(self, request: Request) -> None:
        """LitServe's authentication hook: with an API key, every path but :data:`OPEN_PATHS`
        needs it in the ``X-API-Key`` header (401 otherwise)."""
        if self.api_key is None or request.url.path in OPEN_PATHS:
            return
        given = request.headers.get(API_KEY_HEADER, "")
        if not secrets.compare_digest(given.encode(), self.api_key.encode()):
            raise HTTPException(
                401,
                f"missing or wrong API key: send it in the {API_KEY_HEADER} header "
                "(the server's serve.api_key).",
            )

    def decode_request(self, request: AnswerRequest) -> Decoded:
        return (
            request.question,
            request.context,
            request.top_k or 1,
            request.id,
            request._request_id,
        )

    def batch(self, inputs: list[Decoded]) -> list[Decoded]:
        return list(inputs)

    def predict(self, requests: list[Decoded]) -> list[Any]:
        """The answers of each request (or the exception that answering it alone raised: one
        request the model cannot answer does not fail the others of its batch). Log lines made
        meanwhile end with the request ids of the batch."""
        questions, contexts, top_ks, ids, request_ids = (
            list(column) for column in zip(*requests, strict=True)
        )
        token = REQUEST_IDS.set(",".join(request_ids))
        try:
            with self.cores.claim(self.worker_id) if self.cores else contextlib.nullcontext():
                try:
                    found = self.answerer.answer(questions, contexts, max(top_ks))
                except Exception:
                    log.exception("answering a batch of %d failed; answering one by one", len(ids))
                    found = [self._answer_alone(*request[:3], request[4]) for request in requests]
        finally:
            REQUEST_IDS.reset(token)
        return [
            (qid, answers if isinstance(answers, Exception) else answers[:k])
            for qid, answers, k in zip(ids, found, top_ks, strict=True)
        ]

    def _answer_alone(
        self, question: str, context: str, top_k: int, request_id: str
    ) -> list[Answer] | Exception:
        token = REQUEST_IDS.set(request_id)
        try:
            return self.answerer.answer([question], [context], top_k)[0]
        except Exception as error:
            log.exception("answering one request failed")
            return error
        finally:
            REQUEST_IDS.reset(token)

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def encode_response(self, output: tuple[Any, Any]) -> Any:
        qid, answers = output
        if isinstance(answers, Exception):
            return JSONResponse(
                {"detail": f"the model could not answer this request ({type(answers).__name__})"},
                status_code=500,
            )
        return {"id": qid, "answers": [answer.as_dict() for answer in answers]}


# -- the server --------------------------------------------------------------------------------


#: ``serve.*`` settings that are integers > 0.
POSITIVE_INTS = (
    "max_batch_size",
    "max_context_chars",
    "max_body_bytes",
    "max_top_k",
)


@dataclass(frozen=True)
class ServeSettings:
    """``serve.*`` of ``conf/serve.yaml``."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 16
    batch_timeout: float = 0.0
    workers_per_device: int | str = "auto"
    timeout: float = 30.0
    max_context_chars: int = 100_000
    max_body_bytes: int = 1_000_000
    max_top_k: int = 20
    api_key: str | None = None
    #: seconds SIGTERM waits for the requests in flight (``None``: ``timeout``)
    drain_timeout: float | None = None
    #: names the ``Host`` header may give (``"*"``: any; ``None``: see :meth:`hosts`)
    allowed_hosts: list[str] | None = None
    #: ``text`` (uvicorn's), ``json`` (one JSON line per request, with its id) or ``off``
    access_log: str = "text"
    log_level: str = "info"

    def __post_init__(self) -> None:
        for key, fix in self.problems():
            shown = "..." if key == "api_key" else repr(getattr(self, key))  # never the key
            raise ConfigError(
                f"invalid config: serve.{key}={shown}; must be {fix} (see conf/serve.yaml)."
            )

    def hosts(self) -> tuple[str, ...]:
        """The names requests may give in their ``Host`` header (``("*",)``: any).
        ``serve.allowed_hosts`` if set; else the loopback names on the loopback address; on
        every interface, any with an API key, else the loopback names and this machine's."""
        if self.allowed_hosts is not None:
            return tuple(name.lower().rstrip(".") for name in self.allowed_hosts)
        if self.host == "127.0.0.1":
            return LOOPBACK_NAMES
        if self.api_key is not None:
            return ("*",)
        return (*LOOPBACK_NAMES, *machine_names())

    @property
    def drain_s(self) -> float:
        """Seconds SIGTERM waits for the requests in flight."""
        return self.timeout if self.drain_timeout is None else self.drain_timeout

    def problems(self) -> list[tuple[str, str]]:
        """``(key, what it must be)`` of each setting out of its range."""
        found = [
            (key, "an integer > 0")
            for key in POSITIVE_INTS
            if not (_is_int(getattr(self, key)) and getattr(self, key) > 0)
        ]
        workers = self.workers_per_device
        if workers != "auto" and not (_is_int(workers) and workers > 0):
            found.append(("workers_per_device", "auto or an integer > 0"))
        if self.host not in HOSTS:
            found.append(("host", f"one of {', '.join(HOSTS)} (127.0.0.1: this machine only)"))
        if not (_is_int(self.port) and 1024 <= self.port <= 65535):
            found.append(("port", "an integer from 1024 to 65535"))
        if not (_is_number(self.timeout) and self.timeout > 0):
            found.append(("timeout", "seconds > 0"))
        elif not (_is_number(self.batch_timeout) and 0 <= self.batch_timeout < self.timeout):
            found.append(("batch_timeout", "seconds, >= 0 and < serve.timeout"))
        elif self.drain_timeout is not None and not (
            _is_number(self.drain_timeout) and self.drain_timeout >= self.timeout
        ):
            found.append(
                (
                    "drain_timeout",
                    "null or seconds >= serve.timeout (a request in flight may wait that long "
                    "for the model)",
                )
            )
        hosts = self.allowed_hosts
        if hosts is not None and not (
            isinstance(hosts, list | tuple)
            and hosts
            and all(isinstance(h, str) and h.strip() and " " not in h for h in hosts)
        ):
            found.append(
                (
                    "allowed_hosts",
                    'null or a list of host names, such as [api.example.com] or ["*"]',
                )
            )
        if self.access_log not in ACCESS_LOGS:
            found.append(("access_log", f"one of {', '.join(ACCESS_LOGS)}"))
        if self.api_key is not None and not _is_api_key(self.api_key):
            found.append(
                (
                    "api_key",
                    "a non-empty string of printable ASCII without spaces (HTTP headers carry "
                    "no other text reliably), or unset (LIT_SERVER_API_KEY unset) for no key",
                )
            )
        return found


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_api_key(value: Any) -> bool:
    """A key a client can send in a header: printable ASCII, no spaces, not empty."""
    return isinstance(value, str) and value != "" and all("!" <= c <= "~" for c in value)


def page_html() -> str:
    """The page served at ``/``: plain HTML and JavaScript, no external assets."""
    return resources.files("qa_lightning.serving").joinpath("page.html").read_text("utf-8")


class DeadlineRequestHandler(RegularRequestHandler):
    """LitServe's request handler with a deadline: a request not answered ``timeout`` seconds
    after it was queued gets its 504 from the API process, whatever became of the worker that
    took it (stopped, or killed: LitServe's own check runs in the worker, when it takes the
    request)."""

    async def handle_request(self, request: Any, request_type: Any) -> Any:
        payload = await self._prepare_request(request, request_type)
        if isinstance(payload, AnswerRequest):
            payload._request_id = REQUEST_IDS.get()  # for the worker's log lines
        uid, _ = await self._submit_request(payload)
        event = asyncio.Event()
        self.server.response_buffer[uid] = ResponseBufferItem(event)
        try:
            await asyncio.wait_for(event.wait(), self.server.timeout)
        except TimeoutError:
            self.server.response_buffer.pop(uid, None)
            raise HTTPException(504, "Request timed out") from None
        response, status = self.server.response_buffer.pop(uid).response
        if status == LitAPIStatus.ERROR:
            self._handle_error_response(response)
        self.server._callback_runner.trigger_event(
            EventTypes.ON_RESPONSE.value, litserver=self.server
        )
        return response


#: What the inference workers import before their model: their fork server imports it once
#: and every worker (and every restart of one) is forked from it, sharing those pages.
WORKER_PRELOAD = (
    "__main__",
    "qa_lightning.serving.server",
    "qa_lightning.serving.answerer",
    "transformers.modeling_utils",
    "transformers.masking_utils",  # the encoders' masks: imports torch._dynamo, a large part
    "qa_lightning.serving.preloaded",  # last: freezes what the others made
)


class ForkedWorkers:
    """``multiprocessing`` as LitServe's worker launch sees it (see
    :meth:`QAServer.launch_inference_worker`): its ``"spawn"`` context is the ``forkserver``
    one, whose server process imports :data:`WORKER_PRELOAD` (and onnxruntime for an ONNX
    model) once. Spawned workers would each import torch and transformers anew: about 250 MiB
    each that forked ones share (docs/serving.md, memory). Used with two workers or more."""

    def __init__(self, onnx: bool) -> None:
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload([*WORKER_PRELOAD, *(["onnxruntime"] if onnx else [])])

    def get_context(self, method: str | None = None) -> Any:
        return self.context if method == "spawn" else multiprocessing.get_context(method)

    def __getattr__(self, name: str) -> Any:
        return getattr(multiprocessing, name)

    @contextlib.contextmanager
    def launching(self) -> Any:
        """LitServe's module sees this object as ``mp`` while the block runs."""
        import litserve.server as litserve_server

        saved = litserve_server.mp
        litserve_server.mp = self
        try:
            yield
        finally:
            litserve_server.mp = saved


class QAServer(ls.LitServer):
    """LitServe's server, keeping its API server processes so that SIGTERM can drain them
    (see :meth:`drain`), with its request queue counted for ``cores`` (when shared) and its
    inference workers forked from one fork server (:class:`ForkedWorkers`)."""

    def __init__(
        self,
        *args: Any,
        cores: CoreShare | None = None,
        pids: WorkerPids | None = None,
        forked: ForkedWorkers | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.forked = forked
        self.api_servers: dict[int, Any] = {}
        self.sockets: list[Any] = []
        self.cores = cores
        self.pids = pids
        self.workers = self.workers_per_device * len(self.devices)
        #: every worker has answered /health's check once (set in the API process)
        self.started = False

    def _register_api_endpoints(self, lit_api: ls.LitAPI, request_type: Any, response_type: Any):
        """LitServe's ``POST /predict``, answered by :class:`DeadlineRequestHandler`."""
        self._callback_runner.trigger_event(EventTypes.ON_SERVER_START.value, litserver=self)
        handler = DeadlineRequestHandler(lit_api, self)

        async def endpoint_handler(request: request_type) -> response_type:
            return await handler.handle_request(request, request_type)

        self.app.add_api_route(
            lit_api.api_path,
            endpoint_handler,
            methods=["POST"],
            dependencies=[Depends(self.setup_auth(lit_api))],
        )

    def launch_inference_worker(self, lit_api: ls.LitAPI) -> list[Any]:
        with self.forked.launching() if self.forked else contextlib.nullcontext():
            return super().launch_inference_worker(lit_api)

    def launch_single_inference_worker(self, lit_api: ls.LitAPI, worker_id: int) -> Any:
        """LitServe's restart of a worker that died, forked as the first ones were."""
        with self.forked.launching() if self.forked else contextlib.nullcontext():
            return super().launch_single_inference_worker(lit_api, worker_id)

    def _init_manager(self, num_api_servers: int) -> Any:
        manager = super()._init_manager(num_api_servers)
        if self.cores is not None:
            queues = self.litapi_request_queues
            for path, queue in queues.items():
                queues[path] = CountedQueue(queue, self.cores)
        return manager

    def answering(self) -> list[bool]:
        """Whether each inference worker can answer now: its model loaded (LitServe's set-up
        status; a restarted worker loads it again) and its process running (not killed,
        exited or stopped)."""
        status = getattr(self, "workers_setup_status", None)
        try:
            status = status.copy() if status is not None else {}
        except (OSError, EOFError):  # the manager has stopped
            status = {}
        ready = [status.get(f"predict_{k}") == WorkerSetupStatus.READY for k in range(self.workers)]
        if self.pids is None:
            return ready
        return [r and runs for r, runs in zip(ready, self.pids.running(), strict=True)]

    def health(self) -> Response:
        """``/health``: 200 once every worker has loaded its model, and then while one can
        answer (``ok``, or how many of them can); else a JSON 503."""
        answering = self.answering()
        up, total = sum(answering), len(answering)
        if up == total:
            self.started = True
            return PlainTextResponse("ok")
        if up and self.started:  # not while the workers load the model the first time
            down = ", ".join(str(k) for k, a in enumerate(answering) if not a)
            return PlainTextResponse(
                f"ok: {up} of {total} inference workers answer (not worker {down}: loading, "
                "stopped, or killed and being restarted)"
            )
        if not self.started:
            detail = "not ready: the inference workers are loading the model; retry in a moment"
        else:
            detail = (
                f"not ready: none of the {total} inference workers answers (stopped, or killed "
                "and being restarted); requests wait up to serve.timeout, then get 504"
            )
        return JSONResponse({"detail": detail}, status_code=503)

    def workers_ready(self) -> bool:
        """Whether every inference worker has loaded its model (LitServe's set-up status)."""
        status = getattr(self, "workers_setup_status", None)
        try:
            return bool(status) and all(v == WorkerSetupStatus.READY for v in status.values())
        except (OSError, EOFError):  # the manager has stopped
            return False

    def _start_server(self, port, num_uvicorn_servers, log_level, sockets, *args, **kwargs):
        self.sockets = list(sockets or [])
        self.api_servers = super()._start_server(
            port, num_uvicorn_servers, log_level, sockets, *args, **kwargs
        )
        return self.api_servers

    def drain(self) -> None:
        """Stop accepting requests and finish those in flight (uvicorn's graceful shutdown of
        each API server, while the inference workers still answer), then stop LitServe.

        The listening socket is shut down first: other processes (LitServe's manager) hold
        copies of it, so closing it would leave new connections waiting; shut down, they are
        refused at once."""
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for process in self.api_servers.values():
            if process.is_alive() and hasattr(process, "terminate"):
                process.terminate()
        for process in self.api_servers.values():
            process.join(self.uvicorn_graceful_timeout + 5)
        if self._shutdown_event is not None:
            with contextlib.suppress(OSError, EOFError):  # the manager got the signal too
                self._shutdown_event.set()


@dataclass(frozen=True)
class ModelFacts:
    """What the server needs to know of its model and machine, found by :func:`inspect_model`
    where torch is loaded: ``/info``'s ``model``, torch's intra-op threads (the cores, or
    ``OMP_NUM_THREADS``), and LitServe's accelerator and devices."""

    info: dict[str, Any] = field(default_factory=dict)
    cores: int = 1
    accelerator: str = "cpu"
    devices: int | list[int] = 1


def inspect_model(source: ModelSource, verbose: bool = False) -> ModelFacts:
    """Load the model once on the CPU (a bad path or setting is a one-paragraph
    :class:`ConfigError` here, before any worker starts) and describe it; quiet as a worker
    (:data:`QUIETED_IN_WORKERS`) unless ``verbose``."""
    import torch

    from qa_lightning.core.quiet import quiet_libraries

    quiet_libraries(verbose, QUIETED_IN_WORKERS)  # a process of its own, as a worker
    accelerator, devices = _devices(source)
    answerer = source.load("cpu")
    return ModelFacts(describe(answerer, source), torch.get_num_threads(), accelerator, devices)


def inspect_apart(source: ModelSource, verbose: bool = False) -> ModelFacts:
    """:func:`inspect_model` in a process of its own, which exits after it: the server's main
    process (and the HTTP and manager processes forked from it) then holds no model and no
    torch; only the inference workers do."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            return pool.submit(inspect_model, source, verbose).result()
    except BrokenProcessPool as error:
        raise ConfigError(
            "the process loading the model to check it died (out of memory?); check the model "
            "path and the machine's free memory."
        ) from error


def build_server(
    source: ModelSource, serve: ServeSettings, facts: ModelFacts, verbose: bool = False
) -> QAServer:
    """The LitServe server: the API, its limits, error bodies, ``/info`` and the page; its
    workers quiet other libraries' output unless ``verbose``."""
    AnswerRequest.max_context_chars = serve.max_context_chars
    AnswerRequest.max_top_k = serve.max_top_k
    accelerator, devices, cores = facts.accelerator, facts.devices, facts.cores
    workers = serve.workers_per_device
    if workers == "auto":
        workers = auto_workers(accelerator, cores)
    shared = None if source.threads else CoreShare(cores, workers)
    pids = WorkerPids(workers * (len(devices) if isinstance(devices, list) else devices))
    api = QuestionAnsweringAPI(
        source, serve.max_batch_size, serve.batch_timeout, serve.api_key, shared, pids
    )
    threads = source.threads or f"shared: {cores} cores among {workers} worker(s)"
    server = QAServer(
        api,
        accelerator=accelerator,
        devices=devices,
        workers_per_device=workers,
        timeout=serve.timeout,
        max_payload_size=serve.max_body_bytes,
        model_metadata={
            **facts.info,
            "workers": workers,
            "threads": threads,
            "serve": _public(serve),
        },
        cores=shared,
        pids=pids,
        # one worker shares no pages: spawned, it does not pay for a fork server beside it
        forked=ForkedWorkers(onnx=source.backend == "onnx") if len(pids.pids) > 1 else None,
        # a worker that dies (the OOM killer) is started again; the others answer meanwhile
        restart_workers=True,
        # the OpenAPI pages (/docs, /redoc, /openapi.json) do not ask for the key: off with one
        disable_openapi_url=serve.api_key is not None,
    )
    server.uvicorn_graceful_timeout = serve.drain_s
    app = server.app
    too_large = (
        f"the body is larger than the server's limit serve.max_body_bytes="
        f"{serve.max_body_bytes} bytes; send a shorter context."
    )
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(
        StarletteHTTPException,
        http_error(
            {
                413: too_large,
                504: f"the request waited more than serve.timeout={serve.timeout} s for the "
                "model (the server is overloaded); retry later.",
            }
        ),
    )
    app.add_exception_handler(Exception, unexpected_error)
    app.add_middleware(BodyLimit, max_bytes=serve.max_body_bytes, detail=too_large)
    if "*" not in serve.hosts():
        app.add_middleware(HostCheck, allowed=serve.hosts())
    # the page replaces LitServe's "litserve running" at /, and /health answers its 503 in JSON
    replaced = ("/", "/health")
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) not in replaced]
    page = page_html()

    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    async def health() -> Response:
        return server.health()

    async def livez() -> Response:
        return PlainTextResponse("ok")  # liveness: the HTTP process answers

    api.observed = WorkerMetrics(server.workers)
    api.logging = WorkerLogging.capture(verbose)
    tag_log_records()  # before the HTTP process is forked from this one
    metrics = ServerMetrics(facts.info, server.workers, server.answering, api.observed)

    async def scrape() -> Response:
        text, content_type = metrics.scrape()
        return Response(text, media_type=content_type)

    app.add_api_route("/", index, methods=["GET"], include_in_schema=False)
    app.add_api_route("/health", health, methods=["GET"], include_in_schema=False)
    app.add_api_route("/livez", livez, methods=["GET"], include_in_schema=False)
    app.add_api_route(
        "/metrics",
        scrape,
        methods=["GET"],
        include_in_schema=False,
        dependencies=[Depends(api.authorize)],
    )
    app.add_middleware(Observed, metrics=metrics, access_log=serve.access_log)  # outermost
    return server


def _devices(source: ModelSource) -> tuple[str, int | list[int]]:
    """LitServe's accelerator and devices for the source's ``device`` (``cuda:N``: the GPU of
    index N; the ONNX backend runs on the CPU)."""
    import torch

    from qa_lightning.model.logits import resolve_device

    if source.backend == "onnx":
        return "cpu", 1
    device = torch.device(resolve_device(source.device))
    if device.type != "cuda" or device.index is None:
        return device.type, 1
    if device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device={source.device!r} but this machine has {torch.cuda.device_count()} CUDA "
            "GPU(s) that torch can use (cuda:0 ...); choose one of them, or device=cuda."
        )
    return "cuda", [device.index]


def _public(serve: ServeSettings) -> dict[str, Any]:
    shown = asdict(serve)
    shown["api_key"] = serve.api_key is not None
    return shown


def check_port(serve: ServeSettings) -> None:
    """Fail (:class:`ConfigError` naming ``serve.port``) when the port cannot be bound, before
    the model is loaded; uvicorn would log ``[Errno 98]`` and exit 3 once the workers run."""
    family = socket.AF_INET6 if ":" in serve.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((serve.host, serve.port))
        except OSError as error:
            raise ConfigError(
                f"serve.port={serve.port} cannot be used on {serve.host} ({error.strerror}): "
                "another process listens there (another server?); stop it or choose a free "
                "port with serve.port=PORT."
            ) from error


def local_url(serve: ServeSettings) -> str:
    """The server's address as this machine reaches it (the loopback one for every interface)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(serve.host, serve.host)
    return f"http://{host}:{serve.port}/"


def announce_when_ready(
    server: QAServer, url: str, message: str, stop: threading.Event, every: float = 0.1
) -> None:
    """Log ``message`` once ``url``'s ``/health`` answers 200 (or never, once ``stop`` is set).
    ``/health`` is asked only once the workers say they are ready, so that the access log does
    not fill with 503s."""
    while not stop.wait(every):
        if not server.workers_ready():
            continue
        # not listening yet, or 503 (an HTTPError, an OSError)
        with (
            contextlib.suppress(OSError, ValueError),
            urllib.request.urlopen(f"{url}health", timeout=2) as response,
        ):
            if response.status == 200:
                log.info("%s", message)
                return
        stop.wait(5 * every)


def run_server(server: QAServer, serve: ServeSettings, what: str) -> None:
    """Run until SIGTERM (or Ctrl-C): on SIGTERM stop accepting, finish the requests in flight
    and return. ``serving WHAT at URL`` is logged once ``/health`` answers."""
    main_pid = os.getpid()
    stopped = threading.Event()
    terminated = threading.Event()
    host = f"[{serve.host}]" if ":" in serve.host else serve.host
    threading.Thread(
        target=announce_when_ready,
        args=(server, local_url(serve), f"serving {what} at http://{host}:{serve.port}/", stopped),
        name="qa-announce",
        daemon=True,
    ).start()

    def on_sigterm(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:  # a forked child before it installs its own handlers
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        log.info("SIGTERM: finishing the requests in flight, then stopping")
        terminated.set()
        threading.Thread(target=server.drain, name="qa-drain", daemon=True).start()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        server.run(
            host=serve.host,
            port=serve.port,
            log_level=serve.log_level,
            generate_client_file=False,
            num_api_servers=1,
            access_log=False,  # the access log is Observed's, with request ids
        )
    except (OSError, EOFError):
        if not terminated.is_set():
            raise
        # LitServe's manager process is gone: SIGTERM went to the server's other processes
        # too (systemd's default KillMode, kill -- -PGID, pkill -f), not to this one alone
        log.warning(
            "stopped without finishing the requests in flight: SIGTERM reached the server's "
            "other processes too; send it to the main process only (PID %d; systemd: "
            "KillMode=mixed) to let it finish them",
            main_pid,
        )
    finally:
        stopped.set()
        signal.signal(signal.SIGTERM, previous)
