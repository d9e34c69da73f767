"""Training sequences sampled from the PPO learning histories (docs/design.md §3).

- Standard mode: a window of `n_transit` consecutive steps of one stream, an action target at every step.
- Compressed mode: `max_regions` regions of one stream, `C r_{k-(m-1)s} E ... E C r_{k-s} E C r_k` with s =
  `region_stride` (1: consecutive regions, exactly the contexts evaluation keeps; s > 1: each region s PPO updates ahead
  of the one before it), fewer at the start of a history (`C r_k` for k < s, ...); action and token-type targets at
  every step token. `first_region_any` draws the one-region samples' region from the whole history, not only k < s.
  `first_region_steps` N > 0 trains for a short first region (evaluation's `eval_first_region` N): a sample's oldest
  region, where it plays the first region (a one-region sample, or a region r < s), keeps only its first N steps and
  closes after them.
- `target: oracle` (DPT, Lee et al. 2023): the action target at every step token is the env's optimal action in that
  state (`env.registry.TaskFamily.oracle_action`) instead of the source's action; the context is unchanged.

Sampling is a pure function of (seed, rank, step), so a resumed or multi-process run draws exactly the
batches it would have drawn, and each rank draws its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset

from common import UserError
from env import task_family, task_split
from history import check_history, open_history
from model.ad import COMPRESS_END, COMPRESS_START, IGNORE, PAD_PREV, STEP, encode_prev, encode_state, n_state_ids
from summary import SummarySampler, trim

READ = ("states", "actions", "rewards", "dones", "compress_start", "compress_end")  # the history fields training reads
TARGETS = ("action", "oracle")  # `target`: the source's action (AD) or the env's optimal action (DPT)
# training keys added after runs were trained: a saved config without one trained with this value
TRAINING_DEFAULTS = {"region_stride": 1, "first_region_any": False, "first_region_steps": 0, "target": "action"}


def stream_tokens(states, actions, rewards, dones, grid_size):
    """Time-major step arrays [T, S(, 2)] -> (state_ids, prev_ids) [T, S] as the model sees them."""
    T = len(actions)
    prev_a = np.concatenate([np.full_like(actions[:1], -1), actions[:-1]]).astype(np.int64)
    prev_r = np.concatenate([np.zeros_like(rewards[:1]), rewards[:-1]]).astype(np.int64)
    ep_start = np.concatenate([np.ones_like(dones[:1]), dones[:-1]]).astype(np.int64) if T else dones
    return encode_state(states.astype(np.int64), grid_size), encode_prev(prev_a, prev_r, ep_start)


def episode_stage(rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
    """Time-major [T, S]: the rewards earned earlier in the same episode at each step, capped at 2 (Dark Key-to-Door's key
    stage before the step: 0 no key, 1 key taken, 2 door reached too; its rewards come only from the key and the door)."""
    out = np.zeros(rewards.shape, np.int64)
    run = np.zeros(rewards.shape[1:], np.int64)
    for t in range(len(rewards)):
        out[t] = run
        run = np.where(dones[t], 0, np.minimum(run + rewards[t], 2))
    return out


def oracle_targets(cfg: dict, task: int, states: np.ndarray, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
    """DPT's labels [T, S]: the env's optimal action at each logged state (with its per-episode stage where it has one)."""
    stage = episode_stage(rewards.astype(np.int64), dones.astype(bool))
    return task_family(cfg).oracle_action(states.astype(np.int64), stage, task, cfg).astype(np.int64)


def load_history(path: Path, cfg: dict, goals: list[int], need_markers: bool) -> dict:
    """Read the goals' histories into memory as token ids, after checking the file matches `cfg`."""
    with open_history(path) as f:
        check_history(f, path, cfg)
        out = {}
        for g in goals:
            if str(g) not in f:
                continue
            try:
                d = {k: f[str(g)][k][:] for k in READ}
            except Exception:  # KeyError, OSError, ValueError...: whatever a damaged file raises
                msg = f"history file {path} is truncated or corrupt (goal {g}); delete it and re-run collect.py"
                raise UserError(msg) from None
            state_ids, prev_ids = stream_tokens(d["states"], d["actions"], d["rewards"], d["dones"], cfg["grid_size"])
            out[g] = {"state_ids": state_ids.astype(np.int16), "prev_ids": prev_ids.astype(np.int16),
                      "actions": d["actions"].astype(np.int64), "compress_end": d["compress_end"]}
            oracle = cfg.get("target", "action") == "oracle"  # the action targets; the context keeps the source's actions
            out[g]["target"] = oracle_targets(cfg, g, d["states"], d["rewards"], d["dones"]) if oracle else out[g]["actions"]
            if cfg.get("min_source_return", 0.0) > 0:  # only a run that filters its training tasks needs it
                out[g]["last_return"] = last_rollout_return(d["rewards"], d["compress_end"], cfg["horizon"])
            if need_markers:
                out[g]["regions"] = region_bounds(d["compress_start"], d["compress_end"], path, g)
    return out


