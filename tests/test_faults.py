"""Faults: SIGKILL train.py / collect.py mid-run and start them again; a kill while a checkpoint is written.

Sampling is a function of (seed, rank, step) and the checkpoint holds model, optimiser, scheduler, step and every
rank's random generators, so a killed-and-resumed run must end bit-identical to an uninterrupted one; dropout is
on here so that the restored torch generator matters too.
"""

from __future__ import annotations

import hashlib
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
from conftest import ROOT, TINY_COLLECT, run_script
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

HISTORY = "history_darkroom_PPO_alg-seed42.hdf5"
STEPS = 300
CKPT_INTERVAL = 20
# deterministic=true: on GPU, bit-identical resume needs deterministic kernels (on CPU it changes nothing)
TRAIN = [f"train_timesteps={STEPS}", "log_interval=5", "test_interval=10", f"ckpt_interval={CKPT_INTERVAL}", "dropout=0.1",
         "deterministic=true"]
TAGS = ("train/loss_action", "train/lr", "test/loss_action")


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


@pytest.fixture(scope="module")
def uninterrupted(tiny_history, tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("faults") / "uninterrupted"
    run_script("train.py", "--run-dir", str(run_dir), *tiny_history["standard"], *TRAIN)
    return {"ckpt": load(run_dir / "ckpt.pt"), "curves": curves(run_dir)}


def test_train_sigkill_then_resume_matches_uninterrupted_run(tiny_history, uninterrupted, tmp_path):
    run_dir, args = tmp_path / "run", [*tiny_history["standard"], *TRAIN]
    proc = start("train.py", "--run-dir", str(run_dir), *args)
    wait_for(lambda: (run_dir / "ckpt.pt").exists(), proc)
    time.sleep(0.05)  # a few steps past the checkpoint: lost with the kill, redone on resume
    sigkill(proc)
    saved = load(run_dir / "ckpt.pt")["step"]
    assert 0 < saved < STEPS and saved % CKPT_INTERVAL == 0  # so at most CKPT_INTERVAL steps are redone
    (run_dir / "ckpt.pt.tmp").write_bytes(b"half a checkpoint")  # as if the kill had hit the next save

    out = run_script("train.py", "--run-dir", str(run_dir), *args).stdout
    assert "resuming AD (standard" in out and f"from step {saved}," in out, out
    assert not (run_dir / "ckpt.pt.tmp").exists()
    resumed, ref = load(run_dir / "ckpt.pt"), uninterrupted["ckpt"]
    for key in ("step", "model", "optimizer", "scheduler", "rng"):
        assert_same(resumed[key], ref[key], key)
    got = curves(run_dir)
    assert got == uninterrupted["curves"]  # the curve continues: every step once, same values
    assert [s for s, _ in got["train/loss_action"]] == list(range(5, STEPS + 1, 5))


def test_train_killed_before_its_first_checkpoint_starts_again(tiny_history, uninterrupted, tmp_path):
    run_dir, args = tmp_path / "run", [*tiny_history["standard"], *TRAIN, "ckpt_interval=250"]
    proc = start("train.py", "--run-dir", str(run_dir), *args)
    wait_for(lambda: any(run_dir.glob("events.out.tfevents*")), proc)
    sigkill(proc)
    assert not (run_dir / "ckpt.pt").exists()
    out = run_script("train.py", "--run-dir", str(run_dir), *args).stdout
    assert "yet (stopped before the first one): starting again from step 0" in out, out
    assert_same(load(run_dir / "ckpt.pt")["model"], uninterrupted["ckpt"]["model"])  # ckpt_interval changes no weight
    assert curves(run_dir) == uninterrupted["curves"]


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
        for g in ref:  # recovered and newly collected goals equal an uninterrupted collection
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
