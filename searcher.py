"""A reference learner for the study: a hand-written searcher with memory across episodes, per env; with decaying
noise (`noisy_history`) also a source of learning histories to distil (collect.py's `alg: searcher-eps`).

It plays the same streams as the in-context evaluation (`env.BatchEnv`: every task x `n_streams`, goal-major, all reset
together every `horizon` steps) and keeps the same per-episode bookkeeping as `evaluate.run_in_context`, so its returns
go through the study's statistics unchanged. It observes what the model observes (its position and the reward) and
knows the grid's rules (walls clip a move), not the task:
- darkroom: sweep the cells not yet ruled out (the nearest one by L1 distance, which is the grid's BFS distance: no
  walls inside), and once a step earns the reward walk straight to that cell in every later episode and stay there;
- dark_key_to_door: the same for the key, then from the key for the door (a cell is ruled out as the key only by
  arriving there without the key, as the door only by arriving there with the key and no reward), both remembered;
- darkroom_permuted: the goal is the same (the far corner) for every task, training ones included, so it is known; the
  permutation is not: learn each action's move from what it did (a move into a wall looks like stay, so such a try
  leaves a set of candidates, narrowed because the actions are a permutation), then walk to the goal with known moves.
Ties between equally near cells go to the one farther from the start (`TIE_OUTWARD`), then, like ties between equally
useful actions, at random (`seed`), so streams differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from env import MOVES, N_ACTIONS, BatchEnv, task_family
from env.darkroom_permuted import goal_pos
from history import empty_history


@dataclass(frozen=True)
class Spec:
    n_subgoals: int  # cells to find, in order (the goal; the key then the door)
    advance: bool  # a reward moves on to the next subgoal (a key or door pays once); otherwise the goal pays every step
    known_goal: bool  # the env's one goal cell is known (Darkroom-permuted's, the same for every task)
    learn_moves: bool  # the actions' moves are hidden (a permutation per task)


SPECS = {
    "darkroom": Spec(n_subgoals=1, advance=False, known_goal=False, learn_moves=False),
    "dark_key_to_door": Spec(n_subgoals=2, advance=True, known_goal=False, learn_moves=False),
    "darkroom_permuted": Spec(n_subgoals=1, advance=False, known_goal=True, learn_moves=True),
}


# between equally near cells, prefer the one farther from the start (clear the far cells while out there and leave the
# near ones to the start of the next episode): 0.1 per step of distance, under 1 for the farthest cell, so never
# against the nearer cell; then at random
TIE_OUTWARD = 0.1


class Searcher:
    """The memory and policy of B streams: candidate cells per subgoal `[B, K, G, G]`, candidate moves per action
    `[B, A, A]` (the identity where moves are not hidden), and the subgoal each stream is after in this episode."""

    def __init__(self, cfg: dict, n: int, rng: np.random.Generator):
        env = cfg.get("env", "darkroom")
        if env not in SPECS:
            raise ValueError(f"no searcher for env {env!r}: add its Spec to searcher.SPECS")
        self.spec, self.grid, self.rng, self.n = SPECS[env], cfg["grid_size"], rng, n
        G, K = self.grid, self.spec.n_subgoals
        self.cand = np.ones((n, K, G, G), dtype=bool)
        self.known = np.full((n, K, 2), -1, dtype=np.int64)  # a subgoal's cell once it is the only candidate
        if self.spec.known_goal:
            self.cand[:] = False
            self.cand[:, 0][:, goal_pos(G)[0], goal_pos(G)[1]] = True
            self.known[:, 0] = goal_pos(G)
        self.moves = np.ones((n, N_ACTIONS, N_ACTIONS), bool) if self.spec.learn_moves else np.broadcast_to(
            np.eye(N_ACTIONS, dtype=bool), (n, N_ACTIONS, N_ACTIONS)).copy()
        self.stage = np.zeros(n, dtype=np.int64)
        self.episode = 0
        self.found_episode = np.full((n, K), -1, dtype=np.int64)  # the episode in which each subgoal was first found
        self.cells = np.stack(np.divmod(np.arange(G * G), G), 1)  # [G*G, 2]
        self.from_start = np.abs(self.cells - np.array(task_family(cfg).start_pos(cfg))).sum(1)  # [G*G] from the start
        self.rows = np.arange(n)

    def _targets(self, pos: np.ndarray) -> np.ndarray:
        """[B, 2]: the nearest candidate cell of each stream's subgoal (its own cell once it has found them all)."""
        target = pos.copy()
        after = np.flatnonzero(self.stage < self.spec.n_subgoals)
        cell = self.known[after, self.stage[after]]
        found = cell[:, 0] >= 0
        target[after[found]] = cell[found]
        searching = after[~found]
        if len(searching):
            cand = self.cand[searching, self.stage[searching]].reshape(len(searching), -1)
            assert cand.any(1).all(), "a subgoal was ruled out everywhere: the searcher's bookkeeping is wrong"
            dist = np.abs(self.cells[None] - pos[searching, None]).sum(-1) - TIE_OUTWARD * self.from_start
            dist = dist + self.rng.random(cand.shape) * 0.01  # then at random
            target[searching] = self.cells[np.where(cand, dist, np.inf).argmin(1)]
        return target

    def _blocked(self, pos: np.ndarray) -> np.ndarray:
        """[B, A]: the moves that leave each position unchanged (stay, and moves into a wall)."""
        return (np.clip(pos[:, None] + MOVES[None], 0, self.grid - 1) == pos[:, None]).all(-1)

    def act(self, pos: np.ndarray) -> np.ndarray:
        target = self._targets(pos)
        d = target - pos
        useful = np.stack([d[:, 0] > 0, d[:, 0] < 0, d[:, 1] > 0, d[:, 1] < 0, np.zeros(self.n, bool)], 1)
        here = (d == 0).all(1)
        useful[here] = self._blocked(pos)[here]  # on the target: a move that stays (stay itself, or into a wall)
        known = self.moves.sum(2) == 1  # [B, A]
        gives_useful = (self.moves & useful[:, None]).any(2)  # the action may make a useful move
        score = np.where(known & gives_useful, 2.0, np.where(~known & gives_useful, 1.0, 0.0))
        return (score + self.rng.random(score.shape) * 0.5).argmax(1)

    def observe(self, pos: np.ndarray, action: np.ndarray, obs: np.ndarray, reward: np.ndarray, done: bool) -> None:
        """Learn from one step: `pos` where the actions were taken, `obs` the next observation (after a reset when
        `done`, so then only a known move tells where the step ended)."""
        rows = self.rows
        known = self.moves[rows, action].sum(1) == 1
        move = self.moves[rows, action].argmax(1)
        arrived = np.where(known[:, None], np.clip(pos + MOVES[move], 0, self.grid - 1), obs)
        seen = known | (not done)  # where the step ended is known
        if self.spec.learn_moves and not done:
            fits = (np.clip(pos[:, None] + MOVES[None], 0, self.grid - 1) == obs[:, None]).all(-1)  # [B, A] moves
            self.moves[rows, action] &= fits
            self._propagate()
        searching = seen & (self.stage < self.spec.n_subgoals)
        hit, miss = np.flatnonzero(searching & (reward > 0)), np.flatnonzero(searching & (reward <= 0))
        self.cand[miss, self.stage[miss], arrived[miss, 0], arrived[miss, 1]] = False  # not the subgoal's cell
        k = self.stage[hit]
        self.cand[hit, k] = False  # found: that cell and no other
        self.cand[hit, k, arrived[hit, 0], arrived[hit, 1]] = True
        self.known[hit, k] = arrived[hit]
        first = self.found_episode[hit, k] < 0
        self.found_episode[hit[first], k[first]] = self.episode
        if self.spec.advance:
            self.stage[hit] += 1
        if done:
            self.stage[:] = 0
            self.episode += 1

    def _propagate(self) -> None:
        """The actions are a permutation of the moves: a move known for one action is no other's."""
        for _ in range(N_ACTIONS):
            known = self.moves.sum(2) == 1
            taken = (self.moves & known[:, :, None]).any(1)  # [B, A] moves some known action makes
            before = self.moves.sum()
            self.moves &= ~(taken[:, None, :] & ~known[:, :, None])
            if self.moves.sum() == before:
                return


