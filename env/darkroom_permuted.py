"""Darkroom-permuted: Darkroom with a fixed goal and a hidden permutation of the 5 actions.

9x9 grid, start (0, 0), goal (G-1, G-1), reward 1 on every step that ends on the goal, horizon 50.
Task `i` (0..119) is the permutation `PERMUTATIONS[i]` (`itertools.permutations(range(5))` order): agent
action `a` executes Darkroom's `MOVES[perm[a]]`. Episodes end by truncation only.

Three implementations of the same dynamics (`step_batch` is the single source of truth):
- `DarkroomPermuted`, a `gymnasium.Env` (one episode, checked by gymnasium's and SB3's env checkers);
- `DarkroomPermutedVecEnv`, an SB3 `VecEnv` over `n_envs` streams of one task, with Darkroom's auto-reset contract;
- `step_batch`, one step of B streams that each have their own permutation (for in-context evaluation).
"""

from __future__ import annotations

import itertools
import random

import gymnasium as gym
import numpy as np

from env.darkroom import MOVES, N_ACTIONS, GridVecEnv, step_positions, toward

__all__ = [
    "MOVES",
    "N_ACTIONS",
    "PERMUTATIONS",
    "DarkroomPermuted",
    "DarkroomPermutedVecEnv",
    "goal_pos",
    "optimal_return",
    "oracle_action",
    "split_tasks",
    "start_pos",
    "step_batch",
    "task_to_perm",
]

PERMUTATIONS: list[tuple[int, ...]] = list(itertools.permutations(range(N_ACTIONS)))


def task_to_perm(task: int) -> tuple[int, ...]:
    """Task `i` is the i-th permutation of `itertools.permutations(range(5))`; out-of-range ids are an error."""
    if not 0 <= task < len(PERMUTATIONS):
        raise ValueError(f"task {task} is outside the permuted-Darkroom tasks: use 0..{len(PERMUTATIONS) - 1}")
    return PERMUTATIONS[task]


def start_pos(grid_size: int = 9) -> tuple[int, int]:
    return 0, 0


def goal_pos(grid_size: int = 9) -> tuple[int, int]:
    return grid_size - 1, grid_size - 1


def optimal_return(task: int, grid_size: int = 9, horizon: int = 50) -> int:
    """Return of the oracle that walks straight to the goal and stays: `min(H, H + 1 - |goal - start|_1)`, clipped at 0.

    The permutation only relabels actions, so it is the same for every task (35 for 9x9, horizon 50)."""
    task_to_perm(task)
    dist = int(np.abs(np.subtract(goal_pos(grid_size), start_pos(grid_size))).sum())
    return max(0, min(horizon, horizon + 1 - dist))


def split_tasks(seed: int = 4, train_ratio: float = 0.9, n_val: int = 12) -> tuple[list, list, list]:
    """The 120 task ids shuffled by `random.Random(seed)`: the first `round(120 * train_ratio)` are train, of
    which the last `n_val` are held out as validation; the rest are test. Returns (train, val, test)."""
    tasks = list(range(len(PERMUTATIONS)))
    random.Random(seed).shuffle(tasks)
    n_train = round(len(tasks) * train_ratio)
    if not 0 <= n_val < n_train:
        raise ValueError(f"n_val={n_val} must be in 0..{n_train - 1} (there are {n_train} non-test tasks)")
    return tasks[: n_train - n_val], tasks[n_train - n_val : n_train], tasks[n_train:]


def step_batch(pos: np.ndarray, state: None, actions: np.ndarray, perms: np.ndarray,
               grid_size: int = 9) -> tuple[np.ndarray, np.ndarray, None]:
    """One step of B streams, each with its own permutation: `pos` [B, 2], `actions` [B], `perms` [B, 5]
    (or [5], broadcast). `state` is there only to share Dark Key-to-Door's signature and must be None.
    Returns (new_pos, reward float32, None); reward 1 where the step ends on the goal. Does not reset anything."""
    if state is not None:
        raise ValueError("Darkroom-permuted has no per-stream state besides the position: pass state=None")
    actions = np.asarray(actions, dtype=np.int64)
    perms = np.broadcast_to(np.asarray(perms, dtype=np.int64), (*actions.shape, N_ACTIONS))
    moves = np.take_along_axis(perms, actions[..., None], axis=-1)[..., 0]
    new_pos = step_positions(np.asarray(pos, dtype=np.int64), moves, grid_size)
    reward = np.all(new_pos == np.array(goal_pos(grid_size)), axis=-1).astype(np.float32)
    return new_pos, reward, None


def oracle_action(pos: np.ndarray, task: int, grid_size: int = 9) -> np.ndarray:
    """The optimal action at positions `pos` ([..., 2]) under task `task`'s permutation: the agent action whose move is
    Darkroom's shortest-path step to the goal (row first), then the action whose move is stay."""
    inverse = np.argsort(np.array(task_to_perm(task), dtype=np.int64))  # move -> the agent action that executes it
    return inverse[toward(pos, np.array(goal_pos(grid_size)))]


class DarkroomPermuted(gym.Env):
    """One Darkroom-permuted episode; ends by truncation after `horizon` steps."""

    metadata = {"render_modes": []}
    render_mode = None

    def __init__(self, task: int = 0, grid_size: int = 9, horizon: int = 50):
        self.grid_size, self.horizon, self.task = grid_size, horizon, task
        self.perm = np.array(task_to_perm(task), dtype=np.int64)
        self.goal = np.array(goal_pos(grid_size), dtype=np.int64)
        self.observation_space = gym.spaces.MultiDiscrete([grid_size, grid_size])
        self.action_space = gym.spaces.Discrete(N_ACTIONS)
        self.pos = np.array(start_pos(grid_size), dtype=np.int64)
        self.t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.pos = np.array(start_pos(self.grid_size), dtype=np.int64)
        self.t = 0
        return self.pos.copy(), {}

    def step(self, action):
        new_pos, reward, _ = step_batch(self.pos[None], None, np.array([int(action)]), self.perm, self.grid_size)
        self.pos = new_pos[0]
        self.t += 1
        return self.pos.copy(), float(reward[0]), False, self.t >= self.horizon, {}


class DarkroomPermutedVecEnv(GridVecEnv):
    """`n_envs` Darkroom-permuted streams on one task (the `GridVecEnv` contract of env/darkroom.py)."""

    def __init__(self, n_envs: int, task: int, grid_size: int = 9, horizon: int = 50):
        single = DarkroomPermuted(task, grid_size, horizon)
        super().__init__(n_envs, single, grid_size, horizon, start_pos(grid_size))
        self.task, self.perm, self.goal = task, single.perm, single.goal

    def _move(self) -> np.ndarray:
        self.pos, rewards, _ = step_batch(self.pos, None, self._actions, self.perm, self.grid_size)
        return rewards
