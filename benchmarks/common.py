"""Shared pieces of the benchmark scripts: data paths, MiniLM, timing and the printed table."""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import lightning.pytorch  # noqa: E402, F401  (sets its loggers' level: quieten them after)
import torch  # noqa: E402
import transformers  # noqa: E402

#: The shared SQuAD v1.1 split (../shared/data/squad, see its README.md); QA_SQUAD_DIR overrides it.
SHARED_SQUAD = Path(
    os.environ.get("QA_SQUAD_DIR", Path(__file__).resolve().parents[2] / "shared/data/squad")
)
TRAIN_FILE = SHARED_SQUAD / "train.json"
VALIDATION_FILE = SHARED_SQUAD / "validation.json"

datasets.disable_progress_bars()
transformers.logging.set_verbosity_error()  # "newly initialised QA head" notes, once per model
transformers.logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning, module="pyarrow")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # lightning vs torch 2.13's pytree
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


def parser(doc: str, model: bool = True) -> argparse.ArgumentParser:
    """Arguments every script takes: ``--quick``, ``--threads`` and (``model``) ``--model``."""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small sizes, to check the script")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    if model:
        p.add_argument("--model", default=None, help="model directory (default: MiniLM, offline)")
    return p


def setup(args: argparse.Namespace) -> str:
    """Check the data files and apply ``--threads``; the model path (default: MiniLM)."""
    for path in (TRAIN_FILE, VALIDATION_FILE):
        if not path.is_file():
            raise SystemExit(
                f"{path} not found: the benchmarks read the shared SQuAD split; set QA_SQUAD_DIR "
                "to the directory holding train.json and validation.json."
            )
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "model", None):
        return args.model
    from qa_lightning.core.config import minilm_path

    return minilm_path()


def forever(loader: Any) -> Iterator[Any]:
    """Batches of a data loader, epoch after epoch (``set_epoch`` on its sampler, or its batch
    sampler's, as Lightning calls it)."""
    for epoch in itertools.count():
        for sampler in (loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
        yield from loader


def model_name(path: str) -> str:
    """``MiniLM-L6-H384`` for the packaged MiniLM, else the directory's name."""
    if "minilm" in path.lower():
        return "MiniLM-L6-H384"
    return Path(path).name or path


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """``(fn(*args), seconds)``."""
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def best_of(repeats: int, fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` run ``repeats`` times: its last result and its fastest time."""
    times = []
    for _ in range(repeats):
        result, seconds = timed(fn)
        times.append(seconds)
    return result, min(times)


def verdict(ratio: float, target: float | None, below: bool = False) -> str:
    """``target met`` / ``BELOW TARGET`` (``below``: smaller is better, e.g. memory)."""
    if target is None:
        return ""
    met = ratio <= target if below else ratio >= target
    return "target met" if met else ("ABOVE TARGET" if below else "BELOW TARGET")


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain-text table under ``title``; floats with 2 decimals (3 below 1)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 1 else f"{value:,.2f}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def machine() -> str:
    """One line on the CPU and the threads torch uses."""
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__} ({capability}), " + (
        f"{torch.get_num_threads()} threads"
    )


def cpu_trainer(precision: str = "32-true") -> lightning.pytorch.Trainer:
    """A quiet one-device CPU ``Trainer`` for ``validate`` (no logger, checkpoints or bars)."""
    return lightning.pytorch.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
