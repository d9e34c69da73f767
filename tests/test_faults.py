"""Faults: SIGKILL train.py / collect.py mid-run and start them again; a kill while a checkpoint is written.

Sampling is a function of (seed, rank, step) and the checkpoint holds model, optimiser, scheduler, step and every
rank's random generators, so a killed-and-resumed run must end bit-identical to an uninterrupted one; dropout is
on here so that the restored torch generator matters too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, TINY_COLLECT, run_script
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

HISTORY = "history_darkroom_PPO_alg-seed42.hdf5"
STEPS = 300
CKPT_INTERVAL = 20
# deterministic=true: on GPU, bit-identical resume needs deterministic kernels (on CPU it changes nothing)
TRAIN = [f"train_timesteps={STEPS}", "log_interval=5", "val_interval=10", f"ckpt_interval={CKPT_INTERVAL}", "dropout=0.1",
         "deterministic=true"]
TAGS = ("train/loss_action", "train/lr", "val/loss_action", "val/return")
RESUME_CASES = [("standard", "no"), ("compressed", "bf16")]  # each mode once, and a mixed-precision resume


def start(script: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the process ended before the kill point"
        assert time.monotonic() < deadline, "kill point not reached"
        time.sleep(0.005)


def sigkill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same(a, b, where: str = "") -> None:
    """Exact equality of nested checkpoint state (tensors, arrays, dicts, lists, numbers)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, where


def curves(run_dir: Path) -> dict:
    """TensorBoard scalars as TensorBoard shows them (events past a resumed checkpoint purged)."""
    acc = EventAccumulator(str(run_dir)).Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in TAGS}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_args(tiny, mode: str, precision: str) -> list[str]:
    config = ["--config", str(ROOT / "config" / "model" / "ad_dr_compressed.yaml")] if mode == "compressed" else []
    return [*config, *tiny[mode], *TRAIN, f"mixed_precision={precision}"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_history, tmp_path_factory) -> dict:
    out = {}
    for mode, precision in RESUME_CASES:
        run_dir = tmp_path_factory.mktemp("faults") / f"uninterrupted-{mode}-{precision}"
        run_script("train.py", "--run-dir", str(run_dir), *train_args(tiny_history, mode, precision))
        out[mode, precision] = {"ckpt": load(run_dir / "ckpt.pt"), "curves": curves(run_dir)}
    return out


def logged_past(run_dir: Path, step: int) -> bool:
    """Has the run logged a step after `step` (so steps past that checkpoint will be lost with a kill)?"""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return False
    return any(json.loads(line)["step"] > step for line in lines[:-1])  # the last line may be half-written


@pytest.mark.parametrize("mode,precision", RESUME_CASES)
def test_train_sigkill_then_resume_matches_uninterrupted_run(tiny_history, uninterrupted, tmp_path, mode, precision):
    run_dir, args = tmp_path / "run", train_args(tiny_history, mode, precision)
    proc = start("train.py", "--run-dir", str(run_dir), *args)
    wait_for(lambda: (run_dir / "ckpt.pt").exists() and logged_past(run_dir, CKPT_INTERVAL), proc)
    sigkill(proc)  # a few steps past a checkpoint: lost with the kill, redone on resume
    saved = load(run_dir / "ckpt.pt")["step"]
    assert 0 < saved < STEPS and saved % CKPT_INTERVAL == 0  # so at most CKPT_INTERVAL steps are redone
    (run_dir / "ckpt.pt.tmp").write_bytes(b"half a checkpoint")  # as if the kill had hit the next save

    out = run_script("train.py", "--run-dir", str(run_dir), *args).stdout
    assert f"resuming AD ({mode}" in out and f"from step {saved}," in out, out
    assert not (run_dir / "ckpt.pt.tmp").exists()
    resumed, ref = load(run_dir / "ckpt.pt"), uninterrupted[mode, precision]["ckpt"]
    for key in ("step", "model", "optimizer", "scheduler", "scaler", "schedule_steps", "rng"):
        assert_same(resumed[key], ref[key], key)
    got = curves(run_dir)
    assert got == uninterrupted[mode, precision]["curves"]  # the curve continues: every step once, same values
    assert [s for s, _ in got["train/loss_action"]] == list(range(5, STEPS + 1, 5))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val/return" in r] == list(range(10, STEPS + 1, 10))  # no duplicates either


