"""Every option that filters data, driven to an empty result: a clear error naming the file, the
option and the records dropped per reason, before windowing or caching (no ``IndexError`` from
``datasets.load_from_disk`` on an empty cache entry)."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
from hydra.utils import instantiate

from qa_lightning.core.errors import DataError
from qa_lightning.data.empty import drop_reasons, problem_kind, require_examples
from qa_lightning.data.loading import load_local_file
from tests.conftest import TINY_OVERRIDES, run_cli
from tests.data.test_errors_data import BAD, DEMO_VALIDATION, write_jsonl
from tests.test_errors import cli_error


def nothing(path: Path) -> list:
    """A reader that yields no records."""
    return []


def datamodule(compose_train, train_file: Path, *overrides: str):
    cfg = compose_train(
        [
            *TINY_OVERRIDES,
            f"data.train_file={train_file}",
            f"data.validation_file={DEMO_VALIDATION}",
            *overrides,
        ]
    )
    return instantiate(cfg.data), Path(cfg.paths.cache_dir)


def test_problem_kinds_count_alike_problems_together() -> None:
    assert problem_kind("answer 'river' is not at answer_start 0 (context has 'The r')") == (
        "answer is not at answer_start"
    )
    assert problem_kind("id appears 2 times") == "id appears times"
    assert drop_reasons(
        ["a", "b", "b", "c"], {"a": "empty context", "b": "id appears 2 times"}
    ) == {
        "empty context": 1,
        "id appears times": 2,
    }


def test_skipping_every_record_is_a_clear_error_before_windowing(compose_train, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", BAD[:4])
    module, cache_dir = datamodule(compose_train, data, "data.on_bad_record=skip")
    with pytest.raises(DataError) as error:
        module.prepare_data("fit")
    message = str(error.value)
    assert message.startswith(
        f"no training questions are left of '{data}' after data.on_bad_record=skip: all 4 "
        "record(s) were dropped ("
    )
    for reason in (
        "1 for answer is not at answer_start",
        "1 for answer lies outside the context",
        "1 for empty context",
        "1 for empty question",
    ):
        assert reason in message
    assert not cache_dir.exists() or not any(cache_dir.iterdir())


def test_a_reader_that_yields_nothing_is_a_clear_error(tmp_path: Path) -> None:
    data = tmp_path / "train.custom"
    data.write_text("whatever")
    with pytest.raises(DataError, match=r"holds no questions: the reader \(nothing, data.reader\)"):
        load_local_file(data, nothing)


def test_an_empty_hub_split_is_a_clear_error(compose_train, monkeypatch) -> None:
    from qa_lightning.data import datamodule as module_of_datamodule

    empty = datasets.Dataset.from_dict({c: [] for c in ("id", "question", "context")})
    monkeypatch.setattr(module_of_datamodule, "load_hub_split", lambda *args: empty)
    cfg = compose_train([*TINY_OVERRIDES, "data.train_file=null", "data.dataset_name=squad"])
    module = instantiate(cfg.data)
    with pytest.raises(DataError, match="no training questions are left of hub dataset 'squad' "):
        module.load_examples("train")


def test_windowing_that_gives_no_windows_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="no windows are left of the 3 training questions after"):
        require_examples([], "windows", "the 3 training questions", "windowing", {})
    require_examples([1], "windows", "the 3 training questions", "windowing", {})


def test_cli_train_on_records_all_skipped_exits_2(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", BAD[:4])
    cli_error(
        run_cli(
            "qa_lightning.train",
            *TINY_OVERRIDES,
            f"data.train_file={data}",
            "data.on_bad_record=skip",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ),
        f"no training questions are left of '{data}' after data.on_bad_record=skip",
        "all 4 record(s) were dropped",
    )
