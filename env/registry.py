"""One entry per env name: everything the pipeline needs to know about a task family (docs/design.md §1).

Scripts never name an env: they ask `task_family(cfg)` (the entry for `cfg["env"]`) for
- `splits(cfg)`: (train, val, test) task ids over all tasks; `task_split` / `selected_tasks` apply the
  `n_train_tasks` / `n_test_tasks` subset (the first N of a split, 0 = all) that a CPU can collect;
- `n_tasks(cfg)`, `vec_env(cfg, n_envs, task)` (SB3 VecEnv for PPO collection), `env(cfg, task)` (one gymnasium
  episode), `attrs(task, cfg)` (HDF5 group attrs), `describe(task, cfg)` (for tables), `optimal_return(task, cfg)`,
  `start_pos(cfg)`;
- `BatchEnv(cfg, tasks)`: B streams, each with its own task, stepped together for in-context evaluation.
Observations are always positions (row, col) and rewards 0 or 1 per step, so the model is the same for every env.
"""

from __future__ import annotations

import numpy as np

from common import ENV_CONFIGS, UserError
from env import dark_key_to_door as k2d
from env import darkroom as dr
from env import darkroom_permuted as dp

SPLITS = ("train", "val", "test")


class TaskFamily:
    """The interface; `step` is the batched dynamics: (pos [B,2], state, actions [B], params, grid) -> (pos, reward, state),
    where `params` are the per-stream task parameters from `params(tasks, cfg)` and `state` the per-episode state
    (None where the position is all there is) that starts as `initial_state(B)`."""

    module = None  # the env module: its Env / VecEnv classes and `optimal_return(task, grid, horizon)`, `start_pos(grid)`
    env_cls = vec_env_cls = None

    def initial_state(self, n: int):
        return None

    def vec_env(self, cfg, n_envs, task):
        if cfg.get("ppo_observe_stage", False):
            raise UserError(f"ppo_observe_stage=true is for envs with a hidden per-episode stage (dark_key_to_door); "
                            f"{cfg.get('env', 'darkroom')} has none: set ppo_observe_stage=false")
        return self.vec_env_cls(n_envs, task, cfg["grid_size"], cfg["horizon"])

    def env(self, cfg, task):
        return self.env_cls(task, cfg["grid_size"], cfg["horizon"])

    def optimal_return(self, task, cfg):
        return self.module.optimal_return(task, cfg["grid_size"], cfg["horizon"])

    def start_pos(self, cfg):
        return self.module.start_pos(cfg["grid_size"])

    def oracle_action(self, pos, state, task, cfg):
        """The optimal action at positions `pos` [..., 2] (with the per-episode `state` [...], e.g. the key stage, where
        the env has one; ignored otherwise) on `task`: the label DPT trains on."""
        return self.module.oracle_action(pos, task, cfg["grid_size"])


class Darkroom(TaskFamily):
    module, env_cls, vec_env_cls = dr, dr.Darkroom, dr.DarkroomVecEnv

    def n_tasks(self, cfg):
        return cfg["grid_size"] ** 2

    def splits(self, cfg):
        return dr.split_goals(cfg["grid_size"], cfg["env_split_seed"], cfg["train_env_ratio"], cfg.get("n_val_tasks", 8))

    def attrs(self, task, cfg):
        return {"goal": dr.goal_to_pos(task, cfg["grid_size"])}

    def describe(self, task, cfg):
        return "goal ({},{})".format(*dr.goal_to_pos(task, cfg["grid_size"]))

    def params(self, tasks, cfg):
        return np.array([dr.goal_to_pos(t, cfg["grid_size"]) for t in tasks], dtype=np.int64).reshape(-1, 2)

    def step(self, pos, state, actions, goals, grid_size):
        pos = dr.step_positions(pos, actions, grid_size)
        return pos, np.all(pos == goals, axis=1).astype(np.float32), None


class DarkroomPermuted(TaskFamily):
    module, env_cls, vec_env_cls = dp, dp.DarkroomPermuted, dp.DarkroomPermutedVecEnv
    def n_tasks(self, cfg):
        return len(dp.PERMUTATIONS)

    def splits(self, cfg):
        return dp.split_tasks(cfg["env_split_seed"], cfg["train_env_ratio"], cfg.get("n_val_tasks", 12))

    def attrs(self, task, cfg):
        return {"perm": dp.task_to_perm(task), "goal": dp.goal_pos(cfg["grid_size"])}

    def describe(self, task, cfg):
        return "perm " + "".join(map(str, dp.task_to_perm(task)))

    def params(self, tasks, cfg):
        return np.array([dp.task_to_perm(t) for t in tasks], dtype=np.int64).reshape(-1, len(dp.MOVES))

    def step(self, pos, state, actions, perms, grid_size):
        return dp.step_batch(pos, state, actions, perms, grid_size)


