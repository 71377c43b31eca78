"""The reference recipe (transformers ``examples/pytorch/question-answering``), re-implemented
for side-by-side measurement: ``prepare_train_features`` / ``prepare_validation_features``
(``padding="max_length"``, run through ``datasets.map``) and ``utils_qa.postprocess_qa_predictions``
(a double loop over each window's argsorted start and end logits), SQuAD v1 parts only.
"""

from __future__ import annotations

import collections
from typing import Any

import datasets
import numpy as np


def _tokenize_padded(
    tokenizer: Any, examples: dict[str, list], max_length: int, stride: int
) -> Any:
    """The recipe's tokenizer call: question first, windows padded to ``max_length``."""
    pad_on_right = tokenizer.padding_side == "right"
    questions = [q.lstrip() for q in examples["question"]]
    return tokenizer(
        questions if pad_on_right else examples["context"],
        examples["context"] if pad_on_right else questions,
        truncation="only_second" if pad_on_right else "only_first",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )


def prepare_train_features(
    tokenizer: Any, examples: dict[str, list], max_length: int = 384, stride: int = 128
) -> dict[str, list]:
    """``run_qa.py``'s ``prepare_train_features`` with ``pad_to_max_length=True`` (its default)."""
    pad_on_right = tokenizer.padding_side == "right"
    tokenized = _tokenize_padded(tokenizer, examples, max_length, stride)
    sample_mapping = tokenized.pop("overflow_to_sample_mapping")
    offset_mapping = tokenized.pop("offset_mapping")
    tokenized["start_positions"] = []
    tokenized["end_positions"] = []
    for i, offsets in enumerate(offset_mapping):
        input_ids = tokenized["input_ids"][i]
        cls_index = (
            input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
        )
        sequence_ids = tokenized.sequence_ids(i)
        answers = examples["answers"][sample_mapping[i]]
        if len(answers["answer_start"]) == 0:
            tokenized["start_positions"].append(cls_index)
            tokenized["end_positions"].append(cls_index)
            continue
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        token_start_index = 0
        while sequence_ids[token_start_index] != (1 if pad_on_right else 0):
            token_start_index += 1
        token_end_index = len(input_ids) - 1
        while sequence_ids[token_end_index] != (1 if pad_on_right else 0):
            token_end_index -= 1
        if not (
            offsets[token_start_index][0] <= start_char and offsets[token_end_index][1] >= end_char
        ):
            tokenized["start_positions"].append(cls_index)
            tokenized["end_positions"].append(cls_index)
        else:
            while token_start_index < len(offsets) and offsets[token_start_index][0] <= start_char:
                token_start_index += 1
            tokenized["start_positions"].append(token_start_index - 1)
            while offsets[token_end_index][1] >= end_char:
                token_end_index -= 1
            tokenized["end_positions"].append(token_end_index + 1)
    return tokenized


def prepare_validation_features(
    tokenizer: Any, examples: dict[str, list], max_length: int = 384, stride: int = 128
) -> dict[str, list]:
    """``run_qa.py``'s ``prepare_validation_features``: offsets outside the context are ``None``."""
    pad_on_right = tokenizer.padding_side == "right"
    tokenized = _tokenize_padded(tokenizer, examples, max_length, stride)
    sample_mapping = tokenized.pop("overflow_to_sample_mapping")
    context_index = 1 if pad_on_right else 0
    tokenized["example_id"] = []
    for i in range(len(tokenized["input_ids"])):
        sequence_ids = tokenized.sequence_ids(i)
        tokenized["example_id"].append(examples["id"][sample_mapping[i]])
        tokenized["offset_mapping"][i] = [
            (o if sequence_ids[k] == context_index else None)
            for k, o in enumerate(tokenized["offset_mapping"][i])
        ]
    return tokenized


def map_features(
    tokenizer: Any, examples: datasets.Dataset, train: bool, num_proc: int | None = None
) -> datasets.Dataset:
    """The recipe's ``dataset.map(prepare_*_features, batched=True, remove_columns=...)``."""
    prepare = prepare_train_features if train else prepare_validation_features
    return examples.map(
        lambda batch: prepare(tokenizer, batch),
        batched=True,
        num_proc=num_proc,
        remove_columns=examples.column_names,
    )


def postprocess_qa_predictions(
    examples: datasets.Dataset,
    features: datasets.Dataset,
    predictions: tuple[np.ndarray, np.ndarray],
    n_best_size: int = 20,
    max_answer_length: int = 30,
) -> dict[str, str]:
    """``utils_qa.postprocess_qa_predictions`` for SQuAD v1 (no null answers): id -> text."""
    all_start_logits, all_end_logits = predictions
    example_id_to_index = {k: i for i, k in enumerate(examples["id"])}
    features_per_example = collections.defaultdict(list)
    for i, feature in enumerate(features):
        features_per_example[example_id_to_index[feature["example_id"]]].append(i)
    all_predictions = collections.OrderedDict()
    for example_index, example in enumerate(examples):
        prelim_predictions = []
        for feature_index in features_per_example[example_index]:
            start_logits = all_start_logits[feature_index]
            end_logits = all_end_logits[feature_index]
            offset_mapping = features[feature_index]["offset_mapping"]
            start_indexes = np.argsort(start_logits)[-1 : -n_best_size - 1 : -1].tolist()
            end_indexes = np.argsort(end_logits)[-1 : -n_best_size - 1 : -1].tolist()
            for start_index in start_indexes:
                for end_index in end_indexes:
                    if (
                        start_index >= len(offset_mapping)
                        or end_index >= len(offset_mapping)
                        or offset_mapping[start_index] is None
                        or len(offset_mapping[start_index]) < 2
                        or offset_mapping[end_index] is None
                        or len(offset_mapping[end_index]) < 2
                    ):
                        continue
                    if end_index < start_index or end_index - start_index + 1 > max_answer_length:
                        continue
                    prelim_predictions.append(
                        {
                            "offsets": (
                                offset_mapping[start_index][0],
                                offset_mapping[end_index][1],
                            ),
                            "score": start_logits[start_index] + end_logits[end_index],
                            "start_logit": start_logits[start_index],
                            "end_logit": end_logits[end_index],
                        }
                    )
        predictions = sorted(prelim_predictions, key=lambda x: x["score"], reverse=True)[
            :n_best_size
        ]
        context = example["context"]
        for pred in predictions:
            offsets = pred.pop("offsets")
            pred["text"] = context[offsets[0] : offsets[1]]
        if len(predictions) == 0 or (len(predictions) == 1 and predictions[0]["text"] == ""):
            predictions.insert(
                0, {"text": "empty", "start_logit": 0.0, "end_logit": 0.0, "score": 0.0}
            )
        scores = np.array([pred.pop("score") for pred in predictions])
        exp_scores = np.exp(scores - np.max(scores))
        probs = exp_scores / exp_scores.sum()
        for prob, pred in zip(probs, predictions, strict=True):
            pred["probability"] = prob
        all_predictions[example["id"]] = predictions[0]["text"]
    return all_predictions
