"""`mixed_precision: auto`: bf16 only where the hardware computes it natively, decided from what torch reports."""

import pytest

import hardware
from hardware import bf16_warning, resolve_precision

NATIVE = {"model": "Intel Xeon", "capability": "AVX512", "bf16_native": True, "bf16_reason": "AVX512_BF16"}
AMX = {"model": "Intel Xeon", "capability": "AVX512", "bf16_native": True, "bf16_reason": "AMX tiles"}
AVX2 = {"model": "AMD EPYC 7B13", "capability": "AVX2", "bf16_native": False,
        "bf16_reason": "no AVX512_BF16 or AMX instructions"}


@pytest.mark.parametrize(("cpu", "expected"), [(NATIVE, "bf16"), (AMX, "bf16"), (AVX2, "no")])
def test_auto_on_cpu(cpu, expected):
    precision, reason = resolve_precision("auto", on_gpu=False, cpu=cpu)
    assert precision == expected
    assert reason.startswith(f"mixed_precision=auto -> {'bf16' if expected == 'bf16' else 'fp32'}")
    assert cpu["model"] in reason and cpu["bf16_reason"] in reason


@pytest.mark.parametrize(("gpu_bf16", "expected"), [(True, "bf16"), (False, "no")])
def test_auto_on_gpu(gpu_bf16, expected):
    # the CPU is not consulted on a GPU: an emulating CPU does not turn a bf16 GPU's choice into fp32
    assert resolve_precision("auto", on_gpu=True, gpu_bf16=gpu_bf16, cpu=AVX2)[0] == expected


@pytest.mark.parametrize("requested", ["no", "bf16"])
@pytest.mark.parametrize("cpu", [NATIVE, AVX2])
def test_explicit_choice_is_honoured(requested, cpu):
    assert resolve_precision(requested, on_gpu=False, cpu=cpu)[0] == requested


def test_unknown_precision_refused():
    with pytest.raises(ValueError, match="auto, no, bf16, fp16"):
        resolve_precision("fp8", on_gpu=False, cpu=NATIVE)


def test_bf16_warning_only_where_emulated():
    warning = bf16_warning("bf16", on_gpu=False, cpu=AVX2)
    assert warning.startswith("warning: mixed_precision=bf16") and "4-5x slower" in warning and "AVX2" in warning
    assert "\n" not in warning
    assert bf16_warning("bf16", on_gpu=False, cpu=NATIVE) is None
    assert bf16_warning("no", on_gpu=False, cpu=AVX2) is None
    assert bf16_warning("bf16", on_gpu=True, cpu=AVX2) is None


def test_cpu_info_reads_torch(monkeypatch):
    """`cpu_info` decides from torch's capability queries; an ISA capped below AVX512_BF16 (the emulation of an AVX2
    machine) is not native even where the silicon has the instructions."""
    monkeypatch.setattr(hardware.torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(hardware.torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(hardware.torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert hardware.cpu_info()["bf16_native"] is True
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    info = hardware.cpu_info()
    assert info["bf16_native"] is False and "ONEDNN_MAX_CPU_ISA=AVX2" in info["bf16_reason"]
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(hardware.torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert hardware.cpu_info()["bf16_native"] is False


@pytest.mark.parametrize("requested", ["auto", "bf16"])
def test_training_records_and_warns(tiny_history, tmp_path, monkeypatch, requested):
    """A run prints its choice (or the warning) in one line and records it in train_summary.json; on a CPU dispatching
    like an AVX2-only one, auto trains in fp32 and an explicit bf16 is honoured with a warning."""
    import json

    from conftest import run_script

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # what an AMD Zen 3 or an older Intel runs (any machine can)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    run_dir = tmp_path / "run"
    out = run_script("train.py", "--run-dir", str(run_dir), "train_timesteps=2", f"mixed_precision={requested}",
                     *tiny_history["standard"])
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["mixed_precision"] == requested
    if requested == "auto":
        assert summary["precision"] == "no"
        assert "mixed_precision=auto -> fp32" in out.stdout and "bf16 would be emulated" in out.stdout
        assert "warning" not in out.stderr
    else:
        assert summary["precision"] == "bf16"
        lines = [line for line in out.stderr.splitlines() if line.startswith("warning: mixed_precision=bf16")]
        assert len(lines) == 1 and "4-5x slower" in lines[0]
    assert summary["precision_reason"]
