"""An int8 model's answer to a question does not depend on the other questions of its batch, their
order or the padding: dynamic int8 runs each window alone, static int8 has fixed activation
scales (``quantization.activations``); through the answerer, ``predict`` and the server's API;
the static export, its calibration and its config checks."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from qa_lightning.answers.settings import InferenceSettings
from qa_lightning.core.config import minilm_path, resource_path
from qa_lightning.core.errors import ConfigError, ExportError
from qa_lightning.data.collate import WindowCollator
from qa_lightning.data.windowing import make_eval_windows
from qa_lightning.export import export
from qa_lightning.model.logits import PADDING_LOGIT, QUANTIZATION_METADATA_KEY, OnnxLogits
from qa_lightning.predict import predict
from qa_lightning.runs.checkpoint_reading import Exported
from qa_lightning.serving import int8
from qa_lightning.serving.answerer import QuestionAnswerer
from qa_lightning.serving.exports import export_checked_onnx, export_onnx
from qa_lightning.serving.int8 import (
    QuantizationRecipe,
    calibration_file,
    calibration_windows,
    quantize_onnx,
)
from tests.conftest import CONF_DIR
from tests.serving.graphs import int8_matmuls, op_counts

pytest.importorskip("onnxruntime.quantization")

SETTINGS = InferenceSettings(max_length=128, stride=32)
MECHANISMS = ("dynamic", "static")
#: Contexts of very different lengths beside the demo's: one word, and several windows long.
EXTRA = [
    ("Who?", "Ada."),
    ("What was built first?", " ".join(["The mill was built in 1820, then the bridge."] * 40)),
]


@pytest.fixture(scope="module")
def tiny_export() -> Exported:
    """A random tiny model (conf/model/tiny.yaml, seed 0) with the MiniLM tokenizer."""
    from qa_lightning.core.tokenizer import load_tokenizer
    from qa_lightning.model import load_qa_model

    torch.manual_seed(0)
    overrides = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "tiny.yaml"))
    model = load_qa_model(minilm_path(), True, overrides["config_overrides"]).eval()
    return Exported(model, load_tokenizer(minilm_path()), SETTINGS)


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_export, tmp_path_factory) -> Path:
    """The tiny model exported as fp32 ONNX, with its tokenizer and settings."""
    return export_onnx(tiny_export, tmp_path_factory.mktemp("fp32") / "onnx_model").parent


@pytest.fixture(scope="module")
def exports(tiny_export, tokenizer, tmp_path_factory) -> dict[str, Path]:
    """The tiny model quantised with dynamic and with static activations (percentile, 64
    windows of the demo training questions), each an export directory."""
    calibration = calibration_windows(
        tokenizer, SETTINGS, resource_path("demo/train.json"), size=64
    )
    found = {}
    for mechanism in MECHANISMS:
        recipe = QuantizationRecipe(activations=mechanism)

        def finish(onnx_path: Path, recipe=recipe) -> dict:
            return {"quantization": quantize_onnx(onnx_path, onnx_path, recipe, None, calibration)}

        out_dir = tmp_path_factory.mktemp(mechanism) / "onnx_int8_model"
        found[mechanism] = export_checked_onnx(tiny_export, out_dir, finish=finish)[0].parent
    return found


@pytest.fixture(scope="module")
def pairs(validation) -> list[tuple[str, str]]:
    """The demo's 30 validation questions and two of very different lengths."""
    return [*zip(validation["question"][:], validation["context"][:], strict=True), *EXTRA]


def spans(found: list) -> list[list[tuple]]:
    """Each question's answers as (text, start, end, score)."""
    return [[(a.text, a.start, a.end, a.score) for a in answers] for answers in found]


