"""Dark Key-to-Door and Darkroom-permuted: dynamics and rewards against hand-computed cases, splits, oracles,
env checkers, and agreement of the gymnasium env, the VecEnv and the many-tasks `step_batch`."""

import warnings

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from common import UserError
from env import dark_key_to_door as k2d
from env import darkroom_permuted as perm
from env.dark_key_to_door import DarkKeyToDoor, DarkKeyToDoorVecEnv, key_door_to_task, task_to_key_door
from env.darkroom import Darkroom, step_positions
from env.darkroom_permuted import PERMUTATIONS, DarkroomPermuted, DarkroomPermutedVecEnv, task_to_perm

DOWN, UP, RIGHT, LEFT, STAY = 0, 1, 2, 3, 4  # Darkroom's MOVES: row+1, row-1, col+1, col-1, stay


def run(env, actions):
    """Reset `env`, play `actions`, return the list of (obs, reward, terminated, truncated)."""
    env.reset(seed=0)
    return [(o.tolist(), r, term, trunc) for o, r, term, trunc, _ in (env.step(a) for a in actions)]


def greedy_actions(pos, target):
    """Darkroom action that moves `pos` ([B, 2]) one step towards `target` (rows first), STAY when on it."""
    dr, dc = (target - pos).T
    return np.where(dr > 0, DOWN, np.where(dr < 0, UP, np.where(dc > 0, RIGHT, np.where(dc < 0, LEFT, STAY))))


def assert_vec_matches_single(venv, envs, n_steps, seed=0):
    """Random actions through `venv` and through `envs` (one per stream, reset by hand): identical obs, rewards,
    dones, terminal observations. Returns the total reward seen, so callers can check rewards were exercised."""
    rng = np.random.default_rng(seed)
    obs = venv.reset()
    assert (obs == np.stack([e.reset()[0] for e in envs])).all()
    total, n_done = 0.0, 0
    for _ in range(n_steps):
        actions = rng.integers(5, size=len(envs))
        obs, rewards, dones, infos = venv.step(actions)
        assert rewards.dtype == np.float32 and dones.dtype == bool
        for i, e in enumerate(envs):
            o, r, term, trunc, _ = e.step(actions[i])
            assert not term and rewards[i] == r and dones[i] == trunc
            if trunc:
                n_done += 1
                assert (infos[i]["terminal_observation"] == o).all() and infos[i]["TimeLimit.truncated"] is True
                o, _ = e.reset()
            else:
                assert infos[i] == {}
            assert (obs[i] == o).all()
        total += float(rewards.sum())
    assert n_done >= 2 * len(envs)  # several auto-resets happened
    return total


# ---------------------------------------------------------------- Dark Key-to-Door


def test_k2d_env_checkers_pass_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for task in (0, 1234, 9**4 - 1):
            check_env(DarkKeyToDoor(task=task), skip_render_check=True)
            sb3_check_env(DarkKeyToDoor(task=task))


def test_k2d_task_ids_are_key_row_key_col_door_row_door_col():
    assert task_to_key_door(0) == ((0, 0), (0, 0))
    assert task_to_key_door(1) == ((0, 0), (0, 1))
    assert task_to_key_door(9) == ((0, 0), (1, 0))
    assert task_to_key_door(81) == ((0, 1), (0, 0))
    assert task_to_key_door(729) == ((1, 0), (0, 0))
    assert task_to_key_door(9**4 - 1) == ((8, 8), (8, 8))
    assert task_to_key_door(2 * 729 + 3 * 81 + 4 * 9 + 5) == ((2, 3), (4, 5))
    assert task_to_key_door(1 * 125 + 2 * 25 + 3 * 5 + 4, grid_size=5) == ((1, 2), (3, 4))
    assert all(key_door_to_task(*task_to_key_door(t)) == t for t in range(0, 9**4, 37))
    with pytest.raises(ValueError, match="outside the 9x9"):
        task_to_key_door(9**4)
    with pytest.raises(ValueError, match="outside"):
        DarkKeyToDoor(task=-1)
    with pytest.raises(ValueError, match="outside"):
        key_door_to_task((9, 0), (0, 0))


