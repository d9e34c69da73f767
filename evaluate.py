"""In-context evaluation on held-out goals (tasks of the config's env): no weight updates, the model must learn from its context.

    python evaluate.py [--run-dir DIR] [--config FILE] [--split test|val] [--force] [key=value ...]

The model is rebuilt from DIR/ckpt.pt with the config it was trained with. Its evaluation keys (common.EVAL_KEYS) may
change: those of `--config FILE` apply, and key=value overrides win over them; no other key may.

All goals of the split x `eval_streams` rollouts run as one batch for `eval_episodes` episodes, actions sampled
from the softmax at `eval_temperature` with `eval_seed` (docs/design.md §4). Standard mode keeps a FIFO window of
`n_transit` steps (dropping the oldest `eval_window_shift` when full); compressed mode closes a region whenever the
token-type head says `</compress>` (`eval_prune=model`) or every `compress_interval` steps (`eval_prune=fixed`), and
prunes the oldest so that at most `max_regions` remain. Keys/values are cached between steps and recomputed only
for streams whose window was pruned or shifted.
Writes DIR/eval_result.npy ([n_goals, n_episodes], mean over streams) and DIR/eval_summary.json, which records the
split, the eval settings and the digest of the weights it evaluated. An evaluation of the same weights with other
settings is never replaced without --force.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common import (
    DEFAULT_MODEL_CONFIG,
    EVAL_DEFAULTS,
    EVAL_KEYS,
    UserError,
    add_print_config,
    apply_overrides,
    default_run_dir,
    first_region_steps,
    load_config,
    make_parser,
    max_region_steps,
    parse_cli,
    parse_overrides,
    print_config,
    run_main,
)
from env import SPLITS, BatchEnv, task_family, task_split
from model import MODEL, ADConfig, weights_digest
from model.ad import COMPRESS_END, COMPRESS_START, PAD_PREV, STEP, closes_region, encode_prev, encode_state, n_state_ids
from summary import run_in_context as run_in_context_summary

SLACK = 3  # cache slots beyond n_transit: a step may append </compress>, <compress> and a step token


def load_run(run_dir: Path, overrides: list[str] | dict, device,
             allowed: tuple[str, ...] = EVAL_KEYS) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model from `run_dir/ckpt.pt` (its config is inside); overrides (`key=value` strings or a dict) may
    change the `allowed` keys only."""
    if not run_dir.is_dir():
        what = "is not a directory" if run_dir.exists() else "does not exist"
        raise UserError(f"run dir {run_dir} {what}; pass --run-dir of a trained run (see `ls runs/`)")
    path = run_dir / "ckpt.pt"
    if not path.exists():
        raise UserError(f"no checkpoint in {run_dir}; train first: python train.py --run-dir {run_dir}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(ckpt, dict):
            raise TypeError("not a dict")
        cfg = EVAL_DEFAULTS | dict(ckpt["config"])  # a run trained before an eval key existed evaluates with its default
        model = MODEL[cfg["model"]](ADConfig.from_dict(cfg))
        model.load_state_dict(ckpt["model"])
    except Exception as e:
        raise UserError(f"checkpoint {path} is unreadable or does not match its model ({e.__class__.__name__}); "
                        "retrain") from None
    cfg = apply_overrides(cfg, overrides, allowed, "the checkpoint")
    model.trained_steps = int(ckpt["step"])
    return model.to(device).eval(), cfg


class Contexts:
    """Per-stream token sequences (right-padded, `cap` slots), with the key/value cache that covers their prefix.

    Everything is batched over streams: `append` and `drop_front` take a tensor of rows, and `logits` rebuilds the
    cache of every pruned / shifted stream in one `prefill` and appends the new tokens of all others in one `extend`.
    """

    def __init__(self, model, n: int, cap: int, grid_size: int, device):
        self.model, self.cap, self.device = model, cap, device
        self.pad_state = n_state_ids(grid_size) - 1
        self.type = torch.full((n, cap), STEP, dtype=torch.long, device=device)
        self.state = torch.full((n, cap), self.pad_state, dtype=torch.long, device=device)
        self.prev = torch.full((n, cap), PAD_PREV, dtype=torch.long, device=device)
        self.length = torch.zeros(n, dtype=torch.long, device=device)
        self.cached = torch.zeros(n, dtype=torch.long, device=device)  # tokens covered by the cache; 0 = rebuild
        self.cache = None  # allocated on the first cached `logits`
        self.all_rows = torch.arange(n, device=device)
        self.slot_idx = torch.arange(cap, device=device)
        self.recomputed = 0  # streams whose cache was rebuilt (for the benchmark)

    def append(self, rows, type_id: int, state=None, prev=None):
        """Append one token to each stream in `rows` (all streams if None)."""
        rows = self.all_rows if rows is None else rows
        at = self.length[rows]
        self.type[rows, at] = type_id
        self.state[rows, at] = state if state is not None else self.pad_state
        self.prev[rows, at] = prev if prev is not None else PAD_PREV
        self.length[rows] += 1

    def drop_front(self, rows, n):
        """Drop the oldest `n` (int or (R,)) tokens of each stream in `rows`; positions restart at 0, so their cache
        is rebuilt at the next `logits`. Slots past the new length keep stale tokens, which nothing reads."""
        src = (self.slot_idx[None] + torch.as_tensor(n, device=self.device).view(-1, 1)).clamp(max=self.cap - 1)
        src = src.expand(len(rows), self.cap)  # (R, cap): new slot j holds old slot j + n
        for buf in (self.type, self.state, self.prev):
            buf[rows] = buf[rows].gather(1, src)
        self.length[rows] -= n
        self.cached[rows] = 0

    def logits(self, use_cache: bool):
        """Logits (action, token type) at each stream's newest token."""
        if not use_cache:
            T = int(self.length.max())
            h, _ = self.model.trunk(self.type[:, :T], self.state[:, :T], self.prev[:, :T])
            return self.model.heads(h[self.all_rows, self.length - 1])
        if self.cache is None:
            self.cache = self.model.new_cache(len(self.length), self.cap)
        stale = (self.cached == 0).nonzero().flatten()
        n_stale, B = len(stale), len(self.length)
        if n_stale:  # rebuild the cache of pruned / shifted / new streams from their full context
            rows = None if n_stale == B else stale  # all streams: plain slices, no gather / scatter
            T = int(self.length[stale].max())
            sel = slice(None) if rows is None else stale
            sla, slt = self.model.prefill(self.type[sel, :T], self.state[sel, :T], self.prev[sel, :T], self.length[stale],
                                          self.cache, rows)
            self.cached[stale] = self.length[stale]
            self.recomputed += n_stale
            if n_stale == B:
                return sla, slt
        n_new = self.length - self.cached  # 0 for streams rebuilt above: they ride along as padding
        N = int(n_new.max())
        pos = self.cached[:, None] + torch.arange(N, device=self.device)[None]  # (B, N), past the end = padding
        idx = pos.clamp(max=self.cap - 1)
        la, lt = self.model.extend(self.type.gather(1, idx), self.state.gather(1, idx), self.prev.gather(1, idx),
                                   pos, n_new.clamp(min=1), self.cache)
        self.cached.copy_(self.length)
        if n_stale:  # streams rebuilt above take the prefill's logits
            la[stale] = sla
            if lt is not None:
                lt[stale] = slt
        return la, lt


class RegionPruner:
    """Compressed mode's regions: after each step, which streams close their region, and the oldest region dropped.

    A region closes when the token-type head says `</compress>` (P >= eval_close_threshold), or every
    `compress_interval` steps with eval_prune=fixed; with eval_first_region > 0 (or a run trained with
    first_region_steps > 0 and eval_first_region 0, "as trained") every stream's first region is closed
    after that many steps whatever the head says (a rhythm the model did not choose, which it must read from its
    context); a region that reaches max_region_steps is closed for it (a forced close). A closing stream gets
    `</compress>`, loses its oldest region if it then holds more than `max_regions`, and opens the next with `<compress>`.
    `log` holds, per stream, the steps of each kind of close and of each prune (run_in_context's result keys).
    """

    LOG_KEYS = ("closes", "forced_closes", "set_closes", "prunes")

    def __init__(self, cfg: dict, ctx: Contexts):
        B = len(ctx.length)
        self.ctx, self.max_regions = ctx, cfg["max_regions"]
        fixed = cfg.get("eval_prune", EVAL_DEFAULTS["eval_prune"]) == "fixed"
        self.interval = cfg["compress_interval"] if fixed else None  # the compressed-fixed arm: the grid decides
        self.threshold = cfg.get("eval_close_threshold", EVAL_DEFAULTS["eval_close_threshold"])
        self.max_region_len = max_region_steps(cfg)  # longest region the model may keep open (then a forced close)
        self.first_region = first_region_steps(cfg)  # eval_first_region, or the one the run was trained for
        self.in_first = np.full(B, self.first_region > 0)
        # index of each kept region's <compress> (first n_regions[b] columns; one spare for the region being opened)
        self.region_starts = np.zeros((B, self.max_regions + 1), dtype=np.int64)
        self.n_regions = np.ones(B, dtype=np.int64)
        self.region_len = np.zeros(B, dtype=np.int64)
        # closes: steps after which the model emitted </compress>; forced_closes: steps at which a region reached
        # max_region_len; set_closes: the step that closed the first region (eval_first_region); prunes: steps after
        # which the oldest region was dropped
        self.log = {k: [[] for _ in range(B)] for k in self.LOG_KEYS}
        ctx.append(None, COMPRESS_START)

    def after_step(self, t: int, logits_t) -> None:
        """Step `t` was appended to every stream: close (and prune) the regions that end here."""
        self.region_len += 1
        if self.interval is not None:
            says_end = self.region_len >= self.interval
        else:
            says_end = closes_region(logits_t, self.threshold).cpu().numpy()
        set_end = self.in_first & (self.region_len >= self.first_region)
        says_end = says_end & ~self.in_first
        closing = np.flatnonzero(says_end | set_end | (self.region_len >= self.max_region_len))
        if not len(closing):
            return
        for b in closing:  # all closing streams at once: </compress>, prune the oldest region if over budget, <compress>
            self.log["set_closes" if set_end[b] else "closes" if says_end[b] else "forced_closes"][b].append(t)
        self.in_first[closing] = False
        rows = torch.from_numpy(closing).to(self.ctx.device)
        self.ctx.append(rows, COMPRESS_END)
        self.region_starts[closing, self.n_regions[closing]] = self.ctx.length[rows].cpu().numpy()  # where <compress> goes
        self.n_regions[closing] += 1
        self.drop_oldest(t, closing[self.n_regions[closing] > self.max_regions])
        self.ctx.append(rows, COMPRESS_START)
        self.region_len[closing] = 0

    def drop_oldest(self, t: int, over: np.ndarray) -> None:
        """Drop the oldest region of each stream in `over` (everything before its second kept region)."""
        if not len(over):
            return
        drop = self.region_starts[over, 1].copy()
        dev = self.ctx.device
        self.ctx.drop_front(torch.from_numpy(over).to(dev), torch.from_numpy(drop).to(dev))
        self.region_starts[over, :-1] = self.region_starts[over, 1:] - drop[:, None]
        self.n_regions[over] -= 1
        for b in over:
            self.log["prunes"][b].append(t)


@torch.no_grad()
def run_in_context(model, cfg: dict, goals: list[int], *, n_streams: int, n_episodes: int, seed: int,
                   use_cache: bool = True, temperature: float = 1.0, progress: bool = True, record_logits: bool = False,
                   device="cpu") -> dict:
    """Roll out `len(goals) * n_streams` streams for `n_episodes` episodes each, learning in context only."""
    if cfg.get("use_summary"):  # summary tokens kept for pruned regions: summary.py's loop, same results
        return run_in_context_summary(model, cfg, goals, n_streams=n_streams, n_episodes=n_episodes, seed=seed,
                                      use_cache=use_cache, temperature=temperature, progress=progress,
                                      record_logits=record_logits, device=device)
    G, H = cfg["grid_size"], cfg["horizon"]
    compressed, n_transit = cfg["use_compressed_context"], cfg["n_transit"]
    B = len(goals) * n_streams
    env = BatchEnv(cfg, [g for g in goals for _ in range(n_streams)])  # goal-major: stream b plays goals[b // n_streams]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ctx = Contexts(model, B, n_transit + SLACK, G, device)
    shift = min(cfg["eval_window_shift"], n_transit)
    regions = RegionPruner(cfg, ctx) if compressed else None  # opens every stream's first region

    n_total = n_episodes * H
    pos = env.reset()
    prev_a = np.full(B, -1)
    prev_r = np.zeros(B, dtype=np.int64)
    ep_start = np.ones(B, dtype=np.int64)
    rewards = np.zeros((B, n_total), dtype=np.int8)
    logits_log = []
    kv_max, kv_sum = torch.zeros(B, dtype=torch.long, device=device), torch.zeros(B, dtype=torch.long, device=device)
    for t in tqdm(range(n_total), desc="in-context steps", disable=not progress, mininterval=2):
        if not compressed and int(ctx.length[0]) >= n_transit:  # FIFO: all streams share one length
            ctx.drop_front(ctx.all_rows, shift)
        state_ids = torch.from_numpy(encode_state(pos, G)).to(device)
        prev_ids = torch.from_numpy(encode_prev(prev_a, prev_r, ep_start)).to(device)
        ctx.append(None, STEP, state_ids, prev_ids)
        torch.maximum(kv_max, ctx.length, out=kv_max)  # KV entries the new step attends over (its context, markers too)
        kv_sum += ctx.length
        logits_a, logits_t = ctx.logits(use_cache)
        if record_logits:
            logits_log.append(torch.cat([logits_a] + ([logits_t] if logits_t is not None else []), -1).cpu())
        probs = torch.softmax(logits_a.float().cpu() / temperature, -1)
        action = torch.multinomial(probs, 1, generator=gen).squeeze(1).numpy()

        pos, r, done = env.step(action)  # all streams reset together at the end of an episode
        rewards[:, t] = r
        prev_a, prev_r = action, r
        ep_start[:] = done
        if regions is not None:
            regions.after_step(t, logits_t)
    returns = rewards.reshape(B, n_episodes, H).sum(-1).astype(np.float64)  # [B, n_episodes]
    log = regions.log if regions is not None else {k: [[] for _ in range(B)] for k in RegionPruner.LOG_KEYS}
    out = {"returns": returns.reshape(len(goals), n_streams, n_episodes), "rewards": rewards,
           **log, "recomputed": ctx.recomputed,
           "kv_cache": kv_cache_stats(kv_max, kv_sum, n_total, ctx.cap)}
    if record_logits:
        out["logits"] = torch.stack(logits_log)  # (steps, B, A [+3])
    return out


def kv_cache_stats(kv_max: torch.Tensor, kv_sum: torch.Tensor, n_steps: int, slots: int) -> dict:
    """eval_summary.json's "kv_cache" from per-stream (B,) tensors: the most KV entries (tokens held in the context
    that a step attends over) any stream's step saw, their mean over steps and streams, and the slots allocated."""
    return {"kv_entries_per_stream_max": int(kv_max.max()), "kv_entries_per_stream_mean": float(kv_sum.sum()) / (
        n_steps * len(kv_sum)), "kv_slots_per_stream": int(slots)}


def boundary_metrics(closes: list[list[int]], n_total: int, interval: int) -> dict:
    """Precision / recall of the model's </compress> steps against the true grid (t + 1) % interval == 0."""
    n_closes = sum(len(c) for c in closes)
    correct = sum(sum((t + 1) % interval == 0 for t in c) for c in closes)
    n_true = len(closes) * (n_total // interval)
    return {"n_closes": n_closes, "precision_compress_end": correct / max(n_closes, 1),
            "recall_compress_end": correct / max(n_true, 1)}


def region_stats(closes: list[list[int]], forced: list[list[int]], set_closes: list[list[int]] | None = None) -> dict:
    """Per stream: the lengths (steps) of the regions it closed, in order; and over all streams, the fraction of regions
    after the first whose length equals the previous region's (a model that reads the length from its context keeps
    it), and the first regions' lengths (set by eval_first_region where `set_closes` holds its closes)."""
    lengths = []
    for c, f, s in zip(closes, forced, set_closes or [[] for _ in closes], strict=True):
        ends = sorted(c + f + s)  # may be empty: a stream that closed no region (a young run, a short evaluation)
        lengths.append([int(b - a) for a, b in zip([-1, *ends], ends, strict=False)])
    pairs = [(a, b) for ls in lengths for a, b in zip(ls[:-1], ls[1:], strict=False)]
    out = {"region_lengths": lengths, "first_region_lengths": [ls[0] if ls else None for ls in lengths],
           "consistency": sum(a == b for a, b in pairs) / len(pairs) if pairs else None, "n_region_pairs": len(pairs)}
    if set_closes and any(set_closes):  # a rhythm the model did not choose: how many later regions keep it
        later = [x for ls in lengths for x in ls[1:]]
        first = [ls[0] for ls in lengths if ls]
        out["kept_first_length"] = sum(x == first[0] for x in later) / len(later) if later else None
    return out


def prune_quality(rewards: np.ndarray, prunes: list[list[int]], window: int) -> dict:
    """Reward per step in the `window` steps before each prune vs the `window` steps after it."""
    before, after = [], []
    for b, steps in enumerate(prunes):
        for t in steps:
            if t + 1 - window >= 0 and t + 1 + window <= rewards.shape[1]:
                before.append(rewards[b, t + 1 - window : t + 1].mean())
                after.append(rewards[b, t + 1 : t + 1 + window].mean())
    if not before:
        return {"n_prunes": 0}
    rb, ra = float(np.mean(before)), float(np.mean(after))
    return {"n_prunes": len(before), "reward_per_step_before_prune": rb, "reward_per_step_after_prune": ra,
            "after_over_before": ra / rb if rb > 0 else None}


def summarize(res: dict, goals: list[int], cfg: dict) -> dict:
    """Everything eval_summary.json reports about one in-context run (`res` from `run_in_context`)."""
    returns = res["returns"]  # [n_goals, n_streams, n_episodes]
    H, family = cfg["horizon"], task_family(cfg)
    per_stream = returns.mean(-1).flatten()
    ci = 1.96 * per_stream.std(ddof=1) / np.sqrt(len(per_stream)) if len(per_stream) > 1 else float("nan")
    opt = np.array([family.optimal_return(g, cfg) for g in goals], dtype=np.float64)
    per_goal = []
    for i, g in enumerate(goals):
        r = returns[i].mean(0)  # mean over streams, per episode
        per_goal.append({"goal": g, "task": family.describe(g, cfg), "mean": float(r.mean()),
                         "last20": float(r[-20:].mean()), "last50": float(r[-50:].mean()), "last100": float(r[-100:].mean()),
                         "optimum": float(opt[i]),
                         "normalized": float(r.mean() / opt[i]), "last100_normalized": float(r[-100:].mean() / opt[i])})
    n_total = returns.shape[-1] * H
    s = {
        "mode": "compressed" if cfg["use_compressed_context"] else "standard", "env": cfg["env"],
        "goals": [int(g) for g in goals],
        "n_goals": len(goals), "n_streams": returns.shape[1], "n_episodes": returns.shape[-1],
        "mean_return": float(returns.mean()), "ci95": float(ci),
        "last20_mean": float(returns[..., -20:].mean()), "last50_mean": float(returns[..., -50:].mean()),
        "last100_mean": float(returns[..., -100:].mean()),
        "optimum_mean": float(opt.mean()), "normalized_score": float(returns.mean() / opt.mean()),
        "per_goal": per_goal,
    }
    if cfg["use_compressed_context"]:
        # against the n_steps grid, where there is one (with n_steps drawn per task there is none: see consistency)
        grid = boundary_metrics(res["closes"], n_total, cfg["n_steps"]) if isinstance(cfg["n_steps"], int) else {
            "n_closes": sum(len(c) for c in res["closes"]), "precision_compress_end": None, "recall_compress_end": None}
        s["compression"] = {**grid, **region_stats(res["closes"], res["forced_closes"], res.get("set_closes")),
                            "n_forced_closes": sum(len(c) for c in res["forced_closes"]),
                            "first_region_set": first_region_steps(cfg),
                            **prune_quality(res["rewards"], res["prunes"], H),
                            "close_steps": [list(map(int, c)) for c in res["closes"]],
                            "forced_close_steps": [list(map(int, c)) for c in res["forced_closes"]],
                            "set_close_steps": [list(map(int, c)) for c in res.get("set_closes", [])]}
    if "summary" in res:  # summary mode: summaries written, kept, and the keys/values per stream
        s["summary"] = res["summary"]
    if "kv_cache" in res:  # every mode: KV entries per stream, max / mean over the evaluation, and the slots
        s["kv_cache"] = res["kv_cache"]
    return s


def evaluate_config(model, cfg: dict, split_or_goals: str | list[int], *, episodes: int | None = None,
                    streams: int | None = None, progress: bool = True, device=None) -> tuple[dict, dict]:
    """The one way to evaluate a model in context: (summary, result), `summarize`'s dict and `run_in_context`'s.

    Every eval_* setting comes from `cfg` (eval_episodes, eval_streams, eval_seed, eval_cache, eval_temperature here;
    eval_prune, eval_close_threshold, eval_first_region, eval_window_shift inside run_in_context); change them in the
    config, e.g. with load_run's overrides. `episodes` / `streams` replace eval_episodes / eval_streams (train.py's
    val_episodes / val_streams). `split_or_goals`: "val", "test", ... or a list of goals. `device`: the model's."""
    cfg = EVAL_DEFAULTS | cfg
    if episodes is not None or streams is not None:
        cfg = cfg | {"eval_episodes": cfg["eval_episodes"] if episodes is None else episodes,
                     "eval_streams": cfg["eval_streams"] if streams is None else streams}
    goals = task_split(cfg, split_or_goals) if isinstance(split_or_goals, str) else list(split_or_goals)
    device = next(model.parameters()).device if device is None else device
    res = run_in_context(model, cfg, goals, n_streams=cfg["eval_streams"], n_episodes=cfg["eval_episodes"],
                         seed=cfg["eval_seed"], use_cache=cfg["eval_cache"], temperature=cfg["eval_temperature"],
                         progress=progress, device=device)
    return summarize(res, goals, cfg), res


def print_table(s: dict) -> None:
    print(f"{'goal':>5} {'task':>22} {'mean':>6} {'last50':>7} {'optimum':>8} {'norm':>6}")
    for g in s["per_goal"]:
        print(f"{g['goal']:>5} {g['task']:>22} {g['mean']:>6.2f} {g['last50']:>7.2f} "
              f"{g['optimum']:>8.0f} {g['normalized']:>6.2f}")
    print(f"{s['mode']} AD: mean return {s['mean_return']:.2f} ± {s['ci95']:.2f} (95% CI) over {s['n_episodes']} episodes "
          f"x {s['n_goals']} goals x {s['n_streams']} streams; last 100 {s['last100_mean']:.2f}, last 20 {s['last20_mean']:.2f}; "
          f"optimum {s['optimum_mean']:.2f}; normalised {s['normalized_score']:.3f}")
    if "compression" in s:
        c = s["compression"]
        grid = (f"precision {c['precision_compress_end']:.3f}, recall {c['recall_compress_end']:.3f}"
                if c["precision_compress_end"] is not None else "no fixed grid")
        cons = f"{c['consistency']:.3f}" if c["consistency"] is not None else "n/a"
        first = (f" (first region closed for it after {c['first_region_set']} steps; later regions of that length "
                 f"{c['kept_first_length']:.3f})" if c.get("kept_first_length") is not None else "")
        prune = (f"{c['reward_per_step_before_prune']:.3f} vs {c['reward_per_step_after_prune']:.3f}"
                 if "reward_per_step_before_prune" in c else "n/a (no prune)")
        print(f"</compress>: {c['n_closes']} closes ({grid}), forced {c['n_forced_closes']}{first}, regions as long as the "
              f"previous one {cons}; reward/step before vs after prune {prune}")


def refuse_overwrite(summary_path: Path, new: dict) -> str | None:
    """Why writing `new` over `summary_path` would lose an evaluation (same weights, other settings), or None."""
    if not summary_path.is_file():
        return None
    try:
        old = json.loads(summary_path.read_text())
    except json.JSONDecodeError:
        return None  # a cut-off file holds nothing to keep
    if old.get("weights_sha256") != new["weights_sha256"]:
        return None  # an evaluation of older weights is stale: replaced (and said so)
    was = EVAL_DEFAULTS | old.get("eval_config", {})  # a summary written before an eval key existed used its default
    changed = [f"{k}={was.get(k)!r} (now {v!r})" for k, v in new["eval_config"].items() if was.get(k) != v]
    if old.get("split") != new["split"]:
        changed.insert(0, f"split={old.get('split')!r} (now {new['split']!r})")
    return ", ".join(changed) or None


def main():
    parser = make_parser(__doc__)
    parser.add_argument("--run-dir", default=None, help="trained run (default: the run dir of --config, runs/AD-darkroom-seed0)")
    parser.add_argument("--config", default=None,
                        help="a model config: its eval_* keys apply to the evaluation (key=value overrides win), and "
                        "without --run-dir its run dir is the one evaluated (default: none, the checkpoint's eval settings, "
                        "and the run dir of config/model/ad_dr.yaml)")
    parser.add_argument("--split", choices=[s for s in SPLITS if s != "train"], default="test",
                        help="held-out goals to evaluate on: test reports a finished run; val is for tuning (probe.py's "
                        "default, as probe.py is a tuning tool)")
    parser.add_argument("--out-dir", default=None, help="where eval_summary.json / eval_result.npy go (default: the run dir)")
    parser.add_argument("--force", action="store_true", help="replace an evaluation of the same weights made with other settings")
    add_print_config(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help=f"override eval keys: {', '.join(EVAL_KEYS)}; anywhere among the options")
    args = parse_cli(parser)
    given = load_config(args.config) if args.config else None
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(given or load_config(DEFAULT_MODEL_CONFIG))
    overrides = {k: given[k] for k in EVAL_KEYS if k in (given or {})} | parse_overrides(args.overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg = load_run(run_dir, overrides, device)
    if args.print_config:
        print_config(cfg)
    out_dir = Path(args.out_dir) if args.out_dir else run_dir
    digest = weights_digest(model.state_dict())
    goals = task_split(cfg, args.split)
    planned = {"split": args.split, "weights_sha256": digest, "eval_config": {k: cfg[k] for k in EVAL_KEYS}}
    clash = refuse_overwrite(out_dir / "eval_summary.json", planned)
    if clash and not args.force:
        raise UserError(f"{out_dir / 'eval_summary.json'} holds an evaluation of these weights with {clash}; "
                        "pass --force to replace it, or --out-dir for another place")
    start = time.perf_counter()
    summary, res = evaluate_config(model, cfg, goals, device=device)
    secs = time.perf_counter() - start
    s = {**summary, **planned, "checkpoint_step": model.trained_steps, "seconds": secs}
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "eval_result.npy", res["returns"].mean(1))
    (out_dir / "eval_summary.json").write_text(json.dumps(s, indent=1))
    print_table(s)
    if clash:
        print(f"note: replaced an evaluation with {clash} (--force)")
    print(f"evaluated on the {args.split} goals in {secs:.1f} s; wrote {out_dir / 'eval_result.npy'} and "
          f"{out_dir / 'eval_summary.json'}")


if __name__ == "__main__":
    run_main(main)
