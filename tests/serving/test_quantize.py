"""int8 exports (``export quantize=int8``), their agreement check and settings record, serving them
with ``predict onnx_path=``, and scoring ONNX models with ``evaluate onnx_path=``."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from qa_lightning.answers.settings import InferenceSettings
from qa_lightning.cli import report_errors
from qa_lightning.core import hardware
from qa_lightning.core.config import minilm_path, resource_path
from qa_lightning.core.errors import ConfigError
from qa_lightning.data.windowing import make_eval_windows
from qa_lightning.evaluate import evaluate
from qa_lightning.export import export
from qa_lightning.model.logits import OnnxLogits
from qa_lightning.runs.checkpoint_reading import Exported
from qa_lightning.serving.answerer import QuestionAnswerer
from qa_lightning.serving.exports import export_onnx
from qa_lightning.serving.int8 import Agreement, QuantizationRecipe, compare_answers, quantize_onnx
from tests.conftest import CONF_DIR, EVAL_OVERRIDES, run_cli, train_tiny
from tests.serving.graphs import int8_matmuls, op_counts

pytest.importorskip("onnxruntime.quantization")

#: Two epochs, so that the tiny model's logits are not those of its random initialisation.
EPOCHS = 2
SETTINGS = InferenceSettings(max_length=128, stride=32)
#: The weight MatMuls of the tiny model: query, key, value, attention output, FFN in and out in
#: each of its 2 layers, and the QA head (the two attention MatMuls have no constant weight).
WEIGHT_MATMULS = 2 * 6 + 1


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny model trained on the demo data; its metrics.json with ``run_dir`` added."""
    return train_tiny(tmp_path_factory.mktemp("quantize"), f"trainer.max_epochs={EPOCHS}")


@pytest.fixture(scope="module")
def int8_export(trained, tmp_path_factory) -> dict:
    """``python -m qa_lightning.export ckpt_path=... format=onnx quantize=int8``: its out_dir
    and stdout."""
    tmp = tmp_path_factory.mktemp("int8")
    result = run_cli(
        "qa_lightning.export",
        f"ckpt_path={trained['best_checkpoint']}",
        "format=onnx",
        "quantize=int8",
        f"hydra.run.dir={tmp / 'run'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {"out_dir": tmp / "run" / "onnx_int8_model", "stdout": result.stdout}


@pytest.fixture(scope="module")
def random_onnx(tmp_path_factory) -> Path:
    """A random tiny model (conf/model/tiny.yaml) exported as fp32 ONNX, with its tokenizer."""
    from qa_lightning.core.tokenizer import load_tokenizer
    from qa_lightning.model import load_qa_model

    torch.manual_seed(0)
    overrides = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "tiny.yaml"))
    model = load_qa_model(minilm_path(), True, overrides["config_overrides"]).eval()
    exported = Exported(model, load_tokenizer(minilm_path()), SETTINGS)
    return export_onnx(exported, tmp_path_factory.mktemp("random") / "onnx_model")