def ask(answerer: QuestionAnswerer, pairs: list, order: list[int]) -> list[list[tuple]]:
    """The answers to ``pairs`` asked in ``order``, in the order of ``pairs``."""
    found = answerer.answer([pairs[i][0] for i in order], [pairs[i][1] for i in order], top_k=3)
    by_index = dict(zip(order, spans(found), strict=True))
    return [by_index[i] for i in range(len(pairs))]


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_answers_do_not_depend_on_the_other_questions(exports, tokenizer, pairs, mechanism) -> None:
    """Asked alone, all together, reversed and shuffled (batches of 8 windows of one length, as
    predict batches on a CPU): the same 3 best answers with the same scores, exactly."""
    logits = OnnxLogits(exports[mechanism] / "model.onnx")
    assert logits.dynamic is (mechanism == "dynamic")
    answerer = QuestionAnswerer(tokenizer, logits, SETTINGS, batch_size=8)
    order = list(range(len(pairs)))
    shuffled = random.Random(0).sample(order, len(order))
    alone = [spans(answerer.answer([q], [c], top_k=3))[0] for q, c in pairs]
    assert all(alone)
    assert ask(answerer, pairs, order) == alone
    assert ask(answerer, pairs, order[::-1]) == alone
    assert ask(answerer, pairs, shuffled) == alone
    if mechanism == "dynamic":  # as before: each batch in one pass, its scales from all of it
        logits.unpadded = False
        assert ask(answerer, pairs, order) != alone
        assert ask(answerer, pairs, shuffled) != ask(answerer, pairs, order)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_a_window_has_the_same_logits_padded_among_others(
    exports, tokenizer, tokenizer_dir, pairs, mechanism
) -> None:
    """A padded batch (a server's with equal_length=false, data.pad_to_max_length): each window's
    logits are those it has alone, exactly; its padding positions get PADDING_LOGIT."""
    windows = make_eval_windows(tokenizer, *zip(*pairs, strict=True), 128, 32)
    keys = [k for k in windows if k != "length"]
    rows = [{k: windows[k][i] for k in keys} for i in range(len(windows["input_ids"]))]
    lengths = windows["length"]
    # the shortest, the longest and one between
    chosen = [int(np.argmin(lengths)), int(np.argmax(lengths)), len(rows) // 2]
    collate = WindowCollator(tokenizer.pad_token_id, 8)
    logits = OnnxLogits(exports[mechanism] / "model.onnx")
    batch = collate([rows[i] for i in chosen])
    padded = logits(batch)
    for position, i in enumerate(chosen):
        alone = logits(collate([rows[i]]))
        n = lengths[i]
        for together, by_itself in zip(padded, alone, strict=True):
            assert torch.equal(together[position, :n], by_itself[0, :n])
            assert bool((together[position, n:] == PADDING_LOGIT).all())
    if mechanism == "dynamic":  # as before: the padding and the other windows change them
        logits.unpadded = False
        before = logits(batch)
        assert not torch.equal(
            before[0][0, : lengths[chosen[0]]], padded[0][0, : lengths[chosen[0]]]
        )
    fp32 = OnnxLogits(tokenizer_dir / "model.onnx")  # fp32 runs the batch as it comes
    assert not bool((fp32(batch)[0][0, lengths[chosen[0]] :] == PADDING_LOGIT).any())


def run_predict(compose_train, export_dir: Path, pairs: list, order: list[int], tmp: Path):
    """``predict onnx_path=... input=FILE`` of ``pairs`` written in ``order`` (batches of 4);
    the answers of each question by its id."""
    questions = tmp / "questions.jsonl"
    questions.write_text(
        "".join(
            json.dumps({"id": str(i), "question": pairs[i][0], "context": pairs[i][1]}) + "\n"
            for i in order
        )
    )
    output = tmp / "answers.jsonl"
    overrides = [f"onnx_path={export_dir}", f"input={questions}", f"output={output}"]
    predict(compose_train([*overrides, "top_k=2", "batch_size=4", "progress=false"], "predict"))
    return {row["id"]: row["answers"] for row in map(json.loads, output.read_text().splitlines())}


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_predict_gives_the_same_answers_in_another_order(
    compose_train, exports, pairs, mechanism, tmp_path, monkeypatch
) -> None:
    order = list(range(len(pairs)))
    shuffled = random.Random(1).sample(order, len(order))
    in_order = run_predict(compose_train, exports[mechanism], pairs, order, tmp_path)
    assert len(in_order) == len(pairs)
    assert run_predict(compose_train, exports[mechanism], pairs, shuffled, tmp_path) == in_order
    if mechanism == "dynamic":  # run as a static model (windows of one length together): before
        monkeypatch.setattr(OnnxLogits, "dynamic", property(lambda self: False))
        before = run_predict(compose_train, exports[mechanism], pairs, order, tmp_path)
        assert run_predict(compose_train, exports[mechanism], pairs, shuffled, tmp_path) != before


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_the_server_answers_a_request_as_it_answers_it_alone(exports, pairs, mechanism) -> None:
    """The server's API (a batch of requests is one answer call; with a core share, each
    forward pass through a session of its thread count) answers each request of a batch as
    it answers it alone."""
    server = pytest.importorskip("qa_lightning.serving.server")
    from qa_lightning.serving.cores import CoreShare, SharedLogits

    source = server.ModelSource(backend="onnx", onnx_path=str(exports[mechanism]))
    api = server.QuestionAnsweringAPI(source, max_batch_size=len(pairs), cores=CoreShare(2, 2))
    api.setup("cpu")
    assert isinstance(api.answerer.logits_fn, SharedLogits)
    requests = [
        api.decode_request(server.AnswerRequest(question=q, context=c, top_k=2, id=i))
        for i, (q, c) in enumerate(pairs)
    ]
    together = api.predict(requests)
    alone = [api.predict([request])[0] for request in requests]
    assert [(i, spans([a])) for i, a in together] == [(i, spans([a])) for i, a in alone]


def test_static_export_records_its_calibration(compose_train, model_dir, capsys) -> None:
    """``export model_dir=... quantize=int8 quantization.activations=static``: without a
    checkpoint, the scales are calibrated on validation_file; the fused attention stays fp32,
    every other weight MatMul is int8 with fixed scales."""
    path = resource_path("demo/validation.json")
    cfg = compose_train(
        [
            f"model_dir={model_dir}",
            "quantize=int8",
            "quantization.activations=static",
            "quantization.fuse=true",
            "quantization.calibration_windows=16",
            f"validation_file={path}",
        ],
        config_name="export",
    )
    result = export(cfg)
    out_dir = Path(result["path"]).parent
    printed = capsys.readouterr().out
    assert (
        f"calibrated the static int8 activation scales (percentile) on 16 windows of {path}"
        in printed
    )
    record = json.loads((out_dir / "qa_lightning.json").read_text())["quantization"]
    assert record["activations"] == "static" and record["calibration_method"] == "percentile"
    assert record["calibration_file"] == path and record["calibration_windows"] == 16
    assert record["method"].startswith("onnxruntime static quantisation (QDQ)")
    assert "calibrated (percentile) on 16 windows" in record["method"]
    assert "the fused Attention operators stay fp32" in record["method"]
    counts = op_counts(out_dir / "model.onnx")
    assert counts["Attention"] == 2 and "QAttention" not in counts
    assert "DynamicQuantizeLinear" not in counts and "MatMulInteger" not in counts
    # 2 layers x (attention output, FFN in, FFN out) + the QA head
    assert int8_matmuls(out_dir / "model.onnx") == 2 * 3 + 1
    logits = OnnxLogits(out_dir / "model.onnx")
    assert logits.quantization == {
        k: v for k, v in record.items() if k not in ("checks", "agreement")
    }
    assert not logits.dynamic


def test_static_unfused_quantises_the_attention_projections(tokenizer_dir, tokenizer, tmp_path):
    calibration = calibration_windows(tokenizer, SETTINGS, resource_path("demo/train.json"), 8)
    recipe = QuantizationRecipe(activations="static", fuse=False, calibration_method="minmax")
    record = quantize_onnx(
        tokenizer_dir / "model.onnx", tmp_path / "int8.onnx", recipe, None, calibration
    )
    assert "fused" not in record["method"] and "fused_operators" not in record
    # query, key, value, attention output, FFN in and out in each of 2 layers, the QA head; the
    # attention products (two activations) stay fp32, as with dynamic quantisation
    assert int8_matmuls(tmp_path / "int8.onnx") == 2 * 6 + 1
    assert op_counts(tmp_path / "int8.onnx")["MatMul"] == 2 * 6 + 1 + 2 * 2


def test_dynamic_record_has_no_calibration(tokenizer_dir, tmp_path) -> None:
    record = quantize_onnx(
        tokenizer_dir / "model.onnx",
        tmp_path / "int8.onnx",
        QuantizationRecipe(activations="dynamic"),
    )
    assert record["activations"] == "dynamic"
    assert not [key for key in record if key.startswith("calibration")]
    with pytest.raises(ExportError, match="static quantisation needs calibration windows"):
        quantize_onnx(
            tokenizer_dir / "model.onnx",
            tmp_path / "static.onnx",
            QuantizationRecipe(activations="static"),
        )


def test_calibration_windows_are_unpadded_windows_of_a_sample(tokenizer) -> None:
    path = resource_path("demo/train.json")
    calibration = calibration_windows(tokenizer, SETTINGS, path, size=64)
    assert calibration.file == path and len(calibration.windows) == 64
    for window in calibration.windows:
        assert window.keys() == {"input_ids", "attention_mask", "token_type_ids"}
        assert window["input_ids"].shape[0] == 1 and window["input_ids"].dtype == np.int64
        assert bool(window["attention_mask"].all())  # no padding
    assert len({w["input_ids"].tobytes() for w in calibration.windows}) == 64
    # more than the file has: every window of every question
    from qa_lightning.data.loading import load_local_file

    examples = load_local_file(path)
    every = make_eval_windows(tokenizer, examples["question"][:], examples["context"][:], 128, 32)
    assert len(calibration_windows(tokenizer, SETTINGS, path, 10_000).windows) == len(
        every["input_ids"]
    )


def test_calibration_file_prefers_the_training_questions(monkeypatch) -> None:
    files = {"train_file": "train.json", "validation_file": "checkpoint_val.json"}
    monkeypatch.setattr(int8, "checkpoint_data_file", lambda ckpt, key: ckpt and files.get(key))
    static = QuantizationRecipe(activations="static")

    def resolved(recipe=static, **cfg) -> str:
        return calibration_file(OmegaConf.create(cfg), recipe)

    assert resolved(ckpt_path="a.ckpt", validation_file="val.json") == "train.json"
    given = QuantizationRecipe(activations="static", calibration_file="mine.json")
    assert resolved(given, ckpt_path="a.ckpt") == "mine.json"
    files.pop("train_file")
    assert resolved(ckpt_path="a.ckpt", validation_file="val.json") == "val.json"
    assert resolved(ckpt_path="a.ckpt") == "checkpoint_val.json"
    assert resolved(model_dir="m", validation_file="val.json") == "val.json"
    with pytest.raises(ConfigError, match=re.escape("give quantization.calibration_file=PATH")):
        resolved(model_dir="m")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["quantization.activations=sometimes"], "quantization.activations='sometimes'; use"),
        (["quantization.calibration_method=kl"], "quantization.calibration_method='kl'; use one"),
        (["quantization.calibration_windows=0"], "quantization.calibration_windows=0; give"),
        (["quantization.calibration_windows=many"], "quantization.calibration_windows='many'"),
        (
            ["quantization.activations=static", "quantization.op_types=[Attention]"],
            "quantises nothing: static quantisation has no int8 Attention operator",
        ),
        (
            ["quantization.activations=static", "quantization.op_types=[EmbedLayerNormalization]"],
            "operator types that static quantisation handles",
        ),
        (
            ["quantization.calibration_file=/no/such.json"],
            "quantization.calibration_file='/no/such.json' is not a file",
        ),
        (
            ["quantization.activations=static"],
            "but there is no local file of them (model_dir= has none)",
        ),
        ([], "(quantization.activations=static, the default), but there is no local file"),
    ],
)
def test_static_config_errors_come_before_any_work(
    compose_train, model_dir, overrides, message
) -> None:
    cfg = compose_train([f"model_dir={model_dir}", "quantize=int8", *overrides], "export")
    with pytest.raises(ConfigError, match=re.escape(message)):
        export(cfg)


def test_the_recorded_recipe_is_in_the_model_metadata(exports) -> None:
    import onnx

    for mechanism, directory in exports.items():
        metadata = {p.key: p.value for p in onnx.load(str(directory / "model.onnx")).metadata_props}
        assert json.loads(metadata[QUANTIZATION_METADATA_KEY])["activations"] == mechanism
