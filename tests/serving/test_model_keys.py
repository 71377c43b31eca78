"""The model keys of predict, evaluate, export and serve (``conf/model_keys.yaml``): exactly one
of ``model_dir`` / ``ckpt_path`` / ``onnx_path``, with a hint naming the right key and path for
the common mix-ups, exit 2 before anything loads; evaluate without ``data=`` says how to give
validation data before any hub call."""

from __future__ import annotations

from pathlib import Path

import pytest

from qa_lightning.answers.settings import InferenceSettings
from qa_lightning.core.errors import ConfigError
from qa_lightning.evaluate import evaluate
from qa_lightning.serving.model_keys import GivenModel, given_model
from tests.conftest import CONF_DIR, run_cli, save_tiny_model_dir
from tests.test_errors import _short_errors, cli_error  # noqa: F401

BEST = "best-epoch01-f1_12.50.ckpt"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A training run dir's layout: a real tiny ``hf_model/``, and ``checkpoints/`` with a best
    and a last checkpoint (empty files: no test here reads them)."""
    run = tmp_path_factory.mktemp("train") / "RUN"
    save_tiny_model_dir(run / "hf_model", InferenceSettings(max_length=128, stride=32))
    (run / "checkpoints").mkdir()
    for name in ("best-epoch00-f1_3.10.ckpt", BEST, "last.ckpt"):
        (run / "checkpoints" / name).write_bytes(b"")
    return run


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """An export run dir's layout: ``onnx_model/`` with ``model.onnx`` beside its config."""
    onnx = tmp_path_factory.mktemp("export") / "onnx_model"
    onnx.mkdir()
    for name in ("model.onnx", "config.json", "tokenizer_config.json"):
        (onnx / name).write_text("{}")
    return onnx.parent


def problem(cfg: dict, accepted: tuple[str, ...] = ("model_dir", "ckpt_path", "onnx_path")) -> str:
    with pytest.raises(ConfigError) as error:
        given_model(cfg, accepted)
    return str(error.value)


def test_each_key_names_its_model_and_backend(run_dir, export_dir) -> None:
    hf, best = run_dir / "hf_model", run_dir / "checkpoints" / BEST
    onnx = export_dir / "onnx_model"
    assert given_model({"model_dir": str(hf)}) == GivenModel("model_dir", hf)
    assert given_model({"ckpt_path": str(best)}).backend == "torch"
    beside = given_model({"onnx_path": str(onnx / "model.onnx"), "model_dir": str(hf)})
    assert (beside.key, beside.backend, beside.tokenizer_dir) == ("onnx_path", "onnx", hf)
    assert beside.as_keys() == {
        "model_dir": str(hf),
        "ckpt_path": None,
        "onnx_path": str(onnx / "model.onnx"),
    }
    assert given_model({"onnx_path": str(onnx)}).as_keys()["model_dir"] is None


def test_a_run_dir_names_its_hf_model_and_best_checkpoint(run_dir) -> None:
    best = run_dir / "checkpoints" / BEST
    hint = f"its model: model_dir={run_dir / 'hf_model'} or ckpt_path={best}."
    assert problem({"model_dir": str(run_dir)}) == (
        f"model_dir='{run_dir}' is a run dir, not a Hugging Face model directory; {hint}"
    )
    # the key given comes first
    assert problem({"ckpt_path": str(run_dir)}).endswith(
        f"its model: ckpt_path={run_dir / 'checkpoints' / BEST} or "
        f"model_dir={run_dir / 'hf_model'}."
    )


def test_a_model_under_another_key_names_the_key_to_use(run_dir, export_dir) -> None:
    best, hf = run_dir / "checkpoints" / BEST, run_dir / "hf_model"
    onnx_dir = export_dir / "onnx_model"
    assert problem({"model_dir": str(best)}) == (
        f"model_dir='{best}' is a training checkpoint, not a Hugging Face model directory: "
        f"give ckpt_path={best}."
    )
    assert problem({"ckpt_path": str(hf)}).endswith(f"give model_dir={hf}.")
    assert problem({"model_dir": str(onnx_dir)}).endswith(f"give onnx_path={onnx_dir}.")
    assert problem({"onnx_path": str(best)}).endswith(f"give ckpt_path={best}.")
    assert problem({"onnx_path": str(export_dir)}).endswith(f"its model: onnx_path={onnx_dir}.")
    assert problem({"model_dir": str(run_dir / "checkpoints")}) == (
        f"model_dir='{run_dir / 'checkpoints'}' is a directory of checkpoints: give one of "
        f"them, ckpt_path={run_dir / 'checkpoints' / BEST}."
    )


