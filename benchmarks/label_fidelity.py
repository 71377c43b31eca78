"""Label fidelity: the context text under each labelled training window equals its answer.

For every training window whose labels are not CLS, the context text that the labelled tokens
cover (through their offsets) is compared with the answer text after SQuAD normalisation.

    python benchmarks/label_fidelity.py [--file ../shared/data/squad/train.json] [--model PATH]
"""

from __future__ import annotations

import argparse

import numpy as np
from torchmetrics.functional.text.squad import _normalize_text

from qa_lightning.core.config import minilm_path
from qa_lightning.core.tokenizer import load_tokenizer
from qa_lightning.data.loading import load_local_file
from qa_lightning.data.windowing import make_train_windows


def label_fidelity(
    file: str, model: str, max_length: int = 384, stride: int = 128
) -> tuple[int, int, list[tuple[str, str]]]:
    """``(labelled windows, windows whose covered text matches, examples of mismatches)``."""
    tokenizer = load_tokenizer(model)
    examples = load_local_file(file)
    questions, contexts, answers = (
        examples["question"][:],
        examples["context"][:],
        examples["answers"][:],
    )
    windows = make_train_windows(tokenizer, questions, contexts, answers, max_length, stride)
    encoded = tokenizer(
        [q.lstrip() for q in questions],
        contexts,
        truncation="only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    labelled = matched = 0
    mismatches = []
    for w, (start, end) in enumerate(
        zip(windows["start_positions"], windows["end_positions"], strict=True)
    ):
        if start == end == 0:
            continue
        labelled += 1
        example = windows["example_index"][w]
        offsets = np.asarray(encoded["offset_mapping"][w])
        covered = contexts[example][offsets[start][0] : offsets[end][1]]
        answer = answers[example]["text"][0]
        if _normalize_text(covered) == _normalize_text(answer):
            matched += 1
        elif len(mismatches) < 10:
            mismatches.append((answer, covered))
    return labelled, matched, mismatches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", default="../shared/data/squad/train.json")
    parser.add_argument("--model", default=None, help="tokenizer (default: MiniLM, offline)")
    args = parser.parse_args()
    labelled, matched, mismatches = label_fidelity(args.file, args.model or minilm_path())
    print(f"file: {args.file}")
    print(f"labelled windows: {labelled}, covered text == answer (normalised): {matched}")
    print(f"label fidelity: {100 * matched / labelled:.2f}%")
    for answer, covered in mismatches:
        print(f"  answer {answer!r} <- covered {covered!r}")


if __name__ == "__main__":
    main()
