"""Load test of the HTTP server (``python -m qa_lightning.serve``) against a naive server.

The naive server is what a user would otherwise write: FastAPI + uvicorn, one request -> one fp32
PyTorch forward of its windows, no batching (``naive`` below, the same model and answering code).
Clients (httpx, asyncio) send the shared split's validation questions for a fixed time; every
answer is checked against the answer ``predict`` gives that question with the same model.

    python benchmarks/serve_load.py load --model-dir RUN/hf_model \\
        --onnx-fp32 EXPORT/onnx_model/model.onnx --onnx-int8 EXPORT/onnx_int8_model/model.onnx
    python benchmarks/serve_load.py bad --model-dir RUN/hf_model   # 64 x 50, 10% bad requests

``load``: 1, 8 and 32 concurrent clients (``--clients``) for ``--seconds`` each, after a warm-up,
against the naive server and each backend of the server; requests/s and p50/p95/p99 latency.
``bad``: 64 clients x 50 requests, one in ten malformed (bad JSON, missing or empty fields, wrong
types, top_k out of range, a context over the limit): every good one answered as ``predict``
answers it, every bad one a 4xx, no 5xx, and the server's resident memory (all its processes)
after the run against after the warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
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


class Server:
    """A server process on a free port; ``rss()`` is the resident memory of it and its
    children."""

    def __init__(self, name: str, command: Sequence[str], log_dir: Path) -> None:
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log = log_dir / f"{name.replace(' ', '_')}.log"
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
        import httpx

        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise SystemExit(f"{self.name} did not start in {STARTUP_S} s")

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)

    def rss(self) -> int:
        """Bytes resident in the server's process tree."""
        pids, total = [self.process.pid], 0
        while pids:
            pid = pids.pop()
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                total += int(status.split("VmRSS:")[1].split()[0]) * 1024
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except (OSError, IndexError):
                continue
            pids.extend(int(child) for child in children)
        return total


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


# -- the two scenarios ---------------------------------------------------------------------------


def load_scenario(args: argparse.Namespace) -> None:
    from qa_lightning.serving.answerer import QuestionAnswerer

    questions = validation_questions(args.questions)
    fp32 = QuestionAnswerer.from_model_dir(args.model_dir, "cpu", precision="32-true")
    expected_fp32 = expected_answers(fp32, questions)
    del fp32
    runs = [("naive (FastAPI, fp32 PyTorch)", naive_command(args), expected_fp32)]
    runs.append(
        (
            "server, fp32 PyTorch",
            serve_command(
                args.threads, f"model_dir={args.model_dir}", "precision=32-true", *args.serve
            ),
            expected_fp32,
        )
    )
    for label, path in (("fp32 ONNX", args.onnx_fp32), ("int8 ONNX", args.onnx_int8)):
        if path:
            expected = expected_answers(QuestionAnswerer.from_onnx(path), questions)
            runs.append(
                (
                    f"server, {label}",
                    serve_command(args.threads, f"onnx_path={path}", *args.serve),
                    expected,
                )
            )
    rows = []
    for name, command, expected in runs:
        with Server(name, command, args.log_dir) as server:
            for clients in args.clients:
                tally = asyncio.run(
                    timed_load(server.url, questions, expected, clients, args.seconds, args.warmup)
                )
                rows.append((name, clients, tally))
                print(row_text(name, clients, tally), flush=True)
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


def row_text(name: str, clients: int, tally: Tally) -> str:
    n = len(tally.latencies)
    return (
        f"{name:32s} clients={clients:3d} requests={n:5d} "
        f"req/s={n / tally.seconds:7.2f} p50={1000 * percentile(tally.latencies, 50):7.1f}ms "
        f"p95={1000 * percentile(tally.latencies, 95):7.1f}ms "
        f"p99={1000 * percentile(tally.latencies, 99):7.1f}ms wrong={tally.wrong} "
        f"statuses={tally.statuses}"
    )


def print_table(rows: list[tuple[str, int, Tally]]) -> None:
    naive = {c: len(t.latencies) / t.seconds for name, c, t in rows if name.startswith("naive")}
    print(
        "\n| server | clients | requests/s | vs naive | p50 ms | p95 ms | p99 ms "
        "| answers differing from predict |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, clients, tally in rows:
        rps = len(tally.latencies) / tally.seconds
        ratio = rps / naive[clients] if naive.get(clients) else float("nan")
        print(
            f"| {name} | {clients} | {rps:.1f} | {ratio:.2f}x | "
            f"{1000 * percentile(tally.latencies, 50):.0f} | "
            f"{1000 * percentile(tally.latencies, 95):.0f} | "
            f"{1000 * percentile(tally.latencies, 99):.0f} | "
            f"{tally.wrong} of {len(tally.latencies)} |"
        )


def bad_scenario(args: argparse.Namespace) -> None:
    from qa_lightning.serving.answerer import QuestionAnswerer

    questions = validation_questions(args.questions)
    if args.onnx_path:
        answerer = QuestionAnswerer.from_onnx(args.onnx_path)
        command = serve_command(args.threads, f"onnx_path={args.onnx_path}", *args.serve)
    else:
        answerer = QuestionAnswerer.from_model_dir(args.model_dir, "cpu", precision="32-true")
        command = serve_command(
            args.threads, f"model_dir={args.model_dir}", "precision=32-true", *args.serve
        )
    expected = expected_answers(answerer, questions)
    del answerer
    with Server("server", command, args.log_dir) as server:
        warm = asyncio.run(mixed_load(server.url, questions, expected, 8, 25, 0.0, seed=1))
        rss_warm = server.rss()
        tally = asyncio.run(
            mixed_load(server.url, questions, expected, args.clients, args.per_client, 0.1)
        )
        rss_after = server.rss()
    fives = sum(n for status, n in tally.statuses.items() if status >= 500)
    print(
        f"warm-up: {len(warm.latencies)} requests, {warm.wrong} wrong\n"
        f"{args.clients} clients x {args.per_client} requests: {tally.good} good, {tally.bad} bad; "
        f"statuses {dict(sorted(tally.statuses.items()))}\n"
        f"good answered differently from predict: {tally.wrong}; bad not 4xx: "
        f"{tally.bad_not_4xx}; 5xx: {fives}\n"
        f"resident memory: {rss_warm / 2**20:.0f} MiB after warm-up, "
        f"{rss_after / 2**20:.0f} MiB after the run ({rss_after / rss_warm:.3f}x)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = p.add_subparsers(dest="command", required=True)
    naive = commands.add_parser("naive", help="run the naive server (used by load)")
    naive.add_argument("--model-dir", required=True)
    naive.add_argument("--port", type=int, required=True)
    naive.add_argument("--threads", type=int, default=None)
    for name in ("load", "bad"):
        c = commands.add_parser(name)
        c.add_argument("--threads", type=int, default=None, help="torch threads of both servers")
        c.add_argument("--model-dir", required=True, help="a Hugging Face directory (hf_model/)")
        c.add_argument("--questions", type=int, default=500, help="validation questions used")
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
    args = p.parse_args()
    if args.command == "naive":
        run_naive(args.model_dir, args.port, args.threads)
    elif args.command == "load":
        load_scenario(args)
    else:
        bad_scenario(args)


if __name__ == "__main__":
    main()
