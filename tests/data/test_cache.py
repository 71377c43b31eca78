"""On-disk window cache: build once per key; tokenised once per machine (``prepare_data``)."""

from __future__ import annotations

from collections import Counter

import datasets

from qa_lightning.core.config import minilm_path, resource_path
from qa_lightning.data import SquadDataModule
from qa_lightning.data import datamodule as datamodule_module
from qa_lightning.data.cache import cache_key, cached, examples_fingerprint
from tests.conftest import SHORT_WINDOWS

IDS = [[1, 2, 3], [4]]


class Builder:
    def __init__(self, stride):
        self.stride = stride
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return datasets.Dataset.from_dict({"input_ids": IDS, "stride": [self.stride] * 2})


def test_second_call_loads_from_disk(tmp_path):
    key = cache_key(kind="train", max_length=384, stride=128)
    build = Builder(128)
    first = cached(tmp_path, key, build)
    second = cached(tmp_path, key, build)
    assert build.calls == 1
    assert first.to_dict() == second.to_dict() == {"input_ids": IDS, "stride": [128, 128]}
    assert (tmp_path / key / "dataset_info.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [key]  # no staging directory left behind


def test_different_key_builds_again(tmp_path):
    builds = {stride: Builder(stride) for stride in (128, 64)}
    for stride, build in builds.items():
        key = cache_key(kind="train", max_length=384, stride=stride)
        assert cached(tmp_path, key, build)["stride"] == [stride, stride]
    assert [b.calls for b in builds.values()] == [1, 1]
    assert cache_key(kind="train", stride=128) != cache_key(kind="train", stride=64)
    assert cache_key(stride=128, kind="train") == cache_key(kind="train", stride=128)


def test_no_cache_dir_always_builds():
    build = Builder(1)
    cached(None, "k", build)
    cached(None, "k", build)
    assert build.calls == 2


def test_examples_fingerprint_follows_content():
    rows = {"id": ["a"], "question": ["q"], "context": ["c"], "answers": [{"text": ["c"]}]}
    same = datasets.Dataset.from_dict(rows)
    changed = datasets.Dataset.from_dict({**rows, "context": ["c "]})
    assert examples_fingerprint(datasets.Dataset.from_dict(rows)) == examples_fingerprint(same)
    assert examples_fingerprint(same) != examples_fingerprint(changed)


def demo_datamodule(cache_dir) -> SquadDataModule:
    return SquadDataModule(
        minilm_path(),
        dataset_name=None,
        train_file=resource_path("demo/train.json"),
        validation_file=resource_path("demo/validation.json"),
        cache_dir=None if cache_dir is None else str(cache_dir),
        **SHORT_WINDOWS,
    )


def count_windowing(monkeypatch) -> Counter:
    """Counts the calls of the windowing map, by split ("train", "eval")."""
    calls: Counter = Counter()
    windowing = datamodule_module._map_windows

    def counted(tokenizer, train, *args, **kwargs):
        calls["train" if train else "eval"] += 1
        return windowing(tokenizer, train, *args, **kwargs)

    monkeypatch.setattr(datamodule_module, "_map_windows", counted)
    return calls


def test_prepare_data_tokenises_once_and_every_rank_loads_the_cache(tmp_path, monkeypatch):
    calls = count_windowing(monkeypatch)
    first = demo_datamodule(tmp_path)  # the machine's first process: Lightning's prepare_data
    first.prepare_data()
    assert calls == {"train": 1, "eval": 1}  # 70 + 30 questions: one map batch each
    first.setup("fit")  # its own setup keeps what prepare_data made
    other = demo_datamodule(tmp_path)  # another rank: setup only
    other.setup("fit")
    assert calls == {"train": 1, "eval": 1}
    assert other.train_windows["input_ids"][:] == first.train_windows["input_ids"][:]
    assert other.val_windows["input_ids"][:] == first.val_windows["input_ids"][:]

    validating = demo_datamodule(tmp_path / "eval")  # evaluate: validation windows only
    validating.hparams.train_file = None
    validating.prepare_data("validate")
    assert calls == {"train": 1, "eval": 2} and validating.train_windows is None


def test_without_cache_every_process_tokenises(monkeypatch):
    calls = count_windowing(monkeypatch)
    first = demo_datamodule(None)
    first.prepare_data()
    first.setup("fit")
    assert calls == {"train": 1, "eval": 1}
    demo_datamodule(None).setup("fit")
    assert calls == {"train": 2, "eval": 2}
