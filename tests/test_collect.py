import h5py
import numpy as np
import pytest
import yaml
from conftest import TINY_COLLECT, assert_replays, run_script

from env import Darkroom, goal_to_pos


def test_hdf5_layout(tiny_history):
    with h5py.File(tiny_history["path"], "r") as f:
        assert sorted(int(k) for k in f) == tiny_history["goals"]
        assert f.attrs["format_version"] == 1 and f.attrs["n_steps"] == 20 and f.attrs["grid_size"] == 9
        assert yaml.safe_load(f.attrs["config"])["n_stream"] == 4
        g = f["38"]
        assert tuple(g.attrs["goal"]) == goal_to_pos(38) and g.attrs["n_steps"] == 20
        T, S = 80, 4
        shapes = {"states": (T, S, 2), "actions": (T, S), "rewards": (T, S), "next_states": (T, S, 2), "dones": (T, S),
                  "compress_start": (T, S), "compress_end": (T, S)}
        for name, shape in shapes.items():
            assert g[name].shape == shape, name
            assert g[name].compression == "gzip" and g[name].chunks is not None
        assert g["states"].dtype == np.int8 and g["dones"].dtype == bool


def test_markers_at_rollout_boundaries(tiny_history):
    with h5py.File(tiny_history["path"], "r") as f:
        cs, ce = f["0"]["compress_start"][:], f["0"]["compress_end"][:]
    t = np.arange(80)
    assert (cs == (t % 20 == 0)[:, None]).all()  # <compress> before steps 0, 20, 40, 60
    assert (ce == (t % 20 == 19)[:, None]).all()  # </compress> after steps 19, 39, 59, 79


def test_every_transition_replays_through_the_env(tiny_history):
    _assert_replays(tiny_history["path"])


def _assert_replays(path):
    """Every stored transition of every goal and stream of a history file is what the env does from the stored state."""
    with h5py.File(path, "r") as f:
        cfg = yaml.safe_load(f.attrs["collect_keys"])
        for key in f:
            g = f[key]
            assert_replays({k: g[k][:] for k in ("states", "actions", "rewards", "next_states", "dones")}, cfg, int(key))


def test_rollout_length_per_goal_marks_each_goal_on_its_own_grid(adaptive_history):
    from common import load_config, n_steps_of

    cfg = load_config("config/algorithm/ppo_darkroom.yaml", adaptive_history["overrides"])
    lengths = {}
    with h5py.File(adaptive_history["path"], "r") as f:
        assert yaml.safe_load(f.attrs["collect_keys"])["n_steps"] == [10, 20]
        for key in f:
            n = int(f[key].attrs["n_steps"])
            assert n == n_steps_of(cfg, int(key)) and n in (10, 20)  # drawn from (alg_seed, goal), recorded per goal
            lengths[int(key)] = n
            t = np.arange(80)
            assert (f[key]["compress_start"][:] == (t % n == 0)[:, None]).all()
            assert (f[key]["compress_end"][:] == (t % n == n - 1)[:, None]).all()
    assert set(lengths.values()) == {10, 20}  # both lengths occur among these goals
    assert n_steps_of(cfg, 3) == n_steps_of({**cfg}, 3)  # deterministic