def test_k2d_starts_in_the_centre_observes_position_only_and_truncates_at_horizon():
    env = DarkKeyToDoor(task=key_door_to_task((0, 0), (8, 8)))
    assert env.horizon == 50 and env.observation_space.nvec.tolist() == [9, 9] and env.action_space.n == 5
    obs, info = env.reset(seed=3)
    assert obs.tolist() == [4, 4] and info == {} and env.stage == 0 and not env.has_key
    steps = run(env, [STAY] * 50)
    assert all(not term for *_, term, _ in steps)
    assert [trunc for *_, trunc in steps] == [False] * 49 + [True]
    assert sum(r for _, r, _, _ in steps) == 0.0
    assert DarkKeyToDoor(task=0, grid_size=7).reset()[0].tolist() == [3, 3]


def test_k2d_key_equals_door_pays_on_arrival_and_on_the_next_step_there():
    env = DarkKeyToDoor(task=key_door_to_task((4, 5), (4, 5)))
    steps = run(env, [RIGHT, STAY, STAY, LEFT, RIGHT, STAY])
    assert [o for o, *_ in steps] == [[4, 5], [4, 5], [4, 5], [4, 4], [4, 5], [4, 5]]
    assert [r for _, r, *_ in steps] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert env.stage == 2 and env.has_key
    # leaving and coming back in the second step also pays the door (a later step than the key step)
    assert [r for _, r, *_ in run(env, [RIGHT, LEFT, RIGHT, RIGHT])] == [1.0, 0.0, 1.0, 0.0]


def test_k2d_key_on_the_start_needs_a_step_that_ends_there():
    env = DarkKeyToDoor(task=key_door_to_task((4, 4), (4, 4)))
    assert [r for _, r, *_ in run(env, [STAY, STAY, STAY])] == [1.0, 1.0, 0.0]
    env = DarkKeyToDoor(task=key_door_to_task((4, 4), (3, 4)))
    assert [r for _, r, *_ in run(env, [UP, DOWN, UP, UP])] == [0.0, 1.0, 1.0, 0.0]  # door before key: nothing