def run_searcher(cfg: dict, goals: list[int], *, n_streams: int, n_episodes: int, seed: int) -> dict:
    """The searcher on `len(goals) * n_streams` streams for `n_episodes` episodes each: the keys and shapes of
    `evaluate.run_in_context`'s result (`returns` [n_goals, n_streams, n_episodes], `rewards` [B, steps], no region
    closes), plus `found_episode` [n_goals, n_streams, n_subgoals] (-1: never found)."""
    H = cfg["horizon"]
    B = len(goals) * n_streams
    env = BatchEnv(cfg, [g for g in goals for _ in range(n_streams)])  # goal-major, as run_in_context
    searcher = Searcher(cfg, B, np.random.default_rng(seed))
    n_total = n_episodes * H
    rewards = np.zeros((B, n_total), dtype=np.int8)
    pos = env.reset()
    for t in range(n_total):
        action = searcher.act(pos)
        obs, r, done = env.step(action)
        searcher.observe(pos, action, obs, r, done)
        rewards[:, t] = r
        pos = obs
    returns = rewards.reshape(B, n_episodes, H).sum(-1).astype(np.float64)  # [B, n_episodes], as run_in_context
    return {"returns": returns.reshape(len(goals), n_streams, n_episodes), "rewards": rewards,
            "closes": [[] for _ in range(B)], "forced_closes": [[] for _ in range(B)],
            "set_closes": [[] for _ in range(B)], "prunes": [[] for _ in range(B)], "recomputed": 0,
            "found_episode": searcher.found_episode.reshape(len(goals), n_streams, -1)}


