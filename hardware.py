"""What the machine runs fast, decided from what torch reports (never from a timing, so a run is reproducible).

`mixed_precision: auto` (the default) trains in bf16 only where the hardware computes bf16 natively, else in fp32:
- a CUDA device with bf16 support (Ampere and later): bf16;
- a CPU with AVX512_BF16 or AMX tiles (Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later): bf16;
- any other CPU (AVX2-only: AMD before Zen 4, most laptops, many cloud machines): fp32. There torch emulates bf16
  and every linear layer of a training step runs ~4-5x slower than in fp32 (docs/performance.md, "CPU classes").

`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2` make an AVX-512 machine dispatch like an AVX2-only one; `cpu_info`
reads them, so `auto` then says fp32 too (docs/performance.md measures both classes on one machine that way).
"""

from __future__ import annotations

import os
import platform

import torch

PRECISIONS = ("auto", "no", "bf16", "fp16")
# ISAs at or above this oneDNN level can execute AVX512_BF16 instructions; a lower ONEDNN_MAX_CPU_ISA caps oneDNN below it
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512",
                     "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "DEFAULT", "ALL")


def cpu_model() -> str:
    """The CPU's model name, as `lscpu` prints it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _query(namespace, name: str) -> bool:
    """One of torch's private capability queries; False where this torch version lacks it (never guess native bf16)."""
    try:
        return bool(getattr(namespace, name)())
    except (AttributeError, RuntimeError):
        return False


def cpu_info() -> dict:
    """The CPU as torch sees it: model, the ATen kernel capability, and whether it runs bf16 natively (with why)."""
    isa_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    capped = bool(isa_cap) and isa_cap not in _ONEDNN_BF16_ISAS
    avx512_bf16 = _query(torch.cpu, "_is_avx512_bf16_supported")
    amx = _query(torch.cpu, "_is_amx_tile_supported")
    mkldnn_bf16 = _query(torch.ops.mkldnn, "_is_mkldnn_bf16_supported")
    native = (avx512_bf16 or amx) and mkldnn_bf16 and not capped
    if native:
        why = "AMX tiles" if amx else "AVX512_BF16"
    elif capped:
        why = f"ONEDNN_MAX_CPU_ISA={isa_cap} caps oneDNN below AVX512_BF16"
    else:
        why = "no AVX512_BF16 or AMX instructions"
    return {"model": cpu_model(), "capability": torch.backends.cpu.get_cpu_capability(), "avx512_bf16": avx512_bf16,
            "amx": amx, "mkldnn_bf16": mkldnn_bf16, "bf16_native": native, "bf16_reason": why}


def resolve_precision(requested: str, on_gpu: bool, gpu_bf16: bool = False, cpu: dict | None = None) -> tuple[str, str]:
    """(precision accelerate gets: "no" / "bf16" / "fp16", one line saying why). `cpu`: a `cpu_info()` dict (read when
    None); `gpu_bf16`: whether the CUDA device supports bf16 (only read when `on_gpu`)."""
    if requested not in PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {', '.join(PRECISIONS)}; got {requested!r}")
    if on_gpu:
        if requested != "auto":
            return requested, f"mixed_precision={requested} as configured (GPU)"
        if gpu_bf16:
            return "bf16", "mixed_precision=auto -> bf16: the GPU supports bf16"
        return "no", "mixed_precision=auto -> fp32: this GPU has no bf16 support"
    cpu = cpu if cpu is not None else cpu_info()
    where = f"CPU {cpu['model']} ({cpu['capability']})"
    if requested == "auto":
        if cpu["bf16_native"]:
            return "bf16", f"mixed_precision=auto -> bf16: {where} runs bf16 natively ({cpu['bf16_reason']})"
        return "no", f"mixed_precision=auto -> fp32: {where} has {cpu['bf16_reason']}, so bf16 would be emulated"
    return requested, f"mixed_precision={requested} as configured ({where})"


def bf16_warning(precision: str, on_gpu: bool, cpu: dict | None = None) -> str | None:
    """The one-line warning for bf16 asked for on a CPU that emulates it, else None."""
    if precision != "bf16" or on_gpu:
        return None
    cpu = cpu if cpu is not None else cpu_info()
    if cpu["bf16_native"]:
        return None
    return (f"warning: mixed_precision=bf16 on {cpu['model']} ({cpu['capability']}, {cpu['bf16_reason']}): bf16 is "
            "emulated here and training runs ~4-5x slower than fp32 (docs/performance.md); use mixed_precision=auto or no")