def test_continuing_a_finished_run_keeps_its_lr_schedule(tiny_history, tmp_path):
    """Raising train_timesteps continues the run at the end of its own schedule (0.1 x lr), instead of jumping back up
    the cosine of the new, longer horizon (a 40-step run resumed to 80 was at 0.56 x lr at step 41 before the fix)."""
    from train import lr_lambda

    run_dir = tmp_path / "run"
    base = [*tiny_history["standard"], "log_interval=1", "val_interval=20", "ckpt_interval=20", "warmup_steps=4"]
    run_script("train.py", "--run-dir", str(run_dir), *base, "train_timesteps=40")
    out = run_script("train.py", "--run-dir", str(run_dir), *base, "train_timesteps=80").stdout
    assert "keeps the horizon of 40 steps" in out, out
    lr = {r["step"]: r["train/lr"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
          if "train/lr" in (r := json.loads(line))}
    cfg_lr = 0.001
    assert sorted(lr) == list(range(1, 81))
    assert lr[40] == pytest.approx(0.1 * cfg_lr) and all(lr[s] == pytest.approx(0.1 * cfg_lr) for s in range(41, 81))
    schedule = lr_lambda({"warmup_steps": 4, "train_timesteps": 40})
    assert all(lr[s] == pytest.approx(cfg_lr * schedule(s)) for s in range(1, 41))  # the first session's own schedule
    assert load(run_dir / "ckpt.pt")["schedule_steps"] == 40


def test_train_killed_before_its_first_checkpoint_starts_again(tiny_history, uninterrupted, tmp_path):
    run_dir, args = tmp_path / "run", [*train_args(tiny_history, "standard", "no"), "ckpt_interval=250"]
    proc = start("train.py", "--run-dir", str(run_dir), *args)
    wait_for(lambda: any(run_dir.glob("events.out.tfevents*")), proc)
    sigkill(proc)
    assert not (run_dir / "ckpt.pt").exists()
    out = run_script("train.py", "--run-dir", str(run_dir), *args).stdout
    assert "yet (stopped before the first one): starting again from step 0" in out, out
    ref = uninterrupted["standard", "no"]
    assert_same(load(run_dir / "ckpt.pt")["model"], ref["ckpt"]["model"])  # ckpt_interval changes no weight
    assert curves(run_dir) == ref["curves"]


def test_kill_while_saving_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    code = f"""
import os, signal, sys, torch
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
from train import atomic_save

class KillWhileSaving:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)

atomic_save({{"step": 1, "w": torch.ones(3)}}, Path({str(path)!r}))
atomic_save({{"step": 2, "w": torch.zeros(100_000), "kill": KillWhileSaving()}}, Path({str(path)!r}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (tmp_path / "ckpt.pt.tmp").exists()  # the interrupted write went to the temporary name
    assert load(path)["step"] == 1  # the latest checkpoint is the previous, complete one


def test_collect_sigkill_then_resume_keeps_old_file_until_complete(tiny_history, tmp_path):
    out = tmp_path / HISTORY
    shutil.copy(tiny_history["path"], out)  # an existing history: --force replaces it only once the new one is complete
    before = sha(out)
    goals = [0, 1, 2, 3, 4, 5, 38, 51]
    args = ["--force", "--goals", ",".join(map(str, goals)), *TINY_COLLECT, f"traj_dir={tmp_path}"]
    proc = start("collect.py", *args)
    os.set_blocking(proc.stderr.fileno(), False)
    seen = b""

    def a_goal_is_written() -> bool:  # tqdm reports a goal after it is written and flushed
        nonlocal seen
        seen += proc.stderr.read() or b""
        return re.search(rb"\| [1-8]/8 ", seen) is not None

    wait_for(a_goal_is_written, proc)
    sigkill(proc)
    partial = tmp_path / (HISTORY + ".partial")
    assert partial.exists() and sha(out) == before  # nothing half-written under the final name

    res = run_script("collect.py", *args).stdout
    m = re.search(r"resuming interrupted collection: (\d+) finished goals recovered", res)
    assert m and 1 <= int(m[1]) < len(goals), res
    assert sorted(p.name for p in tmp_path.iterdir()) == [HISTORY]
    with h5py.File(out, "r") as f, h5py.File(tiny_history["path"], "r") as ref:
        assert sorted(map(int, f)) == goals and all(f[str(g)].attrs["complete"] for g in goals)
        for g in sorted(set(ref) & set(f)):  # recovered and newly collected goals equal an uninterrupted collection
            for name in ref[g]:
                assert np.array_equal(f[g][name][:], ref[g][name][:]), (g, name)


@pytest.mark.parametrize("kind", ["unreadable", "different config"])
def test_collect_starts_clean_from_a_stale_partial_file(kind, tmp_path):
    partial = tmp_path / (HISTORY + ".partial")
    if kind == "unreadable":
        partial.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(1000))  # killed while the header was written
    else:
        with h5py.File(partial, "w") as f:
            f.attrs["collect_keys"] = "n_stream: 100\n"
    res = run_script("collect.py", "--goals", "0", *TINY_COLLECT, f"traj_dir={tmp_path}").stdout
    assert kind in res and "starting clean" in res, res
    with h5py.File(tmp_path / HISTORY, "r") as f:
        assert list(f) == ["0"] and f["0"].attrs["complete"]


def test_collect_resumes_a_partial_file_written_before_a_collection_key_with_a_default(tiny_history, tmp_path):
    """A `.partial` whose collect_keys predate keys added later with a default (n_steps_per, ppo_observe_stage,
    ppo_fused_adam) is the same collection, as a finished file of that age is: its goals are recovered, not collected
    again."""
    partial = tmp_path / (HISTORY + ".partial")
    shutil.copy(tiny_history["path"], partial)
    with h5py.File(partial, "a") as f:
        keys = yaml.safe_load(f.attrs["collect_keys"])
        del keys["n_steps_per"], keys["ppo_observe_stage"], keys["ppo_fused_adam"]
        f.attrs["collect_keys"] = yaml.safe_dump(keys)
    first = str(tiny_history["goals"][0])
    res = run_script("collect.py", "--goals", first, *TINY_COLLECT, f"traj_dir={tmp_path}").stdout
    n = len(tiny_history["goals"])
    assert f"resuming interrupted collection: {n} finished goals recovered" in res, res
    with h5py.File(tmp_path / HISTORY, "r") as f, h5py.File(tiny_history["path"], "r") as ref:
        assert np.array_equal(f[first]["actions"][:], ref[first]["actions"][:])
