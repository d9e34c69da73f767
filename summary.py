"""Summary tokens for closed regions: training samples and in-context evaluation.

The layout, the attention rule and the positions are in model/summary.py (read its docstring first); this module
puts them to work:
- `SummarySampler`: training batches. A sample is the `max_regions` raw regions ending at region k plus the
  `summary_train_regions` (0 = `max_summaries`) regions before them whose summaries the context holds, all from one
  stream: `C r E S^n` per pruned region, then `C r E S^n ... C r_k`. Action and token-type targets are at the raw
  regions' step tokens only; summary tokens have none, they are trained by the later regions' action losses through
  the mask. The oldest pruned region of a sample sees no summary before it (the summary chain is truncated there):
  an evaluation context equals a training sample exactly while the sample reaches back to region 0
  (`k - max_regions + 1 <= summary_train_regions`). Later its oldest kept summary was computed from a longer chain,
  but in recurrent mode that changes nothing the sample's decisions compute once `summary_train_regions >= n_layer + 1
  - max_regions` (3 for the configs' 4 layers and 2 raw regions): a summary reads the one before it at the same layer,
  so a chain reaches a token's last layer from n_layer regions back at most, the oldest of them through its
  content-free first-layer keys; a training sample then computes the open region's logits exactly as evaluation does
  at any length, and beyond n_layer pruned regions none of its losses changes (tests/test_summary.py,
  docs/experiments.md E68).
- `SummaryContexts` / `run_in_context`: evaluation. The cache of a stream holds, in slots of their own, the summaries of
  the pruned regions it keeps (`max_summaries` groups, or one in recurrent and feedback mode; feedback keeps the memory
  of the summary's last-layer states, which the raw tokens' states are kept for), then its raw part. After each prune
  the raw part is rebuilt against those summaries, so every cached key/value is the one a teacher-forced pass over the
  whole stream (the uncached reference, `use_cache=False`) computes; the cache has a fixed number of slots, so memory
  stays flat however long the evaluation runs.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from common import EVAL_DEFAULTS, UserError, max_region_steps, min_summary_context
from env import BatchEnv
from model.ad import (
    COMPRESS_END,
    COMPRESS_START,
    IGNORE,
    PAD_PREV,
    STEP,
    SUMMARY,
    closes_region,
    encode_prev,
    encode_state,
    n_state_ids,
)
from model.summary import FEEDBACK, visible

SEQUENCE_KEYS = ("type_ids", "state_ids", "prev_ids", "target_action", "target_token_type", "region_ids")


def train_regions(cfg: dict) -> int:
    """Pruned regions in front of the raw ones in a training sample."""
    return cfg.get("summary_train_regions", 0) or cfg.get("max_summaries", 1)


# ---- training ---------------------------------------------------------------------------------------------------
class SummarySampler:
    """Summary-mode batches from `data` (dataset.load_history's per-task dicts, with `regions`); a batch is a pure function
    of (seed, rank, step) and draws task, stream and region exactly as HistoryDataset's compressed batches do."""

    def __init__(self, data: dict, cfg: dict, batch_size: int, seed: int, rank: int = 0):
        self.data, self.goals = data, sorted(data)
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self.max_regions, self.n_summary, self.back = cfg["max_regions"], cfg["n_summary"], train_regions(cfg)
        self.pad_state = n_state_ids(cfg["grid_size"]) - 1
        longest = max(int((r[:, 1] - r[:, 0]).max()) for d in data.values() for r in d["regions"])
        need = min_summary_context(longest, self.max_regions, self.n_summary)
        if need > cfg["n_transit"]:
            raise UserError(f"n_transit={cfg['n_transit']} is too small for {self.max_regions} regions of {longest} steps "
                            f"plus markers and {self.n_summary} summary tokens each: set n_transit>={need}")
        self.longest = longest

    def batch(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, self.rank, step])
        b = self.empty(self.batch_size)
        length = 0
        for i, gi in enumerate(rng.integers(len(self.goals), size=self.batch_size)):
            d = self.data[self.goals[gi]]
            stream = rng.integers(d["actions"].shape[1])
            length = max(length, self.put(b, i, d, stream, rng.integers(len(d["regions"][stream]))))
        return trim(b, length)

    def empty(self, n: int, back: int | None = None) -> dict:
        """Padding arrays for n samples of at most `back` (default: the config's) pruned regions each."""
        W = ((self.back if back is None else back) + self.max_regions) * (self.longest + 2 + self.n_summary)
        return {"type_ids": np.full((n, W), STEP, np.int64), "state_ids": np.full((n, W), self.pad_state, np.int64),
                "prev_ids": np.full((n, W), PAD_PREV, np.int64), "target_action": np.full((n, W), IGNORE, np.int64),
                "target_token_type": np.full((n, W), IGNORE, np.int64), "region_ids": np.full((n, W), -1, np.int64),
                "first_raw": np.zeros(n, np.int64), "n_regions": np.zeros(n, np.int64),
                "region_lens": np.zeros((n, self.max_regions), np.int64)}

    def put(self, b: dict, i: int, d: dict, stream: int, k: int, back: int | None = None) -> int:
        """Row i := the sample whose open region is k: `back` (default: the config's) pruned regions, then the raw ones.
        Returns its length."""
        back = self.back if back is None else back
        regions = d["regions"][stream]
        first_raw = max(0, k - self.max_regions + 1)
        first = max(0, first_raw - back)
        at = 0
        for r in range(first, k + 1):
            start, (t0, t1) = at, regions[r]
            b["type_ids"][i, at] = COMPRESS_START
            at += 1
            steps = slice(at, at + t1 - t0)
            b["state_ids"][i, steps] = d["state_ids"][t0:t1, stream]
            b["prev_ids"][i, steps] = d["prev_ids"][t0:t1, stream]
            if r >= first_raw:  # raw regions carry the targets; pruned ones are there for their summaries
                b["target_action"][i, steps] = d.get("target", d["actions"])[t0:t1, stream]  # the source's or oracle's
                b["target_token_type"][i, steps] = np.where(d["compress_end"][t0:t1, stream], COMPRESS_END, STEP)
                b["region_lens"][i, r - first_raw] = t1 - t0
            at += t1 - t0
            if r < k:  # a closed region: </compress> and its summary tokens
                b["type_ids"][i, at] = COMPRESS_END
                b["type_ids"][i, at + 1 : at + 1 + self.n_summary] = SUMMARY + np.arange(self.n_summary)
                at += 1 + self.n_summary
            b["region_ids"][i, start:at] = r - first
        b["first_raw"][i] = first_raw - first
        b["n_regions"][i] = k + 1 - first_raw
        return at


