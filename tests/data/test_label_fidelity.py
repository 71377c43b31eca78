"""Label fidelity on the shared SQuAD train file (skipped when the shared files are absent)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT


def test_labelled_tokens_cover_the_answer_for_995_permille_of_windows(shared_squad) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "benchmarks/label_fidelity.py",
            "--file",
            str(shared_squad / "train.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    labelled = int(re.search(r"labelled windows: (\d+)", result.stdout).group(1))
    rate = float(re.search(r"label fidelity: ([\d.]+)%", result.stdout).group(1))
    assert labelled > 7000  # 7,235 questions, a few answers in two windows
    assert rate >= 99.5
