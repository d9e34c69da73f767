"""Training sequences sampled from the PPO learning histories (DESIGN §3).

- Standard mode: a window of `n_transit` consecutive steps of one stream, an action target at every step.
- Compressed mode: `<compress> region_{k-1} </compress> <compress> region_k` of one stream (or the single
  first region `<compress> region_0`), with action and token-type targets at every step token.

Sampling is a pure function of (seed, rank, step), so a resumed or multi-process run draws exactly the
batches it would have drawn, and each rank draws its own.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import IterableDataset

from common import HISTORY_FORMAT_VERSION, UserError
from env import split_goals
from model.ad import COMPRESS_END, COMPRESS_START, IGNORE, PAD_PREV, STEP, encode_prev, encode_state, n_state_ids

FIELDS = ("states", "actions", "rewards", "dones", "compress_start", "compress_end")


def stream_tokens(states, actions, rewards, dones, grid_size):
    """Time-major step arrays [T, S(, 2)] -> (state_ids, prev_ids) [T, S] as the model sees them."""
    T = len(actions)
    prev_a = np.concatenate([np.full_like(actions[:1], -1), actions[:-1]]).astype(np.int64)
    prev_r = np.concatenate([np.zeros_like(rewards[:1]), rewards[:-1]]).astype(np.int64)
    ep_start = np.concatenate([np.ones_like(dones[:1]), dones[:-1]]).astype(np.int64) if T else dones
    return encode_state(states.astype(np.int64), grid_size), encode_prev(prev_a, prev_r, ep_start)


def load_history(path: Path, cfg: dict, goals: list[int], need_markers: bool) -> dict:
    """Read the goals' histories into memory as token ids, after checking the file matches `cfg`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"history file not found: {path}; run `python collect.py` first (or set traj_dir=)")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise UserError(f"history file {path} is truncated or corrupt; delete it and re-run collect.py") from None
    with f:
        if f.attrs.get("format_version") != HISTORY_FORMAT_VERSION:
            raise UserError(f"history file {path} has format {f.attrs.get('format_version')}, expected "
                            f"{HISTORY_FORMAT_VERSION}; re-run collect.py")
        for key in ("grid_size", "n_steps", "horizon"):
            if int(f.attrs[key]) != cfg[key]:
                raise UserError(f"history file {path} was collected with {key}={int(f.attrs[key])} but the config says "
                                f"{key}={cfg[key]}; re-run collect.py with this config or set {key}={int(f.attrs[key])}")
        out = {}
        for g in goals:
            if str(g) not in f:
                continue
            try:
                d = {k: f[str(g)][k][:] for k in FIELDS}
            except Exception:  # KeyError, OSError, ValueError...: whatever a damaged file raises
                msg = f"history file {path} is truncated or corrupt (goal {g}); delete it and re-run collect.py"
                raise UserError(msg) from None
            state_ids, prev_ids = stream_tokens(d["states"], d["actions"], d["rewards"], d["dones"], cfg["grid_size"])
            out[g] = {"state_ids": state_ids.astype(np.int16), "prev_ids": prev_ids.astype(np.int16),
                      "actions": d["actions"].astype(np.int64), "compress_end": d["compress_end"]}
            if need_markers:
                out[g]["regions"] = region_bounds(d["compress_start"], d["compress_end"], path, g)
    return out


def region_bounds(cstart: np.ndarray, cend: np.ndarray, path, goal) -> np.ndarray:
    """Region k spans steps [starts[k], ends[k]] (inclusive) in every stream: from the markers."""
    if not cstart.any() or not cend.any():
        raise UserError(f"history file {path} has no compression markers (compress_start/compress_end), which compressed "
                        "mode needs; re-run collect.py")
    if not ((cstart == cstart[:, :1]).all() and (cend == cend[:, :1]).all()):
        raise UserError(f"compression markers in {path} goal {goal} differ between streams; re-run collect.py")
    starts, ends = np.flatnonzero(cstart[:, 0]), np.flatnonzero(cend[:, 0])
    if len(starts) != len(ends) or starts[0] != 0 or (starts[1:] != ends[:-1] + 1).any() or ends[-1] != len(cstart) - 1:
        raise UserError(f"compression markers in {path} goal {goal} do not tile the history; re-run collect.py")
    return np.stack([starts, ends + 1], 1)  # [K, 2] half-open