def logged_stream(log: dict, row: int = 0) -> tuple[dict, np.ndarray]:
    """Stream `row` of an evaluation's `context_log` (run_in_context with record_logits) as one task's training data,
    as dataset.load_history holds it (one stream, regions from the log; actions and markers are placeholders), and the
    region of each of its steps: what `SummarySampler.put` turns into the training sample of any of its regions."""
    n = int(log["length"][row])
    types, region = log["type"][row, :n], log["region"][row, :n]
    steps = (types == STEP).nonzero().flatten()
    step_region = region[steps].numpy()
    bounds = [np.flatnonzero(step_region == r)[[0, -1]] + [0, 1] for r in range(int(step_region.max()) + 1)]
    d = {"state_ids": log["state"][row, steps].numpy()[:, None], "prev_ids": log["prev"][row, steps].numpy()[:, None],
         "actions": np.zeros((len(steps), 1), np.int64), "compress_end": np.zeros((len(steps), 1), bool),
         "regions": [np.array(bounds)]}
    return d, step_region


@torch.no_grad()
def reach(model, cfg: dict, goals: list[int], backs: list[int], *, n_streams: int, n_episodes: int, seed: int,
          temperature: float) -> dict[int, dict]:
    """How many pruned regions must a training sample hold to compute the evaluation's decisions? Rolls the model out
    (cached) and, for every region k of every stream, compares the action distribution at its steps with the one the
    training sample of region k with b pruned regions in front gives (`put(..., back=b)`). Returns, per b, the mean
    and max over regions of the largest total-variation distance at a step: ~1e-7 (rounding) once b reaches what the
    decisions depend on (model/summary.py: n_layer + 1 - max_regions in recurrent mode)."""
    res = run_in_context(model, cfg, goals, n_streams=n_streams, n_episodes=n_episodes, seed=seed,
                         temperature=temperature, progress=False, record_logits=True)
    want_all = torch.softmax(res["logits"][..., :model.head_action.out_features].float(), -1)  # (steps, B, A)
    tv = {b: [] for b in backs}
    for row in range(want_all.shape[1]):
        d, step_region = logged_stream(res["context_log"], row)
        sampler = SummarySampler({0: d}, cfg, 1, seed=0)
        for k in range(len(d["regions"][0])):
            want = want_all[np.flatnonzero(step_region == k), row]
            for back in backs:
                b = sampler.empty(1, back)
                length = sampler.put(b, 0, d, 0, k, back)
                batch = {key: v.to(want.device) for key, v in trim(b, length).items()}
                logits = model(batch)["logits_action"][0]
                first = k - int(batch["n_regions"][0]) + 1 - int(batch["first_raw"][0])  # region 0 of the sample
                got = torch.softmax(logits[(batch["type_ids"][0] == STEP) & (batch["region_ids"][0] == k - first)].float(), -1)
                tv[back].append(0.5 * float((got - want).abs().sum(-1).max()))
    return {b: {"mean_tv": float(np.mean(v)), "max_tv": float(np.max(v)), "n_regions": len(v)} for b, v in tv.items()}