def source_eps(cfg: dict, n_regions: int) -> np.ndarray:
    """[n_regions]: the noise of each region of a `searcher-eps` history (AD-eps, Zisman et al. 2023): `source_eps_start`
    in region 0, falling linearly to 0 at region `source_eps_regions` and 0 after it."""
    k = np.arange(n_regions)
    return cfg["source_eps_start"] * np.clip(1.0 - k / cfg["source_eps_regions"], 0.0, 1.0)


def noisy_history(cfg: dict, goal: int, n_stream: int, seed: int) -> dict:
    """A learning history of the searcher with decaying noise on `n_stream` streams of one task (collect.py's
    `alg: searcher-eps`): in region k (a rollout of `n_steps`) each step takes a uniformly random action with
    probability `source_eps(cfg)[k]`, else the searcher's; the searcher learns from every step, its own or not. Returns
    the history file's fields (history.FIELDS), time-major `[total_source_timesteps, n_stream, ...]`, with the markers
    and episode ends of a PPO history (episodes of `horizon` steps, all streams reset together)."""
    T, n = cfg["total_source_timesteps"], cfg["n_steps"]
    rng = np.random.default_rng(seed)
    env = BatchEnv(cfg, [goal] * n_stream)
    searcher = Searcher(cfg, n_stream, rng)
    eps = source_eps(cfg, T // n)
    data = empty_history(T, n_stream)
    pos = env.reset()
    for t in range(T):
        action = searcher.act(pos)
        noisy = rng.random(n_stream) < eps[t // n]
        action = np.where(noisy, rng.integers(N_ACTIONS, size=n_stream), action)
        obs, reward, done = env.step(action)
        searcher.observe(pos, action, obs, reward, done)
        data["states"][t], data["actions"][t], data["rewards"][t] = pos, action, reward
        data["next_states"][t], data["dones"][t] = env.arrived, done
        pos = obs
    data["compress_start"][::n] = True
    data["compress_end"][n - 1::n] = True
    return data
