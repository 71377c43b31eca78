"""Every run its own directory; its state in status.json; ``latest``, the last run that finished
(``qa_lightning.runs.run_dir``, the Hydra callback of every entry point)."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from qa_lightning.core.errors import ConfigError
from qa_lightning.runs.run_dir import (
    LATEST,
    STATUS_FILE,
    claim_dir,
    is_main_process,
    new_dir,
    point_latest,
)
from tests.conftest import TINY_OVERRIDES, run_cli

#: A Hydra app on the project's train config (its run dir settings and callbacks) whose task is
#: chosen by $TASK: "ok" writes result.txt (its seed) to the run dir and returns, "raise" fails as
#: a bug does (a traceback), "exit" as the entry points end on a user error (report_errors: exit
#: 2). seed=13 raises too, for a sweep with one failed job.
APP = """
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from qa_lightning.cli import CONFIG_PATH, report_errors
from qa_lightning.core.errors import ConfigError


def bad_input() -> None:
    raise ConfigError("data.stride=999 must be below data.max_length")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg) -> float:
    task = os.environ.get("TASK", "ok")
    if task == "raise" or cfg.seed == 13:
        raise RuntimeError("a bug")
    if task == "exit":
        report_errors(bad_input)
    Path(HydraConfig.get().runtime.output_dir, "result.txt").write_text(str(cfg.seed))
    return 1.0