def test_adaptive_history_replays_and_samples_regions_of_each_goals_length(adaptive_history):
    from common import load_config
    from dataset import HistoryDataset
    from model.ad import COMPRESS_END, COMPRESS_START, IGNORE

    with h5py.File(adaptive_history["path"], "r") as f:
        for key in f:
            env, d = Darkroom(goal=int(key)), {k: f[key][k][:] for k in ("states", "actions", "rewards", "dones")}
            obs, _ = env.reset()
            for t in range(80):
                assert (d["states"][t, 0] == obs).all()
                obs, r, _, trunc, _ = env.step(int(d["actions"][t, 0]))
                assert d["rewards"][t, 0] == r and d["dones"][t, 0] == trunc
                if trunc:
                    obs, _ = env.reset()
        n_of = {int(k): int(f[k].attrs["n_steps"]) for k in f}
    cfg = load_config("config/model/ad_dr_compressed.yaml", [*adaptive_history["overrides"], "compress_interval=20",
                                                              "n_transit=44"])
    ds = HistoryDataset(adaptive_history["path"], cfg, "train", batch_size=64, seed=0)
    b = ds.batch(0)
    seen = set()
    for i in range(64):
        types, tt = b["type_ids"][i], b["target_token_type"][i]
        n = int(b["n_regions"][i])
        lens = b["region_lens"][i, :n].tolist()
        assert len(set(lens)) == 1 and lens[0] in (10, 20)  # one goal: its regions share its length
        starts = (types == COMPRESS_START).nonzero().flatten().tolist()
        assert len(starts) == n and (types == COMPRESS_END).sum() == n - 1
        steps = (tt != IGNORE).nonzero().flatten()
        assert len(steps) == n * lens[0] and (tt[steps] == COMPRESS_END).sum() == n  # one close per region, at its end
        seen.add(lens[0])
    assert seen == {10, 20}  # a batch mixes goals of both lengths: the close position varies between samples
    assert {n_of[g] for g in ds.goals} == {10, 20}


def test_rollout_length_per_stream_marks_each_stream_on_its_own_grid_and_replays(stream_history):
    """`n_steps_per=stream`: every goal holds every length, one PPO learner per length; each stream's markers follow its
    own learner's rollouts, the file records the length of every stream, and every stream replays through the env."""
    from common import load_config, stream_n_steps
    from history import stream_n_steps as file_stream_n_steps

    cfg = load_config("config/algorithm/ppo_darkroom.yaml", stream_history["overrides"])
    assert stream_n_steps(cfg, 0).tolist() == [10, 20, 10, 20]
    t = np.arange(80)
    with h5py.File(stream_history["path"], "r") as f:
        assert yaml.safe_load(f.attrs["collect_keys"])["n_steps_per"] == "stream"
        for key in f:
            g = f[key]
            assert g.attrs["n_steps"].tolist() == [10, 20, 10, 20] == file_stream_n_steps(g).tolist()
            for s, n in enumerate((10, 20, 10, 20)):
                assert (g["compress_start"][:, s] == (t % n == 0)).all()
                assert (g["compress_end"][:, s] == (t % n == n - 1)).all()
            env, d = Darkroom(goal=int(key)), {k: g[k][:] for k in ("states", "actions", "rewards", "dones")}
            for s in range(4):
                obs, _ = env.reset()
                for step in range(80):
                    assert (d["states"][step, s] == obs).all()
                    obs, r, _, trunc, _ = env.step(int(d["actions"][step, s]))
                    assert d["rewards"][step, s] == r and d["dones"][step, s] == trunc
                    if trunc:
                        obs, _ = env.reset()
    with h5py.File(stream_history["path"].with_name("per_task.hdf5"), "w") as f:  # one length per goal: an int attr
        f.create_group("0").create_dataset("actions", data=np.zeros((80, 3), np.int8))
        f["0"].attrs["n_steps"] = 20
        assert file_stream_n_steps(f["0"]).tolist() == [20, 20, 20]


def test_rollout_length_per_stream_needs_a_stream_per_length():
    from common import UserError, load_config

    with pytest.raises(UserError, match="n_steps_per must be one of task, stream"):
        load_config("config/algorithm/ppo_darkroom.yaml", ["n_steps=[10, 20]", "n_steps_per=goal"])
    with pytest.raises(UserError, match="n_stream=2 is fewer than the 3 lengths"):
        load_config("config/algorithm/ppo_darkroom.yaml", ["n_steps=[10, 20, 40]", "n_steps_per=stream", "n_stream=2",
                                                           "total_source_timesteps=80"])


