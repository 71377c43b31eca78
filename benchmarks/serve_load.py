"""Load test of the HTTP server (``python -m qa_lightning.serve``) against a naive server.

The naive server is what a user would otherwise write: FastAPI + uvicorn, one request -> one fp32
PyTorch forward of its windows, no batching (``naive`` below, the same model and answering code).
Clients (httpx, asyncio) send the shared split's validation questions; every answer is checked
against the answer ``predict`` gives that question with the same model (computed in a process of
its own, which exits before the servers start: this one holds no model).

    python benchmarks/serve_load.py load --model-dir RUN/hf_model \\
        --onnx-fp32 EXPORT/onnx_model/model.onnx --onnx-int8 EXPORT/onnx_int8_model/model.onnx
    python benchmarks/serve_load.py bad --model-dir RUN/hf_model   # 64 x 50, 10% bad requests
    python benchmarks/serve_load.py memory --model-dir RUN/hf_model   # idle, after 200 requests
    python benchmarks/serve_load.py killed --model-dir RUN/hf_model   # a worker SIGKILLed

Memory is the proportional set size (PSS, ``/proc/PID/smaps_rollup``) summed over the server's
processes (the one started and all its descendants): a page shared by several of them counts
once, split among them. Idle: once the server is ready and has answered a warm-up (8 clients x 4
requests; ``bad``: 8 x 25), before the timed load.

``load``: 1, 8 and 32 concurrent clients (``--clients``) for ``--seconds`` each, after a warm-up,
against the naive server and each backend of the server; requests/s, p50/p95/p99 latency, and
PSS idle and after each row's load, with ratios to the naive server's.
``bad``: 64 clients x 50 requests, one in ten malformed (bad JSON, missing or empty fields, wrong
types, top_k out of range, a context over the limit): every good one answered as ``predict``
answers it, every bad one a 4xx, no 5xx, and the server's PSS after the run against after the
warm-up.
``memory``: PSS only, idle and after 200 requests (8 clients x 25), of the naive server, the
server with its defaults and the server with ``serve.workers_per_device=1`` (fp32 PyTorch).
``killed``: 16 clients for 20 s against the server (fp32 PyTorch, defaults but
``serve.timeout=10``); a quarter of the way in one inference worker is SIGKILLed. Every request
must be answered (as ``predict`` answers it) or refused (503/504) within ``serve.timeout`` +
``--margin``; ``/health`` must say that fewer workers answer, then plain ``ok`` again once
LitServe has started the worker anew, and the answers after that must still be ``predict``'s.
Exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_SQUAD = Path(
    os.environ.get("QA_SQUAD_DIR", Path(__file__).resolve().parents[2] / "shared/data/squad")
)
VALIDATION_FILE = SHARED_SQUAD / "validation.json"
STARTUP_S = 300


# -- the naive server ----------------------------------------------------------------------------


class NaiveBody(BaseModel):
    question: str
    context: str
    top_k: int = 1
    id: Any = None


def naive_app(model_dir: str, threads: int | None = None) -> Any:
    """FastAPI, one request -> one forward of its windows in fp32 PyTorch (no batching)."""
    from fastapi import FastAPI

    from qa_lightning.serving.answerer import QuestionAnswerer

    if threads:
        import torch

        torch.set_num_threads(threads)
    answerer = QuestionAnswerer.from_model_dir(model_dir, "cpu", precision="32-true")
    app = FastAPI()

    @app.get("/health")
    def health() -> str:
        return "ok"

    @app.post("/predict")
    def predict(body: NaiveBody) -> dict:
        answers = answerer.answer([body.question], [body.context], body.top_k)[0]
        return {"id": body.id, "answers": [a.as_dict() for a in answers]}

    return app


def run_naive(model_dir: str, port: int, threads: int | None) -> None:
    import uvicorn

    uvicorn.run(naive_app(model_dir, threads), host="127.0.0.1", port=port, log_level="warning")


# -- servers as processes ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Memory:
    """The PSS of a server's processes (bytes) and how many processes there were."""

    pss: int
    processes: int

    @property
    def mib(self) -> float:
        return self.pss / 2**20

    def text(self) -> str:
        return f"{self.mib:.0f} MiB ({self.processes})"


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (``/proc/PID/task/*/children``); processes that exit
    during the walk are left out."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        try:
            children = [
                int(child)
                for task in Path(f"/proc/{pid}/task").iterdir()
                for child in (task / "children").read_text().split()
            ]
        except (OSError, ValueError):
            continue
        found.append(pid)
        todo.extend(children)
    return found


def pss(pid: int) -> int | None:
    """Process ``pid``'s proportional set size in bytes (``None``: it has exited)."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    for line in rollup.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return None


def tree_memory(root: int) -> Memory:
    """The PSS summed over ``root``'s process tree, and the number of its processes."""
    sizes = [size for pid in process_tree(root) if (size := pss(pid)) is not None]
    return Memory(sum(sizes), len(sizes))


def inference_workers(root: int) -> list[int]:
    """The server's inference workers, lowest pid (the first started) first: spawned (one
    worker: ``multiprocessing.spawn``) or the children of its fork server (several: the process
    of its tree running ``multiprocessing.forkserver`` forks every worker)."""
    found = []
    for pid in process_tree(root):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
            parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
            forked = b"multiprocessing.forkserver" in Path(f"/proc/{parent}/cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if forked or b"multiprocessing.spawn" in command:
            found.append(pid)
    return sorted(found)


class Server:
    """A server process on a free port, in a process group of its own; ``memory()`` is the PSS
    of it and its descendants. Leaving the ``with`` block (an error too) stops the group."""

    def __init__(self, name: str, command: Sequence[str], log_dir: Path) -> None:
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log = log_dir / f"{name.replace(' ', '_').replace(',', '')}.log"
        run_dir = tempfile.mkdtemp(prefix="qa_serve_load-")  # a run dir of its own
        command = [
            c.replace("{port}", str(self.port)).replace("{run_dir}", run_dir) for c in command
        ]
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def __enter__(self) -> Server:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{self.name} did not start in {STARTUP_S} s")

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM (the server drains), then SIGKILL to whatever of its group is left."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(60)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def memory(self) -> Memory:
        return tree_memory(self.process.pid)


def serve_command(threads: int | None, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "qa_lightning.serve",
        *args,
        *([f"threads={threads}"] if threads else []),
        "device=cpu",
        "serve.port={port}",
        "serve.log_level=warning",
        "hydra.run.dir={run_dir}",
    ]


# -- questions and expected answers --------------------------------------------------------------


def validation_questions(limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` questions of the shared validation file (official SQuAD layout)."""
    if not VALIDATION_FILE.is_file():
        raise SystemExit(
            f"{VALIDATION_FILE} not found: set QA_SQUAD_DIR to the directory of validation.json."
        )
    found = []
    for article in json.loads(VALIDATION_FILE.read_text())["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                found.append(
                    {"id": qa["id"], "question": qa["question"], "context": paragraph["context"]}
                )
    return found[:limit]


def expected_answers(answerer: Any, questions: list[dict[str, Any]]) -> dict[str, tuple]:
    """``predict``'s best answer (text, start, end) of each question asked alone, by id (int8
    answers depend on the other windows of their batch: activations are quantised per batch)."""
    found = [answerer.answer([q["question"]], [q["context"]])[0] for q in questions]
    return {
        q["id"]: (a[0].text, a[0].start, a[0].end) if a else None
        for q, a in zip(questions, found, strict=True)
    }


#: a model to compute ``predict``'s answers with: ("model_dir" or "onnx", path)
Source = tuple[str, str]


def answers_of(source: Source, questions: list[dict[str, Any]]) -> dict[str, tuple]:
    """:func:`expected_answers` of the fp32 PyTorch model of a directory, or of an ONNX file."""
    from transformers.utils import logging as hf_logging

    from qa_lightning.serving.answerer import QuestionAnswerer

    hf_logging.disable_progress_bar()
    kind, path = source
    if kind == "onnx":
        answerer = QuestionAnswerer.from_onnx(path)
    else:
        answerer = QuestionAnswerer.from_model_dir(path, "cpu", precision="32-true")
    return expected_answers(answerer, questions)


def expected_apart(sources: list[Source], questions: list[dict[str, Any]]) -> list[dict]:
    """:func:`answers_of` each source, in a spawned process that exits after: this process then
    maps no model or library pages that would share (and so lower) the servers' PSS."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return [pool.submit(answers_of, source, questions).result() for source in sources]


# -- clients -------------------------------------------------------------------------------------


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    wrong: int = 0
    bad_not_4xx: int = 0
    good: int = 0
    bad: int = 0
    seconds: float = 0.0

    def count(self, status: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1


def check(body: dict[str, Any], expected: tuple | None) -> bool:
    answers = body.get("answers") or []
    got = (answers[0]["answer"], answers[0]["start"], answers[0]["end"]) if answers else None
    return got == expected


async def timed_load(
    url: str,
    questions: list[dict[str, Any]],
    expected: dict[str, tuple],
    clients: int,
    seconds: float,
    warmup: float,
) -> Tally:
    """``clients`` clients, each sending its next question as soon as it has an answer, for
    ``warmup`` + ``seconds``; only the requests that start after the warm-up are counted."""
    import httpx

    tally = Tally()
    order = iter(range(10**9))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    start = time.perf_counter()
    counted_from, stop = start + warmup, start + warmup + seconds
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one_client() -> None:
            while (now := time.perf_counter()) < stop:
                q = questions[next(order) % len(questions)]
                response = await client.post("/predict", json=q)
                latency = time.perf_counter() - now
                if now < counted_from:
                    continue
                tally.count(response.status_code)
                tally.latencies.append(latency)
                if response.status_code != 200 or not check(response.json(), expected[q["id"]]):
                    tally.wrong += 1

        await asyncio.gather(*(one_client() for _ in range(clients)))
    tally.seconds = seconds
    return tally


def bad_bodies() -> list[dict[str, Any]]:
    """httpx keyword arguments of malformed requests, one of each kind."""
    json_header = {"content-type": "application/json"}
    return [
        {"content": b'{"question": "Who?", "context": ', "headers": json_header},
        {"json": {"context": "Some context."}},
        {"json": {"question": "", "context": "Some context."}},
        {"json": {"question": "Who?", "context": 42}},
        {"json": {"question": "Who?", "context": "Some context.", "top_k": 0}},
        {"json": {"question": "Who?", "context": "Some context.", "top_k": "two"}},
        {"json": ["Who?", "Some context."]},
        {"json": {"question": "Who?", "context": "x" * 100_001}},
    ]


async def mixed_load(
    url: str,
    questions: list[dict[str, Any]],
    expected: dict[str, tuple],
    clients: int,
    per_client: int,
    bad_share: float,
    seed: int = 0,
) -> Tally:
    import httpx

    rng = random.Random(seed)
    bad_kinds = bad_bodies()
    plan = [
        [
            ("bad", rng.choice(bad_kinds))
            if rng.random() < bad_share
            else ("good", rng.choice(questions))
            for _ in range(per_client)
        ]
        for _ in range(clients)
    ]
    tally = Tally()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def one_client(requests: list[tuple[str, Any]]) -> None:
            for kind, item in requests:
                started = time.perf_counter()
                if kind == "good":
                    response = await client.post("/predict", json=item)
                    tally.good += 1
                    if response.status_code != 200 or not check(
                        response.json(), expected[item["id"]]
                    ):
                        tally.wrong += 1
                else:
                    response = await client.post("/predict", **item)
                    tally.bad += 1
                    if not 400 <= response.status_code < 500:
                        tally.bad_not_4xx += 1
                tally.count(response.status_code)
                tally.latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(one_client(requests) for requests in plan))
    return tally


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1]
        if len(values) > 1
        else values[0]
    )


# -- load and bad -------------------------------------------------------------------------------

#: the warm-up before a server's idle memory is read: clients x requests each (both workers answer)
WARM_UP = (8, 4)


def warm_up(url: str, questions: list[dict[str, Any]], expected: dict[str, tuple]) -> Tally:
    clients, each = WARM_UP
    return asyncio.run(mixed_load(url, questions, expected, clients, each, 0.0, seed=1))


@dataclass
class Row:
    """One server at one number of clients: the load's tally, and the server's memory idle
    (after the warm-up, before any timed load) and after this row's load."""

    name: str
    clients: int
    tally: Tally
    idle: Memory
    after: Memory


def load_scenario(args: argparse.Namespace) -> None:
    questions = validation_questions(args.questions)
    sources: list[Source] = [("model_dir", args.model_dir)]
    sources += [("onnx", path) for path in (args.onnx_fp32, args.onnx_int8) if path]
    expected = dict(zip(sources, expected_apart(sources, questions), strict=True))
    fp32 = expected[sources[0]]
    runs = [
        ("naive (FastAPI, fp32 PyTorch)", naive_command(args), fp32),
        (
            "server, fp32 PyTorch",
            serve_command(
                args.threads, f"model_dir={args.model_dir}", "precision=32-true", *args.serve
            ),
            fp32,
        ),
    ]
    for label, path in (("fp32 ONNX", args.onnx_fp32), ("int8 ONNX", args.onnx_int8)):
        if path:
            runs.append(
                (
                    f"server, {label}",
                    serve_command(args.threads, f"onnx_path={path}", *args.serve),
                    expected[("onnx", path)],
                )
            )
    rows = []
    for name, command, answers in runs:
        with Server(name, command, args.log_dir) as server:
            warm = warm_up(server.url, questions, answers)
            idle = server.memory()
            print(
                f"{name}: warm-up {len(warm.latencies)} requests ({warm.wrong} wrong), "
                f"PSS idle {idle.text()}",
                flush=True,
            )
            for clients in args.clients:
                tally = asyncio.run(
                    timed_load(server.url, questions, answers, clients, args.seconds, args.warmup)
                )
                rows.append(Row(name, clients, tally, idle, server.memory()))
                print(row_text(rows[-1]), flush=True)
    print_table(rows)


def naive_command(args: argparse.Namespace) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "naive",
        "--model-dir",
        args.model_dir,
        "--port",
        "{port}",
        *(["--threads", str(args.threads)] if args.threads else []),
    ]


def row_text(row: Row) -> str:
    tally = row.tally
    n = len(tally.latencies)
    return (
        f"{row.name:32s} clients={row.clients:3d} requests={n:5d} "
        f"req/s={n / tally.seconds:7.2f} p50={1000 * percentile(tally.latencies, 50):7.1f}ms "
        f"p95={1000 * percentile(tally.latencies, 95):7.1f}ms "
        f"p99={1000 * percentile(tally.latencies, 99):7.1f}ms wrong={tally.wrong} "
        f"pss idle/after={memory_cell(row.idle, row.after)} statuses={tally.statuses}"
    )


def memory_cell(idle: Memory, after: Memory) -> str:
    """``idle / after MiB (processes)`` (both counts when a process was added or lost)."""
    processes = (
        str(idle.processes)
        if idle.processes == after.processes
        else f"{idle.processes}/{after.processes}"
    )
    return f"{idle.mib:.0f} / {after.mib:.0f} ({processes})"


def ratio(value: float, baseline: float | None) -> str:
    return f"{value / baseline:.2f}x" if baseline else "-"


def print_table(rows: list[Row]) -> None:
    naive = {row.clients: row for row in rows if row.name.startswith("naive")}
    print(
        "\n| server | clients | requests/s | vs naive | p50 ms | p95 ms | p99 ms "
        "| PSS idle / after, MiB (processes) | PSS vs naive (idle / after) "
        "| answers differing from predict |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        tally, base = row.tally, naive.get(row.clients)
        rps = len(tally.latencies) / tally.seconds
        base_rps = len(base.tally.latencies) / base.tally.seconds if base else None
        print(
            f"| {row.name} | {row.clients} | {rps:.1f} | {ratio(rps, base_rps)} | "
            f"{1000 * percentile(tally.latencies, 50):.0f} | "
            f"{1000 * percentile(tally.latencies, 95):.0f} | "
            f"{1000 * percentile(tally.latencies, 99):.0f} | "
            f"{memory_cell(row.idle, row.after)} | "
            f"{ratio(row.idle.pss, base and base.idle.pss)} / "
            f"{ratio(row.after.pss, base and base.after.pss)} | "
            f"{tally.wrong} of {len(tally.latencies)} |"
        )


def bad_scenario(args: argparse.Namespace) -> None:
    questions = validation_questions(args.questions)
    if args.onnx_path:
        source: Source = ("onnx", args.onnx_path)
        command = serve_command(args.threads, f"onnx_path={args.onnx_path}", *args.serve)
    else:
        source = ("model_dir", args.model_dir)
        command = serve_command(
            args.threads, f"model_dir={args.model_dir}", "precision=32-true", *args.serve
        )
    [expected] = expected_apart([source], questions)
    with Server("server", command, args.log_dir) as server:
        warm = asyncio.run(mixed_load(server.url, questions, expected, 8, 25, 0.0, seed=1))
        idle = server.memory()
        tally = asyncio.run(
            mixed_load(server.url, questions, expected, args.clients, args.per_client, 0.1)
        )
        after = server.memory()
    fives = sum(n for status, n in tally.statuses.items() if status >= 500)
    print(
        f"warm-up: {len(warm.latencies)} requests, {warm.wrong} wrong\n"
        f"{args.clients} clients x {args.per_client} requests: {tally.good} good, {tally.bad} bad; "
        f"statuses {dict(sorted(tally.statuses.items()))}\n"
        f"good answered differently from predict: {tally.wrong}; bad not 4xx: "
        f"{tally.bad_not_4xx}; 5xx: {fives}\n"
        f"memory (PSS of the server's processes): {idle.text()} after the warm-up, "
        f"{after.text()} after the run ({after.pss / idle.pss:.3f}x)"
    )


# -- memory --------------------------------------------------------------------------------------


def memory_scenario(args: argparse.Namespace) -> None:
    """PSS idle and after ``--requests`` requests of the naive server, the server with its
    defaults and with one worker (fp32 PyTorch, as the load scenario)."""
    questions = validation_questions(args.questions)
    [expected] = expected_apart([("model_dir", args.model_dir)], questions)
    fp32 = (f"model_dir={args.model_dir}", "precision=32-true")
    one = "serve.workers_per_device=1"
    runs = [
        ("naive (FastAPI, fp32 PyTorch)", naive_command(args)),
        ("server, defaults", serve_command(args.threads, *fp32, *args.serve)),
        (f"server, {one}", serve_command(args.threads, *fp32, one, *args.serve)),
    ]
    per_client = -(-args.requests // args.clients)
    rows = []
    for name, command in runs:
        with Server(name, command, args.log_dir) as server:
            warm_up(server.url, questions, expected)
            idle = server.memory()
            workers = len(inference_workers(server.process.pid))
            tally = asyncio.run(
                mixed_load(server.url, questions, expected, args.clients, per_client, 0.0, seed=2)
            )
            after = server.memory()
        if not name.startswith("naive"):
            name = f"{name} ({workers} worker{'s' * (workers != 1)})"
        rows.append((name, idle, after, tally))
        print(
            f"{name}: PSS idle {idle.text()}, after {len(tally.latencies)} requests "
            f"{after.text()}, {tally.wrong} answers differing from predict",
            flush=True,
        )
    _, naive_idle, naive_after, _ = rows[0]
    requests = len(rows[0][3].latencies)
    print(
        f"\n| server | processes | PSS idle, MiB | vs naive | PSS after {requests} requests, MiB "
        "| vs naive | answers differing from predict |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, idle, after, tally in rows:
        processes = memory_cell(idle, after).rpartition(" ")[2].strip("()")
        print(
            f"| {name} | {processes} | {idle.mib:.0f} | {ratio(idle.pss, naive_idle.pss)} | "
            f"{after.mib:.0f} | {ratio(after.pss, naive_after.pss)} | "
            f"{tally.wrong} of {len(tally.latencies)} |"
        )


# -- a worker killed -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """A request of the ``killed`` scenario: when it started (s from the load's start), how long
    it took, its status (or the client's error) and whether its answer was ``predict``'s."""

    started: float
    latency: float
    status: int | str
    right: bool


@dataclass
class KilledRun:
    sent: list[Sent] = field(default_factory=list)
    #: (s from the load's start, what /health said: its text, or the status and text)
    health: list[tuple[float, str]] = field(default_factory=list)
    workers: list[int] = field(default_factory=list)
    killed: int = 0
    killed_at: float = float("nan")

    def first_health(self, after: float, plain_ok: bool) -> tuple[float, str] | None:
        """The first /health reading after ``after`` that is (or is not) a plain ``ok``."""
        return next(
            ((t, text) for t, text in self.health if t > after and (text == "ok") == plain_ok),
            None,
        )


async def killed_load(
    server: Server,
    questions: list[dict[str, Any]],
    expected: dict[str, tuple],
    args: argparse.Namespace,
) -> KilledRun:
    """``args.clients`` clients for ``args.seconds``; after a quarter of it the oldest inference
    worker is SIGKILLed; /health is read every 0.1 s until it says plain ``ok`` again (at most
    ``args.recovery`` s after the load)."""
    import httpx

    run = KilledRun()
    order = iter(range(10**9))
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    start = time.perf_counter()
    stop = start + args.seconds
    client_timeout = args.timeout + args.margin + 30  # a hung request ends, counted as hung

    async def one_client(client: httpx.AsyncClient) -> None:
        while (now := time.perf_counter()) < stop:
            q = questions[next(order) % len(questions)]
            try:
                response = await client.post("/predict", json=q)
                status: int | str = response.status_code
                right = status == 200 and check(response.json(), expected[q["id"]])
            except httpx.HTTPError as error:
                status, right = type(error).__name__, False
            run.sent.append(Sent(now - start, time.perf_counter() - now, status, right))

    async def kill() -> None:
        await asyncio.sleep(args.seconds / 4)
        run.workers = inference_workers(server.process.pid)
        if not run.workers:
            raise SystemExit(f"no inference worker found among {process_tree(server.process.pid)}")
        run.killed = run.workers[0]
        os.kill(run.killed, signal.SIGKILL)
        run.killed_at = time.perf_counter() - start

    async def watch(probe: httpx.AsyncClient) -> None:
        deadline = stop + args.recovery
        while (now := time.perf_counter()) < deadline:
            try:
                response = await probe.get("/health")
                text = response.text
                if response.status_code != 200:
                    text = f"{response.status_code} {text}"
            except httpx.HTTPError as error:
                text = f"error {type(error).__name__}"
            run.health.append((now - start, text))
            down = run.first_health(run.killed_at, plain_ok=False) if run.killed else None
            if down and run.first_health(down[0], plain_ok=True) and now >= stop:
                return
            await asyncio.sleep(0.1)

    async with (
        httpx.AsyncClient(base_url=server.url, timeout=client_timeout, limits=limits) as client,
        httpx.AsyncClient(base_url=server.url, timeout=5) as probe,
    ):
        await asyncio.gather(
            *(one_client(client) for _ in range(args.clients)), kill(), watch(probe)
        )
    return run


def killed_scenario(args: argparse.Namespace) -> int:
    questions = validation_questions(args.questions)
    [expected] = expected_apart([("model_dir", args.model_dir)], questions)
    command = serve_command(
        args.threads,
        f"model_dir={args.model_dir}",
        "precision=32-true",
        f"serve.timeout={args.timeout}",
        *args.serve,
    )
    with Server("server, a worker killed", command, args.log_dir) as server:
        warm = warm_up(server.url, questions, expected)
        run = asyncio.run(killed_load(server, questions, expected, args))
        down = run.first_health(run.killed_at, plain_ok=False)
        up = run.first_health(down[0], plain_ok=True) if down else None
        workers_now = inference_workers(server.process.pid)
        check_after = (
            asyncio.run(mixed_load(server.url, questions, expected, 8, 4, 0.0, seed=3))
            if up
            else None
        )
    return killed_report(args, warm, run, down, up, workers_now, check_after)


def killed_report(
    args: argparse.Namespace,
    warm: Tally,
    run: KilledRun,
    down: tuple[float, str] | None,
    up: tuple[float, str] | None,
    workers_now: list[int],
    check_after: Tally | None,
) -> int:
    """Print what the ``killed`` scenario saw; 1 if a request hung, an answer differed from
    ``predict``'s, a status was neither 200, 503 nor 504, or the worker did not come back."""
    limit = args.timeout + args.margin
    statuses = dict(Counter(sent.status for sent in run.sent))
    answered = [s for s in run.sent if s.status == 200]
    wrong = sum(not s.right for s in answered)
    hung = [s for s in run.sent if s.latency > limit or isinstance(s.status, str)]
    other = {k: n for k, n in statuses.items() if k not in (200, 503, 504)}
    longest = max(run.sent, key=lambda s: s.latency, default=Sent(0.0, 0.0, "none sent", False))
    restarted = sorted(set(workers_now) - set(run.workers))
    print(
        f"warm-up: {len(warm.latencies)} requests, {warm.wrong} wrong\n"
        f"inference workers {run.workers}; SIGKILL to {run.killed} at {run.killed_at:.1f} s\n"
        f"{args.clients} clients for {args.seconds:g} s: {len(run.sent)} requests, "
        f"{len(answered) - wrong} answered as predict, {wrong} answered differently; "
        f"statuses {statuses}\n"
        f"longest request: {longest.latency:.2f} s (started at {longest.started:.1f} s, status "
        f"{longest.status}); limit serve.timeout {args.timeout:g} + {args.margin:g} s: "
        + ("none hung" if not hung else f"{len(hung)} HUNG")
    )
    if down:
        print(f"/health not plain ok {down[0] - run.killed_at:.2f} s after the kill: {down[1]!r}")
    else:
        print("/health: said plain ok all along")
    if up:
        after = [s for s in run.sent if s.started >= up[0]]
        print(
            f"/health plain ok again {up[0] - run.killed_at:.2f} s after the kill; workers now "
            f"{workers_now} (restarted: {restarted or 'none'})\n"
            f"after recovery: {len(after)} requests of the load, "
            f"{sum(s.status == 200 and not s.right for s in after)} answered differently, "
            f"statuses {dict(Counter(s.status for s in after))}; then 8 clients x 4: "
            f"{check_after.wrong if check_after else '-'} of "
            f"{len(check_after.latencies) if check_after else 0} wrong or not 200"
        )
    else:
        print(f"/health NOT plain ok again within {args.recovery:g} s after the load")
    failures = [
        *(["a request hung"] if hung else []),
        *(["an answer differed from predict's"] if wrong else []),
        *([f"statuses other than 200/503/504: {other}"] if other else []),
        *(["the killed worker did not come back"] if not (up and restarted) else []),
        *(["a request after recovery failed"] if check_after and check_after.wrong else []),
    ]
    print("FAILED: " + "; ".join(failures) if failures else "passed")
    return 1 if failures else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = p.add_subparsers(dest="command", required=True)
    naive = commands.add_parser("naive", help="run the naive server (used by the others)")
    naive.add_argument("--model-dir", required=True)
    naive.add_argument("--port", type=int, required=True)
    naive.add_argument("--threads", type=int, default=None)
    questions = {"load": 500, "bad": 500, "memory": 200, "killed": 200}
    for name, default in questions.items():
        c = commands.add_parser(name)
        c.add_argument("--threads", type=int, default=None, help="torch threads of both servers")
        c.add_argument("--model-dir", required=True, help="a Hugging Face directory (hf_model/)")
        c.add_argument("--questions", type=int, default=default, help="validation questions used")
        c.add_argument("--log-dir", type=Path, default=Path("/tmp/qa_serve_load"))
        c.add_argument(
            "--serve",
            nargs="*",
            default=[],
            help="extra overrides for the server, e.g. serve.max_batch_size=32",
        )
    load = commands.choices["load"]
    load.add_argument("--onnx-fp32", default=None)
    load.add_argument("--onnx-int8", default=None)
    load.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    load.add_argument("--seconds", type=float, default=20.0)
    load.add_argument("--warmup", type=float, default=3.0)
    bad = commands.choices["bad"]
    bad.add_argument("--onnx-path", default=None, help="serve this ONNX export instead")
    bad.add_argument("--clients", type=int, default=64)
    bad.add_argument("--per-client", type=int, default=50)
    memory = commands.choices["memory"]
    memory.add_argument("--requests", type=int, default=200, help="requests after the idle read")
    memory.add_argument("--clients", type=int, default=8, help="clients sending them")
    killed = commands.choices["killed"]
    killed.add_argument("--clients", type=int, default=16)
    killed.add_argument("--seconds", type=float, default=20.0, help="the load; the kill at 1/4")
    killed.add_argument("--timeout", type=float, default=10.0, help="the server's serve.timeout")
    killed.add_argument(
        "--margin", type=float, default=5.0, help="s past --timeout a request may take"
    )
    killed.add_argument(
        "--recovery", type=float, default=120.0, help="s after the load /health may take to recover"
    )
    args = p.parse_args()
    if args.command == "naive":
        run_naive(args.model_dir, args.port, args.threads)
        return
    # SIGTERM unwinds too (as Ctrl-C does): every server started is stopped on the way out
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.command == "load":
        load_scenario(args)
    elif args.command == "bad":
        bad_scenario(args)
    elif args.command == "memory":
        memory_scenario(args)
    else:
        sys.exit(killed_scenario(args))


if __name__ == "__main__":
    main()
