"""GPU training throughput and model FLOP utilisation (MFU): windows padded to 384 (reference
recipe) vs dynamic padding, alone and with length grouping, on the shared train sample.

Mixed precision (bf16 where supported, else fp16 with a grad scaler), SDPA attention, fused AdamW,
optionally ``torch.compile``. Configurations take turns step by step (with ``--compile`` one after
another, each compiling afresh: interleaved compiled copies of a model share dynamo's caches).
Warm-up and timing default to an epoch each: the GPU builds kernels' plans and allocator blocks once
per window length, and a dynamic configuration's first steps at new lengths ran ~2.5x slower than
warm ones on an H100, so a few warm-up steps understate dynamic padding. MFU counts the
FLOPs of the padded batch (6 x matmul parameters x tokens + 12 x layers x hidden x length^2 per
window) against the GPU's dense bf16/fp16 peak (``--peak-tflops`` to set it). Without CUDA it says
so and exits 0. The default models need the Hugging Face hub; offline, pass directories, and with
``--from-scratch`` a directory needs only config.json and tokenizer files (random weights: the same
speed as pretrained ones):

    python benchmarks/gpu_throughput.py [--model distilbert-base-uncased --model bert-base-cased]
        [--precision bf16-mixed|16-mixed|32] [--compile] [--from-scratch] [--batch-size 32]
        [--steps N] [--warmup N] [--quick]
"""

from __future__ import annotations

import contextlib
import tempfile

import common
import torch
from torch.utils.data import DataLoader

from qa_lightning.core.tokenizer import load_tokenizer
from qa_lightning.data import SquadDataModule
from qa_lightning.data.loading import load_local_file
from qa_lightning.model import load_qa_model
from qa_lightning.model.logits import AUTOCAST_DTYPES

DEFAULT_MODELS = ("distilbert-base-uncased", "bert-base-cased")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions")
BASELINE = "padded to 384 (reference)"
#: Dense bf16/fp16 tensor-core peaks (TFLOP/s), first match of the device name wins.
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def step_flops(model: torch.nn.Module, batch_size: int, length: int) -> float:
    """Training FLOPs of one padded batch: matmul weights (6 per parameter and token) plus
    attention scores and values (12 x layers x hidden x length^2 per window)."""
    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or config.n_layers
    hidden = getattr(config, "hidden_size", None) or config.dim
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    tokens = batch_size * length
    return 6 * matmul_params * tokens + 12 * layers * hidden * length**2 * batch_size


def loaders(path: str, args, cache_dir: str) -> dict[str, DataLoader]:
    """Reference (padded by ``datasets.map``, shuffled) and the data module's train loaders."""
    from baseline import map_features

    examples = load_local_file(common.TRAIN_FILE).shuffle(seed=42).select(range(args.samples))
    features = map_features(load_tokenizer(path), examples, train=True)
    columns = [c for c in MODEL_INPUTS if c in features.column_names]
    result = {
        BASELINE: DataLoader(
            features.with_format("torch", columns=columns),
            args.batch_size,
            shuffle=True,
            num_workers=args.workers,
            pin_memory=args.device == "cuda",
            persistent_workers=args.workers > 0,
        )
    }
    for name, group in (("dynamic padding", False), ("dynamic + length grouping", True)):
        datamodule = SquadDataModule(
            path,
            dataset_name=None,
            train_file=str(common.TRAIN_FILE),
            validation_file=str(common.VALIDATION_FILE),
            train_samples=args.samples,
            validation_samples=8,
            batch_size=args.batch_size,
            group_by_length=group,
            num_workers=args.workers,
            cache_dir=cache_dir,
        )
        datamodule.setup("fit")
        result[name] = datamodule.train_dataloader()
    return result