def last_rollout_starts(cend: np.ndarray) -> np.ndarray:
    """The first step of each stream's last PPO rollout, `[S]`: one past its next-to-last `</compress>` marker."""
    out = []
    for s in range(cend.shape[1]):
        ends = np.flatnonzero(cend[:, s])
        out.append(ends[-2] + 1 if len(ends) > 1 else 0)
    return np.array(out, np.int64)


def last_rollout_return(rewards: np.ndarray, cend: np.ndarray, horizon: int) -> float:
    """The source's mean episode return over every stream's last PPO rollout (how far it learned the task)."""
    T = len(rewards)
    return float(np.mean([rewards[t0:, s].sum() * horizon / (T - t0) for s, t0 in enumerate(last_rollout_starts(cend))]))


def region_bounds(cstart: np.ndarray, cend: np.ndarray, path, goal) -> list[np.ndarray]:
    """Per stream s, `[K_s, 2]` half-open step ranges of its regions, from the markers. Streams of one PPO learner share
    them (the same array object); with `n_steps_per: stream` learners differ in rollout length, so streams do too."""
    if not cstart.any() or not cend.any():
        raise UserError(f"history file {path} has no compression markers (compress_start/compress_end), which compressed "
                        "mode needs; re-run collect.py")
    seen, out = {}, []
    for s in range(cstart.shape[1]):
        key = (cstart[:, s].tobytes(), cend[:, s].tobytes())
        if key not in seen:
            starts, ends = np.flatnonzero(cstart[:, s]), np.flatnonzero(cend[:, s])
            if (len(starts) != len(ends) or not len(starts) or starts[0] != 0 or (starts[1:] != ends[:-1] + 1).any()
                    or ends[-1] != len(cstart) - 1):
                raise UserError(f"compression markers in {path} goal {goal} stream {s} do not tile the history; "
                                "re-run collect.py")
            seen[key] = np.stack([starts, ends + 1], 1)
        out.append(seen[key])
    return out


def check_training_keys(cfg: dict) -> None:
    """The sampling keys' values (one line each, naming the fix)."""
    if cfg.get("target", "action") not in TARGETS:
        raise UserError(f"target must be one of {', '.join(TARGETS)} (action: AD, the source's action; oracle: DPT); "
                        f"got {cfg['target']!r}")
    if cfg.get("region_stride", 1) > 1 and not cfg["use_compressed_context"]:
        raise UserError(f"region_stride={cfg['region_stride']} is for compressed mode (use_compressed_context=true); set "
                        "region_stride=1")
    if cfg.get("first_region_any", False) and not cfg["use_compressed_context"]:
        raise UserError("first_region_any=true is for compressed mode (use_compressed_context=true); set it false")
    first = cfg.get("first_region_steps", 0)
    if first and not cfg["use_compressed_context"]:
        raise UserError(f"first_region_steps={first} is for compressed mode (use_compressed_context=true); set it 0")
    if first and first >= cfg["compress_interval"]:
        raise UserError(f"first_region_steps={first} is not shorter than a region (compress_interval="
                        f"{cfg['compress_interval']}): set it below, or 0")
    if first and cfg.get("use_summary"):
        raise UserError(f"first_region_steps={first} is not implemented with summary tokens (use_summary=true); set it 0")