def test_fused_adam_is_a_collection_key_that_reaches_sb3(tiny_history, tmp_path):
    """`ppo_fused_adam: true` gives SB3's PPO torch's fused Adam (with SB3's own eps), is stored in the file, and a file
    collected without it is refused for a config that sets it (a file from before the key: tests/test_faults.py)."""
    from stable_baselines3 import PPO

    from collect import adam_kwargs
    from common import UserError, load_config
    from env.registry import task_family
    from history import check_history, open_history

    cfg = load_config("config/algorithm/ppo_darkroom.yaml", TINY_COLLECT + ["ppo_fused_adam=true"])
    assert adam_kwargs(cfg) == {"eps": 1e-5, "fused": True}
    assert adam_kwargs({**cfg, "ppo_fused_adam": False}) == {"eps": 1e-5}  # SB3's default for PPO
    venv = task_family(cfg).vec_env(cfg, 2, 0)
    opt = PPO("MlpPolicy", venv, n_steps=20, batch_size=20, policy_kwargs={"optimizer_kwargs": adam_kwargs(cfg)},
              device="cpu").policy.optimizer
    assert opt.defaults["fused"] is True and opt.defaults["eps"] == 1e-5

    run_script("collect.py", "--goals", "0", *TINY_COLLECT, "ppo_fused_adam=true", f"traj_dir={tmp_path}")
    with open_history(tmp_path / "history_darkroom_PPO_alg-seed42.hdf5") as f:
        assert yaml.safe_load(f.attrs["collect_keys"])["ppo_fused_adam"] is True
        check_history(f, "fused.hdf5", cfg)  # fits its own config
    with open_history(tiny_history["path"]) as f, pytest.raises(
            UserError, match=r"collected with ppo_fused_adam=False \(config: True\)"):
        check_history(f, "tiny.hdf5", cfg)
    with open_history(tiny_history["path"]) as f:  # a PPO file does not depend on the searcher's noise keys
        check_history(f, "tiny.hdf5", {**cfg, "ppo_fused_adam": False, "source_eps_start": 0.3, "source_eps_regions": 7})


