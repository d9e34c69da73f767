"""Shared fixtures: one tiny history collection per test session, and helpers to run the scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# pytest-xdist (pyproject.toml's addopts) runs the test files on one worker per core: each worker's in-process torch
# gets its share of the cores, as the scripts the tests start get one thread each (run_script)
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

ROOT = Path(__file__).resolve().parent.parent
# 2 train goals, 1 validation goal ((1,3)=12) and 2 test goals ((4,2)=38 and (5,6)=51)
TINY_GOALS = "0,1,12,38,51"
TINY_COLLECT = ["n_stream=4", "n_steps=20", "total_source_timesteps=80", "ppo_batch_size=40", "ppo_n_epochs=2", "n_process=1"]
TINY_MODEL = ["d_model=16", "n_layer=1", "n_head=2", "train_batch_size=4", "log_interval=2", "val_interval=3",
              "val_batches=2", "ckpt_interval=3", "warmup_steps=2", "eval_episodes=3", "eval_streams=2", "val_episodes=3"]
TINY_STANDARD = TINY_COLLECT + TINY_MODEL + ["n_transit=40", "compress_interval=20"]
TINY_COMPRESSED = TINY_COLLECT + TINY_MODEL + ["n_transit=48", "compress_interval=20"]


def run_script(script: str, *args: str, cwd: Path | None = None, check: bool = True, timeout: int = 300):
    """Run a repo script in a subprocess (one thread, like CI) and return the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def assert_replays(data: dict, cfg: dict, task: int) -> None:
    """Every stored transition of every stream of one task's history (`data`: the history fields, `[T, S, ...]`) is
    what the env does from the stored state: the state, the next state (the terminal observation at an episode's end),
    the reward and the episode end."""
    from env import task_family

    for s in range(data["actions"].shape[1]):
        env = task_family(cfg).env(cfg, task)
        obs, _ = env.reset()
        for t in range(data["actions"].shape[0]):
            assert (data["states"][t, s] == obs).all()
            obs, r, _, trunc, _ = env.step(int(data["actions"][t, s]))
            assert (data["next_states"][t, s] == obs).all()
            assert data["rewards"][t, s] == r and data["dones"][t, s] == trunc
            if trunc:
                obs, _ = env.reset()


@pytest.fixture(scope="session")
def tiny_history(tmp_path_factory) -> dict:
    """A tiny history file (5 goals x 4 streams x 80 steps, n_steps=20) made by collect.py."""
    traj_dir = tmp_path_factory.mktemp("datasets")
    overrides = TINY_COLLECT + [f"traj_dir={traj_dir}"]
    run_script("collect.py", "--goals", TINY_GOALS, *overrides)
    path = traj_dir / "history_darkroom_PPO_alg-seed42.hdf5"
    assert path.exists()
    return {"traj_dir": traj_dir, "path": path, "goals": [int(g) for g in TINY_GOALS.split(",")],
            "standard": TINY_STANDARD + [f"traj_dir={traj_dir}"],
            "compressed": TINY_COMPRESSED + [f"traj_dir={traj_dir}"]}


@pytest.fixture(scope="session")
def adaptive_history(tmp_path_factory) -> dict:
    """A tiny history whose PPO rollout length is drawn per goal from [10, 20] (80 steps: 8 or 4 regions). Train goals
    0-3 (lengths 20 10 20 20), validation goal 12 (20), test goals 38 (20) and 51 (10)."""
    traj_dir = tmp_path_factory.mktemp("adaptive")
    over = [o for o in TINY_COLLECT if not o.startswith(("n_steps", "ppo_batch_size"))]
    over += ["n_steps=[10, 20]", "ppo_batch_size=20", f"traj_dir={traj_dir}"]
    run_script("collect.py", "--goals", "0,1,2,3,12,38,51", *over)
    return {"path": traj_dir / "history_darkroom_PPO_alg-seed42.hdf5", "overrides": over}


@pytest.fixture(scope="session")
def stream_history(tmp_path_factory) -> dict:
    """A tiny history in which every goal holds both rollout lengths: `n_steps_per=stream` with n_steps [10, 20] runs
    streams 0 and 2 in a 10-step PPO learner, streams 1 and 3 in a 20-step one (80 steps: 8 or 4 regions). Train goals
    0 and 1, validation goal 12, test goals 38 and 51."""
    traj_dir = tmp_path_factory.mktemp("stream_lengths")
    over = [o for o in TINY_COLLECT if not o.startswith(("n_steps", "ppo_batch_size"))]
    over += ["n_steps=[10, 20]", "n_steps_per=stream", "ppo_batch_size=20", f"traj_dir={traj_dir}"]
    run_script("collect.py", "--goals", TINY_GOALS, *over)
    return {"path": traj_dir / "history_darkroom_PPO_alg-seed42.hdf5", "overrides": over}
