"""Dark Key-to-Door: a 9x9 grid, start in the centre, a hidden key and a hidden door, return at most 2.

Reward 1 on the first step that ends on the key, and 1 on the first *later* step that ends on the door
(walking over the door before the key gives nothing). The agent observes only its position, so it has to
remember whether it already found the key. Episodes end by truncation after `horizon` steps only.

The per-stream progress is a `stage` in {0, 1, 2}: 0 no key yet, 1 key taken (`has_key`), 2 door reached
too. A boolean `has_key` alone is not enough state: it cannot tell "key taken" from "key and door done",
and the door pays only once.

Three implementations of the same dynamics (`step_batch` is the single source of truth):
- `DarkKeyToDoor`, a `gymnasium.Env` (one episode, checked by gymnasium's and SB3's env checkers);
- `DarkKeyToDoorVecEnv`, an SB3 `VecEnv` over `n_envs` streams of one task, with Darkroom's auto-reset contract;
  with `observe_stage=True` its observation is (row, col, stage), the Markov state, for the source PPO (whose
  memoryless policy cannot otherwise know whether it holds the key); the logged history keeps positions only;
- `step_batch`, one step of B streams that each have their own task (for in-context evaluation).
"""

from __future__ import annotations

import random
from functools import cache

import gymnasium as gym
import numpy as np

from env.darkroom import MOVES, N_ACTIONS, GridVecEnv, start_pos, step_positions, toward

__all__ = [
    "MOVES",
    "N_ACTIONS",
    "DarkKeyToDoor",
    "DarkKeyToDoorVecEnv",
    "key_door_to_task",
    "optimal_return",
    "oracle_action",
    "split_tasks",
    "start_pos",
    "step_batch",
    "task_to_key_door",
]


def task_to_key_door(task: int, grid_size: int = 9) -> tuple[tuple[int, int], tuple[int, int]]:
    """Task `i` is the base-`grid_size` number (key_row, key_col, door_row, door_col), key row most significant."""
    n_tasks = grid_size**4
    if not 0 <= task < n_tasks:
        raise ValueError(f"task {task} is outside the {grid_size}x{grid_size} key-to-door tasks: use 0..{n_tasks - 1}")
    key, door = divmod(task, grid_size * grid_size)
    return divmod(key, grid_size), divmod(door, grid_size)


def key_door_to_task(key: tuple[int, int], door: tuple[int, int], grid_size: int = 9) -> int:
    """Inverse of `task_to_key_door`."""
    cells = (*key, *door)
    if not all(0 <= c < grid_size for c in cells):
        raise ValueError(f"key {key} / door {door} is outside the {grid_size}x{grid_size} grid")
    kr, kc, dr, dc = cells
    return ((kr * grid_size + kc) * grid_size + dr) * grid_size + dc


def split_tasks(grid_size: int = 9, seed: int = 4, train_ratio: float = 0.95, n_val: int = 32) -> tuple[list, list, list]:
    """Row-major task ids shuffled by `random.Random(seed)`: the first `round(n * train_ratio)` are train, of
    which the last `n_val` are held out as validation; the rest are test. Returns (train, val, test)."""
    tasks = list(range(grid_size**4))
    random.Random(seed).shuffle(tasks)
    n_train = round(len(tasks) * train_ratio)
    if not 0 <= n_val < n_train:
        raise ValueError(f"n_val={n_val} must be in 0..{n_train - 1} (there are {n_train} non-test tasks)")
    return tasks[: n_train - n_val], tasks[n_train - n_val : n_train], tasks[n_train:]


