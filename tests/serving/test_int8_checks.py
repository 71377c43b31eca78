"""The int8 export checks what ships: the fused graph and the int8 file themselves, in padded
and unpadded batches; ``quantization.exclude`` patterns of layers also keep their fused attention
fp32; rebuilt models are fp32 whatever dtype their config names; the agreement check measures
answers (F1 against fp32, on labelled questions against the gold answers) and warns only on a
real drop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from qa_lightning.answers.settings import InferenceSettings
from qa_lightning.core.config import minilm_path, resource_path
from qa_lightning.core.errors import ExportError
from qa_lightning.data.loading import load_local_file
from qa_lightning.model.logits import TorchLogits
from qa_lightning.runs.checkpoint_reading import Exported
from qa_lightning.serving.exports import export_checked_onnx
from tests.conftest import CONF_DIR

pytest.importorskip("onnxruntime.quantization")
from qa_lightning.serving import int8 as quantize  # noqa: E402
from qa_lightning.serving.int8 import QuantizationRecipe, compare_answers, quantize_export  # noqa: E402

SETTINGS = InferenceSettings(max_length=128, stride=32)
DEMO_VALIDATION = resource_path("demo/validation.json")


def tiny_model(config_overrides: dict | None = None) -> torch.nn.Module:
    from qa_lightning.model import load_qa_model

    torch.manual_seed(0)
    overrides = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "tiny.yaml"))
    return load_qa_model(
        minilm_path(), True, {**overrides["config_overrides"], **(config_overrides or {})}
    ).eval()


@pytest.fixture(scope="module")
def exported() -> Exported:
    from qa_lightning.core.tokenizer import load_tokenizer

    return Exported(tiny_model(), load_tokenizer(minilm_path()), SETTINGS)


def export_cfg(**values) -> OmegaConf:
    return OmegaConf.create(
        {
            "validation_file": DEMO_VALIDATION,
            "validation_samples": 12,
            "min_agreement": 0.9,
            "max_f1_drop": 1.0,
            "atol": 1e-4,
            "ckpt_path": None,
            **values,
        }
    )


def int8_export(exported, out_dir: Path, recipe: QuantizationRecipe, **cfg) -> dict:
    def finish(path: Path) -> dict:
        return quantize_export(exported, path, recipe, export_cfg(**cfg))

    return export_checked_onnx(exported, out_dir, atol=1e-4, finish=finish)[2]["quantization"]


# -- 5: the checks run on what ships -------------------------------------------------------------


def test_a_broken_fusion_stops_the_export(exported, tmp_path, monkeypatch) -> None:
    import onnx
    from onnx import numpy_helper

    fuse = quantize.fuse_transformer_graph

    def broken_fusion(onnx_path, fused_path):
        counts = fuse(onnx_path, fused_path)
        model = onnx.load(str(fused_path))
        for tensor in model.graph.initializer:
            if tensor.name == "Attention_1_qkv_weight":  # the last layer's attention, scrambled
                tensor.CopyFrom(
                    numpy_helper.from_array(numpy_helper.to_array(tensor)[::-1].copy(), tensor.name)
                )
        onnx.save(model, str(fused_path))
        return counts

    monkeypatch.setattr(quantize, "fuse_transformer_graph", broken_fusion)
    with pytest.raises(ExportError, match="the fused graph's logits differ from PyTorch's"):
        int8_export(exported, tmp_path / "int8", QuantizationRecipe(fuse=True))
    assert not (tmp_path / "int8").exists()


def test_the_record_says_what_was_measured_on_which_file(exported, tmp_path, capsys) -> None:
    record = int8_export(exported, tmp_path / "int8", QuantizationRecipe(fuse=True))
    assert record["fused_operators"] == {
        "EmbedLayerNormalization": 1,
        "Attention": 2,
        "BiasGelu": 2,
        "SkipLayerNormalization": 4,  # two a layer: after attention and after the FFN
    }
    checks = record["checks"]
    assert checks["fused fp32 graph vs fp32 PyTorch"]["max_abs_logit_diff"] <= 1e-4
    int8 = checks["int8 model.onnx vs fp32 PyTorch"]
    assert 0 < int8["max_abs_logit_diff"] < 1
    printed = capsys.readouterr().out
    assert "fused fp32 graph vs fp32 PyTorch" in printed
    assert "int8 model.onnx vs fp32 PyTorch" in printed


def test_the_agreement_check_runs_padded_and_unpadded_batches(exported) -> None:
    validation = load_local_file(DEMO_VALIDATION)
    seen: list[torch.Tensor] = []
    reference = TorchLogits(exported.model, "cpu", "32-true")

    def candidate(batch):
        seen.append(batch["attention_mask"])
        return reference(batch)

    agreement = compare_answers(
        exported.tokenizer,
        SETTINGS,
        reference,
        candidate,
        validation["question"][:12],
        validation["context"][:12],
    )
    assert any(bool((mask == 0).any()) for mask in seen), "no padded batch was checked"
    assert any(bool((mask == 1).all()) for mask in seen), "no unpadded batch was checked"
    assert agreement.padded_windows > 0
    assert agreement.max_abs_logit_diff == 0.0


def test_excluding_a_layer_keeps_its_fused_attention_fp32(exported, tmp_path) -> None:
    import onnx

    # dynamic: its int8 Attention (QAttention) shows which layer stayed fp32
    recipe = QuantizationRecipe(activations="dynamic", fuse=True, exclude=(r"layer\.1/",))
    record = int8_export(exported, tmp_path / "int8", recipe)
    assert any("Attention" in name for name in record["excluded_nodes"])
    graph = onnx.load(str(tmp_path / "int8" / "model.onnx")).graph
    ops = [(node.op_type, node.name) for node in graph.node]
    assert sum(op == "Attention" for op, _ in ops) == 1  # layer 1's, fp32
    assert sum(op == "QAttention" for op, _ in ops) == 1  # layer 0's, int8
    quantised = [name for op, name in ops if op in ("QAttention", "MatMulInteger")]
    assert quantised and not any("layer.1/" in name for name in quantised)


def test_an_exclude_pattern_that_matches_no_node_stops_the_export(exported, tmp_path) -> None:
    recipe = QuantizationRecipe(exclude=(r"layer\.1\.",))  # names say layer.1/, not layer.1.
    with pytest.raises(ExportError, match=r"match no node of the graph"):
        int8_export(exported, tmp_path / "int8", recipe)
    assert not (tmp_path / "int8").exists()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fp32_weights_under_a_config_that_says_fp16_load_back_exactly(tmp_path, dtype) -> None:
    """A hub config often says ``"dtype": "float16"``; the weights saved with it (a checkpoint's,
    a teacher's) are fp32 and must not be rounded when the model is rebuilt or loaded."""
    from qa_lightning.model import load_qa_model

    model = tiny_model()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1e-4)  # not representable in fp16 or bf16 around 1
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "dtype": dtype}))
    rebuilt = load_qa_model(str(tmp_path), True)  # as load_checkpoint rebuilds a checkpoint's
    rebuilt.load_state_dict(model.state_dict())
    loaded = load_qa_model(str(tmp_path))  # as a model directory is loaded
    for other in (rebuilt, loaded):
        for (name, a), b in zip(
            model.state_dict().items(), other.state_dict().values(), strict=True
        ):
            assert b.dtype == torch.float32 and torch.equal(a, b), name
    assert loaded.config.dtype == torch.float32


