"""What each checkpoint of a run holds: the best one the weights and what evaluate, export and
predict read; last.ckpt also what exact resume needs. Training refuses to continue from a best
checkpoint with a hint, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qa_lightning.core.errors import ConfigError
from qa_lightning.model.files import CHECKPOINT_KEY as MODEL_FILES_KEY
from qa_lightning.runs.checkpoint_reading import load_checkpoint, read_checkpoint
from qa_lightning.train import train
from tests.conftest import TINY_OVERRIDES, train_tiny

#: What only training's continuation needs: the optimizer, the schedule and the callbacks' state.
RESUME_KEYS = {"optimizer_states", "lr_schedulers", "callbacks"}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """One epoch of the tiny model: its metrics.json with ``run_dir`` added."""
    return train_tiny(tmp_path_factory.mktemp("checkpoints"))


def test_best_checkpoint_holds_the_weights_and_what_serving_reads(run) -> None:
    best_path = Path(run["best_checkpoint"])
    last_path = run["run_dir"] / "checkpoints" / "last.ckpt"
    best, last = read_checkpoint(best_path), read_checkpoint(last_path)
    assert not RESUME_KEYS & best.keys()
    assert last.keys() >= RESUME_KEYS
    for key in ("hyper_parameters", "datamodule_hyper_parameters", "qa_best", MODEL_FILES_KEY):
        assert best[key] == last[key], key
    # one epoch: the best is the last epoch's weights
    assert best["state_dict"].keys() == last["state_dict"].keys()
    for key, value in best["state_dict"].items():
        assert torch.equal(value, last["state_dict"][key]), key
    # AdamW keeps two moments per weight: the best is about a third of last.ckpt
    assert best_path.stat().st_size < 0.5 * last_path.stat().st_size
    exported = load_checkpoint(best_path)  # what evaluate, export and predict load
    assert exported.settings.max_length == 128 and exported.settings.stride == 32


def test_training_from_a_best_checkpoint_is_refused_with_the_ways_to_go_on(
    run, compose_train
) -> None:
    best = run["best_checkpoint"]
    run_dir = run["run_dir"]
    cfg = compose_train([*TINY_OVERRIDES, f"ckpt_path={best}"])
    with pytest.raises(ConfigError) as raised:
        train(cfg)
    message = str(raised.value)
    assert f"cannot continue training from '{best}' (ckpt_path)" in message
    assert "weights only" in message
    assert f"resume=true hydra.run.dir={run_dir}" in message
    assert f"model.name_or_path={run_dir}/hf_model model.from_scratch=false" in message
    assert (run_dir / "hf_model" / "config.json").is_file()  # the hinted export exists
    assert not Path(cfg.paths.output_dir).exists()  # refused before any work