def test_export_takes_no_onnx_export(export_dir) -> None:
    onnx = export_dir / "onnx_model" / "model.onnx"
    for cfg in ({"onnx_path": str(onnx)}, {"model_dir": str(onnx)}):
        message = problem(cfg, ("model_dir", "ckpt_path"))
        assert "an ONNX export, which this command does not take: give model_dir=PATH" in message
        assert "or ckpt_path=PATH" in message


def test_none_two_or_a_directory_without_a_model(run_dir, tmp_path) -> None:
    assert problem({}).startswith(
        "give exactly one of model_dir=PATH (a Hugging Face model directory such as a training "
        "run's hf_model/), ckpt_path=PATH"
    )
    two = problem({"model_dir": str(run_dir / "hf_model"), "ckpt_path": "x.ckpt"})
    assert f"; got model_dir={run_dir / 'hf_model'}, ckpt_path=x.ckpt;" in two
    (tmp_path / "notes.txt").write_text("")
    assert problem({"model_dir": str(tmp_path)}).startswith(
        f"model_dir='{tmp_path}' is not a Hugging Face model directory (no config.json; it "
        "holds: notes.txt); give"
    )
    assert "is a directory, not a training checkpoint" in problem({"ckpt_path": str(tmp_path)})


# -- through the entry points ------------------------------------------------------------------


def test_cli_predict_with_a_run_dir_names_its_hf_model(run_dir, tmp_path) -> None:
    result = run_cli(
        "qa_lightning.predict",
        f"model_dir={run_dir}",
        "question=Who?",
        "context=Me.",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    line = cli_error(result, "is a run dir", f"model_dir={run_dir / 'hf_model'}")
    assert f"ckpt_path={run_dir / 'checkpoints' / BEST}" in line
    assert "tokenizer" not in result.stderr and "model=minilm" not in result.stderr


def test_cli_evaluate_with_a_checkpoint_as_model_dir_names_ckpt_path(run_dir, tmp_path) -> None:
    best = run_dir / "checkpoints" / BEST
    result = run_cli(
        "qa_lightning.evaluate",
        f"model_dir={best}",
        "data=demo",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    cli_error(result, f"model_dir='{best}' is a training checkpoint", f"give ckpt_path={best}.")


def test_cli_export_names_what_it_takes(export_dir, tmp_path) -> None:
    onnx = export_dir / "onnx_model"
    result = run_cli("qa_lightning.export", f"onnx_path={onnx}", f"hydra.run.dir={tmp_path / 'r'}")
    cli_error(result, f"onnx_path='{onnx}' names an ONNX export", "give model_dir=PATH")


def test_the_model_keys_are_defined_once() -> None:
    """One definition of the model keys: each entry point's config has all four keys, from
    conf/model_keys.yaml, and predict no backend key (the backend follows from the key)."""
    from omegaconf import OmegaConf

    keys = set(OmegaConf.load(CONF_DIR / "model_keys.yaml"))
    assert keys == {"model_dir", "ckpt_path", "onnx_path", "trust_checkpoint"}
    for name in ("predict", "eval", "export", "serve"):
        config = OmegaConf.load(CONF_DIR / f"{name}.yaml")
        assert "model_keys" in config.defaults, name
        assert not keys & set(config), f"{name}.yaml defines a model key again"
    assert "backend" not in OmegaConf.load(CONF_DIR / "predict.yaml")


def test_serve_checks_the_same_keys(compose_train, run_dir) -> None:
    pytest.importorskip("litserve", reason="serve needs the serve extra")
    from qa_lightning.serve import model_source

    with pytest.raises(ConfigError, match="is a run dir, not a Hugging Face model directory"):
        model_source(compose_train([f"model_dir={run_dir}"], config_name="serve"))
    source = model_source(compose_train([f"ckpt_path={run_dir / 'checkpoints' / BEST}"], "serve"))
    assert (source.backend, source.ckpt_path, source.model_dir) == (
        "torch",
        str(run_dir / "checkpoints" / BEST),
        None,
    )


# -- evaluate without data ---------------------------------------------------------------------


def test_evaluate_without_data_says_how_to_give_it_before_any_hub_call(
    compose_eval, run_dir, monkeypatch
) -> None:
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was called")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    cfg = compose_eval([f"model_dir={run_dir / 'hf_model'}"])
    assert "data" not in cfg  # evaluation has no default data
    with pytest.raises(ConfigError) as error:
        evaluate(cfg)
    message = str(error.value)
    assert message.startswith("no validation data: choose them with data=..., e.g. data=demo")
    assert "data=local data.validation_file=FILE" in message
    assert "data=sample (SQuAD's validation split from the Hugging Face hub)" in message


def test_cli_evaluate_without_data(run_dir, tmp_path) -> None:
    result = run_cli(
        "qa_lightning.evaluate",
        f"model_dir={run_dir / 'hf_model'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    cli_error(result, "no validation data: choose them with data=...", "data=demo")
    assert "huggingface" not in result.stderr.lower()
