"""Darkroom: a 9x9 grid, start in the centre, a hidden goal, reward 1 per step spent on the goal.

Two implementations of the same dynamics:
- `Darkroom`, a `gymnasium.Env` (one episode, checked by gymnasium's and SB3's env checkers);
- `DarkroomVecEnv`, an SB3 `VecEnv` that steps all parallel streams of one goal in numpy, which is what
  PPO collection uses (SB3's DummyVecEnv over 100 Python envs costs more than the PPO update itself).
"""

from __future__ import annotations

import random
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import VecEnv

from model.ad import N_ACTIONS  # the model's action vocabulary is the one home of the action count

# action -> (d_row, d_col): 0 row+1, 1 row-1, 2 col+1, 3 col-1, 4 stay
MOVES = np.array([[1, 0], [-1, 0], [0, 1], [0, -1], [0, 0]], dtype=np.int64)
assert len(MOVES) == N_ACTIONS


def goal_to_pos(goal_idx: int, grid_size: int = 9) -> tuple[int, int]:
    """Goal `i` is `(i // grid_size, i % grid_size)`; out-of-grid indices are an error."""
    n_goals = grid_size * grid_size
    if not 0 <= goal_idx < n_goals:
        raise ValueError(f"goal {goal_idx} is outside the {grid_size}x{grid_size} grid: use 0..{n_goals - 1}")
    return goal_idx // grid_size, goal_idx % grid_size


def start_pos(grid_size: int = 9) -> tuple[int, int]:
    return grid_size // 2, grid_size // 2


def optimal_return(goal_idx: int, grid_size: int = 9, horizon: int = 20) -> int:
    """Return of the oracle that walks straight to the goal and stays: `min(H, H + 1 - |g - start|_1)`."""
    g = np.array(goal_to_pos(goal_idx, grid_size))
    dist = int(np.abs(g - np.array(start_pos(grid_size))).sum())
    return min(horizon, horizon + 1 - dist)


def split_goals(grid_size: int = 9, env_split_seed: int = 0, train_env_ratio: float = 0.9,
                n_val: int = 8) -> tuple[list, list, list]:
    """The one train / validation / test split (docs/design.md §1).

    Row-major goals are shuffled by `random.Random(env_split_seed)`; the last `1 - train_env_ratio` of them are the
    test goals (the 8 held-out goals other Darkroom AD repos report on), and the last `n_val` of the rest are the
    validation goals, which choose every default and are never trained on. Returns (train, val, test)."""
    goals = list(range(grid_size * grid_size))
    random.Random(env_split_seed).shuffle(goals)
    n_train = round(len(goals) * train_env_ratio)
    if not 0 <= n_val < n_train:
        raise ValueError(f"n_val_tasks={n_val} must be in 0..{n_train - 1} (there are {n_train} non-test goals)")
    return goals[: n_train - n_val], goals[n_train - n_val : n_train], goals[n_train:]


def step_positions(pos: np.ndarray, actions: np.ndarray, grid_size: int) -> np.ndarray:
    """Apply `actions` ([N]) to positions ([N, 2]); moves are clipped at the walls."""
    return np.clip(pos + MOVES[actions], 0, grid_size - 1)


