"""Summary of a sweep (Hydra multirun): ``python -m qa_lightning.report SWEEP_DIR [--x KEY]``.

The command writes ``summary.csv``, ``summary.md`` and ``summary.png`` to the sweep dir and prints
the table; what they hold is :mod:`qa_lightning.runs.sweep_report`'s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qa_lightning.core.errors import ResourceError
from qa_lightning.runs.sweep_report import (
    SUMMARY_FILES,
    find_runs,
    summarize,
    swept_keys,
    to_markdown,
    write_report,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qa_lightning.report",
        description="Summarise the runs of a sweep dir into summary.csv, summary.md, summary.png.",
    )
    parser.add_argument("sweep_dir", type=Path, help="e.g. outputs/train/multirun/2026-01-01_12-00")
    parser.add_argument(
        "--x", help="the swept key on the plot's x axis (default: the numeric one with most values)"
    )
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        what = "is not a directory" if args.sweep_dir.exists() else "does not exist"
        print(
            f"error: sweep dir '{args.sweep_dir}' {what}; pass the sweep dir of a multirun, e.g. "
            "outputs/train/multirun/<date>",
            file=sys.stderr,
        )
        return 2
    if not find_runs(args.sweep_dir):
        print(
            f"error: no runs in {args.sweep_dir} (run dirs hold .hydra/overrides.yaml); pass the "
            "sweep dir of a multirun, e.g. outputs/train/multirun/<date>",
            file=sys.stderr,
        )
        return 2
    keys = swept_keys(summarize(args.sweep_dir))
    if args.x is not None and args.x not in keys:
        print(
            f"error: --x {args.x} is not a swept key of {args.sweep_dir}; use one of {keys}",
            file=sys.stderr,
        )
        return 2
    try:
        rows = write_report(args.sweep_dir, args.x)
    except ResourceError as error:  # a full disk
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(
            f"error: cannot write the summary to {args.sweep_dir} ({error.strerror or error}"
            f"{f': {error.filename}' if error.filename else ''}); free disk space or make the "
            "sweep dir writable, then run again.",
            file=sys.stderr,
        )
        return 2
    print(to_markdown(rows, title=args.sweep_dir.name), end="")
    written = [args.sweep_dir / name for name in SUMMARY_FILES]
    print(f"wrote {', '.join(str(path) for path in written if path.is_file())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