main()
"""
YEAR = "${now:%Y}"  # a timestamped run dir that two runs started in the same year share


def app(cwd: Path, *overrides: str, task: str = "ok") -> subprocess.Popen:
    (cwd / "app.py").write_text(APP)
    environ = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.Popen(
        [sys.executable, "app.py", *overrides],
        cwd=cwd,
        env={**environ, "TASK": task},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_app(cwd: Path, *overrides: str, task: str = "ok") -> tuple[int, str]:
    """Run :data:`APP`; its exit status and standard error."""
    process = app(cwd, *overrides, task=task)
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / STATUS_FILE).read_text())


def test_one_timestamp_claimed_twice_gives_two_dirs(tmp_path: Path) -> None:
    stamp = tmp_path / "outputs" / "train" / "2026-01-02_03-04-05"
    first, _ = claim_dir(stamp, timestamped=True, resume=None)
    second, _ = claim_dir(stamp, timestamped=True, resume=None)
    assert (first, second) == (stamp, stamp.with_name("2026-01-02_03-04-05_1"))
    assert first.is_dir() and second.is_dir()


def _claim(stamp: Path, barrier, results) -> None:
    barrier.wait()
    results.put(str(new_dir(stamp)))


def test_processes_claiming_one_timestamp_at_once_get_their_own_dirs(tmp_path: Path) -> None:
    stamp = tmp_path / "2026-01-02_03-04-05"
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(6), context.Queue()
    processes = [context.Process(target=_claim, args=(stamp, barrier, results)) for _ in range(6)]
    for process in processes:
        process.start()
    claimed = sorted(results.get(timeout=60) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    expected = [stamp, *(stamp.with_name(f"{stamp.name}_{n}") for n in range(1, 6))]
    assert claimed == sorted(map(str, expected))


def test_two_runs_started_at_one_time_keep_their_own_files(tmp_path: Path) -> None:
    runs = [app(tmp_path, f"hydra.run.dir=runs/{YEAR}", f"seed={seed}") for seed in (1, 2)]
    for process in runs:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    year = str(datetime.now().year)
    dirs = sorted((tmp_path / "runs").glob(f"{year}*"))
    assert [d.name for d in dirs] == [year, f"{year}_1"]
    assert sorted((d / "result.txt").read_text() for d in dirs) == ["1", "2"]
    assert [status(d)["status"] for d in dirs] == ["finished", "finished"]
    assert {status(d)["pid"] for d in dirs} == {p.pid for p in runs}
    assert (tmp_path / "runs" / LATEST).resolve() in dirs


def test_failed_runs_are_marked_and_latest_is_the_last_finished_run(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    assert run_app(tmp_path, f"hydra.run.dir={runs / 'a'}")[0] == 0
    assert run_app(tmp_path, f"hydra.run.dir={runs / 'bug'}", task="raise")[0] == 1
    code, stderr = run_app(tmp_path, f"hydra.run.dir={runs / 'user'}", task="exit")
    assert code == 2 and "error: data.stride=999" in stderr
    assert status(runs / "a")["status"] == "finished"
    assert {k: status(runs / "bug")[k] for k in ("status", "error")} == {
        "status": "failed",
        "error": "RuntimeError: a bug",
    }
    assert {k: status(runs / "user")[k] for k in ("status", "error")} == {
        "status": "failed",
        "error": "data.stride=999 must be below data.max_length",
    }
    assert os.readlink(runs / LATEST) == "a"  # relative: the runs can move together
    assert run_app(tmp_path, f"hydra.run.dir={runs / 'b'}")[0] == 0
    assert os.readlink(runs / LATEST) == "b"
    assert sorted(p.name for p in runs.iterdir()) == ["a", "b", "bug", LATEST, "user"]


def test_a_named_dir_holding_a_run_is_reused_only_by_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert run_app(tmp_path, f"hydra.run.dir={run_dir}", "seed=1")[0] == 0
    first = status(run_dir)
    code, stderr = run_app(tmp_path, f"hydra.run.dir={run_dir}", "seed=2")
    assert code == 2 and "Traceback" not in stderr
    assert stderr == (
        f"error: hydra.run.dir='{run_dir}' already holds a run (finished), whose files a new run "
        "would overwrite: continue that run with resume=true, or give a new directory "
        "(hydra.run.dir=DIR, or leave it out for a new timestamped one).\n"
    )
    assert (run_dir / "result.txt").read_text() == "1" and status(run_dir) == first
    assert run_app(tmp_path, f"hydra.run.dir={run_dir}", "seed=2", "resume=true")[0] == 0
    assert (run_dir / "result.txt").read_text() == "2"
    assert status(run_dir)["status"] == "finished" and status(run_dir)["pid"] != first["pid"]


def test_resume_without_a_named_dir_is_refused_naming_the_last_run(tmp_path: Path) -> None:
    """``resume=true`` in a new timestamped dir can continue nothing: exit 2 before the run,
    naming the key and the last run that finished."""
    runs = tmp_path / "outputs" / "train"
    assert run_app(tmp_path, f"hydra.run.dir={runs / 'a'}")[0] == 0
    code, stderr = run_app(tmp_path, f"hydra.run.dir={runs / YEAR}", "resume=true")
    assert code == 2 and "Traceback" not in stderr
    assert stderr == (
        "error: resume=true continues the run in hydra.run.dir, but hydra.run.dir is not "
        "given: a new timestamped directory holds nothing to continue. Name the run to "
        f"continue: hydra.run.dir=DIR resume=true (hydra.run.dir={runs / 'a'} is the last that "
        "finished).\n"
    )
    assert sorted(p.name for p in runs.iterdir()) == ["a", LATEST]  # no dir made
    # a sweep's jobs may (a requeued SLURM job continues in its dir)
    sweeps = tmp_path / "sweeps"
    assert run_app(tmp_path, "-m", f"hydra.sweep.dir={sweeps / YEAR}", "resume=true")[0] == 0
    assert (sweeps / datetime.now().strftime("%Y") / "0" / "result.txt").is_file()


def test_claim_of_a_named_dir(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert claim_dir(empty, timestamped=False, resume=None) == (empty, False)
    assert claim_dir(tmp_path / "new", timestamped=False, resume=False) == (tmp_path / "new", True)
    (empty / ".hydra").mkdir()  # a run from before status.json
    with pytest.raises(ConfigError, match=r"already holds a run, .*give a new directory") as error:
        claim_dir(empty, timestamped=False, resume=None)
    assert "resume=true" not in str(error.value)  # evaluate, predict ... cannot resume
    assert claim_dir(empty, timestamped=False, resume=True) == (empty, False)


def test_sweeps_started_at_one_time_get_their_own_dirs(tmp_path: Path) -> None:
    year = str(datetime.now().year)
    (tmp_path / "sweeps" / year).mkdir(parents=True)
    (tmp_path / "sweeps" / year / "multirun.yaml").write_text("{}")  # a sweep started first
    code, stderr = run_app(tmp_path, "-m", "seed=1,13", f"hydra.sweep.dir=sweeps/{YEAR}")
    assert code == 1, stderr[-3000:]  # Hydra re-raises the failed job's error after the sweep
    sweep = tmp_path / "sweeps" / f"{year}_1"
    assert sorted(p.name for p in (tmp_path / "sweeps" / year).iterdir()) == ["multirun.yaml"]
    assert (sweep / "0" / "result.txt").read_text() == "1"
    assert [status(sweep / n)["status"] for n in ("0", "1")] == ["finished", "failed"]
    assert status(sweep / "1")["error"] == "RuntimeError: a bug"
    summary = (sweep / "summary.csv").read_text()
    assert "seed" in summary.splitlines()[0] and len(summary.splitlines()) == 3
    assert not (sweep / LATEST).exists()  # latest is for runs, not for a sweep's jobs


def test_latest_is_replaced_whole_and_never_replaces_a_directory(tmp_path: Path, caplog) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    assert point_latest(tmp_path / "a") == tmp_path / LATEST
    assert point_latest(tmp_path / "b") == tmp_path / LATEST
    assert os.readlink(tmp_path / LATEST) == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", LATEST]  # nothing left aside
    other = tmp_path / "other"
    (other / LATEST).mkdir(parents=True)  # a run dir named latest by hand
    (other / "c").mkdir()
    assert point_latest(other / "c") is None
    assert "could not point" in caplog.text and (other / LATEST).is_dir()


def test_only_rank_zero_manages_the_run_dir(monkeypatch) -> None:
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()
    monkeypatch.setenv("LOCAL_RANK", "1")  # a process Lightning's DDP launcher started
    assert not is_main_process()


def test_train_stopped_by_a_user_error_is_marked_failed(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    result = run_cli(
        "qa_lightning.train", *TINY_OVERRIDES, "data.stride=128", f"hydra.run.dir={runs / 'r'}"
    )
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    state = status(runs / "r")
    assert state["status"] == "failed" and line == f"error: {state['error']}"
    assert not (runs / LATEST).exists()
