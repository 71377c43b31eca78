"""Summary of a sweep (Hydra multirun): ``python -m qa_lightning.report SWEEP_DIR``.

Writes to the sweep dir ``summary.csv`` and ``summary.md`` (one row per run: a column per swept
key, best EM/F1, epoch of the best, wall time, status; best F1 first) and ``summary.png`` (best F1
against one numeric swept key, one line per value of the next, one panel per value of the rest).
The swept keys are the overrides (``<run>/.hydra/overrides.yaml``) whose values differ between
runs, whatever they are: ``model.lr`` x ``data.stride``, ``model.warmup_ratio`` x
``data.batch_size``, ``model=...`` ... A run without ``metrics.json`` (it raised, or was killed) is
listed as failed, with the last line of its ``error.txt`` when there is one.

:class:`SweepSummary`, a Hydra callback (``conf/hydra/default.yaml``), writes the summary after
every job of a multirun and at its end, and each failed job's traceback to ``<run>/error.txt``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import traceback
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import OverrideParseException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from qa_lightning.core.integrity import is_disk_full, write_atomic

log = logging.getLogger(__name__)
_ABSENT = object()  # an override that a run does not have

SCORE_COLUMNS = ["f1", "em", "best_epoch", "wall_time_s"]
SUMMARY_FILES = ("summary.csv", "summary.md", "summary.png")
#: More panels than this: one panel, a line per combination of the keys not on the x axis.
MAX_PANELS = 9


def find_runs(sweep_dir: str | Path) -> list[Path]:
    """The run dirs of a sweep: those holding Hydra's ``.hydra/overrides.yaml``."""
    sweep_dir = Path(sweep_dir)
    runs = {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    runs.discard(sweep_dir)
    return sorted(runs, key=lambda p: _natural_key(p.relative_to(sweep_dir).as_posix()))


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``{key: value}`` of Hydra overrides, typed by Hydra's parser: ``model.lr=1e-3`` -> 0.001,
    ``data.batch_size=16`` -> 16, ``model=tiny`` -> ``"tiny"``; lists and dicts stay text."""
    parser = OverridesParser.create()
    params: dict[str, Any] = {}
    for text in overrides:
        try:
            (override,) = parser.parse_overrides([text])
        except OverrideParseException:
            key, _, value = text.partition("=")
            params[key.lstrip("+~")] = value
            continue
        key = override.key_or_group + (f"@{override.package}" if override.package else "")
        value = override.value()
        scalar = value is None or isinstance(value, str | int | float)
        params[key] = value if scalar else override.get_value_element_as_str()
    return params


def read_run(run_dir: str | Path, sweep_dir: str | Path | None = None) -> dict[str, Any]:
    """One row of the summary; ``params`` holds the run's overrides as ``{key: value}``, scores
    are ``None`` for a failed run."""
    run_dir = Path(run_dir)
    damaged: list[str] = []  # files of the run that do not parse: named in the row's error
    overrides = _read_yaml(run_dir, ".hydra/overrides.yaml", damaged) or []
    if not isinstance(overrides, list):
        damaged.append(".hydra/overrides.yaml is not a list")
        overrides = []
    overrides = [str(o) for o in overrides]
    row: dict[str, Any] = {
        "run": run_dir.relative_to(sweep_dir).as_posix() if sweep_dir else run_dir.name,
        "status": "failed",
        "f1": None,
        "em": None,
        "best_epoch": None,
        "wall_time_s": None,
        "params": parse_overrides(overrides),
        "overrides": " ".join(overrides),
        "error": "; ".join(damaged),
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


def swept_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The override keys whose values differ between runs (absent counts as a value), in the
    order they first appear."""
    keys = dict.fromkeys(key for row in rows for key in row["params"])
    return [key for key in keys if len({repr(row["params"].get(key, _ABSENT)) for row in rows}) > 1]


def write_report(sweep_dir: str | Path, x: str | None = None) -> list[dict[str, Any]]:
    """Write ``summary.csv``, ``summary.md`` and ``summary.png`` (x axis: the swept key ``x``, by
    default chosen by :func:`plot_data`) to ``sweep_dir``; returns the rows.

    Each file is replaced atomically: jobs of a parallel launcher may write at the same time.
    """
    sweep_dir = Path(sweep_dir)
    rows = summarize(sweep_dir)
    write_atomic(sweep_dir / "summary.csv", to_csv(rows))
    write_atomic(sweep_dir / "summary.md", to_markdown(rows, title=sweep_dir.name))
    try:
        png = plot_png(rows, title=sweep_dir.name, x=x)
    except ImportError:
        log.warning("no summary.png: it needs matplotlib (pip install 'qa-lightning[sweep]')")
    else:
        write_atomic(sweep_dir / "summary.png", png)
    return rows


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """``summary.csv``'s columns: run, status, the swept keys, the scores, overrides, error."""
    return ["run", "status", *swept_keys(rows), *SCORE_COLUMNS, "overrides", "error"]


def to_csv(rows: list[dict[str, Any]]) -> str:
    fields = columns(rows)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        cells = {**row["params"], **{k: v for k, v in row.items() if k != "params"}}
        writer.writerow({k: "" if cells.get(k) is None else cells[k] for k in fields})
    return out.getvalue()


def to_markdown(rows: list[dict[str, Any]], title: str = "") -> str:
    """A table with a column per swept key; the overrides shared by every run are listed above."""
    keys = swept_keys(rows)
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
    header = ["run", *(f"`{key}`" for key in keys), "F1", "EM", "best epoch", "wall time (s)"]
    lines += [
        "",
        "| " + " | ".join([*header, "status"]) + " |",
        "| " + " | ".join(["---"] * (len(keys) + 1) + ["---:"] * 4 + ["---"]) + " |",
    ]
    for row in rows:
        status = row["status"] if not row["error"] else f"{row['status']}: {row['error']}"
        cells = [
            row["run"],
            *(_fmt_value(row["params"].get(key, _ABSENT)) for key in keys),
            _fmt(row["f1"], ".2f"),
            _fmt(row["em"], ".2f"),
            _fmt(row["best_epoch"], "d"),
            _fmt(row["wall_time_s"], ".1f"),
            status.replace("|", "\\|"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_data(rows: list[dict[str, Any]], x: str | None = None) -> dict[str, Any]:
    """What ``summary.png`` draws: best F1 of the finished runs against the swept key ``x``.

    ``x`` defaults to the numeric swept key with the most values (the first one on a tie:
    ``model.lr`` in ``-m model.lr=... data.stride=...``). The next swept key gives one line per
    value, the others one panel per combination of values (at most :data:`MAX_PANELS`, else one
    panel with a line per combination). Without a numeric key the first swept key, or the run
    names, are categories on the x axis. Returns ``{"x", "lines", "panels", "series"}`` with
    ``series[panel][line] = [(x value, f1), ...]``, labels such as ``"data.stride=32"``.
    """
    keys = swept_keys(rows)
    ok = [row for row in rows if row["status"] == "ok"]
    numeric = [key for key in keys if ok and all(_is_number(r["params"].get(key)) for r in ok)]
    if x is not None and x not in keys:
        raise ValueError(f"x={x!r} is not a swept key of this sweep; swept keys: {keys}")
    if x is None and keys:
        x = max(numeric, key=lambda k: len({r["params"][k] for r in ok})) if numeric else keys[0]
    others = [key for key in keys if key != x]
    lines, panels = others[:1], others[1:]
    if _count_values(ok, panels) > MAX_PANELS:
        lines, panels = others, []
    series: dict[str, dict[str, list[tuple[Any, float]]]] = {}
    for row in ok:
        at = row["params"].get(x, _ABSENT) if x is not None else row["run"]
        line = series.setdefault(_label(row, panels), {}).setdefault(_label(row, lines), [])
        line.append((at if _is_number(at) else _fmt_value(at), row["f1"]))
    for panel in series.values():
        for points in panel.values():
            points.sort(key=lambda point: (not _is_number(point[0]), point[0]))
    return {"x": x, "lines": lines, "panels": panels, "series": series}


def plot_png(rows: list[dict[str, Any]], title: str = "", x: str | None = None) -> bytes:
    """:func:`plot_data` as PNG bytes: a panel per combination of the panel keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = plot_data(rows, x)
    series = data["series"] or {"": {}}
    ncols = min(3, len(series))
    nrows = math.ceil(len(series) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(6 * ncols, 4 * nrows), dpi=100, sharey=True, squeeze=False
    )
    for ax in axes.flat[len(series) :]:
        ax.set_visible(False)
    panels = sorted(series.items(), key=lambda item: _natural_key(item[0]))
    for ax, (panel, lines) in zip(axes.flat, panels, strict=False):
        for label, points in sorted(lines.items(), key=lambda item: _natural_key(item[0])):
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        xs = sorted({p[0] for points in lines.values() for p in points}, key=str)
        if xs and all(_is_number(v) for v in xs):
            if min(xs) > 0 and max(xs) >= 10 * min(xs):
                ax.set_xscale("log")
            if len(xs) <= 12:  # ticks at the swept values, as written in the table
                ax.set_xticks(xs, [_fmt_value(v) for v in xs], minor=False)
                ax.minorticks_off()
        if any(lines):
            ax.legend()
        if not lines:
            ax.text(0.5, 0.5, "no finished runs", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(data["x"] or "run")
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel("best validation F1")
        ax.set_title(panel)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"Sweep {title}".strip())
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out.getvalue()


class SweepSummary(Callback):
    """Hydra callback: the sweep summary after every job of a multirun and at its end.

    Hydra's basic launcher records a job that raises as failed and runs the others; the basic
    sweeper then re-raises the first failure after its batch, so ``on_multirun_end`` is not
    reached: the summary written after the last job is the complete one. ``x``: the swept key on
    the plot's x axis (``hydra.callbacks.sweep_summary.x=model.warmup_ratio``; default: see
    :func:`plot_data`).
    """

    def __init__(self, x: str | None = None) -> None:
        self.x = x

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        run_dir = Path(config.hydra.runtime.output_dir)
        if job_return.status == JobStatus.FAILED:
            try:
                job_return.return_value  # noqa: B018 (raises the job's exception)
            except Exception as error:
                text = "".join(traceback.format_exception(error))
                write_atomic(run_dir / "error.txt", text)
                log.error("run %s failed: %s: %s", run_dir, type(error).__name__, error)
        try:
            write_report(config.hydra.sweep.dir, self.x)
        except Exception as error:  # a summary must never stop the sweep
            if not is_disk_full(error):
                log.exception("could not write the sweep summary to %s", config.hydra.sweep.dir)
            else:  # the project's message (write_atomic's) says it all
                log.error("could not write the sweep summary: %s", error)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_report(sweep_dir, self.x)
        failed = sum(r["status"] != "ok" for r in rows)
        log.info(
            "sweep summary: %s (%d runs, %d failed)", sweep_dir / "summary.md", len(rows), failed
        )


def _read_yaml(run_dir: Path, name: str, damaged: list[str]) -> Any:
    """The YAML file ``run_dir/name``; ``None`` when it is absent or does not parse (then
    ``damaged`` gets a line naming it)."""
    path = run_dir / name
    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        damaged.append(f"unreadable {name} ({type(error).__name__})")
        return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _label(row: dict[str, Any], keys: list[str]) -> str:
    """``"data.stride=32, data.batch_size=8"``: the values of ``keys`` in ``row``."""
    return ", ".join(f"{key}={_fmt_value(row['params'].get(key, _ABSENT))}" for key in keys)


def _count_values(rows: list[dict[str, Any]], keys: list[str]) -> int:
    return len({_label(row, keys) for row in rows})


def _fmt_value(value: Any) -> str:
    if value is _ABSENT:
        return ""
    if value is None:
        return "null"
    return format(value, "g") if isinstance(value, float) else str(value)


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
