"""On-disk window cache: build once per key."""

from __future__ import annotations

import datasets

from qa_lightning.data.cache import cache_key, cached, examples_fingerprint

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