def step_batch(pos: np.ndarray, stage: np.ndarray, actions: np.ndarray, key: np.ndarray, door: np.ndarray,
               grid_size: int = 9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step of B streams, each with its own task: `pos` [B, 2], `stage` [B] (0 no key, 1 has key, 2 done),
    `actions` [B], `key` and `door` [B, 2] (or [2], broadcast). Returns (new_pos, reward float32, new_stage).

    The door condition uses the stage *before* the step, so the door pays on a strictly later step than
    the key (key == door: +1 on arriving, +1 on the next step spent there). Does not reset anything."""
    pos = np.asarray(pos, dtype=np.int64)
    stage = np.asarray(stage, dtype=np.int64)
    new_pos = step_positions(pos, np.asarray(actions, dtype=np.int64), grid_size)
    got_key = (stage == 0) & np.all(new_pos == key, axis=-1)
    got_door = (stage == 1) & np.all(new_pos == door, axis=-1)
    reward = got_key | got_door
    return new_pos, reward.astype(np.float32), stage + reward


@cache
def _min_steps(task: int, grid_size: int) -> tuple[float, float]:
    """Layered BFS over (position, stage) states with `step_batch` itself: fewest steps after which the stage
    is 1 and 2 (inf where unreachable). The MDP is deterministic, so this is the exact oracle."""
    key, door = (np.array(p, dtype=np.int64) for p in task_to_key_door(task, grid_size))
    seen = np.zeros((grid_size, grid_size, 3), dtype=bool)
    pos, stage = np.array([start_pos(grid_size)], dtype=np.int64), np.zeros(1, dtype=np.int64)
    seen[pos[0, 0], pos[0, 1], 0] = True
    first = [0.0, float("inf"), float("inf")]
    steps = 0
    while len(pos):
        steps += 1
        n = len(pos)
        pos, _, stage = step_batch(np.repeat(pos, N_ACTIONS, axis=0), np.repeat(stage, N_ACTIONS),
                                   np.tile(np.arange(N_ACTIONS), n), key, door, grid_size)
        flat = np.unique(np.ravel_multi_index((pos[:, 0], pos[:, 1], stage), seen.shape))
        flat = flat[~seen.flat[flat]]
        seen.flat[flat] = True
        r, c, stage = np.unravel_index(flat, seen.shape)
        pos = np.stack([r, c], axis=1)
        for s in np.unique(stage).tolist():
            first[s] = min(first[s], steps)
    return first[1], first[2]


def optimal_return(task: int, grid_size: int = 9, horizon: int = 50) -> int:
    """Return of the oracle (exact, by BFS over (position, stage)): how many of the two rewards fit in `horizon`."""
    to_key, to_door = _min_steps(task, grid_size)
    return int(to_key <= horizon) + int(to_door <= horizon)


def oracle_action(pos: np.ndarray, stage: np.ndarray, task: int, grid_size: int = 9) -> np.ndarray:
    """The optimal action at positions `pos` ([..., 2]) in key stages `stage` ([...]: 0 no key, 1 key taken, 2 done):
    a shortest-path step to the key, then to the door, then stay. Any path pays the key before the door, so the
    shortest start -> key -> door path is the BFS oracle's (`optimal_return`); on key == door the stay step pays."""
    key, door = (np.array(p, dtype=np.int64) for p in task_to_key_door(task, grid_size))
    stage = np.asarray(stage, dtype=np.int64)
    return np.where(stage == 0, toward(pos, key), np.where(stage == 1, toward(pos, door), 4)).astype(np.int64)


class DarkKeyToDoor(gym.Env):
    """One Dark Key-to-Door episode; ends by truncation after `horizon` steps."""

    metadata = {"render_modes": []}
    render_mode = None

    def __init__(self, task: int = 0, grid_size: int = 9, horizon: int = 50):
        self.grid_size, self.horizon, self.task = grid_size, horizon, task
        key, door = task_to_key_door(task, grid_size)
        self.key, self.door = np.array(key, dtype=np.int64), np.array(door, dtype=np.int64)
        self.observation_space = gym.spaces.MultiDiscrete([grid_size, grid_size])
        self.action_space = gym.spaces.Discrete(N_ACTIONS)
        self.pos = np.array(start_pos(grid_size), dtype=np.int64)
        self.stage = 0
        self.t = 0

    @property
    def has_key(self) -> bool:
        return self.stage >= 1

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.pos = np.array(start_pos(self.grid_size), dtype=np.int64)
        self.stage = 0
        self.t = 0
        return self.pos.copy(), {}

    def step(self, action):
        new_pos, reward, stage = step_batch(self.pos[None], np.array([self.stage]), np.array([int(action)]),
                                            self.key, self.door, self.grid_size)
        self.pos, self.stage = new_pos[0], int(stage[0])
        self.t += 1
        return self.pos.copy(), float(reward[0]), False, self.t >= self.horizon, {}


class DarkKeyToDoorVecEnv(GridVecEnv):
    """`n_envs` Dark Key-to-Door streams on one task (the `GridVecEnv` contract of env/darkroom.py); a new episode
    also resets the key stage to 0."""

    def __init__(self, n_envs: int, task: int, grid_size: int = 9, horizon: int = 50, observe_stage: bool = False):
        single = DarkKeyToDoor(task, grid_size, horizon)
        super().__init__(n_envs, single, grid_size, horizon, start_pos(grid_size))
        self.task, self.key, self.door = task, single.key, single.door
        self.stage = np.zeros(n_envs, dtype=np.int64)
        self.observe_stage = observe_stage
        if observe_stage:  # (row, col, stage): the Markov state, for a source learner without memory; a Box, so that
            # SB3's MlpPolicy sees the numbers rather than one-hot codes (PPO got stuck on "key only" far more often with
            # one-hot codes: docs/experiments.md E11)
            self.observation_space = gym.spaces.Box(0, np.array([grid_size - 1, grid_size - 1, 2]), (3,), np.int64)

    def _observe(self) -> np.ndarray:
        if self.observe_stage:
            return np.concatenate([self.pos, self.stage[:, None]], axis=1)
        return self.pos.copy()

    @property
    def has_key(self) -> np.ndarray:
        return self.stage >= 1

    def _new_episode(self, streams: np.ndarray) -> None:
        super()._new_episode(streams)
        self.stage[streams] = 0

    def _move(self) -> np.ndarray:
        self.pos, rewards, self.stage = step_batch(self.pos, self.stage, self._actions, self.key, self.door, self.grid_size)
        return rewards