def trim(b: dict, length: int) -> dict:
    """Tensors, sequences cut to `length` (nothing past a sample's end is seen by its tokens)."""
    return {k: torch.from_numpy(np.ascontiguousarray(v[:, :length]) if k in SEQUENCE_KEYS else v) for k, v in b.items()}


# ---- evaluation -------------------------------------------------------------------------------------------------
class SummaryContexts:
    """Per-stream contexts with summaries, and their key/value cache.

    Cache slots per stream: [0, F) the summaries of kept pruned regions (oldest first, F = max_summaries x n_summary),
    [F, F + cap) the raw part (slot F + i holds raw token i, at position i), and one junk slot that padding queries
    write to and nothing reads. Every slot's region and kind are tracked, and the new tokens' attention is the rule of
    model/summary.py over them, so what a token sees is decided in one place for training and evaluation.
    `keep_log` keeps every token of the stream for the uncached reference (a teacher-forced pass over all of it)."""

    def __init__(self, model, n: int, cfg: dict, device, keep_log: bool = False, log_cap: int = 0):
        c = model.config
        self.model, self.device = model, device
        self.n_summary, self.mode, self.kept = c.n_summary, c.summary_mode, c.max_summaries
        self.F = self.kept * self.n_summary
        self.cap = cfg["n_transit"] + self.n_summary + 3  # a full raw part, then </compress>, summaries, <compress>, a step
        self.L = self.F + self.cap + 1
        self.pad_state = n_state_ids(cfg["grid_size"]) - 1

        def full(value, width=self.cap, dtype=torch.long):
            return torch.full((n, width), value, dtype=dtype, device=device)

        self.type, self.state, self.prev, self.region = full(STEP), full(self.pad_state), full(PAD_PREV), full(-1)
        self.length = torch.zeros(n, dtype=torch.long, device=device)
        self.frozen_region, self.frozen_valid = full(-1, self.F), full(False, self.F, torch.bool)
        self.cached = torch.zeros(n, dtype=torch.long, device=device)  # raw tokens the cache covers; 0 = rebuild
        self.oldest = torch.zeros(n, dtype=torch.long, device=device)  # region index of the oldest raw region
        self.current = torch.zeros(n, dtype=torch.long, device=device)  # region index of the open region
        self.cache = None
        # feedback mode: the last-layer states of the raw tokens, whose summaries' memory a prune freezes
        self.hidden = torch.zeros(n, self.cap, c.d_model, device=device) if self.mode == FEEDBACK else None
        self.all_rows = torch.arange(n, device=device)
        self.recomputed, self.kv_max = 0, 0
        self.kv_sum = torch.zeros(n, dtype=torch.long, device=device)  # KV entries summed over steps (their mean)
        self.log = None
        if keep_log:
            self.log = {"type": full(STEP, log_cap), "state": full(self.pad_state, log_cap), "prev": full(PAD_PREV, log_cap),
                        "region": full(-1, log_cap)}
            self.log_len = torch.zeros(n, dtype=torch.long, device=device)

    def append(self, rows, type_id, state=None, prev=None):
        """Append one token (of the open region) to each stream in `rows` (all if None)."""
        rows = self.all_rows if rows is None else rows
        state = self.pad_state if state is None else state
        prev = PAD_PREV if prev is None else prev
        for buf, lengths in [((self.type, self.state, self.prev, self.region), self.length)] + (
                [((self.log["type"], self.log["state"], self.log["prev"], self.log["region"]), self.log_len)]
                if self.log is not None else []):
            at = lengths[rows]
            for b, v in zip(buf, (type_id, state, prev, self.current[rows]), strict=True):
                b[rows, at] = v
            lengths[rows] += 1

    def append_summaries(self, rows):
        for j in range(self.n_summary):
            self.append(rows, SUMMARY + j)

    def kv_entries(self) -> torch.Tensor:
        """(B,) keys/values each stream's newest token may attend over: kept summaries + raw part."""
        return self.frozen_valid.sum(1) + self.length

    def logits(self, use_cache: bool):
        """Logits (action, token type) at each stream's newest token."""
        kv = self.kv_entries()
        self.kv_max = max(self.kv_max, int(kv.max()))
        self.kv_sum += kv
        return self.run_pending() if use_cache else self.full_pass()

    def flush(self, use_cache: bool):
        """Compute the keys/values of tokens not yet in the cache (before a prune freezes summaries)."""
        if use_cache and bool((self.cached < self.length).any()):
            self.run_pending()

    def run_pending(self):
        """One `extend_at` for all streams: stale streams (after a prune) rebuild their raw part, others add new tokens."""
        if self.cache is None:
            self.cache = self.model.new_cache(len(self.length), self.L)
        stale = self.cached == 0
        self.recomputed += int(stale.sum())
        start = torch.where(stale, 0, self.cached)
        n_new = self.length - start
        N = max(int(n_new.max()), 1)
        idx = start[:, None] + torch.arange(N, device=self.device)  # raw index = position
        real = idx < self.length[:, None]
        gidx = idx.clamp(max=self.cap - 1)
        types = self.type.gather(1, gidx)
        slot = torch.where(real, self.F + idx, self.L - 1)
        seen = self.seen(slot, self.region.gather(1, gidx), types >= SUMMARY)
        out = self.model.extend_at(types, self.state.gather(1, gidx), self.prev.gather(1, gidx), idx, slot, seen,
                                   n_new.clamp(min=1), self.cache, return_hidden=self.hidden is not None)
        if self.hidden is not None:
            out, h = out
            row = self.all_rows[:, None].expand_as(idx)
            self.hidden[row[real], idx[real]] = h[real].to(self.hidden.dtype)
        self.cached.copy_(self.length)
        return out

    def seen(self, slot, q_region, q_summary) -> torch.Tensor:
        """(B, N, L): the cache slots the new tokens at `slot` (B, N) attend to (model/summary.py's rule, causal)."""
        B = len(self.length)
        no = torch.zeros(B, 1, dtype=torch.bool, device=self.device)
        k_region = torch.cat([self.frozen_region, self.region, torch.full((B, 1), -1, device=self.device)], 1)
        k_summary = torch.cat([torch.ones_like(self.frozen_valid), self.type >= SUMMARY, no], 1)
        k_valid = torch.cat([self.frozen_valid, torch.arange(self.cap, device=self.device) < self.length[:, None], no], 1)
        rule = visible(q_region[:, :, None], q_summary[:, :, None], k_region[:, None], k_summary[:, None],
                       self.oldest[:, None, None], self.mode, self.kept)
        keys = torch.arange(self.L, device=self.device)
        return (rule & k_valid[:, None] & (keys <= slot[:, :, None])) | (keys == slot[:, :, None])

    def full_pass(self):
        """The uncached reference: a teacher-forced pass over every token of each stream so far, with the mask."""
        T = int(self.log_len.max())
        ids = {k: v[:, :T] for k, v in self.log.items()}
        region = torch.where(torch.arange(T, device=self.device) < self.log_len[:, None], ids["region"], -1)
        h = self.model.summary_hidden(ids["type"], ids["state"], ids["prev"], region, self.oldest)
        return self.model.heads(h[self.all_rows, self.log_len - 1])

    def prune(self, rows):
        """Drop the oldest raw region of each stream in `rows`: its summaries' keys/values move to the kept-summary slots
        (the oldest kept group leaves when they are full), its other tokens leave; the raw part is rebuilt next time."""
        n, R = self.n_summary, len(rows)
        in_oldest = (self.region[rows] == self.oldest[rows, None]) & (
            torch.arange(self.cap, device=self.device) < self.length[rows, None])
        s = in_oldest.sum(1)  # tokens of the oldest region: C r E S^n, its summaries last
        if self.cache is not None:
            src = self.F + s[:, None] - n + torch.arange(n, device=self.device)  # (R, n) slots of its summaries
            if self.hidden is not None:  # feedback: what stays is the memory of the summaries' last-layer states
                top = self.hidden[rows[:, None], src - self.F]  # (R, n, D)
                for (K, V), (k, v) in zip(self.cache, self.model.memory_kv(top.to(self.cache[0][0].dtype)), strict=True):
                    K[rows, :, : self.F], V[rows, :, : self.F] = k, v  # one summary kept (F = n)
            else:
                for K, V in self.cache:
                    for X in (K, V):
                        new = X[rows[:, None], :, src].transpose(1, 2)  # (R, H, n, Dh)
                        X[rows, :, : self.F] = torch.cat([X[rows, :, n : self.F], new], 2)
        self.frozen_region[rows] = torch.cat([self.frozen_region[rows, n:], self.oldest[rows, None].expand(R, n)], 1)
        self.frozen_valid[rows] = torch.cat([self.frozen_valid[rows, n:], torch.ones_like(self.frozen_valid[rows, :n])], 1)
        src = (torch.arange(self.cap, device=self.device)[None] + s[:, None]).clamp(max=self.cap - 1)
        for buf in (self.type, self.state, self.prev, self.region):
            buf[rows] = buf[rows].gather(1, src)
        self.length[rows] -= s
        self.oldest[rows] += 1
        self.cached[rows] = 0


