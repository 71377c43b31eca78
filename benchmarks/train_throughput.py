"""Training throughput of MiniLM on CPU: padded windows (reference recipe) vs dynamic padding,
alone and with length-grouped batches, on the same 2,000-question sample of the shared train file.

Train mode (dropout on), loss + backward + fused AdamW step (the project's default, and the
reference's: ``Trainer``'s default optimizer is ``adamw_torch_fused`` from torch 2.8), fp32,
batches of 8; a step's time includes fetching and collating its batch. The configurations take
turns step by step (after warm-up steps), so that changes in machine load hit them alike.
"tokens/window" counts padding: over the timed steps, and over a whole epoch of each loader (to
judge whether the timed steps were typical).

With ``--epoch`` each configuration is timed for as many steps as an epoch has batches (after the
warm-up steps), so that the timed windows have an epoch's length mix (~30 min on 2 cores).

    python benchmarks/train_throughput.py [--steps 30 | --epoch] [--warmup 3] [--quick]
"""

from __future__ import annotations

import tempfile

import common
import numpy as np
import torch
from baseline import map_features
from torch.utils.data import DataLoader

from qa_lightning.core.tokenizer import load_tokenizer
from qa_lightning.data import SquadDataModule
from qa_lightning.data.loading import load_local_file
from qa_lightning.model import load_qa_model

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions")
BASELINE = "padded to 384 (reference)"
TARGETS = {"dynamic padding": 1.5, "dynamic + length grouping": 3.0}


def epoch_tokens_per_window(loader: DataLoader) -> float:
    """Mean padded length of a window over one epoch of ``loader``'s batches (no collation)."""
    lengths = np.array([len(ids) for ids in loader.dataset.with_format(None)["input_ids"]])
    multiple = getattr(loader.collate_fn, "pad_to_multiple_of", None) or 1
    padded = sum(
        -(-lengths[indices].max() // multiple) * multiple * len(indices)
        for indices in loader.batch_sampler
    )
    return padded / len(lengths)


def project_loaders(
    model: str, samples: int, batch_size: int, cache_dir: str
) -> dict[str, DataLoader]:
    """The data module's train loaders, without and with length grouping (windows cached once)."""
    loaders = {}
    for name, group in (("dynamic padding", False), ("dynamic + length grouping", True)):
        datamodule = SquadDataModule(
            model,
            dataset_name=None,
            train_file=str(common.TRAIN_FILE),
            validation_file=str(common.VALIDATION_FILE),
            train_samples=samples,
            validation_samples=8,
            batch_size=batch_size,
            group_by_length=group,
            cache_dir=cache_dir,
        )
        datamodule.setup("fit")
        loaders[name] = datamodule.train_dataloader()
    return loaders


def baseline_loader(tokenizer, samples: int, batch_size: int) -> DataLoader:
    """Reference recipe: the same sample, windows padded to 384 by ``datasets.map``, shuffled."""
    examples = load_local_file(common.TRAIN_FILE).shuffle(seed=42).select(range(samples))
    features = map_features(tokenizer, examples, train=True)
    columns = [c for c in MODEL_INPUTS if c in features.column_names]
    return DataLoader(features.with_format("torch", columns=columns), batch_size, shuffle=True)


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--samples", type=int, default=2000, help="questions of the train file")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--epoch", action="store_true", help="time an epoch's number of steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    if args.quick:
        args.samples, args.steps, args.warmup = 200, 4, 1
    path = common.setup(args)
    torch.manual_seed(42)

    with tempfile.TemporaryDirectory() as cache_dir:
        loaders = {
            BASELINE: baseline_loader(load_tokenizer(path), args.samples, args.batch_size),
            **project_loaders(path, args.samples, args.batch_size, cache_dir),
        }
        if args.epoch:
            args.steps = len(loaders[BASELINE])
        seconds, windows, tokens = measure(path, loaders, args.warmup, args.steps)
        counts = {name: len(loader.dataset) for name, loader in loaders.items()}
        epoch_tokens = {name: epoch_tokens_per_window(loader) for name, loader in loaders.items()}

    baseline = windows[BASELINE] / seconds[BASELINE]
    rows = []
    for name in loaders:
        rate = windows[name] / seconds[name]
        rows.append(
            [
                name,
                counts[name],
                round(tokens[name] / windows[name]),
                round(epoch_tokens[name]),
                rate,
                rate / baseline,
                TARGETS.get(name, ""),
                common.verdict(rate / baseline, TARGETS.get(name)),
            ]
        )
    common.print_table(
        f"Training throughput, {common.model_name(path)} fp32 train mode + AdamW, "
        f"batch {args.batch_size}, {args.samples} questions, {args.steps} timed steps each "
        f"({common.machine()})",
        [
            "configuration",
            "windows",
            "tokens/window timed",
            "tokens/window epoch",
            "windows/s",
            "vs padded",
            "target",
            "",
        ],
        rows,
    )


def measure(
    path: str, loaders: dict[str, DataLoader], warmup: int, steps: int
) -> tuple[dict[str, float], dict[str, int], dict[str, int]]:
    """Seconds, windows and tokens (padding included) of ``steps`` timed training steps per
    loader, each with its own model and optimizer; the loaders take turns step by step."""
    runs = {}
    for name, loader in loaders.items():
        model = load_qa_model(path).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01, fused=True)
        runs[name] = (model, optimizer, common.forever(loader))
    seconds = dict.fromkeys(loaders, 0.0)
    windows = dict.fromkeys(loaders, 0)
    tokens = dict.fromkeys(loaders, 0)
    for step in range(warmup + steps):
        for name, (model, optimizer, batches) in runs.items():
            batch, elapsed = common.timed(train_step, model, optimizer, batches)
            if step >= warmup:
                seconds[name] += elapsed
                windows[name] += len(batch["input_ids"])
                tokens[name] += batch["input_ids"].numel()
    return seconds, windows, tokens


def train_step(model, optimizer, batches) -> dict[str, torch.Tensor]:
    """Next batch (collation included), loss, backward, AdamW step."""
    batch = next(batches)
    loss = model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss.item()
    return batch


if __name__ == "__main__":
    main()