# -- 4: the agreement measures answers ----------------------------------------------------------


def test_the_agreement_scores_both_models_on_labelled_questions(exported) -> None:
    validation = load_local_file(DEMO_VALIDATION)
    reference = TorchLogits(exported.model, "cpu", "32-true")
    questions, contexts = validation["question"][:12], validation["context"][:12]
    gold = [a["text"] for a in validation["answers"][:12]]

    same = compare_answers(
        exported.tokenizer, SETTINGS, reference, reference, questions, contexts, gold
    )
    assert same.answer_f1 == 100.0 and same.in_reference_top3 == 1.0
    assert same.reference_scores == same.candidate_scores
    assert same.f1_drop == 0.0

    def worse(batch):  # the fp32 logits with the start moved by one token: overlapping answers
        start, end = reference(batch)
        return torch.roll(start, 1, dims=1), end

    moved = compare_answers(exported.tokenizer, SETTINGS, reference, worse, questions, contexts)
    assert moved.candidate_scores is None and moved.f1_drop is None
    assert 0 <= moved.answer_f1 < 100


def test_a_small_answer_change_does_not_warn_but_a_real_drop_does(caplog) -> None:
    base = dict(questions=300, windows=310, padded_windows=100, same_best_answer=260)
    small = quantize.Agreement(
        **base,
        in_reference_top3=0.99,
        answer_f1=96.0,
        max_abs_logit_diff=0.3,
        reference_scores={"em": 80.0, "f1": 87.0},
        candidate_scores={"em": 79.8, "f1": 86.6},
    )
    assert small.share < 0.9  # the old top-1 alarm would fire
    assert quantize.agreement_problem(small, min_agreement=0.9, max_f1_drop=1.0) is None
    drop = quantize.Agreement(**{**small.__dict__, "candidate_scores": {"em": 75.0, "f1": 84.0}})
    assert "F1 3.00 points below fp32's" in quantize.agreement_problem(drop, 0.9, 1.0)
    unlabelled = quantize.Agreement(
        **{**small.__dict__, "reference_scores": None, "candidate_scores": None, "answer_f1": 80.0}
    )
    assert "overlap F1 of 80.0%" in quantize.agreement_problem(unlabelled, 0.9, 1.0)
