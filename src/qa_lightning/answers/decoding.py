"""The decoding settings' reference values (``utils_qa.py``'s) and their check: what a config
needs of decoding without importing the tensor code of :mod:`.postprocess`."""

from __future__ import annotations

from qa_lightning.core.errors import Problem

#: ``utils_qa.py``'s decoding: the best starts and ends paired per window, the longest answer.
REFERENCE_DECODING = {"n_best": 20, "max_answer_length": 30}


def decoding_problem(n_best: int, max_answer_length: int, prefix: str = "") -> Problem | None:
    """The first of ``n_best`` and ``max_answer_length`` (keys ``prefix + name``) that is not
    > 0, else ``None``."""
    for name, value in (("n_best", n_best), ("max_answer_length", max_answer_length)):
        if value <= 0:
            return f"{prefix}{name}", value, f"must be > 0 (reference: {REFERENCE_DECODING[name]})."
    return None
