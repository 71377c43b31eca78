"""SQuAD v1.1 exact match and F1 (official normalisation, max over reference answers)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torchmetrics.functional.text import squad


def squad_v1_scores(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """``{"em": ..., "f1": ...}`` in percent over the questions of ``references``.

    A question without a prediction counts as answered with ``""``.
    """
    if not references:
        raise ValueError("cannot score an empty set of questions")
    preds = [{"id": qid, "prediction_text": predictions.get(qid, "")} for qid in references]
    target = [
        {"id": qid, "answers": {"text": list(texts), "answer_start": [0] * len(texts)}}
        for qid, texts in references.items()
    ]
    scores = squad(preds, target)
    return {"em": float(scores["exact_match"]), "f1": float(scores["f1"])}
