"""Each env's oracle action (the DPT label): hand-checked on constructed states, the labels `dataset.oracle_targets`
gives a constructed history, and the return of following it (the optimum on every task tried)."""

import numpy as np
import pytest

from common import env_configs, load_config
from dataset import oracle_targets
from env import BatchEnv, task_family, task_split
from env.dark_key_to_door import key_door_to_task
from env.darkroom_permuted import PERMUTATIONS


def _cfg(env):
    return load_config(env_configs(env)["standard"])


def test_darkroom_oracle_on_constructed_states():
    cfg = _cfg("darkroom")
    goal = 38  # (4, 2)
    pos = np.array([[4, 4], [0, 2], [4, 2], [8, 0], [4, 0], [7, 2]])
    # row first, then column, stay on the goal: col-1, row+1, stay, row-1, col+1, row-1
    assert task_family(cfg).oracle_action(pos, None, goal, cfg).tolist() == [3, 0, 4, 1, 2, 1]


def test_key_to_door_oracle_on_constructed_states_and_a_constructed_history():
    cfg = _cfg("dark_key_to_door")
    fam = task_family(cfg)
    task = key_door_to_task((0, 4), (8, 4))
    pos = np.array([[4, 4], [4, 4], [4, 4], [0, 4], [0, 4], [8, 4]])
    stage = np.array([0, 1, 2, 0, 1, 1])
    # stage 0: to the key (on it without it, as on a key at the start: stay, the step that ends there pays); stage 1: to
    # the door; stage 2: stay
    assert fam.oracle_action(pos, stage, task, cfg).tolist() == [1, 0, 4, 4, 0, 4]
    # a constructed history of one stream, key (0, 4) and door (2, 4): episode 1 takes the key on its step 1 and reaches
    # the door on its step 3; episode 2 starts over without the key. The labels follow the stage its rewards give.
    task = key_door_to_task((0, 4), (2, 4))
    states = np.array([[2, 4], [1, 4], [0, 4], [1, 4], [2, 4], [4, 4], [3, 4]])[:, None]
    rewards = np.array([0, 1, 0, 1, 0, 0, 0])[:, None]
    dones = np.array([0, 0, 0, 0, 1, 0, 0], bool)[:, None]
    # stages 0 0 1 1 2 | 0 0: up, up, down, down, stay | up, up
    assert oracle_targets(cfg, task, states, rewards, dones)[:, 0].tolist() == [1, 1, 0, 0, 4, 1, 1]


def test_permuted_oracle_on_constructed_states():
    cfg = _cfg("darkroom_permuted")
    task = 57
    perm = PERMUTATIONS[task]
    inverse = {m: a for a, m in enumerate(perm)}
    pos = np.array([[0, 0], [8, 0], [8, 8], [3, 8]])  # row+1, col+1, stay, row+1 in Darkroom moves
    assert task_family(cfg).oracle_action(pos, None, task, cfg).tolist() == [inverse[0], inverse[2], inverse[4], inverse[0]]


@pytest.mark.parametrize("env", ["darkroom", "dark_key_to_door", "darkroom_permuted"])
def test_following_the_oracle_earns_the_optimum_on_every_task_tried(env):
    cfg = _cfg(env)
    fam = task_family(cfg)
    tasks = (task_split(cfg, "val") + task_split(cfg, "test"))[:40]
    env_ = BatchEnv(cfg, tasks)
    pos, total = env_.reset(), np.zeros(len(tasks))
    for _ in range(cfg["horizon"]):
        state = env_.state if env_.state is not None else np.zeros(len(tasks), np.int64)
        action = np.array([fam.oracle_action(pos[b], state[b], t, cfg) for b, t in enumerate(tasks)])
        pos, r, _ = env_.step(action)
        total += r
    assert total.tolist() == [fam.optimal_return(t, cfg) for t in tasks]