def test_int8_export_quantises_the_weights_and_records_recipe_and_agreement(
    int8_export, trained
) -> None:
    out_dir = int8_export["out_dir"]
    for name in ("model.onnx", "config.json", "tokenizer.json", "qa_lightning.json"):
        assert (out_dir / name).is_file(), name
    counts = op_counts(out_dir / "model.onnx")
    # static and unfused (the default): every weight MatMul int8 with fixed scales; the
    # attention products (two activations) fp32; nothing fused, nothing dynamic
    assert int8_matmuls(out_dir / "model.onnx") == WEIGHT_MATMULS
    assert counts["MatMul"] == WEIGHT_MATMULS + 2 * 2
    assert not {"Attention", "DynamicQuantizeLinear", "MatMulInteger"} & set(counts)

    saved = json.loads((out_dir / "qa_lightning.json").read_text())
    # the training run's windowing still travels with the model, beside the recipe
    assert InferenceSettings.from_dir(out_dir) == SETTINGS
    record = saved["quantization"]
    assert record["type"] == "int8" and record["activations"] == "static"
    # calibrated on the checkpoint's training questions
    assert record["calibration_file"] == resource_path("demo/train.json")
    assert (record["per_channel"], record["reduce_range"]) == (True, False)
    assert record["op_types"] == ["MatMul", "Attention"] and record["fuse"] is False
    assert "fused_operators" not in record
    assert record["exclude"] == record["excluded_nodes"] == []
    agreement = record["agreement"]
    # by default the checkpoint's validation file: the 30 demo questions
    assert agreement["validation_file"] == resource_path("demo/validation.json")
    assert agreement["questions"] == 30 and agreement["windows"] >= 30
    assert agreement["share"] == round(agreement["same_best_answer"] / 30, 4) >= 0.9
    assert 0 < agreement["max_abs_logit_diff"] < 0.1
    assert agreement["padded_windows"] > 0  # the padded batches' attention mask was checked
    # labelled questions: both models scored against the gold answers
    worst = min(agreement["candidate_scores"]["f1"], agreement["padded_candidate_scores"]["f1"])
    assert agreement["f1_drop"] == round(agreement["reference_scores"]["f1"] - worst, 4)
    checks = record["checks"]
    assert list(checks) == ["int8 model.onnx vs fp32 PyTorch"]  # nothing fused to check
    assert checks["int8 model.onnx vs fp32 PyTorch"]["f1_drop"] == agreement["f1_drop"]
    printed = re.search(r"same best answer for (\d+)/30", int8_export["stdout"])
    assert int(printed.group(1)) == agreement["same_best_answer"]
    # the model carries its recipe too (without the agreement), for the VNNI warning
    meta = OnnxLogits(out_dir / "model.onnx").quantization
    assert meta == {k: v for k, v in record.items() if k not in ("agreement", "checks")}