def toward(pos: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The move (index into MOVES) of one shortest-path step from `pos` to `target` (both [..., 2]): the row first, then
    the column, 4 (stay) where `pos` is the target. Deterministic, so it can label every state with one oracle action."""
    pos, target = np.asarray(pos, dtype=np.int64), np.asarray(target, dtype=np.int64)
    dr, dc = target[..., 0] - pos[..., 0], target[..., 1] - pos[..., 1]
    return np.select([dr > 0, dr < 0, dc > 0, dc < 0], [0, 1, 2, 3], 4).astype(np.int64)


def oracle_action(pos: np.ndarray, goal_idx: int, grid_size: int = 9) -> np.ndarray:
    """The optimal action at positions `pos` ([..., 2]) for goal `goal_idx`: walk straight to the goal, then stay (the
    policy whose return is `optimal_return`)."""
    return toward(pos, np.array(goal_to_pos(goal_idx, grid_size)))


class Darkroom(gym.Env):
    """One Darkroom episode; ends by truncation after `horizon` steps."""

    metadata = {"render_modes": []}
    render_mode = None

    def __init__(self, goal: int = 0, grid_size: int = 9, horizon: int = 20):
        self.grid_size, self.horizon = grid_size, horizon
        self.goal = np.array(goal_to_pos(goal, grid_size), dtype=np.int64)
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
        self.pos = step_positions(self.pos[None], np.array([int(action)]), self.grid_size)[0]
        self.t += 1
        reward = float(np.array_equal(self.pos, self.goal))
        return self.pos.copy(), reward, False, self.t >= self.horizon, {}


class GridVecEnv(VecEnv):
    """The SB3 `VecEnv` plumbing the gridworlds share: `n_envs` streams of one task stepped together in numpy
    (SB3's DummyVecEnv over 100 Python envs costs more than the PPO update itself).

    Follows SB3's VecEnv contract: auto-reset on episode end, the last observation of an episode in
    `infos[i]["terminal_observation"]`, and `infos[i]["TimeLimit.truncated"] = True` (episodes only end by time limit,
    so PPO bootstraps from the value of the terminal observation). A subclass moves the streams (`_move`) and resets
    whatever per-episode state it keeps besides position and time (`_new_episode`)."""

    render_mode = None

    def __init__(self, n_envs: int, single: gym.Env, grid_size: int, horizon: int, start: tuple[int, int]):
        super().__init__(n_envs, single.observation_space, single.action_space)
        self.grid_size, self.horizon = grid_size, horizon
        self.start = np.array(start, dtype=np.int64)
        self.pos = np.tile(self.start, (n_envs, 1))
        self.t = np.zeros(n_envs, dtype=np.int64)
        self._actions = np.zeros(n_envs, dtype=np.int64)

    def _move(self) -> np.ndarray:
        """Apply `self._actions`: update `self.pos` (and per-episode state); return the rewards (float32, [n_envs])."""
        raise NotImplementedError

    def _new_episode(self, streams: np.ndarray) -> None:
        """Start a new episode in the `streams` (a bool mask)."""
        self.pos[streams] = self.start
        self.t[streams] = 0

    def _observe(self) -> np.ndarray:
        """What PPO observes: the positions (a subclass may add to them)."""
        return self.pos.copy()

    def reset(self) -> np.ndarray:
        self._new_episode(np.ones(self.num_envs, dtype=bool))
        self.reset_infos = [{} for _ in range(self.num_envs)]
        return self._observe()

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions, dtype=np.int64).reshape(self.num_envs)

    def step_wait(self):
        rewards = self._move()
        self.t += 1
        dones = self.t >= self.horizon
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        obs = self._observe()
        if dones.any():
            for i in np.flatnonzero(dones):
                infos[i] = {"terminal_observation": obs[i].copy(), "TimeLimit.truncated": True}
            self._new_episode(dones)
            obs[dones] = self._observe()[dones]
        return obs, rewards, dones, infos

    def close(self) -> None:
        pass

    def get_attr(self, attr_name, indices=None):
        return [getattr(self, attr_name) for _ in self._get_indices(indices)]

    def set_attr(self, attr_name, value, indices=None) -> None:
        setattr(self, attr_name, value)

    def env_method(self, method_name, *args, indices=None, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no sub-environments to call methods on")

    def env_is_wrapped(self, wrapper_class, indices=None):
        return [False for _ in self._get_indices(indices)]


class DarkroomVecEnv(GridVecEnv):
    """`n_envs` Darkroom streams on one goal (the `GridVecEnv` contract)."""

    def __init__(self, n_envs: int, goal: int, grid_size: int = 9, horizon: int = 20):
        single = Darkroom(goal, grid_size, horizon)
        super().__init__(n_envs, single, grid_size, horizon, start_pos(grid_size))
        self.goal = single.goal

    def _move(self) -> np.ndarray:
        self.pos = step_positions(self.pos, self._actions, self.grid_size)
        return np.all(self.pos == self.goal, axis=1).astype(np.float32)
