"""Summary of a sweep (Hydra multirun): ``python -m qa_lightning.report SWEEP_DIR``.

Writes to the sweep dir ``summary.csv`` and ``summary.md`` (one row per run: overrides, best
EM/F1, epoch of the best, wall time, status; best F1 first) and ``summary.png`` (best F1 against
the learning rate, one line per stride). A run without ``metrics.json`` (it raised, or was killed)
is listed as failed, with the last line of its ``error.txt`` when there is one.

:class:`SweepSummary`, a Hydra callback (``conf/hydra/default.yaml``), writes the summary after
every job of a multirun and at its end, and each failed job's traceback to ``<run>/error.txt``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger(__name__)

COLUMNS = [
    "run",
    "status",
    "f1",
    "em",
    "best_epoch",
    "wall_time_s",
    "lr",
    "stride",
    "overrides",
    "error",
]
SUMMARY_FILES = ("summary.csv", "summary.md", "summary.png")


def find_runs(sweep_dir: str | Path) -> list[Path]:
    """The run dirs of a sweep: those holding Hydra's ``.hydra/overrides.yaml``."""
    sweep_dir = Path(sweep_dir)
    runs = {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    runs.discard(sweep_dir)
    return sorted(runs, key=lambda p: _natural_key(p.relative_to(sweep_dir).as_posix()))


def read_run(run_dir: str | Path, sweep_dir: str | Path | None = None) -> dict[str, Any]:
    """One row of the summary (see :data:`COLUMNS`); numbers are ``None`` for a failed run."""
    run_dir = Path(run_dir)
    overrides = _read_yaml(run_dir / ".hydra" / "overrides.yaml") or []
    config = _read_yaml(run_dir / "config_resolved.yaml") or _read_yaml(
        run_dir / ".hydra" / "config.yaml"
    )
    row: dict[str, Any] = {
        "run": run_dir.relative_to(sweep_dir).as_posix() if sweep_dir else run_dir.name,
        "status": "failed",
        "f1": None,
        "em": None,
        "best_epoch": None,
        "wall_time_s": None,
        "lr": _number(_select(config, "model", "lr")),
        "stride": _number(_select(config, "data", "stride")),
        "overrides": " ".join(str(o) for o in overrides),
        "error": "",
    }
    metrics_file = run_dir / "metrics.json"
    try:
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        row["error"] = f"unreadable metrics.json ({type(error).__name__})"
        return row
    if metrics is not None and not isinstance(metrics, dict):
        row["error"] = "metrics.json is not a JSON object"
        return row
    # training runs keep their best epoch's scores under "best"; evaluation runs theirs on top
    best = (metrics or {}).get("best", metrics or {})
    best = best if isinstance(best, dict) else {}
    f1, em, epoch = _number(best.get("f1")), _number(best.get("em")), best.get("epoch", 0)
    if f1 is not None and em is not None and isinstance(epoch, int) and epoch >= 0:
        row.update(
            status="ok",
            f1=f1,
            em=em,
            best_epoch=best.get("epoch"),
            wall_time_s=_number(metrics.get("wall_time_s")),
        )
    else:
        error_file = run_dir / "error.txt"
        if error_file.is_file():
            try:
                text = error_file.read_text(errors="replace")
            except OSError as error:
                text = f"unreadable error.txt ({error.strerror})"
            lines = [line for line in text.splitlines() if line.strip()]
            row["error"] = lines[-1][:300] if lines else ""
        elif metrics:
            row["error"] = "metrics.json holds no validation score"
        else:
            row["error"] = "no metrics.json (crashed, killed or still running)"
    return row


def summarize(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """A row per run, finished runs by best F1 (highest first), then failed runs."""
    rows = [read_run(run, sweep_dir) for run in find_runs(sweep_dir)]
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: -r["f1"])
    return ok + [r for r in rows if r["status"] != "ok"]


def write_report(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Write ``summary.csv``, ``summary.md`` and ``summary.png`` to ``sweep_dir``; returns the rows.

    Each file is replaced atomically: jobs of a parallel launcher may write at the same time.
    """
    sweep_dir = Path(sweep_dir)
    rows = summarize(sweep_dir)
    _write_atomic(sweep_dir / "summary.csv", to_csv(rows).encode())
    _write_atomic(sweep_dir / "summary.md", to_markdown(rows, title=sweep_dir.name).encode())
    try:
        png = plot_png(rows, title=sweep_dir.name)
    except ImportError:
        log.warning("no summary.png: it needs matplotlib (pip install 'qa-lightning[sweep]')")
    else:
        _write_atomic(sweep_dir / "summary.png", png)
    return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if row[k] is None else row[k] for k in COLUMNS} for row in rows)
    return out.getvalue()


def to_markdown(rows: list[dict[str, Any]], title: str = "") -> str:
    """A table whose overrides column keeps what differs between runs; the rest is listed above."""
    split = [row["overrides"].split() for row in rows]
    common = set.intersection(*map(set, split)) if split else set()
    failed = sum(row["status"] != "ok" for row in rows)
    lines = [
        f"# Sweep {title}".rstrip(),
        "",
        f"{len(rows)} runs, {len(rows) - failed} ok, {failed} failed; best F1 first.",
    ]
    if common:
        shared = " ".join(o for o in split[0] if o in common)
        lines.append(f"Overrides of every run: `{shared}`")
    lines += [
        "",
        "| run | overrides | F1 | EM | best epoch | wall time (s) | status |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row, overrides in zip(rows, split, strict=True):
        varying = " ".join(o for o in overrides if o not in common)
        status = row["status"] if not row["error"] else f"{row['status']}: {row['error']}"
        cells = [
            row["run"],
            f"`{varying}`" if varying else "",
            _fmt(row["f1"], ".2f"),
            _fmt(row["em"], ".2f"),
            _fmt(row["best_epoch"], "d"),
            _fmt(row["wall_time_s"], ".1f"),
            status.replace("|", "\\|"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_png(rows: list[dict[str, Any]], title: str = "") -> bytes:
    """Best F1 against the learning rate, one line per stride, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r["status"] == "ok" and r["lr"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    strides = sorted({r["stride"] for r in points}, key=lambda s: (s is None, s))
    for stride in strides:
        line = sorted((r["lr"], r["f1"]) for r in points if r["stride"] == stride)
        label = f"stride {stride:g}" if stride is not None else "stride ?"
        ax.plot([lr for lr, _ in line], [f1 for _, f1 in line], marker="o", label=label)
    if points:
        lrs = {r["lr"] for r in points}
        if len(lrs) > 1 and min(lrs) > 0:
            ax.set_xscale("log")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("learning rate (model.lr)")
    ax.set_ylabel("best validation F1")
    ax.set_title(f"Sweep {title}".strip())
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out.getvalue()


class SweepSummary(Callback):
    """Hydra callback: the sweep summary after every job of a multirun and at its end.

    Hydra's basic launcher records a job that raises as failed and runs the others; the basic
    sweeper then re-raises the first failure after its batch, so ``on_multirun_end`` is not
    reached: the summary written after the last job is the complete one.
    """

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        run_dir = Path(config.hydra.runtime.output_dir)
        if job_return.status == JobStatus.FAILED:
            try:
                job_return.return_value  # noqa: B018 (raises the job's exception)
            except Exception as error:
                text = "".join(traceback.format_exception(error))
                (run_dir / "error.txt").write_text(text)
                log.error("run %s failed: %s: %s", run_dir, type(error).__name__, error)
        try:
            write_report(config.hydra.sweep.dir)
        except Exception:  # a summary must never stop the sweep
            log.exception("could not write the sweep summary to %s", config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_report(sweep_dir)
        failed = sum(r["status"] != "ok" for r in rows)
        log.info(
            "sweep summary: %s (%d runs, %d failed)", sweep_dir / "summary.md", len(rows), failed
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qa_lightning.report",
        description="Summarise the runs of a sweep dir into summary.csv, summary.md, summary.png.",
    )
    parser.add_argument("sweep_dir", type=Path, help="e.g. outputs/train/multirun/2026-01-01_12-00")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        what = "is not a directory" if args.sweep_dir.exists() else "does not exist"
        print(
            f"error: sweep dir '{args.sweep_dir}' {what}; pass the sweep dir of a multirun, e.g. "
            "outputs/train/multirun/<date>",
            file=sys.stderr,
        )
        return 2
    if not find_runs(args.sweep_dir):
        print(
            f"error: no runs in {args.sweep_dir} (run dirs hold .hydra/overrides.yaml); pass the "
            "sweep dir of a multirun, e.g. outputs/train/multirun/<date>",
            file=sys.stderr,
        )
        return 2
    try:
        rows = write_report(args.sweep_dir)
    except OSError as error:
        print(
            f"error: cannot write the summary to {args.sweep_dir} ({error.strerror or error}"
            f"{f': {error.filename}' if error.filename else ''}); free disk space or make the "
            "sweep dir writable, then run again.",
            file=sys.stderr,
        )
        return 2
    print(to_markdown(rows, title=args.sweep_dir.name), end="")
    written = [args.sweep_dir / name for name in SUMMARY_FILES]
    print(f"wrote {', '.join(str(path) for path in written if path.is_file())}")
    return 0


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        return None


def _select(config: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(config, dict):
            return None
        config = config.get(key)
    return config


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _natural_key(text: str) -> list[Any]:
    """``2`` before ``10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
