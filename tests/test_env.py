import warnings

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from env import Darkroom, DarkroomVecEnv, goal_to_pos, optimal_return, split_goals


def test_env_checkers_pass_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(Darkroom(goal=10), skip_render_check=True)
        sb3_check_env(Darkroom(goal=10))


def test_moves_clip_at_walls_and_reward_on_goal():
    env = Darkroom(goal=goal_to_pos_inv(5, 4))  # goal one row below the start
    obs, _ = env.reset(seed=0)
    assert obs.tolist() == [4, 4]
    obs, r, term, trunc, _ = env.step(0)  # row + 1 -> onto the goal
    assert obs.tolist() == [5, 4] and r == 1.0 and not term and not trunc
    obs, r, *_ = env.step(4)  # stay on the goal: reward again
    assert obs.tolist() == [5, 4] and r == 1.0
    obs, r, *_ = env.step(2)  # col + 1
    assert obs.tolist() == [5, 5] and r == 0.0
    for _ in range(6):
        obs, *_ = env.step(2)
    assert obs.tolist() == [5, 8]  # clipped at the right wall
    for _ in range(9):
        obs, *_ = env.step(1)
    assert obs.tolist() == [0, 8]  # clipped at the top wall
    obs, *_ = env.step(3)
    assert obs.tolist() == [0, 7]


def goal_to_pos_inv(row, col, grid=9):
    return row * grid + col


def test_episode_truncates_after_horizon():
    env = Darkroom(goal=0, horizon=20)
    env.reset()
    for t in range(20):
        _, _, term, trunc, _ = env.step(4)
        assert not term
        assert trunc == (t == 19)


def test_goal_index_and_bounds():
    assert goal_to_pos(0) == (0, 0) and goal_to_pos(80) == (8, 8) and goal_to_pos(38) == (4, 2)
    with pytest.raises(ValueError, match="outside the 9x9 grid"):
        goal_to_pos(81)
    with pytest.raises(ValueError, match="outside"):
        Darkroom(goal=-1)


def test_optimal_return_hand_computed():
    assert optimal_return(40) == 20  # the start is the goal
    assert optimal_return(goal_to_pos_inv(4, 5)) == 20  # one step away: 19 steps on it + ... min(20, 21 - 1)
    assert optimal_return(0) == 13  # distance 8
    assert optimal_return(goal_to_pos_inv(0, 5)) == 16  # distance 5


def test_split_is_the_published_one_plus_validation_goals():
    train, val, test = split_goals(9, 0, 0.9)
    # the test goals are those other Darkroom AD repos report on, unchanged by the validation split
    assert [goal_to_pos(g) for g in test] == [(4, 2), (5, 6), (6, 8), (7, 2), (3, 6), (0, 5), (5, 8), (5, 4)]
    assert [optimal_return(g) for g in test] == [19, 18, 15, 16, 18, 16, 16, 20]
    assert np.mean([optimal_return(g) for g in test]) == 17.25
    # validation: the last 8 of the 73 former training goals
    assert val == [12, 68, 36, 17, 64, 27, 45, 61]
    assert len(train) == 65 and sorted(train + val + test) == list(range(81))  # disjoint and complete
    assert split_goals(9, 0, 0.9) == (train, val, test)  # deterministic
    train0, val0, test0 = split_goals(9, 0, 0.9, n_val=0)
    assert test0 == test and val0 == [] and train0 == train + val
    other = split_goals(9, 1, 0.9)
    assert other[2] != test  # the seed is what fixes the split
    with pytest.raises(ValueError, match="n_val_tasks=73"):
        split_goals(9, 0, 0.9, n_val=73)


def test_task_split_reads_the_config():
    from env import task_split

    cfg = {"grid_size": 9, "env_split_seed": 0, "train_env_ratio": 0.9, "n_val_tasks": 4}
    assert task_split(cfg, "val") == [64, 27, 45, 61] and len(task_split(cfg, "train")) == 69
    with pytest.raises(ValueError, match="split must be one of"):
        task_split(cfg, "validation")


def test_vec_env_matches_single_env_and_reports_terminal_obs():
    rng = np.random.default_rng(0)
    venv = DarkroomVecEnv(n_envs=3, goal=goal_to_pos_inv(2, 3))
    envs = [Darkroom(goal=goal_to_pos_inv(2, 3)) for _ in range(3)]
    obs = venv.reset()
    singles = [e.reset()[0] for e in envs]
    assert (obs == np.stack(singles)).all()
    for _ in range(45):
        actions = rng.integers(5, size=3)
        obs, rewards, dones, infos = venv.step(actions)
        for i, e in enumerate(envs):
            o, r, _, trunc, _ = e.step(actions[i])
            assert rewards[i] == r and dones[i] == trunc
            if trunc:
                assert (infos[i]["terminal_observation"] == o).all() and infos[i]["TimeLimit.truncated"]
                o, _ = e.reset()
            assert (obs[i] == o).all()
