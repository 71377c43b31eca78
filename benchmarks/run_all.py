"""Run every benchmark, each in its own process, printing their tables (``make bench``).

    python benchmarks/run_all.py [--quick] [--threads N] [--only train_throughput eval_throughput]

Full sizes on a 2-core CPU take roughly half an hour; --quick checks every script in minutes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = (
    "preprocess",
    "train_throughput",
    "eval_throughput",
    "bf16_cpu",
    "memory",
    "gpu_throughput",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the scripts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    args = parser.parse_args()
    passed = ["--quick"] * args.quick + (["--threads", str(args.threads)] if args.threads else [])
    failed = []
    for name in args.only:
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, str(HERE / f"{name}.py"), *passed])
        print(f"({name}: {time.perf_counter() - start:.0f} s, exit code {code})", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        sys.exit(f"\nfailed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
