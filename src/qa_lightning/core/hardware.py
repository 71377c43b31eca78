"""What the machine does fast: native bf16 arithmetic and int8 dot products on the CPU.

torch is imported only where ``/proc/cpuinfo`` cannot answer (and for CUDA), so that the
processes that answer no question (the server's HTTP process) do not load it."""

from __future__ import annotations

from pathlib import Path

#: ``/proc/cpuinfo`` flags of native bf16 arithmetic: x86 AVX512-BF16 and AMX-BF16 (Intel Xeon
#: Cooper Lake, Sapphire Rapids and later; AMD Zen 4 and later) and the aarch64 BF16 extension.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
#: ``/proc/cpuinfo`` flags of int8 dot-product instructions, which onnxruntime's int8 matrix
#: products use: x86 AVX512-VNNI, AVX-VNNI and AMX-INT8 (Intel Cascade Lake / Alder Lake /
#: Sapphire Rapids and later; AMD Zen 4 and later) and the aarch64 dot-product and int8-matmul
#: extensions.
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"})
CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_flags(cpuinfo: str) -> set[str]:
    """Feature flags that every processor of ``/proc/cpuinfo`` text lists.

    x86 lists them on ``flags`` lines, aarch64 on ``Features`` lines; no such line gives ``set()``.
    """
    per_processor = [
        set(value.split())
        for key, _, value in (line.partition(":") for line in cpuinfo.splitlines())
        if key.strip().lower() in ("flags", "features")
    ]
    return set.intersection(*per_processor) if per_processor else set()


def cpu_supports_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes in bf16 natively, so that ``bf16-mixed`` can beat fp32.

    Without native bf16 (e.g. AVX2-only CPUs) PyTorch emulates bf16 and is slower than fp32.
    Reads ``/proc/cpuinfo`` (or the ``cpuinfo`` text given); where it cannot be read (macOS,
    Windows) asks PyTorch's CPU detection for AVX512-BF16 or AMX.
    """
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            return _torch_cpu_has("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return bool(cpuinfo_flags(cpuinfo) & BF16_FLAGS)


def _torch_cpu_has(*checks: str) -> bool:
    """Whether one of PyTorch's CPU feature ``checks`` (``torch.cpu._is_..._supported``) holds."""
    import torch

    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def cpu_bf16_warning(
    accelerator: str,
    precision: str | int | None,
    key: str = "trainer.precision",
    fp32: str = "trainer=cpu (precision 32-true)",
) -> str | None:
    """The warning for a bf16 precision run on a CPU without native bf16, else ``None``.

    ``key`` names the setting and ``fp32`` the override that runs in fp32 instead.
    """
    import torch

    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if not on_cpu or not str(precision).startswith("bf16") or cpu_supports_bf16():
        return None
    return (
        f"{key}={precision} on a CPU without native bf16 (no avx512_bf16 or amx_bf16 flag in "
        "/proc/cpuinfo): PyTorch emulates bf16 here, so it runs slower than fp32, not faster "
        f"(measure it with python benchmarks/bf16_cpu.py). Use {fp32} on this machine; bf16 "
        "pays off on CPUs with AVX512-BF16 or AMX (Intel Xeon Cooper Lake / Sapphire Rapids or "
        "later, AMD Zen 4 or later)."
    )


def missing_gpu_error(accelerator: str) -> str | None:
    """The error for ``trainer.accelerator`` naming a GPU that torch does not see (``gpu``:
    CUDA or Apple's MPS), else ``None``: Lightning's own message names no fix."""
    import torch

    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if {"gpu": cuda or mps, "cuda": cuda, "mps": mps}.get(accelerator, True):
        return None
    return (
        f"trainer.accelerator={accelerator} (trainer=gpu, ddp, fsdp and deepspeed set it) but "
        f"torch {torch.__version__} sees no GPU on this machine (a CPU build of torch, or no "
        "driver): train on the CPU with trainer=default or trainer=cpu, or with DDP on CPU "
        "processes with trainer=ddp_cpu."
    )


def cpu_supports_int8_dot(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has int8 dot-product instructions (VNNI, AMX-INT8, aarch64 dot product).

    Without them (e.g. AVX2 or AVX512 CPUs before Cascade Lake / Zen 4) onnxruntime multiplies
    int8 matrices with 16-bit multiply-adds, which can be no faster than fp32 and can saturate.
    Reads ``/proc/cpuinfo`` (or the ``cpuinfo`` text given); where it cannot be read asks
    PyTorch's CPU detection for AVX512-VNNI or AMX.
    """
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            return _torch_cpu_has("_is_vnni_supported", "_is_amx_tile_supported")
    return bool(cpuinfo_flags(cpuinfo) & INT8_DOT_FLAGS)


def cpu_int8_warning(what: str = "the int8 ONNX model") -> str | None:
    """The warning for int8 inference on a CPU without int8 dot products, else ``None``."""
    if cpu_supports_int8_dot():
        return None
    return (
        f"{what} runs on a CPU without int8 dot-product instructions (no avx512_vnni, avx_vnni "
        "or amx_int8 flag in /proc/cpuinfo): onnxruntime then multiplies int8 matrices with "
        "16-bit multiply-adds, which may be no faster than the fp32 ONNX export, or slower, and "
        "can saturate (an export with quantization.reduce_range=true avoids that). Measure it "
        "with python benchmarks/int8_throughput.py on this machine, or serve the fp32 export "
        "(format=onnx without quantize); int8 pays off on CPUs with VNNI or AMX (Intel Cascade "
        "Lake / Sapphire Rapids or later, AMD Zen 4 or later)."
    )
