"""Peak memory of tokenising a 10x replicated copy of the shared train file (~72k questions,
distinct ids): the project's data module vs the reference recipe, each in its own process.

The replicated file is written to a temporary directory. Project: ``SquadDataModule.setup("fit")``
(train and validation windows, window cache on, as in the default config). Reference: the same
examples through ``prepare_train_features`` / ``prepare_validation_features`` with
``padding="max_length"`` and ``datasets.map``. Peak RSS is the child's ``ru_maxrss``.

    python benchmarks/memory.py [--copies 10] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import common

TARGET_GB = 3.0


def replicate(source: Path, copies: int, target: Path) -> int:
    """Write ``copies`` copies of a SQuAD json file's articles with distinct question ids."""
    content = json.loads(source.read_text(encoding="utf-8"))
    articles = []
    for copy in range(copies):
        for article in content["data"]:
            paragraphs = [
                {
                    "context": p["context"],
                    "qas": [{**qa, "id": f"{qa['id']}-{copy}"} for qa in p["qas"]],
                }
                for p in article["paragraphs"]
            ]
            articles.append({"title": article["title"], "paragraphs": paragraphs})
    target.write_text(json.dumps({"version": content.get("version"), "data": articles}))
    return sum(len(p["qas"]) for a in articles for p in a["paragraphs"])


def child(kind: str, train_file: str, cache_dir: str, model: str) -> None:
    """Tokenise in this process; print the number of train and validation windows as json."""
    if kind == "project":
        from qa_lightning.data import SquadDataModule

        datamodule = SquadDataModule(
            model,
            dataset_name=None,
            train_file=train_file,
            validation_file=str(common.VALIDATION_FILE),
            cache_dir=cache_dir,
        )
        datamodule.setup("fit")
        counts = [len(datamodule.train_windows), len(datamodule.val_windows)]
    else:
        from baseline import map_features

        from qa_lightning.core.tokenizer import load_tokenizer
        from qa_lightning.data.loading import load_local_file

        tokenizer = load_tokenizer(model)
        train = map_features(tokenizer, load_local_file(train_file), train=True)
        validation = map_features(tokenizer, load_local_file(common.VALIDATION_FILE), train=False)
        counts = [len(train), len(validation)]
    print(json.dumps(counts))


def peak_rss(kind: str, train_file: Path, cache_dir: Path, model: str) -> tuple[float, list[int]]:
    """Peak RSS in GB of a child process doing ``kind``'s tokenisation, and its window counts."""
    command = [sys.executable, __file__, "--child", kind, str(train_file), str(cache_dir), model]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{kind} child failed ({os.waitstatus_to_exitcode(status)})")
    return usage.ru_maxrss / 1024**2, json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        common.setup(args)
        child(*args.child)
        return
    if args.quick:
        args.copies = 2
    path = common.setup(args)
    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / f"train_x{args.copies}.json"
        questions = replicate(common.TRAIN_FILE, args.copies, train_file)
        project_gb, project_counts = peak_rss("project", train_file, Path(tmp) / "cache", path)
        reference_gb, reference_counts = peak_rss("reference", train_file, Path(tmp), path)
    ratio = project_gb / reference_gb
    common.print_table(
        f"Peak memory (RSS) tokenising {questions} train questions ({args.copies}x "
        f"{common.TRAIN_FILE.name}) + {common.VALIDATION_FILE.name}, {common.model_name(path)} "
        "tokenizer, one process each",
        ["path", "train windows", "validation windows", "peak RSS, GB", "target", ""],
        [
            ["reference (padded 384, datasets.map)", *reference_counts, reference_gb, "", ""],
            [
                "project (SquadDataModule.setup, cache on)",
                *project_counts,
                project_gb,
                f"< {TARGET_GB:g} GB",
                common.verdict(project_gb, TARGET_GB, below=True),
            ],
            ["project / reference", "", "", ratio, "", ""],
        ],
    )


if __name__ == "__main__":
    main()