def test_k2d_door_before_key_gives_nothing_and_pays_after_the_key():
    env = DarkKeyToDoor(task=key_door_to_task((4, 6), (4, 5)))  # door between the start and the key
    steps = run(env, [RIGHT, STAY, RIGHT, RIGHT, LEFT, LEFT, RIGHT, LEFT])
    assert [o for o, *_ in steps] == [[4, 5], [4, 5], [4, 6], [4, 7], [4, 6], [4, 5], [4, 6], [4, 5]]
    assert [r for _, r, *_ in steps] == [0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    # the key pays once: walking over it again gives nothing
    env = DarkKeyToDoor(task=key_door_to_task((4, 5), (0, 0)))
    assert [r for _, r, *_ in run(env, [RIGHT, LEFT, RIGHT, STAY])] == [1.0, 0.0, 0.0, 0.0]


def test_k2d_return_never_exceeds_two():
    rng = np.random.default_rng(1)
    tasks = [key_door_to_task((4, 4), (4, 4)), key_door_to_task((4, 5), (4, 4)), key_door_to_task((3, 4), (5, 4))]
    returns = []
    for task in tasks:
        venv = DarkKeyToDoorVecEnv(n_envs=64, task=task, horizon=30)
        venv.reset()
        ep_return = np.zeros(64)
        for _ in range(90):
            _, rewards, dones, _ = venv.step(rng.integers(5, size=64))
            assert set(np.unique(rewards).tolist()) <= {0.0, 1.0}
            ep_return += rewards
            assert (ep_return <= 2).all() and (venv.stage[~dones] == ep_return[~dones]).all()
            returns += ep_return[dones].tolist()
            ep_return[dones] = 0
            assert (venv.stage[dones] == 0).all() and (venv.pos[dones] == [4, 4]).all()
    assert max(returns) == 2 and min(returns) == 0 and len(returns) == 3 * 64 * 3


def test_k2d_optimal_return_hand_computed():
    t = key_door_to_task
    assert k2d.optimal_return(t((4, 5), (0, 0))) == 2  # key adjacent (1 step), door 9 further: 10 steps
    assert k2d.optimal_return(t((4, 5), (0, 0)), horizon=10) == 2
    assert k2d.optimal_return(t((4, 5), (0, 0)), horizon=9) == 1
    assert k2d.optimal_return(t((4, 5), (0, 0)), horizon=1) == 1
    assert k2d.optimal_return(t((0, 0), (8, 8))) == 2  # 8 + 16 = 24 steps
    assert k2d.optimal_return(t((0, 0), (8, 8)), horizon=24) == 2
    assert k2d.optimal_return(t((0, 0), (8, 8)), horizon=23) == 1
    assert k2d.optimal_return(t((0, 0), (8, 8)), horizon=7) == 0
    assert k2d.optimal_return(t((4, 4), (4, 4)), horizon=2) == 2  # key == start == door: stay, stay
    assert k2d.optimal_return(t((4, 4), (4, 4)), horizon=1) == 1
    assert k2d.optimal_return(t((4, 4), (4, 5)), horizon=2) == 2  # key == start: stay, then one step
    assert k2d.optimal_return(t((4, 5), (4, 5)), horizon=1) == 1  # key == door: arrive, then stay
    assert k2d.optimal_return(t((4, 5), (4, 5)), horizon=2) == 2
    assert k2d.optimal_return(t((4, 4), (4, 4)), horizon=0) == 0
    assert min(k2d.optimal_return(task) for task in range(0, 9**4, 7)) == 2  # all fit in 50 steps on 9x9


@pytest.mark.parametrize("grid_size,stride", [(5, 1), (9, 7)])
def test_k2d_optimal_return_is_the_closed_form_and_the_greedy_oracle_reaches_it(grid_size, stride):
    tasks = np.arange(0, grid_size**4, stride)
    kd = np.array([task_to_key_door(int(i), grid_size) for i in tasks])
    key, door = kd[:, 0], kd[:, 1]
    centre = np.array(k2d.start_pos(grid_size))
    d1 = np.maximum(np.abs(key - centre).sum(1), 1)
    d2 = np.maximum(np.abs(door - key).sum(1), 1)
    for horizon in (3, 12, 50):
        closed = (d1 <= horizon).astype(int) + (d1 + d2 <= horizon)
        assert [k2d.optimal_return(int(i), grid_size, horizon) for i in tasks] == closed.tolist()
        # the greedy oracle (walk to the key, then to the door, STAY to collect on the spot) gets it exactly
        pos, stage, ret = np.tile(centre, (len(tasks), 1)), np.zeros(len(tasks), dtype=np.int64), np.zeros(len(tasks))
        for _ in range(horizon):
            target = np.where((stage == 0)[:, None], key, door)
            pos, r, stage = k2d.step_batch(pos, stage, greedy_actions(pos, target), key, door, grid_size)
            ret += r
        assert ret.tolist() == closed.tolist()


def test_k2d_split_sizes_disjoint_and_deterministic():
    train, val, test = k2d.split_tasks()
    assert (len(train), len(val), len(test)) == (6201, 32, 328)
    assert sorted(train + val + test) == list(range(9**4))
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    assert k2d.split_tasks(9, 4, 0.95, 32) == (train, val, test)
    assert train[:3] == [558, 2586, 14] and val[:3] == [3985, 907, 4464] and test[:3] == [3406, 3554, 4198]
    # validation is carved from the end of the train part: the train+val order is n_val-independent
    tr0, val0, te0 = k2d.split_tasks(n_val=0)
    assert val0 == [] and tr0 == train + val and te0 == test
    assert k2d.split_tasks(seed=5)[2] != test
    with pytest.raises(ValueError, match="n_val"):
        k2d.split_tasks(n_val=7000)


def test_k2d_vec_env_matches_single_env():
    for task, grid_size, horizon in [(key_door_to_task((2, 3), (1, 1), 5), 5, 12), (key_door_to_task((4, 5), (4, 4)), 9, 50),
                                     (key_door_to_task((1, 2), (1, 2), 5), 5, 7)]:
        venv = DarkKeyToDoorVecEnv(n_envs=4, task=task, grid_size=grid_size, horizon=horizon)
        envs = [DarkKeyToDoor(task, grid_size, horizon) for _ in range(4)]
        total = assert_vec_matches_single(venv, envs, n_steps=3 * horizon + 5)
        assert total > 0  # rewards were exercised
        assert venv.get_attr("task") == [task] * 4 and venv.env_is_wrapped(object) == [False] * 4


def test_k2d_vec_env_observing_the_stage_adds_it_to_the_same_positions():
    """The source PPO's optional Markov observation (row, col, stage): the same positions, rewards and dones as the
    position-only VecEnv, the stage each stream is in, the pre-reset stage in the terminal observation, and 0 after."""
    task, grid_size, horizon = key_door_to_task((2, 3), (1, 1), 5), 5, 12
    plain = DarkKeyToDoorVecEnv(n_envs=6, task=task, grid_size=grid_size, horizon=horizon)
    staged = DarkKeyToDoorVecEnv(n_envs=6, task=task, grid_size=grid_size, horizon=horizon, observe_stage=True)
    assert staged.observation_space.shape == (3,) and (staged.observation_space.high == [4, 4, 2]).all()
    obs_p, obs_s = plain.reset(), staged.reset()
    assert (obs_s[:, :2] == obs_p).all() and (obs_s[:, 2] == 0).all()
    rng = np.random.default_rng(0)
    seen_stages, n_done = set(), 0
    for _ in range(3 * horizon):
        actions = rng.integers(5, size=6)
        obs_p, r_p, d_p, info_p = plain.step(actions)
        _, _, stage_after = k2d.step_batch(staged.pos, staged.stage, actions, staged.key, staged.door, grid_size)
        obs_s, r_s, d_s, info_s = staged.step(actions)
        assert (obs_s[:, :2] == obs_p).all() and (r_s == r_p).all() and (d_s == d_p).all()
        for i in range(6):
            if d_s[i]:
                n_done += 1
                term = info_s[i]["terminal_observation"]
                assert (term[:2] == info_p[i]["terminal_observation"]).all() and term[2] == stage_after[i]
                assert obs_s[i, 2] == 0  # the new episode starts without the key
            else:
                assert obs_s[i, 2] == stage_after[i]
        seen_stages |= set(stage_after.tolist())
    assert n_done >= 12 and seen_stages >= {0, 1}  # resets happened and the key was taken at least once


def test_observing_the_stage_is_refused_for_envs_without_one():
    from env import task_family
    cfg = {"env": "darkroom", "grid_size": 9, "horizon": 20, "ppo_observe_stage": True}
    with pytest.raises(UserError, match="ppo_observe_stage=true is for envs with a hidden per-episode stage"):
        task_family(cfg).vec_env(cfg, 2, 0)
    cfg = {"env": "dark_key_to_door", "grid_size": 9, "horizon": 50, "ppo_observe_stage": True}
    assert task_family(cfg).vec_env(cfg, 2, 0).reset().shape == (2, 3)


def test_k2d_step_batch_matches_single_env_with_a_task_per_stream():
    rng = np.random.default_rng(2)
    grid_size, horizon, n = 5, 25, 40
    tasks = rng.integers(grid_size**4, size=n)
    kd = np.array([task_to_key_door(int(i), grid_size) for i in tasks])
    envs = [DarkKeyToDoor(int(i), grid_size, horizon) for i in tasks]
    singles = np.stack([e.reset()[0] for e in envs])
    pos, stage = singles.copy(), np.zeros(n, dtype=np.int64)
    total = 0.0
    for _ in range(horizon):
        actions = rng.integers(5, size=n)
        pos, rewards, stage = k2d.step_batch(pos, stage, actions, kd[:, 0], kd[:, 1], grid_size)
        for i, e in enumerate(envs):
            o, r, *_ = e.step(actions[i])
            assert (pos[i] == o).all() and rewards[i] == r and stage[i] == e.stage
        total += rewards.sum()
    assert total > 0


# ---------------------------------------------------------------- Darkroom-permuted


def test_perm_env_checkers_pass_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for task in (0, 26, 119):
            check_env(DarkroomPermuted(task=task), skip_render_check=True)
            sb3_check_env(DarkroomPermuted(task=task))


def test_perm_task_ids_are_itertools_permutations():
    assert len(PERMUTATIONS) == 120
    assert task_to_perm(0) == (0, 1, 2, 3, 4) and task_to_perm(1) == (0, 1, 2, 4, 3)
    assert task_to_perm(26) == (1, 0, 3, 2, 4) and task_to_perm(119) == (4, 3, 2, 1, 0)
    with pytest.raises(ValueError, match="outside"):
        task_to_perm(120)
    with pytest.raises(ValueError, match="outside"):
        DarkroomPermuted(task=-1)


def test_perm_identity_is_darkroom_moves():
    rng = np.random.default_rng(3)
    actions = rng.integers(5, size=200)
    env = DarkroomPermuted(task=0, horizon=200)
    env.reset()
    pos = np.zeros((1, 2), dtype=np.int64)
    for a in actions:
        pos = step_positions(pos, np.array([a]), 9)
        assert env.step(a)[0].tolist() == pos[0].tolist()
    # and the same moves as Darkroom itself (whose start is the centre, so compare displacements from a reset)
    dark, permd = Darkroom(goal=0), DarkroomPermuted(task=0)
    d0, p0 = dark.reset()[0], permd.reset()[0]
    for a in [DOWN, DOWN, RIGHT, UP, LEFT, STAY, RIGHT]:
        assert (dark.step(a)[0] - d0).tolist() == (permd.step(a)[0] - p0).tolist()


def test_perm_non_identity_by_hand():
    env = DarkroomPermuted(task=26)  # (1, 0, 3, 2, 4): agent 0 -> row-1, 1 -> row+1, 2 -> col-1, 3 -> col+1, 4 -> stay
    obs, _ = env.reset()
    assert obs.tolist() == [0, 0]
    steps = run(env, [1, 3, 3, 0, 2, 0, 4, 1])
    assert [o for o, *_ in steps] == [[1, 0], [1, 1], [1, 2], [0, 2], [0, 1], [0, 1], [0, 1], [1, 1]]
    env = DarkroomPermuted(task=119)  # (4, 3, 2, 1, 0): agent 0 -> stay, 1 -> col-1, 2 -> col+1, 3 -> row-1, 4 -> row+1
    steps = run(env, [0, 4, 4, 2, 3, 1, 1])
    assert [o for o, *_ in steps] == [[0, 0], [1, 0], [2, 0], [2, 1], [1, 1], [1, 0], [1, 0]]


def test_perm_dense_reward_on_every_step_on_the_goal():
    env = DarkroomPermuted(task=26)
    assert env.horizon == 50 and env.goal.tolist() == [8, 8]
    # under (1, 0, 3, 2, 4): agent 1 is row+1, agent 3 is col+1
    steps = run(env, [1] * 8 + [3] * 8 + [4] * 3 + [0] + [1] + [2, 3] + [4] * 27)
    assert len(steps) == 50 and steps[-1][3] and not any(trunc for *_, trunc in steps[:-1])
    rewards = [r for _, r, *_ in steps]
    assert rewards[:15] == [0.0] * 15 and rewards[15:19] == [1.0] * 4  # arrive at step 16, stay 3
    assert rewards[19:23] == [0.0, 1.0, 0.0, 1.0]  # step up and back, left and back
    assert sum(rewards) == 35 - 2 == perm.optimal_return(26) - 2
    assert all(not term for *_, term, _ in steps)


def test_perm_optimal_return_and_the_oracle_reaches_it():
    assert [perm.optimal_return(t) for t in range(120)] == [35] * 120
    assert perm.optimal_return(0, grid_size=5, horizon=10) == 3 and perm.optimal_return(0, grid_size=9, horizon=16) == 1
    assert perm.optimal_return(0, horizon=15) == 0 and perm.optimal_return(0, grid_size=1, horizon=4) == 4
    with pytest.raises(ValueError, match="outside"):
        perm.optimal_return(120)
    # the oracle that knows the permutation: invert it, then walk greedily to the goal, all 120 tasks at once
    perms = np.array(PERMUTATIONS)
    inverse = np.argsort(perms, axis=1)  # inverse[t, move] is the agent action that executes MOVES[move]
    pos, ret = np.zeros((120, 2), dtype=np.int64), np.zeros(120)
    goal = np.array([8, 8])
    for _ in range(50):
        moves = greedy_actions(pos, goal)
        pos, r, state = perm.step_batch(pos, None, inverse[np.arange(120), moves], perms)
        assert state is None
        ret += r
    assert ret.tolist() == [35.0] * 120


def test_perm_split_sizes_disjoint_and_deterministic():
    train, val, test = perm.split_tasks()
    assert (len(train), len(val), len(test)) == (96, 12, 12)
    assert sorted(train + val + test) == list(range(120))
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    assert perm.split_tasks(4, 0.9, 12) == (train, val, test)
    assert val == [33, 117, 22, 35, 46, 68, 66, 28, 7, 97, 102, 37]
    assert test == [70, 51, 2, 8, 11, 19, 61, 50, 92, 13, 38, 30]
    tr0, val0, te0 = perm.split_tasks(n_val=0)
    assert val0 == [] and tr0 == train + val and te0 == test
    assert perm.split_tasks(seed=5)[2] != test


def test_perm_vec_env_matches_single_env():
    for task, grid_size, horizon in [(26, 3, 9), (119, 9, 50), (57, 4, 25)]:
        venv = DarkroomPermutedVecEnv(n_envs=4, task=task, grid_size=grid_size, horizon=horizon)
        envs = [DarkroomPermuted(task, grid_size, horizon) for _ in range(4)]
        total = assert_vec_matches_single(venv, envs, n_steps=3 * horizon + 5)
        if grid_size < 9:
            assert total > 0  # rewards were exercised
        assert (venv.reset() == 0).all()


def test_perm_step_batch_matches_single_env_with_a_task_per_stream():
    rng = np.random.default_rng(4)
    grid_size, horizon, n = 3, 20, 30
    tasks = rng.integers(120, size=n)
    envs = [DarkroomPermuted(int(i), grid_size, horizon) for i in tasks]
    pos = np.stack([e.reset()[0] for e in envs])
    total = 0.0
    for _ in range(horizon):
        actions = rng.integers(5, size=n)
        pos, rewards, state = perm.step_batch(pos, None, actions, np.array(PERMUTATIONS)[tasks], grid_size)
        assert state is None
        for i, e in enumerate(envs):
            o, r, *_ = e.step(actions[i])
            assert (pos[i] == o).all() and rewards[i] == r
        total += rewards.sum()
    assert total > 0
    with pytest.raises(ValueError, match="state=None"):
        perm.step_batch(pos, np.zeros(n), actions, np.array(PERMUTATIONS)[tasks], grid_size)
