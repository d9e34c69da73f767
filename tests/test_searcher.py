"""The searcher reference learner (searcher.py): it finds every goal within the episodes a sweep of the grid allows and
earns the optimum in every episode after, on every env; its result has run_in_context's keys and shapes."""

import math

import numpy as np
import pytest
import torch

import evaluate
from common import env_configs, load_config
from env import task_family, task_split
from env.dark_key_to_door import key_door_to_task
from model import AD, ADConfig
from searcher import run_searcher


def _cfg(env, extra=()):
    return load_config(env_configs(env)["standard"], list(extra))


def _optimum(cfg, tasks):
    return np.array([task_family(cfg).optimal_return(t, cfg) for t in tasks], dtype=np.float64)


def _optimal_after(res, opt, episode):
    """Every episode after `episode` [goals, streams] returns the optimum."""
    R = res["returns"]
    later = np.arange(R.shape[-1])[None, None] > episode[..., None]
    return bool((np.where(later, R == opt[:, None, None], True)).all())


def test_darkroom_every_goal_is_found_within_a_sweep_and_walked_to_after():
    """A sweep tests at most one cell per step, so the last of the 81 cells needs ceil(81 / 20) = 5 episodes; one that
    reaches the untested cells within 8 steps (the farthest cell from the centre) tests at least 12 a episode, so every
    goal is found within ceil(81 / 12) = 7. Then every later episode walks straight to it: the optimum."""
    cfg = _cfg("darkroom")
    goals = list(range(81))
    H, D = cfg["horizon"], 8
    for seed in (0, 1):
        res = run_searcher(cfg, goals, n_streams=4, n_episodes=10, seed=seed)
        found = res["found_episode"][..., 0]  # 0-based episode of the first reward
        assert (found >= 0).all() and found.max() <= math.ceil(81 / (H - D)) - 1
        assert found.max() >= math.ceil(81 / H) - 1  # no peeking: some goal is among the last cells a sweep tests
        assert _optimal_after(res, _optimum(cfg, goals), found)
        assert (res["returns"][np.arange(81)[:, None], np.arange(4)[None], found] > 0).all()


def test_darkroom_streams_differ_by_seed_and_repeat_with_it():
    cfg = _cfg("darkroom")
    a, b, c = (run_searcher(cfg, [38, 5], n_streams=4, n_episodes=8, seed=s)["returns"] for s in (0, 0, 1))
    assert (a == b).all() and not (a == c).all() and not (a[:, :1] == a).all()  # ties are broken at random


def test_key_to_door_finds_the_key_then_the_door_and_remembers_both():
    """The key within the sweep bound ceil(81 / (50 - 8)) = 2 episodes; the door within ceil(81 / (50 - 8 - 16)) = 4
    episodes after (at most 8 steps to the key, 16 from it to any cell); the optimum (2) in every episode after both."""
    cfg = _cfg("dark_key_to_door")
    special = [key_door_to_task((4, 4), (0, 0)), key_door_to_task((3, 3), (3, 3)), key_door_to_task((0, 0), (4, 4)),
               key_door_to_task((8, 8), (0, 0)), key_door_to_task((4, 4), (4, 4))]  # key on the start, key == door, ...
    tasks = special + task_split(cfg, "val") + task_split(cfg, "test")
    H = cfg["horizon"]
    res = run_searcher(cfg, tasks, n_streams=3, n_episodes=8, seed=0)
    key, door = res["found_episode"][..., 0], res["found_episode"][..., 1]
    assert (key >= 0).all() and key.max() <= math.ceil(81 / (H - 8)) - 1
    assert (door >= key).all() and (door - key).max() <= math.ceil(81 / (H - 8 - 16))
    assert _optimal_after(res, _optimum(cfg, tasks), door)


def test_permuted_learns_the_permutation_in_the_first_episode_and_walks_to_the_goal_after():
    """Every one of the 120 permutations: the goal in the first episode, at most 2 steps lost for each of the 4 actions
    that do not lead to the goal (a try that moves the wrong way and back), and the optimum in every later episode."""
    cfg = _cfg("darkroom_permuted")
    tasks = list(range(120))
    res = run_searcher(cfg, tasks, n_streams=2, n_episodes=3, seed=0)
    opt = _optimum(cfg, tasks)
    assert (res["found_episode"][..., 0] == 0).all()
    assert (res["returns"][..., 0] >= opt[:, None] - 8).all()
    assert _optimal_after(res, opt, np.zeros((120, 2), np.int64))


def test_the_result_has_run_in_context_keys_and_shapes_and_summarises_alike(tiny_history):
    cfg = load_config("config/model/ad_dr.yaml", tiny_history["standard"])
    goals = task_split(cfg, "test")
    torch.manual_seed(0)
    model = AD(ADConfig.from_dict(cfg)).eval()
    ref = evaluate.run_in_context(model, cfg, goals, n_streams=3, n_episodes=4, seed=0, progress=False)
    res = run_searcher(cfg, goals, n_streams=3, n_episodes=4, seed=0)
    assert "kv_cache" not in res  # the searcher's memory is a map of cells, not KV entries: no cache size to report
    ref.pop("kv_cache")
    assert set(ref) <= set(res)
    for k in ref:
        assert type(res[k]) is type(ref[k]) and np.shape(res[k]) == np.shape(ref[k]), k
    assert res["returns"].dtype == ref["returns"].dtype
    # the same bookkeeping: episode returns are the per-step rewards summed per horizon, goal-major
    np.testing.assert_array_equal(res["returns"], res["rewards"].reshape(len(goals), 3, 4, -1).sum(-1))
    s = evaluate.summarize(res, goals, cfg)
    assert s["n_goals"] == len(goals) and s["n_streams"] == 3 and s["mean_return"] == pytest.approx(res["returns"].mean())