class Run:
    """One configuration: its model, fused AdamW, grad scaler (fp16) and batches."""

    def __init__(self, path: str, loader: DataLoader, args, device: torch.device) -> None:
        self.model = load_qa_model(
            path, args.from_scratch, config_overrides={"attn_implementation": "sdpa"}
        )
        self.model.to(device).train()
        if args.compile:
            self.model.forward = torch.compile(self.model.forward)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=2e-5, weight_decay=0.01, fused=not args.no_fused
        )
        dtype = AUTOCAST_DTYPES.get(args.precision)  # "32": None
        self.autocast = (
            torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "16-mixed")
        self.loader = loader
        self.batches = common.forever(loader)
        self.device = device

    def step(self) -> tuple[int, int]:
        """One training step; returns the batch's windows and padded length."""
        batch = next(self.batches)
        batch = {k: batch[k].to(self.device, non_blocking=True) for k in MODEL_INPUTS if k in batch}
        with self.autocast:
            loss = self.model(**batch).loss
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        return batch["input_ids"].shape


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(path: str, args, device: torch.device) -> list[list]:
    """Rows of the table for one model."""
    with tempfile.TemporaryDirectory() as cache_dir:
        runs = {
            name: Run(path, loader, args, device)
            for name, loader in loaders(path, args, cache_dir).items()
        }
        epoch = max(len(run.loader) for run in runs.values())
        warmup = epoch if args.warmup is None else args.warmup
        total = warmup + (epoch if args.steps is None else args.steps)
        if args.compile:
            order = [(name, step) for name in runs for step in range(total)]
        else:
            order = [(name, step) for step in range(total) for name in runs]
        seconds = dict.fromkeys(runs, 0.0)
        windows = dict.fromkeys(runs, 0)
        flops = dict.fromkeys(runs, 0.0)
        for name, step in order:
            if args.compile and step == 0:
                torch.compiler.reset()
            synchronize(device)
            (count, length), elapsed = common.timed(runs[name].step)
            if step >= warmup:
                seconds[name] += elapsed
                windows[name] += count
                flops[name] += step_flops(runs[name].model, count, length)
    peak = args.peak_tflops or peak_tflops(device)
    baseline = windows[BASELINE] / seconds[BASELINE]
    rows = []
    for name in runs:
        rate = windows[name] / seconds[name]
        mfu = f"{100 * flops[name] / seconds[name] / (peak * 1e12):.1f}%" if peak else "n/a"
        rows.append([common.model_name(path), name, rate, rate / baseline, mfu])
    return rows


def steps(count: int | None) -> str:
    return "an epoch's" if count is None else str(count)


def main() -> None:
    parser = common.parser(__doc__, model=False)
    parser.add_argument("--model", action="append", help="name or directory (repeatable)")
    parser.add_argument("--precision", choices=["bf16-mixed", "16-mixed", "32"], default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model's forward")
    parser.add_argument("--from-scratch", action="store_true", help="random weights, from config")
    parser.add_argument("--no-fused", action="store_true", help="plain (not fused) AdamW")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=2000, help="questions of the train file")
    parser.add_argument("--steps", type=int, default=None, help="timed (default: an epoch)")
    parser.add_argument("--warmup", type=int, default=None, help="steps (default: an epoch)")
    parser.add_argument("--workers", type=int, default=4, help="data loader workers")
    parser.add_argument("--peak-tflops", type=float, default=None, help="for MFU")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to check the script")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("\nGPU throughput: not run, no CUDA GPU on this machine (run it on a GPU machine).")
        return
    if args.quick:
        args.samples, args.steps, args.warmup = min(args.samples, 200), 3, 2
    common.setup(args)
    device = torch.device(args.device)
    if args.precision is None:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        args.precision = "bf16-mixed" if bf16 else ("16-mixed" if device.type == "cuda" else "32")
    rows = []
    for model in args.model or DEFAULT_MODELS:
        rows += measure(model, args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    common.print_table(
        f"GPU training throughput, {name}, {args.precision}, SDPA, "
        f"{'plain' if args.no_fused else 'fused'} AdamW, compile={args.compile}, "
        f"{'random' if args.from_scratch else 'pretrained'} weights, batch "
        f"{args.batch_size}, max length 384, {args.samples} questions, steps: "
        f"{steps(args.warmup)} warm-up, {steps(args.steps)} timed",
        ["model", "configuration", "windows/s", "vs padded", "MFU"],
        rows,
    )


if __name__ == "__main__":
    main()
