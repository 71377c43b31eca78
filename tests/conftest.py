"""Shared fixtures: Hydra composition into a temporary run dir, the tiny model's tokenizer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from qa_lightning.core.config import minilm_path, register_resolvers
from qa_lightning.runs.checkpoint_writing import LastCheckpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
SHARED_SQUAD = ROOT.parent / "shared" / "data" / "squad"
register_resolvers()

#: Overrides for a quick CPU run of the tiny model on the shipped demo files.
TINY_OVERRIDES = [
    "model=tiny",
    "data=demo",
    "trainer=cpu",
    "trainer.max_epochs=1",
    "data.max_length=128",
    "data.stride=32",
    "data.batch_size=16",
    "callbacks.progress_bar.refresh_rate=0",
    "trainer.log_every_n_steps=1",
]
#: The training overrides that evaluation shares: data (windowing, batch sizes) and trainer.
EVAL_OVERRIDES = [o for o in TINY_OVERRIDES if o.startswith(("data", "trainer"))]
#: Short windows, so that every demo context spans several of them, in many lengths.
SHORT_WINDOWS = {"max_length": 64, "stride": 8, "max_question_tokens": 24}


@pytest.fixture(scope="session")
def tokenizer():
    """MiniLM's uncased WordPiece tokenizer (offline), also the tiny model's."""
    from qa_lightning.core.tokenizer import load_tokenizer

    return load_tokenizer(minilm_path())


@pytest.fixture
def compose_train(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose ``conf/train.yaml`` with overrides; run dir and feature cache under tmp_path."""

    def _compose(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = compose(config_name, overrides=overrides or [], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
            cfg.paths.cache_dir = str(tmp_path / "cache")
            del cfg.hydra
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture
def shared_squad() -> Path:
    """The shared SQuAD v1.1 split (see ../shared/data/squad/README.md); skip when absent."""
    if not (SHARED_SQUAD / "train.json").is_file():
        pytest.skip("shared SQuAD files not present")
    return SHARED_SQUAD


#: The entry points that are Hydra apps: their run dir defaults to the repository's outputs/.
HYDRA_ENTRY_POINTS = {
    f"qa_lightning.{name}" for name in ("train", "evaluate", "predict", "export", "serve")
}


def run_cli(module: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``python -m module args`` from the repository root, offline. A Hydra entry point is given
    its run dir (``hydra.run.dir=`` under the test's tmp_path), so that no test writes into the
    repository's ``outputs/``."""
    given = ("hydra.run.dir=", "hydra.sweep.dir=", "--cfg", "--help")
    if module in HYDRA_ENTRY_POINTS and not any(arg.startswith(given) for arg in args):
        raise AssertionError(f"run_cli({module!r}, ...) needs hydra.run.dir=<tmp_path>/...")
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    if "HYDRA_FULL_ERROR" not in env:
        environ.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=600,
    )


class KeepingLastCheckpoint(LastCheckpoint):
    """``last.ckpt`` as usual, and a copy of each as ``step-<global step>.ckpt`` beside it, to
    resume from any of them (``callbacks.last_checkpoint._target_=tests.conftest.Keeping...``)."""

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if trainer.is_global_zero:
            last = Path(self.last_model_path)
            shutil.copy(last, last.with_name(f"step-{trainer.global_step}.ckpt"))


class RecordBatches(L.Callback):
    """Appends each training batch this rank receives to ``<run dir>/batches-rank<R>.jsonl``:
    epoch, step, padded length and each window's unpadded input ids."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        lengths = batch["attention_mask"].sum(1).tolist()
        rows = zip(batch["input_ids"].tolist(), lengths, strict=True)
        record = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "padded": batch["input_ids"].shape[1],
            "windows": [ids[:length] for ids, length in rows],
        }
        path = Path(trainer.default_root_dir) / f"batches-rank{trainer.global_rank}.jsonl"
        with path.open("a") as file:
            file.write(json.dumps(record) + "\n")


def read_batches(run_dir: Path, rank: int) -> list[dict]:
    """The batches :class:`RecordBatches` recorded for ``rank``."""
    lines = (run_dir / f"batches-rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture
def compose_eval(compose_train, tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose ``conf/eval.yaml``; each call writes to its own run dir under tmp_path/eval."""

    def _compose(overrides: list[str], name: str = "run") -> DictConfig:
        cfg = compose_train(overrides, config_name="eval")
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "eval" / name)
        return cfg

    return _compose


def train_tiny(tmp: Path, *overrides: str) -> dict:
    """``python -m qa_lightning.train`` of the tiny model on the demo data into ``tmp/run``; its
    metrics.json with ``run_dir`` added."""
    run_dir = tmp / "run"
    result = run_cli(
        "qa_lightning.train",
        *TINY_OVERRIDES,
        *overrides,
        f"paths.cache_dir={tmp / 'cache'}",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {**json.loads((run_dir / "metrics.json").read_text()), "run_dir": run_dir}


def save_tiny_model_dir(directory: Path, settings: Any) -> Path:
    """A random tiny model (conf/model/tiny.yaml, seed 0) exported as a Hugging Face directory."""
    import torch
    from omegaconf import OmegaConf

    from qa_lightning.core.tokenizer import load_tokenizer
    from qa_lightning.model import load_qa_model
    from qa_lightning.runs.checkpoint_reading import Exported
    from qa_lightning.serving.exports import save_hf

    torch.manual_seed(0)
    overrides = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "tiny.yaml"))
    model = load_qa_model(minilm_path(), True, overrides["config_overrides"])
    return save_hf(Exported(model.eval(), load_tokenizer(minilm_path()), settings), directory)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A random tiny model (conf/model/tiny.yaml, seed 0) exported as a Hugging Face directory,
    windows of 128 tokens with stride 32."""
    from qa_lightning.answers.settings import InferenceSettings

    settings = InferenceSettings(max_length=128, stride=32)
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "hf_model", settings)


@pytest.fixture(scope="session")
def validation() -> Any:
    """The shipped demo validation set (30 questions), as read by ``data=local``."""
    from qa_lightning.core.config import resource_path
    from qa_lightning.data.loading import load_local_file

    return load_local_file(resource_path("demo/validation.json"))