def test_int8_export_answers_through_predict_onnx_path(int8_export, tmp_path: Path) -> None:
    question, context = "Who wrote the report?", "The report was written by the committee in 1998."
    result = run_cli(
        "qa_lightning.predict",
        f"onnx_path={int8_export['out_dir'] / 'model.onnx'}",
        f"question='{question}'",
        f"context='{context}'",
        "top_k=2",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = [
        json.loads(line.split(". ", 1)[1])
        for line in result.stdout.splitlines()
        if line[:1].isdigit() and ". {" in line
    ]
    expected = QuestionAnswerer.from_onnx(int8_export["out_dir"]).answer([question], [context], 2)
    assert printed == [a.as_dict() for a in expected[0]]
    assert len(printed) == 2
    assert all(context[a["start"] : a["end"]] == a["answer"] for a in printed)


def test_evaluate_scores_onnx_exports_with_the_training_code_path(
    compose_train, compose_eval, trained, int8_export, tmp_path: Path
) -> None:
    """fp32 ONNX scores exactly as the PyTorch model: the export checks its logits to 1e-4, and an
    answer could only change where two candidate spans' scores are that close (none of the 30).
    The int8 model is scored by the same code, and mostly gives the same answers."""
    fp32 = export(
        compose_train(
            [f"model_dir={trained['hf_model']}", "format=onnx", f"out_dir={tmp_path / 'fp32'}"],
            config_name="export",
        )
    )
    runs = {
        "torch": f"model_dir={trained['hf_model']}",
        "fp32": f"onnx_path={fp32['path']}",
        "int8": f"onnx_path={int8_export['out_dir']}",  # the directory: its model.onnx
    }
    scores, predictions = {}, {}
    for name, source in runs.items():
        scores[name] = evaluate(compose_eval([*EVAL_OVERRIDES, source], name))
        out = tmp_path / "eval" / name
        predictions[name] = json.loads((out / "predictions.json").read_text())
        assert json.loads((out / "metrics.json").read_text()) == scores[name]
    assert predictions["fp32"] == predictions["torch"]
    assert (scores["fp32"]["em"], scores["fp32"]["f1"]) == (
        scores["torch"]["em"],
        scores["torch"]["f1"],
    )
    assert scores["torch"]["f1"] == trained["best"]["f1"]  # evaluate reproduces training
    assert scores["fp32"]["source_type"] == scores["int8"]["source_type"] == "onnx"
    assert scores["int8"]["source"] == str(int8_export["out_dir"] / "model.onnx")
    assert scores["int8"]["questions"] == 30
    same = sum(predictions["int8"][q] == predictions["torch"][q] for q in predictions["torch"])
    assert same >= 27, f"{same}/30"
    assert abs(scores["int8"]["f1"] - scores["torch"]["f1"]) <= 100 * (30 - same) / 30


def test_evaluate_onnx_runs_on_the_cpu_in_its_own_precision(compose_eval, random_onnx) -> None:
    from qa_lightning.evaluate import configure_model_source

    cfg = compose_eval([f"onnx_path={random_onnx}", "data=demo", "trainer=cpu_bf16"])
    assert configure_model_source(cfg) == {"source": str(random_onnx), "source_type": "onnx"}
    assert (cfg.trainer.accelerator, cfg.trainer.precision) == ("cpu", "32-true")
    assert cfg.data.tokenizer_name_or_path == str(random_onnx.parent)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["onnx_path=a.onnx", "ckpt_path=b"], "give exactly one of model_dir=PATH"),
        (["onnx_path=/nonexistent.onnx", "data=demo"], "onnx_path='/nonexistent.onnx' does not"),
    ],
)
def test_evaluate_onnx_config_errors(compose_eval, overrides, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        evaluate(compose_eval(overrides))


def test_an_onnx_file_without_its_tokenizer_is_a_clear_error(compose_eval, tmp_path) -> None:
    lonely = tmp_path / "model.onnx"
    lonely.write_bytes(b"")
    with pytest.raises(ConfigError, match="has no tokenizer beside it"):
        evaluate(compose_eval([f"onnx_path={lonely}", "data=demo"]))


def test_excluded_nodes_stay_fp32(random_onnx, tmp_path: Path) -> None:
    recipe = QuantizationRecipe(activations="dynamic", fuse=False, exclude=("qa_outputs",))
    record = quantize_onnx(random_onnx, tmp_path / "int8.onnx", recipe)
    # the head's MatMul and its bias Add (which has nothing to quantise)
    assert record["excluded_nodes"] == ["/model/qa_outputs/MatMul", "/model/qa_outputs/Add"]
    counts = op_counts(tmp_path / "int8.onnx")
    assert counts["MatMulInteger"] == WEIGHT_MATMULS - 1
    assert counts["MatMul"] == 2 * 2 + 1
    # per tensor: one scale per weight, against one per output channel
    per_tensor = quantize_onnx(
        random_onnx, tmp_path / "t.onnx", replace(recipe, exclude=(), per_channel=False)
    )
    assert per_tensor["per_channel"] is False
    assert _scale_sizes(tmp_path / "t.onnx") == {1}
    # hidden size 32 (query, key, value, outputs), 64 (FFN in); the head (2) was excluded
    assert _scale_sizes(tmp_path / "int8.onnx") == {32, 64}


def _scale_sizes(onnx_path: Path) -> set[int]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    return {numpy_helper.to_array(t).size for t in graph.initializer if t.name.endswith("_scale")}


def test_compare_answers_of_shifted_logits(random_onnx, tokenizer, validation) -> None:
    """Adding a constant to every logit changes no answer; the difference is that constant."""
    reference = OnnxLogits(random_onnx)

    def shifted(batch):
        start_logits, end_logits = reference(batch)
        return start_logits + 0.5, end_logits + 0.5

    questions, contexts = validation["question"][:10], validation["context"][:10]
    agreement = compare_answers(tokenizer, SETTINGS, reference, shifted, questions, contexts)
    windows = make_eval_windows(
        tokenizer, questions, contexts, SETTINGS.max_length, SETTINGS.stride
    )
    assert agreement.questions == 10 and agreement.same_best_answer == 10
    assert agreement.windows == len(windows["input_ids"])
    assert agreement.max_abs_logit_diff == pytest.approx(0.5, abs=1e-5)
    assert agreement.answer_f1 == agreement.padded_answer_f1 == 100.0
    share = Agreement(40, 41, 0, 38, in_reference_top3=1.0, answer_f1=99.0, max_abs_logit_diff=0.1)
    assert share.share == 0.95 and share.f1_drop is None


def test_int8_model_warns_on_a_cpu_without_int8_dot_products(
    random_onnx, tmp_path: Path, monkeypatch, caplog
) -> None:
    int8_path = tmp_path / "int8.onnx"
    quantize_onnx(random_onnx, int8_path, QuantizationRecipe(activations="dynamic"))
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(hardware, "CPUINFO", cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma\n")
    assert OnnxLogits(random_onnx).quantization is None
    assert "without int8 dot-product" not in caplog.text  # fp32: nothing to say
    OnnxLogits(int8_path)
    assert f"onnx_path='{int8_path}' (int8) runs on a CPU without int8 dot-product" in caplog.text
    caplog.clear()
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    OnnxLogits(int8_path)
    assert "without int8 dot-product" not in caplog.text


def test_missing_quantization_tools_stop_the_export_with_exit_2(
    compose_train, monkeypatch, capsys
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)  # import raises
    cfg = compose_train(
        ["ckpt_path=/nonexistent.ckpt", "format=onnx", "quantize=int8"], config_name="export"
    )
    with pytest.raises(SystemExit) as exit_info:
        report_errors(lambda: export(cfg))  # as export's main does
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    # before the checkpoint is looked at
    assert err.startswith("error: quantize=int8 needs onnxruntime's quantisation tools")
    assert "pip install 'qa-lightning[export]'" in err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["quantize=int4"], "quantize='int4'; use quantize=int8"),
        (["quantize=int8", "format=hf"], "give format=onnx (format=hf has no quantised variant)"),
        (["quantize=int8", "quantization.op_types=[Softmax]"], "quantization.op_types=['Softmax']"),
        (["quantize=int8", "quantization.op_types=[]"], "quantization.op_types=[]"),
        (["quantize=int8", "quantization.op_types=MatMul"], "give a list, e.g."),
        (["quantize=int8", "quantization.per_channel=maybe"], "quantization.per_channel='maybe'"),
        (["quantize=int8", "quantization.fuse=1"], "quantization.fuse=1; must be true or false"),
        (["quantize=int8", "quantization.exclude=['(']"], "is not a regular expression"),
        (["quantize=int8", "+quantization.symmetric=true"], "unknown key(s) quantization."),
        (["quantize=int8", "validation_samples=0"], "validation_samples=0"),
        (["quantize=int8", "min_agreement=95"], "min_agreement=95; give a share in [0, 1]"),
        (["quantize=int8", "max_f1_drop=-1"], "max_f1_drop=-1; give F1 points in [0, 100]"),
        (["quantize=int8", "validation_file=/no/such.json"], "validation_file='/no/such.json'"),
    ],
)
def test_quantize_config_errors_come_before_any_work(compose_train, overrides, message) -> None:
    cfg = compose_train(["ckpt_path=/nonexistent.ckpt", *overrides], config_name="export")
    with pytest.raises(ConfigError, match=re.escape(message)):
        export(cfg)


def test_recipe_defaults_are_export_yamls(compose_train) -> None:
    cfg = compose_train([], config_name="export")
    assert cfg.quantize is None
    assert QuantizationRecipe.from_config(cfg.quantization) == QuantizationRecipe()
    assert QuantizationRecipe.from_config({"op_types": ["MatMul", "Gather"]}).op_types == (
        "MatMul",
        "Gather",
    )


def test_onnx_module_cannot_be_trained(random_onnx) -> None:
    from qa_lightning.model.onnx_model import OnnxQAModule

    module = OnnxQAModule(str(random_onnx), name_or_path=str(random_onnx.parent))
    assert module.hparams.onnx_path == str(random_onnx)
    assert not list(module.parameters())
    with pytest.raises(NotImplementedError, match="cannot be trained"):
        module.configure_optimizers()
    batch = {"input_ids": torch.tensor([[101, 2040, 102, 2009, 102]])}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["token_type_ids"] = torch.tensor([[0, 0, 0, 1, 1]])
    outputs = module(batch)
    start_logits, end_logits = OnnxLogits(random_onnx)(batch)
    assert torch.equal(outputs.start_logits, start_logits)
    assert torch.equal(outputs.end_logits, end_logits)
