"""The pipeline on Darkroom-permuted and Dark Key-to-Door through the env registry: splits and the task subset, the
batched stepper against the gymnasium env, tiny collections that replay through the env, collect -> train ->
evaluate per env and mode through the scripts, and sharded collection merged back (merge_histories.py)."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import yaml
from conftest import assert_replays, run_script

from common import UserError, env_configs, load_config, parse_goals
from env import BatchEnv, selected_tasks, split_goals, task_family, task_split
from env import dark_key_to_door as k2d
from env import darkroom_permuted as dp
from history import FIELDS

NEW_ENVS = ("darkroom_permuted", "dark_key_to_door")
# tiny PPO (regions of 25 steps, half an episode) on a tiny selection: 2 train, 1 validation, 2 test tasks
TINY_COLLECT = ["n_stream=4", "n_steps=25", "total_source_timesteps=100", "ppo_batch_size=50", "ppo_n_epochs=2",
                "n_process=1", "n_train_tasks=2", "n_test_tasks=2", "n_val_tasks=1"]
TINY_MODEL = ["d_model=16", "n_layer=1", "n_head=2", "train_batch_size=4", "log_interval=2", "val_interval=2",
              "val_batches=1", "ckpt_interval=2", "warmup_steps=2", "train_timesteps=4", "eval_episodes=3",
              "eval_streams=2", "val_episodes=2", "compress_interval=25", "eval_window_shift=25",
              "min_source_return=0"]  # Key-to-Door's configs train only on tasks the source learned; this tiny PPO learns none
# compressed: up to 3 regions (both envs keep 3): C r E C r E C r = 3 x 27 - 1 = 80
N_TRANSIT = {"standard": "n_transit=50", "compressed": "n_transit=84"}


def collect_cfg(env: str, *extra: str) -> dict:
    return load_config(env_configs(env)["collect"], [*TINY_COLLECT, *extra])


def history_file(traj_dir, env: str):
    return traj_dir / f"history_{env}_PPO_alg-seed42.hdf5"


def read_groups(path) -> dict:
    """{task: ({attr: value}, {field: array})} of a history file."""
    with h5py.File(path, "r") as f:
        return {int(k): ({a: np.asarray(v) for a, v in f[k].attrs.items()}, {n: f[k][n][:] for n in FIELDS}) for k in f}


def assert_same_groups(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for task in a:
        (attrs_a, data_a), (attrs_b, data_b) = a[task], b[task]
        assert sorted(attrs_a) == sorted(attrs_b)
        for k in attrs_a:
            np.testing.assert_array_equal(attrs_a[k], attrs_b[k])
        for name in FIELDS:
            assert data_a[name].dtype == data_b[name].dtype
            np.testing.assert_array_equal(data_a[name], data_b[name], err_msg=f"task {task} {name}")


@pytest.fixture(scope="module", params=NEW_ENVS)
def tiny_task_history(request, tmp_path_factory) -> dict:
    """collect.py with no task list: the env's whole (tiny) train/val/test selection."""
    env = request.param
    traj_dir = tmp_path_factory.mktemp(env)
    overrides = [*TINY_COLLECT, f"traj_dir={traj_dir}"]
    run_script("collect.py", "--config", str(env_configs(env)["collect"]), *overrides)
    return {"env": env, "traj_dir": traj_dir, "path": history_file(traj_dir, env), "overrides": overrides,
            "cfg": collect_cfg(env, f"traj_dir={traj_dir}")}


# ---- the registry ---------------------------------------------------------------------------------------------------


def test_darkroom_splits_are_unchanged():
    cfg = load_config(env_configs("darkroom")["collect"])
    parts = [task_split(cfg, s) for s in ("train", "val", "test")]
    assert tuple(parts) == split_goals(9, 0, 0.9, 8)
    assert parts[2] == [38, 51, 62, 65, 33, 5, 53, 49] and parts[1] == [12, 68, 36, 17, 64, 27, 45, 61]
    assert selected_tasks(cfg) == list(range(81)) and task_family(cfg).n_tasks(cfg) == 81


