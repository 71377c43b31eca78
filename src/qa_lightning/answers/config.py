"""The ``postprocess.*`` config: its types and the decoding rule
(:func:`~qa_lightning.answers.decoding.decoding_problem`), checked before any heavy work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig

from qa_lightning.answers.decoding import REFERENCE_DECODING, decoding_problem
from qa_lightning.core.config import check_types, is_finite_number, require
from qa_lightning.core.errors import invalid_config

#: ``postprocess.null_score_diff_threshold`` that applies the validation's ``best_f1_thresh``.
NULL_THRESHOLD_BEST = "best"


@dataclass
class DecodingTypes:
    """The types of ``postprocess.*`` (``conf/postprocess/``); ``null_score_diff_threshold`` is a
    number or ``best``, which a type cannot say (:func:`validate_decoding_config`)."""

    n_best: int = field(metadata={"example": str(REFERENCE_DECODING["n_best"])})
    max_answer_length: int = field(
        metadata={"example": str(REFERENCE_DECODING["max_answer_length"])}
    )


def validate_decoding_config(postprocess: DictConfig) -> None:
    """``postprocess.n_best``, ``postprocess.max_answer_length`` and
    ``postprocess.null_score_diff_threshold`` (a number, or ``best``)."""
    check_types(postprocess, DecodingTypes, "postprocess.")
    if problem := decoding_problem(
        postprocess.n_best, postprocess.max_answer_length, "postprocess."
    ):
        raise invalid_config(problem)
    threshold = postprocess.get("null_score_diff_threshold")
    require(
        threshold == NULL_THRESHOLD_BEST or is_finite_number(threshold),
        "postprocess.null_score_diff_threshold",
        threshold,
        "use a number (e.g. 0.0, the reference) or best (the threshold that maximises F1 "
        "on the validation data, as the official SQuAD v2 script's best_f1_thresh).",
    )