class HistoryDataset(IterableDataset):
    """Never-ending stream of batches for one split ("train", "val" or "test") of the goals."""

    def __init__(self, path, cfg: dict, split: str, batch_size: int, seed: int, rank: int = 0, start_step: int = 0):
        self.compressed = cfg["use_compressed_context"]
        check_training_keys(cfg)
        self.stride = cfg.get("region_stride", 1)
        self.first_region_any = cfg.get("first_region_any", False)
        self.first_steps = cfg.get("first_region_steps", 0)
        self.data = load_history(path, cfg, task_split(cfg, split), need_markers=self.compressed)
        if not self.data:
            raise UserError(f"history file {path} holds none of the {split} goals; collect all goals (no --goals)")
        self.dropped = []  # training tasks whose source never learned them (min_source_return), left out
        if split == "train" and cfg.get("min_source_return", 0.0) > 0:
            family = task_family(cfg)
            for g, d in list(self.data.items()):
                if d["last_return"] < cfg["min_source_return"] * family.optimal_return(g, cfg):
                    self.dropped.append(g)
                    del self.data[g]
            if not self.data:
                raise UserError(f"min_source_return={cfg['min_source_return']} leaves no training task in {path}; lower it")
        self.goals = sorted(self.data)
        self.n_transit, self.batch_size, self.max_regions = cfg["n_transit"], batch_size, cfg["max_regions"]
        self.seed, self.rank, self.step = seed, rank, start_step
        self.pad_state = n_state_ids(cfg["grid_size"]) - 1
        if self.compressed:  # regions may differ in length between goals or streams (a list of n_steps): size for the longest
            longest = max(int((r[:, 1] - r[:, 0]).max()) for d in self.data.values() for r in d["regions"])
            need = self.max_regions * (longest + 2) - 1
            if need > self.n_transit:
                raise UserError(f"n_transit={self.n_transit} is too small for {self.max_regions} regions of {longest} steps "
                                f"plus markers: set n_transit>={need}")
        # summary tokens: batches of summary.py's layout, drawn like the compressed ones
        self.summary = SummarySampler(self.data, cfg, batch_size, seed, rank) if cfg.get("use_summary") else None

    def __iter__(self):
        while True:
            yield self.batch(self.step)
            self.step += 1

    def batch(self, step: int) -> dict:
        if self.summary is not None:
            return self.summary.batch(step)
        rng = np.random.default_rng([self.seed, self.rank, step])
        b = self._empty(self.batch_size)
        goal_idx = rng.integers(len(self.goals), size=self.batch_size)
        length = 0
        for i, gi in enumerate(goal_idx):
            d = self.data[self.goals[gi]]
            stream = rng.integers(d["actions"].shape[1])
            if self.compressed:
                k, n_regions = int(rng.integers(len(d["regions"][stream]))), None
                if self.first_region_any and k < self.stride:  # a one-region sample: its region from anywhere in the history
                    k, n_regions = int(rng.integers(len(d["regions"][stream]))), 1
                end = self._compressed_sample(b, i, d, stream, k, n_regions)
            else:
                end = self._standard_sample(b, i, d, stream, rng)
            length = max(length, end)
        # a batch is as long as its longest sample: the causal model never looks at trailing padding, so dropping it
        # changes no output and saves compute (a compressed pair is 163 of the 168 positions of n_transit)
        return trim(b, length)

    def final_contexts(self, goal: int) -> dict:
        """A batch of every stream of `goal` at the end of its history, as training sees it: the last region with the
        regions kept before it (compressed; with summary tokens, also the pruned regions whose summaries the context
        holds, in summary.py's layout) or the last `n_transit` steps (standard). `in_last` (S, L) marks the step tokens of
        the last PPO rollout, whose actions PPO took after learning the most."""
        d = self.data[goal]
        T, S = d["actions"].shape
        b, length = self._empty_for(S), 0
        for s in range(S):
            if self.compressed:
                length = max(length, self._region_sample(b, s, d, s, len(d["regions"][s]) - 1))
            else:
                length = self._put_steps(b, s, 0, d, s, max(T - self.n_transit, 0), T)
        idx = np.arange(length)[None]
        if self.compressed:  # after the last <compress>
            last_c = np.where(b["type_ids"][:, :length] == COMPRESS_START, idx, -1).max(1, keepdims=True)
            in_last = idx > last_c
        else:  # the window ends at the history's end; the last rollout starts after the stream's next-to-last </compress>
            in_last = idx >= length - (T - last_rollout_starts(d["compress_end"])[:, None])
        out = trim(b, length)
        out["in_last"] = torch.from_numpy(in_last & (out["target_action"].numpy() != IGNORE))
        return out

    def region_contexts(self, goal: int, streams, k: int) -> dict:
        """A batch of the training context that ends with region `k` of each of `streams` of `goal` (compressed mode):
        the sequences whose token-type targets say where region k closes (summary mode: the training sample of
        summary.py, pruned regions and their summaries first)."""
        d = self.data[goal]
        b, length = self._empty_for(len(streams)), 0
        for i, s in enumerate(streams):
            length = max(length, self._region_sample(b, i, d, s, k))
        return trim(b, length)

    def _empty_for(self, n: int) -> dict:
        """Padding for n contexts of this mode: summary.py's layout (pruned regions and their summaries first) or ours."""
        return self.summary.empty(n) if self.summary is not None else self._empty(n)

    def _region_sample(self, b, i, d, stream, k) -> int:
        """Row i := the training context whose newest region is k (summary.py's layout with summaries); its length."""
        return self.summary.put(b, i, d, stream, k) if self.summary is not None else self._compressed_sample(b, i, d, stream, k)

    def _empty(self, n: int) -> dict:
        L = self.n_transit
        b = {
            "type_ids": np.full((n, L), STEP, np.int64),
            "state_ids": np.full((n, L), self.pad_state, np.int64),
            "prev_ids": np.full((n, L), PAD_PREV, np.int64),
            "target_action": np.full((n, L), IGNORE, np.int64),
        }
        if self.compressed:
            b["target_token_type"] = np.full((n, L), IGNORE, np.int64)
            b["n_regions"] = np.zeros(n, np.int64)
            b["region_lens"] = np.zeros((n, self.max_regions), np.int64)  # oldest first; 0 where fewer regions
        return b

    def _put_steps(self, b, i, at, d, stream, t0, t1):
        n = t1 - t0
        b["state_ids"][i, at : at + n] = d["state_ids"][t0:t1, stream]
        b["prev_ids"][i, at : at + n] = d["prev_ids"][t0:t1, stream]
        b["target_action"][i, at : at + n] = d["target"][t0:t1, stream]
        if self.compressed:
            # 2 where the step closes its region (the next element is </compress>), else 0
            b["target_token_type"][i, at : at + n] = np.where(d["compress_end"][t0:t1, stream], COMPRESS_END, STEP)
        return at + n

    def _standard_sample(self, b, i, d, stream, rng):
        T = d["actions"].shape[0]
        t0 = rng.integers(max(T - self.n_transit, 0) + 1)
        return self._put_steps(b, i, 0, d, stream, t0, min(t0 + self.n_transit, T))

    def sample_regions(self, k: int, n_regions: int | None = None) -> list[int]:
        """The region indices of the sample whose newest region is k, oldest first: `k-(n-1)s, ..., k-s, k` with s =
        region_stride and n = min(max_regions, k // s + 1) (fewer near the start of a history), or n = `n_regions`."""
        n = min(self.max_regions, k // self.stride + 1) if n_regions is None else n_regions
        return [k - j * self.stride for j in range(n - 1, -1, -1)]

    def _compressed_sample(self, b, i, d, stream, k, n_regions=None):
        """`C r_{k-(n-1)s} E ... E C r_k` (`sample_regions`): the newest region k and the closed regions before it that
        evaluation would keep (stride 1: the `_get_compressed_context_sample` of the docs, for any max_regions); with
        first_region_steps N, the oldest region cut to its first N steps where it plays the first region."""
        regions, at = d["regions"][stream], 0
        chosen = self.sample_regions(k, n_regions)
        for j, r in enumerate(chosen):
            b["type_ids"][i, at] = COMPRESS_START
            t0, t1 = regions[r]
            short = self.first_steps and j == 0 and (len(chosen) == 1 or r < self.stride) and t1 - t0 > self.first_steps
            if short:  # it plays the first region: its first first_region_steps steps, then it closes
                t1 = t0 + self.first_steps
            at = self._put_steps(b, i, at + 1, d, stream, t0, t1)
            if short:
                b["target_token_type"][i, at - 1] = COMPRESS_END
            b["region_lens"][i, j] = t1 - t0
            if r < k:
                b["type_ids"][i, at] = COMPRESS_END
                at += 1
        b["n_regions"][i] = len(chosen)
        return at
