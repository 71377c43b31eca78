"""An override naming a key or config option that does not exist stops every Hydra entry point
with one line naming the closest known ones, exit 2, before anything runs
(``qa_lightning.cli.hydra_main``); the other uses of the command line are Hydra's, unchanged."""

from __future__ import annotations

import json
import sys

import pytest

from qa_lightning import evaluate, export, predict, serve, train
from qa_lightning.cli import closest
from tests.conftest import run_cli
from tests.test_errors import _short_errors  # noqa: F401


def run_main(module, *argv: str, capsys) -> tuple[int | str | None, str, str]:
    """``module.main()`` as ``python -m module argv`` runs it: exit status, stdout, stderr."""
    capsys.readouterr()
    code = 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [module.__name__, *argv])
        try:
            module.main()
        except SystemExit as exit_info:
            code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("module", "override", "line"),
    [
        (
            train,
            "trainer.max_epoch=3",
            "unknown config key trainer.max_epoch in trainer.max_epoch=3: did you mean "
            "trainer.max_epochs? (add --cfg job to the command to print every key)",
        ),
        (
            train,
            "modle.lr=1e-4",
            "unknown config key modle.lr in modle.lr=1e-4: did you mean model.lr?",
        ),
        (
            train,
            "batch_size=8",
            "unknown config key batch_size in batch_size=8: did you mean data.batch_size?",
        ),
        (
            train,
            "data=sampel",
            "no config data=sampel: did you mean data=sample? The options in data: demo, full, "
            "local, mrqa, sample, squad, squad_v2.",
        ),
        (
            train,
            "logger=[tensorboard,mlfow]",
            "no config logger=mlfow (in logger=[tensorboard,mlfow]): did you mean logger=mlflow?",
        ),
        (
            evaluate,
            "data.validation_file=dev.json",
            "data.validation_file=dev.json sets a key of the data config, and none is chosen: "
            "choose one first, data=OPTION data.validation_file=dev.json (the options in data: ",
        ),
        (evaluate, "postprocess.nbest=5", "did you mean postprocess.n_best?"),
        (predict, "top_kk=3", "unknown config key top_kk in top_kk=3: did you mean top_k?"),
        (
            predict,
            "backend=onnx",
            "unknown config key backend in backend=onnx: the config has no key backend (add "
            "--cfg job to the command to print every key).",
        ),
        (export, "formt=hf", "did you mean format?"),
        (export, "quantization.per_chanel=false", "did you mean quantization.per_channel?"),
        (serve, "serve.prot=8001", "did you mean serve.port?"),
        (train, "hydra.run.dri=x", "did you mean hydra.run.dir?"),
    ],
)
def test_an_unknown_key_or_option_is_one_line_naming_the_closest(
    module, override, line, capsys, tmp_path
) -> None:
    code, out, err = run_main(module, override, f"hydra.run.dir={tmp_path / 'run'}", capsys=capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert line in err
    assert "Traceback" not in err and not out
    assert not (tmp_path / "run").exists()  # nothing ran


def test_closest_prefers_the_shortest_key_ending_in_the_typed_one() -> None:
    keys = ["data", "data.batch_size", "data.eval_batch_size", "callbacks.x.data.batch_size"]
    assert closest("batch_size", keys) == ["data.batch_size"]
    assert closest("data.bacth_size", keys) == ["data.batch_size"]
    assert closest("data.foo", keys) == []


def test_other_errors_of_the_command_line_stay_hydras(capsys, tmp_path) -> None:
    run = f"hydra.run.dir={tmp_path / 'run'}"
    code, _, err = run_main(train, "data.batch_size=[1", run, capsys=capsys)
    assert code == 1 and "no viable alternative at input '[1'" in err
    code, _, err = run_main(train, "~data.bacth_size", run, capsys=capsys)
    assert code == 1 and "Could not delete from config. 'data.bacth_size' does not exist." in err


def test_hydra_full_error_shows_hydras_traceback(capsys, monkeypatch) -> None:
    from hydra.errors import ConfigCompositionException

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["train", "data.bacth_size=8"])
    with pytest.raises(ConfigCompositionException, match="Could not override 'data.bacth_size'"):
        train.main()


def test_cfg_job_new_and_deleted_keys_and_a_config_dir_still_compose(capsys, tmp_path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.yaml").write_text("defaults:\n  - squad\nbatch_size: 3\n")
    code, out, err = run_main(
        train,
        "--config-dir",
        str(tmp_path),
        "data=mine",
        "+data.note=hello",
        "~data.num_workers",
        "--cfg",
        "job",
        capsys=capsys,
    )
    assert code == 0, err
    assert "  batch_size: 3\n" in out and "  note: hello\n" in out
    assert "num_workers" not in out
    code, _, err = run_main(train, "--config-dir", str(tmp_path), "data=mien", capsys=capsys)
    assert code == 2 and "did you mean data=mine?" in err


def test_an_optuna_search_still_composes(capsys) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the sweep extra")
    code, out, err = run_main(
        train, "hparams_search=optuna", "experiment=demo", "--cfg", "hydra", capsys=capsys
    )
    assert code == 0, err
    assert "_target_: hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper" in out


def test_cli_multirun_runs_every_job_and_a_typo_in_a_sweep_stops_it(model_dir, tmp_path) -> None:
    common = [f"model_dir={model_dir}", "context='The report was written by the committee.'"]
    result = run_cli(
        "qa_lightning.predict",
        "-m",
        *common,
        "question='Who wrote it?','What was written?'",
        "device=cpu",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers = [line for line in result.stdout.splitlines() if line.startswith("1. {")]
    assert len(answers) == 2 and all(json.loads(a[3:])["answer"] for a in answers)
    typo = run_cli(
        "qa_lightning.predict",
        "-m",
        *common,
        "question='Who wrote it?'",
        "top_kk=1,2",
        f"hydra.sweep.dir={tmp_path / 'typo'}",
    )
    assert typo.returncode == 2, typo.stderr[-3000:]
    assert "error: unknown config key top_kk in top_kk=1,2: did you mean top_k?" in typo.stderr
    assert "Traceback" not in typo.stderr and not (tmp_path / "typo" / "0").exists()
