"""Peak resident memory (RSS) of a whole training run against its number of steps, split by phase.

Each run is ``qa_lightning.train`` (the real entry point's ``train()``, every default callback and
TensorBoard) in a child process of its own, on the shared train file replicated ``--copies``
times with distinct ids (written to a temporary directory, as each run's dir and window cache),
scored on the shared validation file once, at the last step (``trainer.val_check_interval``).
A thread in the child reads its ``VmRSS`` from ``/proc/self/status`` every 50 ms; a callback
names the phase each sample falls in:

- ``setup``: reading and tokenising the files (window cache written), loading the model;
- ``training``: the training steps (and checkpoints: ``last.ckpt`` every 500 steps);
- ``validation``: the sanity check and the validation of all questions;
- ``export``: after ``fit``: ``hf_model/`` exported from the best checkpoint, ``metrics.json``.

The child's ``VmHWM`` (the kernel's own peak) is printed beside the sampled peak as a check.

    python benchmarks/train_memory.py --model tiny --steps 250 1000 4000
    python benchmarks/train_memory.py --steps 50 200                     # MiniLM
    python benchmarks/train_memory.py --model tiny --copies 12 --steps 300
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common
from lightning.pytorch.callbacks import Callback

PHASES = ("setup", "training", "validation", "export")
#: The phase the sampler thread attributes its samples to (set by :class:`Phases`).
current = {"phase": "setup"}


def rss_kib(field: str = "VmRSS") -> int:
    """This process's ``field`` of ``/proc/self/status``, in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class Sampler(threading.Thread):
    """Samples RSS every ``interval`` seconds; keeps each phase's peak and sample count."""

    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peaks = {phase: 0 for phase in PHASES}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            phase = current["phase"]
            self.peaks[phase] = max(self.peaks[phase], rss_kib())
            time.sleep(self.interval)


class Phases(Callback):
    """Sets the sampled phase from Lightning's hooks."""

    def on_fit_start(self, trainer, pl_module) -> None:
        current["phase"] = "training"

    def on_validation_start(self, trainer, pl_module) -> None:
        current["phase"] = "validation"

    def on_validation_end(self, trainer, pl_module) -> None:
        current["phase"] = "training"

    def on_fit_end(self, trainer, pl_module) -> None:
        current["phase"] = "export"


def child(overrides: list[str], output_dir: str, cache_dir: str) -> None:
    """One training run in this process; prints its peaks (GiB) and metrics as one json line."""
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from qa_lightning.train import train

    sampler = Sampler()
    sampler.start()
    with initialize_config_module("qa_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir, cfg.paths.cache_dir = output_dir, cache_dir
        cfg.callbacks.memory_phases = {"_target_": "__main__.Phases"}
        del cfg.hydra
    start = time.perf_counter()
    metrics = train(cfg)
    wall = time.perf_counter() - start
    sampler.stopped.set()
    sampler.join()
    gb = {phase: kib / 1024**2 for phase, kib in sampler.peaks.items()}  # GiB
    result = {
        "peaks_gb": gb,
        "vmhwm_gb": rss_kib("VmHWM") / 1024**2,
        "steps": metrics["global_step"],
        "train_questions": metrics["train_questions"],
        "train_windows": metrics["train_windows"],
        "f1": metrics["final"]["f1"],
        "wall_s": wall,
        "precision": cfg.trainer.precision,
    }
    print(json.dumps(result))


def run(args: argparse.Namespace, train_file: Path, tmp: Path, steps: int) -> dict:
    """A child training run of ``steps`` steps; its result."""
    model = {"tiny": "model=tiny", "minilm": "model=minilm"}[args.model]
    overrides = [
        model,
        "data=local",
        f"data.train_file={train_file}",
        f"data.validation_file={common.VALIDATION_FILE}",
        f"data.batch_size={args.batch_size}",
        f"trainer={args.trainer}",
        f"++trainer.max_steps={steps}",
        "trainer.max_epochs=1000",  # max_steps ends the run
        f"++trainer.val_check_interval={steps}",
        "++trainer.check_val_every_n_epoch=null",
        "callbacks.progress_bar.refresh_rate=0",
        *args.override,
    ]
    run_dir = tmp / f"run-{args.model}-{steps}"
    command = [
        sys.executable,
        __file__,
        "--child",
        json.dumps(overrides),
        str(run_dir),
        str(run_dir / "cache"),  # each run tokenises afresh
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = common.parser(__doc__, model=False)
    parser.add_argument("--model", choices=["tiny", "minilm"], default="minilm")
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--copies", type=int, default=1, help="replicas of the shared train file")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--trainer", default="default", help="trainer config (cpu: fp32)")
    parser.add_argument("--override", nargs="*", default=[], help="more train overrides")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        overrides, output_dir, cache_dir = args.child
        child(json.loads(overrides), output_dir, cache_dir)
        return
    if args.quick:
        args.model, args.steps = "tiny", [20]
    common.setup(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / f"train_x{args.copies}.json"
        from memory import replicate

        questions = replicate(common.TRAIN_FILE, args.copies, train_file)
        for steps in args.steps:
            result = run(args, train_file, Path(tmp), steps)
            peaks = result["peaks_gb"]
            rows.append(
                [
                    steps,
                    result["precision"],
                    *(peaks[phase] for phase in PHASES),
                    max(peaks.values()),
                    result["vmhwm_gb"],
                    round(result["wall_s"]),
                ]
            )
    common.print_table(
        f"Peak RSS (GiB) of a training run by phase: {args.model}, {questions} train questions "
        f"({args.copies}x {common.TRAIN_FILE.name}), validation {common.VALIDATION_FILE.name}, "
        f"batch {args.batch_size}, trainer={args.trainer} ({common.machine()})",
        ["steps", "precision", *PHASES, "peak", "VmHWM", "wall s"],
        rows,
    )


if __name__ == "__main__":
    main()