class HistoryDataset(IterableDataset):
    """Never-ending stream of batches for one split ("train" or "test") of the goals."""

    def __init__(self, path, cfg: dict, split: str, batch_size: int, seed: int, rank: int = 0, start_step: int = 0):
        train_goals, test_goals = split_goals(cfg["grid_size"], cfg["env_split_seed"], cfg["train_env_ratio"])
        goals = train_goals if split == "train" else test_goals
        self.compressed = cfg["use_compressed_context"]
        self.data = load_history(path, cfg, goals, need_markers=self.compressed)
        if not self.data:
            raise UserError(f"history file {path} holds none of the {split} goals; collect all goals (no --goals)")
        self.goals = sorted(self.data)
        self.n_transit, self.batch_size = cfg["n_transit"], batch_size
        self.seed, self.rank, self.step = seed, rank, start_step
        self.pad_state = n_state_ids(cfg["grid_size"]) - 1
        if self.compressed:
            regions = self.data[self.goals[0]]["regions"]
            longest = (regions[:, 1] - regions[:, 0]).max()
            if 2 * longest + 3 > self.n_transit:
                raise UserError(f"n_transit={self.n_transit} is too small for region pairs of {longest} steps: "
                                f"set n_transit>={2 * longest + 3}")

    def __iter__(self):
        while True:
            yield self.batch(self.step)
            self.step += 1

    def batch(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, self.rank, step])
        b = self._empty(self.batch_size)
        goal_idx = rng.integers(len(self.goals), size=self.batch_size)
        length = 0
        for i, gi in enumerate(goal_idx):
            d = self.data[self.goals[gi]]
            stream = rng.integers(d["actions"].shape[1])
            if self.compressed:
                end = self._compressed_sample(b, i, d, stream, rng.integers(len(d["regions"])))
            else:
                end = self._standard_sample(b, i, d, stream, rng)
            length = max(length, end)
        # a batch is as long as its longest sample: the causal model never looks at trailing padding, so dropping it
        # changes no output and saves compute (a compressed pair is 163 of the 168 positions of n_transit)
        return {k: torch.from_numpy(np.ascontiguousarray(v[:, :length]) if v.ndim == 2 else v) for k, v in b.items()}

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
            b["prev_region_len"] = np.zeros(n, np.int64)
            b["curr_region_len"] = np.zeros(n, np.int64)
        return b

    def _put_steps(self, b, i, at, d, stream, t0, t1):
        n = t1 - t0
        b["state_ids"][i, at : at + n] = d["state_ids"][t0:t1, stream]
        b["prev_ids"][i, at : at + n] = d["prev_ids"][t0:t1, stream]
        b["target_action"][i, at : at + n] = d["actions"][t0:t1, stream]
        if self.compressed:
            # 2 where the step closes its region (the next element is </compress>), else 0
            b["target_token_type"][i, at : at + n] = np.where(d["compress_end"][t0:t1, stream], COMPRESS_END, STEP)
        return at + n

    def _standard_sample(self, b, i, d, stream, rng):
        T = d["actions"].shape[0]
        t0 = rng.integers(max(T - self.n_transit, 0) + 1)
        return self._put_steps(b, i, 0, d, stream, t0, min(t0 + self.n_transit, T))

    def _compressed_sample(self, b, i, d, stream, k):
        """`C r_{k-1} E C r_k` (k > 0) or `C r_0` (k == 0): the `_get_compressed_context_sample` of the docs."""
        regions, at = d["regions"], 0
        if k > 0:
            b["type_ids"][i, at] = COMPRESS_START
            at = self._put_steps(b, i, at + 1, d, stream, *regions[k - 1])
            b["type_ids"][i, at] = COMPRESS_END
            at += 1
            b["prev_region_len"][i] = regions[k - 1, 1] - regions[k - 1, 0]
        b["type_ids"][i, at] = COMPRESS_START
        b["curr_region_len"][i] = regions[k, 1] - regions[k, 0]
        return self._put_steps(b, i, at + 1, d, stream, *regions[k])