def test_permuted_splits():
    cfg = load_config(env_configs("darkroom_permuted")["collect"])
    train, val, test = (task_split(cfg, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (96, 12, 12) and (train, val, test) == dp.split_tasks(4, 0.9, 12)
    assert sorted(train + val + test) == list(range(120)) == selected_tasks(cfg)
    assert test == [70, 51, 2, 8, 11, 19, 61, 50, 92, 13, 38, 30]  # random.Random(4)
    assert task_split(load_config(env_configs("darkroom_permuted")["collect"]), "test") == test  # deterministic


def test_key_to_door_splits_and_subset():
    full = load_config(env_configs("dark_key_to_door")["collect"], ["n_train_tasks=0", "n_test_tasks=0"])
    train, val, test = (task_split(full, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (6201, 32, 328) and (train, val, test) == k2d.split_tasks(9, 4, 0.95, 32)
    assert len(train) + len(val) == round(6561 * 0.95) and sorted(train + val + test) == list(range(6561))
    cfg = load_config(env_configs("dark_key_to_door")["collect"])  # the config's subset: the first N of each list
    n = cfg["n_train_tasks"]
    assert n >= 32 and cfg["n_test_tasks"] == 32  # at least the 32 held-out tasks the targets are measured on
    assert task_split(cfg, "train") == train[:n] and task_split(cfg, "test") == test[:32] and task_split(cfg, "val") == val
    sel = selected_tasks(cfg)
    assert len(sel) == n + 64 and sel == sorted(train[:n] + val + test[:32])
    with pytest.raises(UserError, match="n_test_tasks=400 is more than the 328 test tasks"):
        task_split({**cfg, "n_test_tasks": 400}, "test")


def test_unknown_env_and_task_ranges_are_one_line_errors():
    with pytest.raises(UserError, match="unknown env 'darkroom3': use one of darkroom, darkroom_permuted"):
        load_config(env_configs("darkroom")["collect"], ["env=darkroom3"])
    with pytest.raises(UserError, match="unknown env"):
        env_configs("darkroom3")
    sel = [3, 10, 50]
    assert parse_goals("0:11", 100, sel) == [3, 10] and parse_goals("10:100,3", 100, sel) == [3, 10, 50]
    for text, msg in (("4", "not in the train/val/test selection"), ("11:50", "holds no task"), ("5:200", "range"),
                      ("100", "outside the task range: use 0..99"), ("a", "comma-separated")):
        with pytest.raises(UserError, match=msg):
            parse_goals(text, 100, sel)


@pytest.mark.parametrize("env", ["darkroom", *NEW_ENVS])
def test_batched_stepper_equals_the_gymnasium_env(env):
    """A task per stream, several episodes: the same observations, rewards and episode ends (with resets, including
    the key stage) as one gymnasium env per stream. A 3x3 grid, so that random actions find goals, keys and doors."""
    cfg = load_config(env_configs(env)["collect"], ["grid_size=3", "horizon=13", "n_train_tasks=0", "n_test_tasks=0"])
    family = task_family(cfg)
    rng = np.random.default_rng(0)
    tasks = [int(t) for t in rng.integers(family.n_tasks(cfg), size=40)]
    batch, singles = BatchEnv(cfg, tasks), [family.env(cfg, t) for t in tasks]
    obs = batch.reset()
    assert (obs == np.stack([e.reset()[0] for e in singles])).all() and (obs == family.start_pos(cfg)).all()
    episode_return, returns = np.zeros(len(tasks)), []
    for t in range(3 * 13):
        actions = rng.integers(5, size=len(tasks))
        obs, rewards, done = batch.step(actions)
        assert rewards.dtype == np.int64 and done == ((t + 1) % 13 == 0)
        for i, e in enumerate(singles):
            o, r, term, trunc, _ = e.step(int(actions[i]))
            assert not term and trunc == done and rewards[i] == r
            if trunc:
                o, _ = e.reset()
            assert (obs[i] == o).all()
        episode_return += rewards
        if done:
            returns += episode_return.tolist()
            episode_return[:] = 0
    assert max(returns) == 2 if env == "dark_key_to_door" else max(returns) > 0  # key and door both paid
    assert set(family.attrs(tasks[0], cfg)) == {"darkroom": {"goal"}, "darkroom_permuted": {"perm", "goal"},
                                                "dark_key_to_door": {"key", "door"}}[env]


# ---- collection -----------------------------------------------------------------------------------------------------


def test_collection_holds_the_selection_and_replays_through_the_env(tiny_task_history):
    cfg, family = tiny_task_history["cfg"], task_family(tiny_task_history["cfg"])
    with h5py.File(tiny_task_history["path"], "r") as f:
        assert sorted(int(k) for k in f) == selected_tasks(cfg)
        assert yaml.safe_load(f.attrs["collect_keys"])["env"] == cfg["env"] and f.attrs["horizon"] == 50
        for key in f:
            g, task = f[key], int(key)
            for name, value in family.attrs(task, cfg).items():
                assert tuple(g.attrs[name]) == tuple(value)
            d = {k: g[k][:] for k in ("states", "actions", "rewards", "next_states", "dones", "compress_start")}
            assert d["states"].shape == (100, 4, 2) and (d["compress_start"][:, 0] == (np.arange(100) % 25 == 0)).all()
            assert_replays(d, cfg, task)


# ---- collect -> train -> evaluate, per env and mode -------------------------------------------------------------------


def test_train_and_evaluate_each_mode_through_the_scripts(tiny_task_history, tmp_path):
    """example_compressed_training.py --env NAME: the env's configs, the collection skipped (it holds the selection),
    standard and compressed trained 4 steps, evaluated on the test tasks, and the report."""
    env, cfg = tiny_task_history["env"], tiny_task_history["cfg"]
    args = ["--env", env, "--mode", "all", "--sequential", "--runs-root", str(tmp_path), *tiny_task_history["overrides"],
            *TINY_MODEL, *(f"{mode}.{o}" for mode, o in N_TRANSIT.items())]
    out = run_script("example_compressed_training.py", *args, timeout=600).stdout
    assert "[collect] skip" in out
    test_tasks = task_split(cfg, "test")
    for mode, run_name in (("standard", f"AD-{env}-seed0"), ("compressed", f"AD-{env}-compressed-seed0")):
        run_dir = tmp_path / run_name
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert saved["env"] == env and saved["use_compressed_context"] == (mode == "compressed")
        assert json.loads((run_dir / "train_summary.json").read_text())["steps"] == 4
        s = json.loads((run_dir / "eval_summary.json").read_text())
        res = np.load(run_dir / "eval_result.npy")
        assert s["env"] == env and s["goals"] == test_tasks and res.shape == (2, 3) and s["mode"] == mode
        optimum = [task_family(cfg).optimal_return(t, cfg) for t in test_tasks]
        assert [g["optimum"] for g in s["per_goal"]] == optimum and s["optimum_mean"] == np.mean(optimum)
        assert [g["task"] for g in s["per_goal"]] == [task_family(cfg).describe(t, cfg) for t in test_tasks]
        assert (res >= 0).all() and (res <= np.array(optimum)[:, None]).all()
    assert env in (tmp_path / "compare" / "report.md").read_text()


# ---- shards -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tiny_task_history", ["dark_key_to_door"], indirect=True)  # one env: merging is env-blind
def test_shards_merge_into_the_single_collection(tiny_task_history, tmp_path):
    env, cfg = tiny_task_history["env"], tiny_task_history["cfg"]
    sel, n = selected_tasks(cfg), task_family(cfg).n_tasks(cfg)
    cut = (sel[1] + sel[2]) // 2 + 1  # ranges of task ids: each shard gets the selected tasks in its range
    shards = [tmp_path / "s0.hdf5", tmp_path / "s1.hdf5"]
    for shard, tasks in zip(shards, (f"0:{cut}", f"{cut}:{n}"), strict=True):
        run_script("collect.py", "--config", str(env_configs(env)["collect"]), "--goals", tasks, "--out", str(shard),
                   *tiny_task_history["overrides"])
    assert [sorted(read_groups(s)) for s in shards] == [sel[:2], sel[2:]]
    merged = tmp_path / "merged.hdf5"
    out = run_script("merge_histories.py", str(merged), *map(str, shards), "--expect-all").stdout
    assert f"{len(sel)} tasks from 2 shards" in out and not list(tmp_path.glob("*.tmp"))
    assert_same_groups(read_groups(merged), read_groups(tiny_task_history["path"]))
    with h5py.File(merged, "r") as m, h5py.File(tiny_task_history["path"], "r") as one:
        assert m.attrs["collect_keys"] == one.attrs["collect_keys"] and m.attrs["format_version"] == 1

    # refusals: one line each, nothing written
    def refused(*args: str) -> str:
        proc = run_script("merge_histories.py", str(tmp_path / "bad.hdf5"), *args, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and not (tmp_path / "bad.hdf5").exists()
        return proc.stderr.strip()

    assert "is in both" in refused(str(shards[0]), str(tiny_task_history["path"]))
    other = tmp_path / "other.hdf5"
    shutil.copy(shards[1], other)
    with h5py.File(other, "a") as f:
        f.attrs["collect_keys"] = yaml.safe_dump({**yaml.safe_load(f.attrs["collect_keys"]), "ppo_n_epochs": 1})
    assert "was collected with ppo_n_epochs=1 (first shard: 2)" in refused(str(shards[0]), str(other))
    assert "in no shard" in refused(str(shards[0]), "--expect-all")
    assert "already exists" in run_script("merge_histories.py", str(merged), str(shards[0]), check=False).stderr
