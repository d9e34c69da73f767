"""`accelerate launch` with 2 CPU processes (gloo): one set of outputs, ranks in sync, DDP = averaged gradients.

The reference re-computes the run in this process from the pieces train.py uses (`build`, `HistoryDataset`):
each step averages the gradients of rank 0's and rank 1's batches. Matching it shows the data is sharded per
rank and the gradients are averaged; the per-rank weight hashes that train.py records show the replicas agree.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_script
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from common import DEFAULT_MODEL_CONFIG, history_path, load_config
from dataset import HistoryDataset
from model import weights_digest

COMPRESSED_CONFIG = ROOT / "config" / "model" / "ad_dr_compressed.yaml"
STEPS = ["train_timesteps=6", "log_interval=2", "val_interval=3", "ckpt_interval=3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: Path, run_dir: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    """The README's multi-process command, on CPU: `accelerate launch --multi_gpu --num_processes 2 train.py`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(ROOT / "train.py"), "--config", str(config), "--run-dir", str(run_dir), *overrides]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_one_set_of_outputs(proc: subprocess.CompletedProcess, run_dir: Path) -> dict:
    """Only rank 0 prints, logs and saves; returns the checkpoint."""
    assert proc.stdout.count("training AD") == 1 and "2 process(es)" in proc.stdout, proc.stdout
    assert proc.stdout.count("done:") == 1, proc.stdout
    files = sorted(p.name for p in run_dir.iterdir())
    events = [f for f in files if f.startswith("events.out.tfevents")]
    others = sorted(set(files) - set(events))
    assert len(events) == 1 and others == ["ckpt.pt", "config.yaml", "metrics.jsonl", "train_summary.json"], files
    steps = [e.step for e in EventAccumulator(str(run_dir)).Reload().Scalars("train/loss_action")]
    assert steps == [2, 4, 6]  # each logged once

    ckpt = torch.load(run_dir / "ckpt.pt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("module.") for k in ckpt["model"])  # the unwrapped model's state dict
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # one per rank
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["num_processes"] == 2
    assert summary["weights_sha256_per_rank"] == [weights_digest(ckpt["model"])] * 2  # both ranks, same bytes
    return ckpt


@pytest.fixture(scope="module")
def ddp_run(tiny_history, tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    overrides = tiny_history["standard"] + STEPS + ["val_batches=3", "mixed_precision=no"]  # the reference is fp32
    proc = launch(DEFAULT_MODEL_CONFIG, run_dir, overrides)
    return {"proc": proc, "run_dir": run_dir, "cfg": load_config(DEFAULT_MODEL_CONFIG, overrides)}


def test_two_processes_write_one_run_with_identical_rank_weights(ddp_run):
    assert_one_set_of_outputs(ddp_run["proc"], ddp_run["run_dir"])


def reference(cfg: dict, ranks: list[int]) -> torch.nn.Module:
    """train.py's loop in one process, each step averaging the gradients of the given ranks' batches."""
    model, opt, sched = train.build(cfg)
    shards = [HistoryDataset(history_path(cfg), cfg, "train", cfg["train_batch_size"], cfg["seed"], rank=r) for r in ranks]
    for step in range(cfg["train_timesteps"]):
        loss = sum(model(d.batch(step))["loss"] for d in shards) / len(shards)  # what DDP's all-reduce averages
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    return model


def test_ddp_equals_averaged_gradients_of_both_ranks_shards(ddp_run):
    cfg = ddp_run["cfg"]
    ckpt = torch.load(ddp_run["run_dir"] / "ckpt.pt", map_location="cpu", weights_only=False)
    model = reference(cfg, [0, 1])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ckpt["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    rank0_only = reference(cfg, [0]).state_dict()  # had rank 1 drawn rank 0's batches, this is what DDP would give
    assert not torch.allclose(rank0_only["head_action.weight"], ckpt["model"]["head_action.weight"], rtol=1e-4, atol=1e-5)

    # the val metrics in the summary are reduced over ranks: rank 0 ran val batches 0 and 2, rank 1 batch 1
    model.load_state_dict(ckpt["model"])
    model.eval()
    test = HistoryDataset(history_path(cfg), cfg, "val", cfg["train_batch_size"], cfg["seed"] + 10_000)
    with torch.no_grad():
        outs = [model(test.batch(i)) for i in range(cfg["val_batches"])]
    n = sum(float(o["n_targets"]) for o in outs)
    loss = sum(float(o["loss_action"]) * float(o["n_targets"]) for o in outs) / n
    summary = json.loads((ddp_run["run_dir"] / "train_summary.json").read_text())
    assert summary["val/loss_action"] == pytest.approx(loss, rel=1e-5)


def test_checkpoint_loads_in_single_process_evaluate(ddp_run):
    run_script("evaluate.py", "--run-dir", str(ddp_run["run_dir"]))
    summary = json.loads((ddp_run["run_dir"] / "eval_summary.json").read_text())
    assert summary["mode"] == "standard" and summary["n_episodes"] > 0


def test_compressed_mode_with_fewer_val_batches_than_ranks(tiny_history, tmp_path):
    """Rank 1 has no test batch here; it must still join the metric all-reduce (this used to hang)."""
    run_dir = tmp_path / "run"
    proc = launch(COMPRESSED_CONFIG, run_dir, tiny_history["compressed"] + STEPS + ["val_batches=1"])
    assert_one_set_of_outputs(proc, run_dir)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    # the metrics are rank 0's single batch: what one process computes on val batch 0 with the saved weights
    cfg = load_config(COMPRESSED_CONFIG, tiny_history["compressed"] + STEPS + ["val_batches=1"])
    model, _, _ = train.build(cfg)
    model.load_state_dict(torch.load(run_dir / "ckpt.pt", map_location="cpu", weights_only=False)["model"])
    val = HistoryDataset(history_path(cfg), cfg, "val", cfg["train_batch_size"], cfg["seed"] + 10_000)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.eval()(val.batch(0))
    assert summary["val/recall_compress_end"] == pytest.approx(float(out["n_true_positive"]) / max(float(out["n_true_end"]), 1))
    assert summary["val/loss_action"] == pytest.approx(float(out["loss_action"]), rel=1e-4)
