"""CPU bf16 and int8 dot-product detection from hand-written /proc/cpuinfo text."""

from __future__ import annotations

import pytest
import torch

from qa_lightning.core import hardware
from qa_lightning.core.hardware import (
    cpu_bf16_warning,
    cpu_int8_warning,
    cpu_supports_bf16,
    cpu_supports_int8_dot,
    cpuinfo_flags,
    missing_gpu_error,
)

AVX2_ONLY = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx f16c fma avx2 bmi2

processor\t: 1
flags\t\t: fpu sse sse2 avx f16c fma avx2 bmi2
"""
SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""
AMX_ONLY = "processor\t: 0\nflags\t\t: avx2 avx512f amx_tile amx_bf16\n"
GRAVITON3 = "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd sve i8mm bf16 sve2\n"
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics\n"
MIXED = SAPPHIRE_RAPIDS + "\nprocessor\t: 1\nflags\t\t: fpu avx2 avx512f\n"


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        (AVX2_ONLY, False),
        (SAPPHIRE_RAPIDS, True),
        (AMX_ONLY, True),
        (GRAVITON3, True),
        (GRAVITON2, False),
        (MIXED, False),  # only flags every processor has count
        ("", False),
    ],
)
def test_cpu_supports_bf16_from_cpuinfo(cpuinfo, expected):
    assert cpu_supports_bf16(cpuinfo) is expected


def test_cpuinfo_flags_are_words_of_flags_lines():
    assert cpuinfo_flags(AVX2_ONLY) == {"fpu", "sse", "sse2", "avx", "f16c", "fma", "avx2", "bmi2"}
    assert "AuthenticAMD" not in cpuinfo_flags(AVX2_ONLY)


def test_unreadable_cpuinfo_falls_back_to_torch(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "CPUINFO", tmp_path / "missing")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert cpu_supports_bf16() is True
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert cpu_supports_bf16() is False


def test_warning_only_for_bf16_on_a_cpu_without_it(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(AVX2_ONLY)
    monkeypatch.setattr(hardware, "CPUINFO", cpuinfo)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = cpu_bf16_warning("cpu", "bf16-mixed")
    assert message is not None and "trainer=cpu" in message and "bf16-mixed" in message
    assert cpu_bf16_warning("auto", "bf16-true") is not None
    assert cpu_bf16_warning("cpu", "32-true") is None
    assert cpu_bf16_warning("gpu", "bf16-mixed") is None
    cpuinfo.write_text(SAPPHIRE_RAPIDS)
    assert cpu_bf16_warning("cpu", "bf16-mixed") is None


ZEN4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
ALDER_LAKE = "processor\t: 0\nflags\t\t: fpu avx2 avx_vnni\n"


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        (AVX2_ONLY, False),
        (ZEN4, True),  # avx512_vnni
        (ALDER_LAKE, True),  # avx_vnni
        (SAPPHIRE_RAPIDS, True),  # amx_int8
        (AMX_ONLY, False),  # amx_bf16 without amx_int8
        (GRAVITON3, True),  # i8mm
        (GRAVITON2, False),
        (MIXED, False),  # only flags every processor has count
        ("", False),
    ],
)
def test_cpu_supports_int8_dot_from_cpuinfo(cpuinfo, expected):
    assert cpu_supports_int8_dot(cpuinfo) is expected


def test_int8_warning_only_on_a_cpu_without_int8_dot_products(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(hardware, "CPUINFO", cpuinfo)
    cpuinfo.write_text(AVX2_ONLY)
    message = cpu_int8_warning("model.onnx")
    assert message is not None and message.startswith("model.onnx runs on a CPU without int8")
    assert "quantization.reduce_range=true" in message and "int8_throughput.py" in message
    for fast in (ZEN4, ALDER_LAKE, SAPPHIRE_RAPIDS, GRAVITON3):
        cpuinfo.write_text(fast)
        assert cpu_int8_warning() is None


def test_unreadable_cpuinfo_asks_torch_for_vnni(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "CPUINFO", tmp_path / "missing")
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert cpu_supports_int8_dot() is False
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: True, raising=False)
    assert cpu_supports_int8_dot() is True


@pytest.mark.parametrize(
    ("cuda", "mps", "failing"),
    [
        (False, False, {"gpu", "cuda", "mps"}),
        (True, False, {"mps"}),
        (False, True, {"cuda"}),  # a Mac: gpu is MPS
    ],
)
def test_a_gpu_accelerator_without_a_gpu_names_the_cpu_trainers(monkeypatch, cuda, mps, failing):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    for accelerator in ("gpu", "cuda", "mps", "cpu", "auto"):
        message = missing_gpu_error(accelerator)
        assert (message is not None) == (accelerator in failing), accelerator
        if message:
            assert f"trainer.accelerator={accelerator} " in message and "trainer=cpu" in message