class DarkKeyToDoor(TaskFamily):
    module, env_cls, vec_env_cls = k2d, k2d.DarkKeyToDoor, k2d.DarkKeyToDoorVecEnv
    def n_tasks(self, cfg):
        return cfg["grid_size"] ** 4

    def splits(self, cfg):
        return k2d.split_tasks(cfg["grid_size"], cfg["env_split_seed"], cfg["train_env_ratio"], cfg.get("n_val_tasks", 32))

    def attrs(self, task, cfg):
        key, door = k2d.task_to_key_door(task, cfg["grid_size"])
        return {"key": key, "door": door}

    def describe(self, task, cfg):
        return "key ({},{}) door ({},{})".format(*(c for p in k2d.task_to_key_door(task, cfg["grid_size"]) for c in p))

    def params(self, tasks, cfg):
        return np.array([k2d.task_to_key_door(t, cfg["grid_size"]) for t in tasks], dtype=np.int64).reshape(-1, 2, 2)

    def vec_env(self, cfg, n_envs, task):
        return self.vec_env_cls(n_envs, task, cfg["grid_size"], cfg["horizon"], cfg.get("ppo_observe_stage", False))

    def initial_state(self, n):
        return np.zeros(n, dtype=np.int64)  # the key stage: 0 no key, 1 key taken, 2 door reached too

    def oracle_action(self, pos, stage, task, cfg):
        return k2d.oracle_action(pos, stage, task, cfg["grid_size"])

    def step(self, pos, stage, actions, key_door, grid_size):
        return k2d.step_batch(pos, stage, actions, key_door[:, 0], key_door[:, 1], grid_size)


REGISTRY: dict[str, TaskFamily] = {"darkroom": Darkroom(), "darkroom_permuted": DarkroomPermuted(),
                                   "dark_key_to_door": DarkKeyToDoor()}
assert set(REGISTRY) == set(ENV_CONFIGS), "common.ENV_CONFIGS and the registry must name the same envs"


def task_family(cfg: dict) -> TaskFamily:
    """The entry of the config's env (a config without an `env` key is Darkroom's, as before there were others)."""
    name = cfg.get("env", "darkroom")
    if name not in REGISTRY:
        raise UserError(f"unknown env {name!r}: use one of {', '.join(REGISTRY)} (config/env/*.yaml)")
    return REGISTRY[name]


def task_split(cfg: dict, split: str) -> list[int]:
    """The tasks of one split ("train", "val" or "test") for a config: the env's split, of which `n_train_tasks` /
    `n_test_tasks` (0 = all) keep the first N, so that an env with thousands of tasks can be collected on a CPU."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    tasks = dict(zip(SPLITS, task_family(cfg).splits(cfg), strict=True))[split]
    n = cfg.get(f"n_{split}_tasks", 0) if split != "val" else 0
    if n > len(tasks):
        raise UserError(f"n_{split}_tasks={n} is more than the {len(tasks)} {split} tasks of {cfg.get('env', 'darkroom')}: "
                        f"set n_{split}_tasks<={len(tasks)} (0 = all)")
    return tasks[:n] if n else tasks


def selected_tasks(cfg: dict) -> list[int]:
    """Every task of the train / val / test selection, sorted: what collect.py collects by default."""
    return sorted(t for split in SPLITS for t in task_split(cfg, split))


class BatchEnv:
    """B streams, stream b on task `tasks[b]`, stepped together (in-context evaluation). Every stream starts at the
    env's start position and all reset together every `horizon` steps (position and per-episode state, e.g. the key
    stage); `step` returns the position after the reset, as the next observation."""

    def __init__(self, cfg: dict, tasks: list[int]):
        self.family, self.grid_size, self.horizon = task_family(cfg), cfg["grid_size"], cfg["horizon"]
        self.params = self.family.params(tasks, cfg)
        self.start = np.array(self.family.start_pos(cfg), dtype=np.int64)
        self.n = len(tasks)
        self.reset()

    def reset(self) -> np.ndarray:
        self.pos = np.tile(self.start, (self.n, 1))
        self.state = self.family.initial_state(self.n)
        self.t = 0
        return self.pos.copy()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        """(observation [B, 2], reward [B] int64, episode ended) after one step of every stream."""
        self.pos, reward, self.state = self.family.step(self.pos, self.state, np.asarray(actions, dtype=np.int64),
                                                        self.params, self.grid_size)
        self.arrived = self.pos.copy()  # where the step ended, before a reset (a history's next_states)
        self.t += 1
        done = self.t >= self.horizon
        if done:
            self.reset()
        return self.pos.copy(), reward.astype(np.int64), done
