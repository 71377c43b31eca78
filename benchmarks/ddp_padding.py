"""Padding of the training batches under DDP: mean padded tokens per window over one epoch of all
ranks' batches, for 1 to 8 ranks, with the project's batch sharding (whole length-grouped
batches per rank) and with Lightning's default (its ``DistributedSamplerWrapper`` around the
length-grouped order, which shuffles the windows again), on a sample of the shared train file.

No model and no timing: the batches' windows are counted as the collator pads them (to the
longest window of the batch, rounded up to a multiple of 8). Also says whether every rank's
first batch is its longest (an out-of-memory error then shows at the first step).

    python benchmarks/ddp_padding.py [--samples 2000] [--batch-size 8] [--quick]
"""

from __future__ import annotations

import tempfile

import common
import numpy as np
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

from qa_lightning.data import SquadDataModule
from qa_lightning.data.sampling import (
    DistributedBatchSampler,
    LengthGroupedSampler,
    SeededRandomSampler,
)

MULTIPLE = 8  # data.pad_to_multiple_of
SEED = 42


def padded(lengths: np.ndarray, batches: list[list[int]]) -> list[int]:
    """Padded tokens of each batch."""
    return [-(-int(lengths[b].max()) // MULTIPLE) * MULTIPLE * len(b) for b in batches]


def cut(indices: list[int], batch_size: int) -> list[list[int]]:
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]


def rank_batches(
    lengths: np.ndarray, batch_size: int, ranks: int, how: str
) -> list[list[list[int]]]:
    """Each rank's batches of epoch 0."""
    if how == "lightning default":  # what use_distributed_sampler=True did to the grouped order
        grouped = LengthGroupedSampler(lengths.tolist(), batch_size, seed=SEED)
        return [
            cut(list(DistributedSamplerWrapper(grouped, ranks, r, seed=SEED)), batch_size)
            for r in range(ranks)
        ]
    order = (
        LengthGroupedSampler(lengths.tolist(), batch_size, seed=SEED, longest_first=ranks)
        if how == "grouped"
        else SeededRandomSampler(len(lengths), seed=SEED)
    )
    return [
        list(DistributedBatchSampler(order, batch_size, num_replicas=ranks, rank=r))
        for r in range(ranks)
    ]


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--samples", type=int, default=2000, help="questions of the train file")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per rank and step")
    args = parser.parse_args()
    if args.quick:
        args.samples = 200
    path = common.setup(args)
    with tempfile.TemporaryDirectory() as cache_dir:
        datamodule = SquadDataModule(
            path,
            dataset_name=None,
            train_file=str(common.TRAIN_FILE),
            validation_file=str(common.VALIDATION_FILE),
            train_samples=args.samples,
            validation_samples=8,
            cache_dir=cache_dir,
        )
        datamodule.setup("fit")
        lengths = np.asarray(datamodule.train_windows["length"][:])

    rows, reference = [], {}
    for how in ("grouped", "lightning default", "random"):
        for ranks in (1, 2, 4, 8):
            if how == "lightning default" and ranks == 1:
                continue  # no wrapper on one process: the grouped row
            batches = rank_batches(lengths, args.batch_size, ranks, how)
            tokens = [padded(lengths, mine) for mine in batches]
            windows = sum(len(b) for mine in batches for b in mine)
            per_window = sum(map(sum, tokens)) / windows
            reference.setdefault(how if how != "lightning default" else "grouped", per_window)
            base = reference["grouped" if how == "lightning default" else how]
            longest_first = all(
                max(lengths[mine[0]]) == max(lengths[i] for b in mine for i in b)
                for mine in batches
            )
            rows.append(
                [
                    how,
                    ranks,
                    len(batches[0]),
                    windows,
                    round(per_window, 1),
                    f"{per_window / base - 1:+.1%}",
                    "yes" if longest_first else "no",
                ]
            )
    common.print_table(
        f"Padded tokens per training window, one epoch, all ranks: {len(lengths)} windows of "
        f"{args.samples} questions, batch {args.batch_size} per rank, "
        f"{common.model_name(path)} tokenizer",
        [
            "batches",
            "ranks",
            "steps",
            "windows",
            "tokens/window",
            "vs 1 process",
            "longest batch first on every rank",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
