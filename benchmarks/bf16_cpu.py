"""fp32 vs bf16 autocast on the CPU (what ``trainer=cpu_bf16``, precision ``bf16-mixed``, does):
MiniLM inference and training steps on batches of windows of ~176 tokens (the mean window length of
the shared train sample), and whether this CPU computes in bf16 natively.

Without native bf16 (no ``avx512_bf16`` / ``amx_bf16`` flag) PyTorch emulates it and bf16 is
expected to be slower than fp32. fp32 and bf16 take turns step by step.

    python benchmarks/bf16_cpu.py [--tokens 176] [--batch-size 8] [--steps 5] [--quick]
"""

from __future__ import annotations

import contextlib

import common
import torch

from qa_lightning.core.hardware import cpu_supports_bf16
from qa_lightning.model import load_qa_model

TARGET_NATIVE = 1.0  # bf16 should at least match fp32 where the CPU has native bf16


def make_batch(vocab_size: int, batch_size: int, tokens: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, vocab_size, (batch_size, tokens), generator=generator)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "token_type_ids": (torch.arange(tokens) > 20).long().expand(batch_size, -1),
        "start_positions": torch.randint(21, tokens, (batch_size,), generator=generator),
        "end_positions": torch.randint(21, tokens, (batch_size,), generator=generator),
    }


def precision(bf16: bool) -> contextlib.AbstractContextManager:
    """What Lightning's ``bf16-mixed`` does on the CPU: autocast to bf16 (weights stay fp32)."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def infer(model, batch, bf16: bool) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if not k.endswith("_positions")}
    with torch.inference_mode(), precision(bf16):
        return model(**inputs).start_logits.float()


def train(model, optimizer, batch, bf16: bool) -> float:
    with precision(bf16):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--tokens", type=int, default=176)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.steps, args.warmup = 2, 2, 1
    path = common.setup(args)
    native = cpu_supports_bf16()
    model = load_qa_model(path)
    batch = make_batch(model.config.vocab_size, args.batch_size, args.tokens)

    model.eval()
    seconds = {"inference": {False: 0.0, True: 0.0}, "training": {False: 0.0, True: 0.0}}
    logits = {}
    for step in range(args.warmup + args.steps):
        for bf16 in (False, True):
            logits[bf16], elapsed = common.timed(infer, model, batch, bf16)
            seconds["inference"][bf16] += elapsed if step >= args.warmup else 0.0
    difference = (logits[True] - logits[False]).abs().max().item()

    models = {bf16: load_qa_model(path).train() for bf16 in (False, True)}
    optimizers = {bf16: torch.optim.AdamW(m.parameters(), lr=2e-5) for bf16, m in models.items()}
    for step in range(args.warmup + args.steps):
        for bf16 in (False, True):
            _, elapsed = common.timed(train, models[bf16], optimizers[bf16], batch, bf16)
            seconds["training"][bf16] += elapsed if step >= args.warmup else 0.0

    windows = args.steps * args.batch_size
    rows = []
    for stage, times in seconds.items():
        ratio = times[False] / times[True]
        target = TARGET_NATIVE if native else None
        rows.append(
            [
                stage,
                windows / times[False],
                windows / times[True],
                ratio,
                f">= {TARGET_NATIVE:g}x" if native else "n/a (no native bf16)",
                common.verdict(ratio, target),
            ]
        )
    common.print_table(
        f"bf16 autocast vs fp32 on CPU, {common.model_name(path)}, batches of {args.batch_size} x "
        f"{args.tokens} tokens, {args.steps} timed steps each ({common.machine()})",
        ["stage", "fp32 windows/s", "bf16 windows/s", "bf16 speed-up", "target", ""],
        rows,
    )
    print(f"max |start logit difference| bf16 vs fp32 (inference): {difference:.3f}")
    if native:
        print("This CPU has native bf16 (avx512_bf16 / amx_bf16): trainer=cpu_bf16 can pay off.")
    else:
        print(
            "This CPU has NO native bf16 (no avx512_bf16 / amx_bf16 flag in /proc/cpuinfo): "
            "bf16 is emulated here; use trainer=cpu (fp32), not trainer=cpu_bf16."
        )


if __name__ == "__main__":
    main()