def test_searcher_eps_noise_falls_linearly_region_by_region():
    from searcher import source_eps

    cfg = {"source_eps_start": 1.0, "source_eps_regions": 4}
    assert np.allclose(source_eps(cfg, 6), [1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    assert np.allclose(source_eps({"source_eps_start": 0.4, "source_eps_regions": 1}, 3), [0.4, 0.0, 0.0])


def test_searcher_eps_history_is_random_at_eps_1_and_the_searcher_at_eps_0():
    """In a region of eps 1 every action is uniform (the stay action a fifth of the time); at eps 0 the history is the
    searcher's: every stream finds the goal within the episodes a sweep allows (7, tests/test_searcher.py) and earns
    the optimum in every episode after it."""
    from common import load_config
    from env import task_family
    from searcher import noisy_history

    cfg = load_config("config/algorithm/searcher_eps_darkroom.yaml", ["source_eps_start=1.0", "source_eps_regions=1"])
    H, n, S, goal = cfg["horizon"], cfg["n_steps"], 50, 0
    d = noisy_history(cfg, goal, S, seed=0)
    T = cfg["total_source_timesteps"]
    assert d["actions"].shape == (T, S) and d["states"].shape == (T, S, 2)
    share = np.bincount(d["actions"][:n].ravel(), minlength=5) / (n * S)
    assert np.abs(share - 0.2).max() < 0.03  # eps 1: every action uniform, then eps 0 ...
    optimum = task_family(cfg).optimal_return(goal, cfg)
    returns = d["rewards"].reshape(T // H, H, S).sum(axis=1)
    assert (returns[n // H + 7:] == optimum).all()  # ... and within 7 noise-free episodes the searcher's optimum

    d0 = noisy_history({**cfg, "source_eps_start": 0.0}, goal, S, seed=0)
    first = d0["rewards"].reshape(T // H, H, S).sum(axis=1) > 0
    found = first.argmax(axis=0)
    assert first.any(axis=0).all() and found.max() <= 6
    returns0 = d0["rewards"].reshape(T // H, H, S).sum(axis=1)
    assert (returns0[np.arange(T // H)[:, None] > found[None]] == optimum).all()


# the episodes after which the noise-free searcher earns the optimum (tests/test_searcher.py's bounds): the key within
# ceil(81 / 42) = 2 episodes and the door within ceil(81 / 26) = 4 after it; the permutation within the first episode
@pytest.mark.parametrize("env,search_episodes", [("dark_key_to_door", 2 + 4), ("darkroom_permuted", 1)])
def test_searcher_eps_history_on_the_other_envs_replays_and_ends_at_the_optimum(env, search_episodes):
    """Key-to-Door and Darkroom-permuted histories of the noise-free searcher (their configs' eps 0): every stored
    transition is what the env does (replayed with the stored actions), and every stream earns the
    task's optimum in every episode after the sweep bound."""
    from common import load_config
    from env import task_family, task_split
    from searcher import noisy_history

    cfg = load_config(f"config/algorithm/searcher_eps_{env}.yaml")
    assert cfg["source_eps_start"] == 0.0 and cfg["alg"] == "searcher-eps"
    S, T, H = 20, cfg["total_source_timesteps"], cfg["horizon"]
    for task in task_split(cfg, "train")[:3]:
        d = noisy_history(cfg, task, S, seed=task)
        assert_replays(d, cfg, task)
        returns = d["rewards"].reshape(T // H, H, S).sum(axis=1)
        assert (returns[search_episodes:] == task_family(cfg).optimal_return(task, cfg)).all()
        assert d["compress_start"][::cfg["n_steps"]].all() and d["compress_end"].sum() == S * T // cfg["n_steps"]


def test_searcher_eps_collection_replays_with_ppo_markers_and_is_refused_with_bad_keys(tmp_path):
    from common import UserError, load_config

    over = [o for o in TINY_COLLECT if not o.startswith("ppo_")] + [f"traj_dir={tmp_path}"]
    run_script("collect.py", "--config", "config/algorithm/searcher_eps_darkroom.yaml", "--goals", "0,12", *over)
    path = tmp_path / "history_darkroom_searcher-eps_alg-seed42.hdf5"
    _assert_replays(path)
    with h5py.File(path, "r") as f:
        assert sorted(f) == ["0", "12"] and yaml.safe_load(f.attrs["collect_keys"])["source_eps_regions"] == 4
        t = np.arange(80)
        assert (f["12"]["compress_start"][:] == (t % 20 == 0)[:, None]).all()
        assert (f["12"]["compress_end"][:] == (t % 20 == 19)[:, None]).all()
    from history import check_history, open_history

    cfg = load_config("config/algorithm/searcher_eps_darkroom.yaml", over)
    with open_history(path) as f:  # a searcher-eps file depends on its noise, not on the PPO keys it does not use
        assert not any(k.startswith("ppo_") for k in yaml.safe_load(f.attrs["collect_keys"]))
        check_history(f, path, {**cfg, "ppo_lr": 0.1, "ppo_n_epochs": 1})
        with pytest.raises(UserError, match=r"collected with source_eps_start=0.0 \(config: 0.5\)"):
            check_history(f, path, {**cfg, "source_eps_start": 0.5})
    with pytest.raises(UserError, match="alg must be one of PPO, searcher-eps"):
        load_config("config/algorithm/ppo_darkroom.yaml", ["alg=DQN"])
    with pytest.raises(UserError, match="searcher-eps writes regions of one length"):
        load_config("config/algorithm/searcher_eps_darkroom.yaml", ["n_steps=[40, 80]"])
    with pytest.raises(UserError, match=r"source_eps_start in \[0, 1\]"):
        load_config("config/algorithm/searcher_eps_darkroom.yaml", ["source_eps_start=1.5"])