@torch.no_grad()
def run_in_context(model, cfg: dict, goals: list[int], *, n_streams: int, n_episodes: int, seed: int,
                   use_cache: bool = True, temperature: float = 1.0, progress: bool = True, record_logits: bool = False,
                   device="cpu") -> dict:
    """evaluate.run_in_context for summary mode (same arguments and results, plus `summary`): after each close the
    model writes its summary tokens, and the oldest raw region is pruned once more than `max_regions` are open."""
    G, H, max_regions = cfg["grid_size"], cfg["horizon"], cfg["max_regions"]
    fixed_prune = cfg.get("eval_prune", EVAL_DEFAULTS["eval_prune"]) == "fixed"
    threshold = cfg.get("eval_close_threshold", EVAL_DEFAULTS["eval_close_threshold"])
    first_region = cfg.get("eval_first_region", EVAL_DEFAULTS["eval_first_region"])
    max_region_len = max_region_steps(cfg)
    B, n_total = len(goals) * n_streams, n_episodes * H
    env = BatchEnv(cfg, [g for g in goals for _ in range(n_streams)])
    gen = torch.Generator(device="cpu").manual_seed(seed)
    keep_log = not use_cache or record_logits
    ctx = SummaryContexts(model, B, cfg, device, keep_log, log_cap=n_total * (model.config.n_summary + 3) + 1)
    ctx.append(None, COMPRESS_START)
    n_raw = np.ones(B, dtype=np.int64)  # raw regions in context, the open one included
    region_len = np.zeros(B, dtype=np.int64)
    in_first = np.full(B, first_region > 0)
    pos = env.reset()
    prev_a, prev_r, ep_start = np.full(B, -1), np.zeros(B, dtype=np.int64), np.ones(B, dtype=np.int64)
    rewards = np.zeros((B, n_total), dtype=np.int8)
    closes, forced, set_closes, prunes = ([[] for _ in range(B)] for _ in range(4))
    logits_log, n_written, frozen_max = [], 0, 0
    for t in tqdm(range(n_total), desc="in-context steps", disable=not progress, mininterval=2):
        state_ids = torch.from_numpy(encode_state(pos, G)).to(device)
        prev_ids = torch.from_numpy(encode_prev(prev_a, prev_r, ep_start)).to(device)
        ctx.append(None, STEP, state_ids, prev_ids)
        logits_a, logits_t = ctx.logits(use_cache)
        if record_logits:
            logits_log.append(torch.cat([logits_a, logits_t], -1).cpu())
        action = torch.multinomial(torch.softmax(logits_a.float().cpu() / temperature, -1), 1, generator=gen).squeeze(1).numpy()
        pos, r, done = env.step(action)
        rewards[:, t] = r
        prev_a, prev_r = action, r
        ep_start[:] = done

        region_len += 1
        says_end = region_len >= cfg["compress_interval"] if fixed_prune else closes_region(logits_t, threshold).cpu().numpy()
        set_end = in_first & (region_len >= first_region)
        says_end = says_end & ~in_first
        closing = np.flatnonzero(says_end | set_end | (region_len >= max_region_len))
        if not len(closing):
            continue
        for b in closing:
            (set_closes if set_end[b] else closes if says_end[b] else forced)[b].append(t)
        in_first[closing] = False
        rows = torch.from_numpy(closing).to(device)
        ctx.append(rows, COMPRESS_END)
        ctx.append_summaries(rows)
        n_written += len(closing)
        n_raw[closing] += 1
        over = closing[n_raw[closing] > max_regions]
        if len(over):
            ctx.flush(use_cache)  # the summaries about to be frozen need their keys/values
            ctx.prune(torch.from_numpy(over).to(device))
            n_raw[over] -= 1
            for b in over:
                prunes[b].append(t)
            frozen_max = max(frozen_max, int(ctx.frozen_valid.sum(1).max()) // ctx.n_summary)
        ctx.current[rows] += 1
        ctx.append(rows, COMPRESS_START)
        region_len[closing] = 0
    returns = rewards.reshape(B, n_episodes, H).sum(-1).astype(np.float64)
    out = {"returns": returns.reshape(len(goals), n_streams, n_episodes), "rewards": rewards, "closes": closes,
           "forced_closes": forced, "set_closes": set_closes, "prunes": prunes, "recomputed": ctx.recomputed,
           "summary": {"summary_mode": ctx.mode, "n_summary": ctx.n_summary, "max_summaries": ctx.kept,
                       "n_summaries_written": n_written, "summary_tokens_written": n_written * ctx.n_summary,
                       "kept_summaries_max": frozen_max, "kv_entries_per_stream_max": ctx.kv_max,
                       "kv_slots_per_stream": ctx.L - 1},
           "kv_cache": {"kv_entries_per_stream_max": ctx.kv_max,  # as evaluate.run_in_context's, for every arm
                        "kv_entries_per_stream_mean": float(ctx.kv_sum.sum()) / (n_total * B),
                        "kv_slots_per_stream": ctx.L - 1}}
    if record_logits:
        out["logits"] = torch.stack(logits_log)  # (steps, B, A + 3)
        out["context_log"] = {k: v.cpu() for k, v in ctx.log.items()} | {"length": ctx.log_len.cpu()}
    return out
