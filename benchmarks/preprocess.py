"""Tokenisation + windowing of the shared train file (all questions), reference recipe vs project,
and the project's window cache.

Reference: ``prepare_train_features`` with ``padding="max_length"`` through ``datasets.map`` (one
process). Project: the data module's path (question truncation, ``make_train_windows`` through
``datasets.map``, cache key) with one process and with ``--num-proc`` processes; then its cache:
a second call that loads the saved windows vs tokenising again. The examples are loaded once,
before any timing.

    python benchmarks/preprocess.py [--num-proc 2] [--repeats 1] [--quick]
"""

from __future__ import annotations

import tempfile

import common
import datasets
from baseline import map_features

from qa_lightning.core.tokenizer import load_tokenizer
from qa_lightning.data import SquadDataModule
from qa_lightning.data.loading import load_local_file


def project_windows(datamodule: SquadDataModule, examples: datasets.Dataset) -> datasets.Dataset:
    """What ``SquadDataModule.setup`` does to the training examples once they are loaded."""
    return datamodule.windows(examples, train=True)


def data_module(path: str, num_proc: int | None, cache_dir: str | None) -> SquadDataModule:
    datamodule = SquadDataModule(
        path,
        dataset_name=None,
        train_file=str(common.TRAIN_FILE),
        num_proc=num_proc,
        cache_dir=cache_dir,
    )
    datamodule.tokenizer = load_tokenizer(path)
    return datamodule


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each; the fastest counts")
    parser.add_argument("--limit", type=int, default=None, help="questions (default: all)")
    args = parser.parse_args()
    if args.quick:
        args.limit = args.limit or 500
    path = common.setup(args)
    examples = load_local_file(common.TRAIN_FILE)
    if args.limit:
        examples = examples.select(range(args.limit)).flatten_indices()
    tokenizer = load_tokenizer(path)
    single, parallel = data_module(path, None, None), data_module(path, args.num_proc, None)

    reference, reference_s = common.best_of(
        args.repeats, lambda: map_features(tokenizer, examples, train=True)
    )
    windows, single_s = common.best_of(args.repeats, lambda: project_windows(single, examples))
    _, parallel_s = common.best_of(args.repeats, lambda: project_windows(parallel, examples))
    with tempfile.TemporaryDirectory() as cache_dir:
        cached = data_module(path, None, cache_dir)
        _, first_s = common.timed(project_windows, cached, examples)
        hit, hit_s = common.best_of(max(3, args.repeats), lambda: project_windows(cached, examples))
        assert len(hit) == len(windows)

    questions = len(examples)

    def row(name: str, count: int, seconds: float, ratio: float, target: float | None = None):
        target_text = f">= {target:g}x" if target else ""
        return [
            name,
            count,
            seconds,
            questions / seconds,
            ratio,
            target_text,
            common.verdict(ratio, target),
        ]

    rows = [
        row("reference (padded 384), 1 process", len(reference), reference_s, 1.0),
        row("project, 1 process", len(windows), single_s, reference_s / single_s),
        row(
            f"project, num_proc={args.num_proc}", len(windows), parallel_s, reference_s / parallel_s
        ),
        row(
            "project, first call with cache (+ save)", len(windows), first_s, reference_s / first_s
        ),
        row("project, cache hit (second call)", len(hit), hit_s, single_s / hit_s, 20),
    ]
    common.print_table(
        f"Tokenisation + windowing, {questions} questions of {common.TRAIN_FILE.name}, "
        f"{common.model_name(path)} tokenizer ({common.machine()}); cache hit: ratio vs "
        "tokenising again (project, 1 process)",
        ["path", "windows", "seconds", "questions/s", "ratio", "target", ""],
        rows,
    )


if __name__ == "__main__":
    main()
