"""Quick probe of a trained run: does the model read the goal from the rewards in its context?

    python probe.py --run-dir runs/AD-darkroom-compressed-seed0                   # teacher-forced accuracy only
    python probe.py --run-dir runs/AD-darkroom-compressed-seed0 eval_episodes=100  # + a short in-context rollout

1. Teacher-forced action accuracy on the LAST PPO region of every held-out goal's history (all streams), with
   the context the model sees in training: the regions kept before it (compressed mode, `C r_{K-2} E C r_{K-1}` for
   max_regions=2) or the last `n_transit` steps (standard mode). By then PPO has found the goal, so a model that reads
   the goal from the rewards in its context scores high on every goal; one that memorised the training goals does not.
   Seconds, no rollout: the cheap signal to check early in a tuning run (docs/experiments.md). Summary-token runs
   (use_summary=true) read summary.py's training samples: the raw regions, and in front of them the pruned regions
   whose summaries the context holds, with the summary mask.
2. Compressed mode: teacher-forced `</compress>` precision / recall on the held-out histories' regions, separately for
   regions with a previous region in context and for first regions, next to a position-only baseline (close after the
   most common region length of the training goals): what the head reads from its context beyond position. With one
   n_steps for every task the baseline is perfect too; with several (config/model/ad_dr_adaptive.yaml: 40, 80 and 120
   steps in every goal) only a model that reads the previous region's length can beat it. Recall is also printed per
   (goal, rollout length) and per length.
3. With `eval_episodes=N` on the command line: `evaluate.evaluate_config` on the held-out goals for N episodes, with the
   run's other eval_* settings (nothing is written); without it, no rollout.
4. Summary runs with `--summary-reach 0,1,2,3,4`: how many pruned regions a training sample must hold to compute the
   decisions evaluation makes (summary.reach; docs/experiments.md E68): per b, the total-variation distance between the
   evaluation's policy and the b-region sample's at each region of a short rollout.
`--histories CONFIG` reads the held-out histories of another collection config of the same env (e.g. a model trained on
one rollout length per goal, probed on histories with every length in every goal); the position-only rule keeps the
length of the run's own training histories.
Held-out goals are the validation goals unless `--split test` (tuning decisions are made on validation goals).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from common import (
    EVAL_DEFAULTS,
    EVAL_KEYS,
    UserError,
    add_print_config,
    history_path,
    make_parser,
    parse_cli,
    parse_overrides,
    print_config,
    run_main,
)
from dataset import HistoryDataset
from env import task_split
from evaluate import evaluate_config, load_run
from model.ad import IGNORE


@torch.no_grad()
def last_region_accuracy(model, cfg: dict, split: str = "val", device="cpu") -> dict[int, float]:
    """Held-out goal -> teacher-forced action accuracy on the last region of its streams."""
    ds = HistoryDataset(history_path(cfg), cfg, split, batch_size=1, seed=0)
    acc = {}
    for g in ds.goals:
        b = {k: v.to(device) for k, v in ds.final_contexts(g).items()}
        pred = model(b)["logits_action"].argmax(-1)
        acc[g] = float((pred == b["target_action"])[b["in_last"]].float().mean())
    return acc


def _pr(pred: np.ndarray, true: np.ndarray) -> dict:
    tp = int((pred & true).sum())
    return {"precision": tp / max(int(pred.sum()), 1), "recall": tp / max(int(true.sum()), 1), "n_true": int(true.sum())}


def trained_region_length(cfg: dict) -> int:
    """The most common region length among the training goals' histories (what a position-only rule would use)."""
    from history import open_history, stream_n_steps

    counts: dict[int, int] = {}
    with open_history(history_path(cfg)) as f:
        for g in task_split(cfg, "train"):
            if str(g) in f:
                T = f[str(g)]["actions"].shape[0]
                for n in stream_n_steps(f[str(g)]).tolist():  # every stream's regions
                    counts[n] = counts.get(n, 0) + T // n
    return max(counts, key=lambda n: (counts[n], -n))


@torch.no_grad()
def boundary_report(model, cfg: dict, split: str = "val", device="cpu", max_streams: int = 20,
                    thresholds: tuple[float, ...] = (), histories: dict | None = None) -> dict:
    """Teacher-forced `</compress>` precision / recall at the step tokens of the newest region of every training-style
    context of the held-out histories, for regions with a previous region in context and for first regions, with the
    config's close rule (`eval_close_threshold`, as evaluate.py applies it); the same for the position-only rule that
    closes after `trained_region_length` steps; and, for each of `thresholds`, the model's precision / recall had it
    closed at P(</compress>) >= that threshold (`sweep`: how to choose eval_close_threshold on validation tasks).
    `histories`: the config to read held-out histories with instead of `cfg` (`with_histories`)."""
    from model.ad import COMPRESS_END, COMPRESS_START, closes_region

    hcfg = histories or cfg
    ds = HistoryDataset(history_path(hcfg), hcfg, split, batch_size=1, seed=0)
    L0 = trained_region_length(cfg)
    threshold = cfg.get("eval_close_threshold", EVAL_DEFAULTS["eval_close_threshold"])
    acc = {k: ([], []) for k in ("with_previous", "first", "baseline_with_previous", "baseline_first")}
    probs = {k: ([], []) for k in ("with_previous", "first")}  # P(</compress>) and truth at the newest region's steps
    closes = {}  # (goal, stream) -> history steps after which the head said </compress> (newest region of each context)
    by_length = {}  # (goal, rollout length) -> [boundaries found, boundaries] over regions with a previous region in context
    for g in ds.goals:
        streams = list(range(min(max_streams, ds.data[g]["actions"].shape[1])))
        learners = {}  # streams that share their regions (one PPO learner), read in one batch per region
        for st in streams:
            learners.setdefault(id(ds.data[g]["regions"][st]), []).append(st)
        for group_streams in learners.values():
            regions = ds.data[g]["regions"][group_streams[0]]
            n_steps = int(regions[0, 1] - regions[0, 0])
            for k in range(len(regions)):
                b = ds.region_contexts(g, group_streams, k)
                logits = model(b)["logits_token_type"]
                pred = closes_region(logits, threshold).numpy()
                tt = b["target_token_type"].numpy()
                idx = np.arange(tt.shape[1])[None]
                last_c = np.where(b["type_ids"].numpy() == COMPRESS_START, idx, -1).max(1, keepdims=True)
                newest = (idx > last_c) & (tt != IGNORE)
                true = newest & (tt == COMPRESS_END)
                base = newest & (idx - last_c == L0)  # the L0-th step of the newest region
                for i, st in enumerate(group_streams):
                    closes.setdefault((g, st), []).extend(int(regions[k, 0] + j - last_c[i, 0] - 1)
                                                          for j in np.flatnonzero(pred[i] & newest[i]))
                group = "with_previous" if k > 0 else "first"
                if k > 0:
                    found = by_length.setdefault((g, n_steps), [0, 0])
                    found[0] += int((pred & true).sum())
                    found[1] += int(true.sum())
                for key, p in ((group, pred & newest), (f"baseline_{group}", base)):
                    acc[key][0].append(p.flatten())
                    acc[key][1].append(true.flatten())
                if thresholds:
                    probs[group][0].append(torch.softmax(logits.float(), -1)[..., COMPRESS_END].numpy()[newest])
                    probs[group][1].append(true[newest])
    out = {k: _pr(np.concatenate(p), np.concatenate(t)) for k, (p, t) in acc.items() if p}
    sweep = {}
    for thr in thresholds:
        sweep[thr] = {k: _pr(np.concatenate(p) >= thr, np.concatenate(t)) for k, (p, t) in probs.items() if p}
    ends = {key: (ds.data[key[0]]["regions"][key[1]][:, 1] - 1).tolist() for key in closes}
    recall_by_goal = {key: tp / max(n, 1) for key, (tp, n) in by_length.items()}
    return out | {"baseline_length": L0, "split": split, "streams_per_goal": max_streams, "closes": closes, "ends": ends,
                  "threshold": threshold, "sweep": sweep, "recall_by_goal": recall_by_goal}


def with_histories(cfg: dict, config: str) -> dict:
    """The run's config reading the history file of another collection config (`--histories`): the same env, task
    split and horizon, rollouts no longer than the run's compress_interval."""
    from common import ENV_KEYS, load_config, rollout_lengths
    from history import collect_keys

    other = load_config(config)
    differ = [k for k in ENV_KEYS if cfg.get(k) != other.get(k)]
    if differ:
        raise UserError(f"--histories {config} is another task set ({differ[0]}={other.get(differ[0])!r}, the run's "
                        f"{cfg.get(differ[0])!r}); pass a collection config of the run's env")
    if cfg["use_compressed_context"] and max(rollout_lengths(other)) > cfg["compress_interval"]:
        raise UserError(f"--histories {config} has rollouts of {max(rollout_lengths(other))} steps, longer than the run's "
                        f"compress_interval={cfg['compress_interval']}; pass one with shorter rollouts")
    return cfg | collect_keys(other) | {"traj_dir": other["traj_dir"]}


def plot_boundaries(report: dict, path: Path, n_streams: int = 2) -> Path:
    """For a few held-out streams: where PPO's rollouts ended (the true </compress>) and where the model, reading the
    history teacher-forced, said </compress>; one row per stream."""
    from plots import pyplot

    plt = pyplot()
    keys = [key for key in sorted(report["closes"]) if key[1] < n_streams]
    fig, axes = plt.subplots(len(keys), 1, figsize=(10, 0.9 * len(keys) + 1), sharex=True, squeeze=False)
    for ax, (g, st) in zip(axes[:, 0], keys, strict=True):
        ends = report["ends"][g, st]
        ax.vlines(ends, 0, 1, color="tab:gray", linewidth=2, alpha=0.6, label="PPO rollout ended")
        ax.plot(report["closes"][g, st], [0.5] * len(report["closes"][g, st]), "v", color="tab:red", markersize=6,
                label="model said </compress>")
        n = ends[0] + 1
        ax.set_yticks([])
        ax.set_ylabel(f"goal {g}\nstream {st}\n({n} steps)", rotation=0, ha="right", va="center", fontsize=8)
    axes[0, 0].legend(loc="upper right", fontsize=8, ncols=2)
    axes[-1, 0].set_xlabel("step of the PPO history (teacher-forced)")
    fig.suptitle(f"</compress> on {report['split']} histories: model vs PPO's rollout ends", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rollout_overrides(overrides: list[str], episodes: int | None) -> list[str]:
    """The overrides with the old `--episodes N` as the `eval_episodes=N` it means; the two at once must agree."""
    given = parse_overrides(overrides).get("eval_episodes")
    if episodes is None:
        return list(overrides)
    if given is not None and given != episodes:
        raise UserError(f"--episodes {episodes} and eval_episodes={given} disagree: --episodes is eval_episodes=N; pass "
                        "one of them")
    return [*overrides, f"eval_episodes={episodes}"]


def parse_backs(text: str, episodes: int) -> list[int]:
    """--summary-reach: comma-separated numbers of pruned regions (>= 0), sorted; --reach-episodes must be >= 1."""
    try:
        backs = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        backs = [-1]
    if any(b < 0 for b in backs):
        raise UserError(f"--summary-reach must be comma-separated numbers of pruned regions >= 0, got {text!r}")
    if backs and episodes < 1:
        raise UserError(f"--reach-episodes must be >= 1, got {episodes}")
    return backs


def rollout_compression_line(c: dict) -> str:
    """The rollout's `</compress>` line; precision / recall are None where there is no fixed grid (a list of n_steps)."""
    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    return (f"</compress> precision {f(c['precision_compress_end'])} recall {f(c['recall_compress_end'])}, "
            f"forced closes {c['n_forced_closes']}")


def main():
    parser = make_parser(__doc__)
    parser.add_argument("--run-dir", required=True, help="a trained run (holds ckpt.pt and config.yaml)")
    parser.add_argument("--episodes", type=int, default=None, help=argparse.SUPPRESS)  # the old spelling of eval_episodes=N
    parser.add_argument("--split", choices=("val", "test"), default="val",
                        help="held-out goals: val, as tuning is done on them (evaluate.py defaults to test: it reports "
                        "a finished run)")
    parser.add_argument("--thresholds", default="", help="compressed mode: also report teacher-forced </compress> precision / "
                        "recall had the head closed at P(</compress>) >= each of these (e.g. 0.5,0.3,0.2,0.1; default: "
                        "none)")
    parser.add_argument("--plot", default=None, help="compressed mode: write the </compress> vs PPO-rollout-end plot to "
                        "this PNG file (default: no plot)")
    parser.add_argument("--histories", default=None, help="collection config whose held-out histories to read (same env; "
                        "default: the run's own)")
    parser.add_argument("--summary-reach", default="", metavar="B,B,...",
                        help="summary runs: roll out --reach-episodes episodes (4 held-out goals x 2 streams, the run's "
                        "eval_temperature) and print, per number b of pruned regions, how far the training sample with b "
                        "pruned regions in front is from the evaluation's policy at each region (e.g. 0,1,2,3,4)")
    parser.add_argument("--reach-episodes", type=int, default=40, help="episodes of the --summary-reach rollout")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"{', '.join(EVAL_KEYS)}, traj_dir; "
                        "eval_episodes=N also rolls out N in-context episodes (default: teacher-forced only); "
                        "anywhere among the options")
    add_print_config(parser)
    args = parse_cli(parser)
    overrides = rollout_overrides(args.overrides, args.episodes)
    backs = parse_backs(args.summary_reach, args.reach_episodes)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg = load_run(Path(args.run_dir), overrides, device, allowed=(*EVAL_KEYS, "traj_dir"))
    if args.print_config:
        print_config(cfg)
    if backs and not cfg.get("use_summary"):
        raise UserError(f"--summary-reach needs a summary run (use_summary=true); {args.run_dir} has none")
    hcfg = with_histories(cfg, args.histories) if args.histories else cfg
    if args.histories:
        print(f"held-out histories: {history_path(hcfg)}")
    acc = last_region_accuracy(model, hcfg, args.split, device)
    print(f"teacher-forced acc, last region of the {args.split} goals' histories: {np.mean(list(acc.values())):.3f}  per goal "
          + " ".join(f"{g}:{a:.2f}" for g, a in acc.items()))
    if cfg["use_compressed_context"]:
        try:
            thresholds = tuple(float(x) for x in args.thresholds.split(",") if x.strip())
        except ValueError:
            thresholds = (-1.0,)
        if any(not 0 < t < 1 for t in thresholds):
            raise UserError(f"--thresholds must be probabilities in (0, 1), got {args.thresholds!r}")
        r = boundary_report(model, cfg, args.split, device, thresholds=thresholds, histories=hcfg)
        rule = f"P >= {r['threshold']}" if r["threshold"] > 0 else "argmax"
        for group in ("with_previous", "first"):
            m, b = r[group], r[f"baseline_{group}"]
            print(f"teacher-forced </compress> ({rule}), {group.replace('_', ' ')} region ({m['n_true']} regions): "
                  f"precision {m['precision']:.3f} recall {m['recall']:.3f}; position-only rule (close after "
                  f"{r['baseline_length']} steps): precision {b['precision']:.3f} recall {b['recall']:.3f}")
        print("  recall by goal (rollout length), regions with a previous region: " + " ".join(
            f"{g}({n}):{rec:.2f}" for (g, n), rec in r["recall_by_goal"].items()))
        by_n = {}
        for (_, n), rec in r["recall_by_goal"].items():
            by_n.setdefault(n, []).append(rec)
        print("  recall by rollout length (mean over goals): " + " ".join(
            f"{n}:{np.mean(v):.3f}" for n, v in sorted(by_n.items())))
        for thr, m in r["sweep"].items():
            print(f"  had it closed at P(</compress>) >= {thr}: " + "; ".join(
                f"{g.replace('_', ' ')} precision {v['precision']:.3f} recall {v['recall']:.3f}" for g, v in m.items()))
        if args.plot:
            print(f"wrote {plot_boundaries(r, Path(args.plot))}")
    if "eval_episodes" in parse_overrides(overrides):
        goals = task_split(cfg, args.split)
        start = time.perf_counter()
        s, res = evaluate_config(model, cfg, goals, device=device)
        R = res["returns"]  # [goal, stream, episode]
        k = min(100, cfg["eval_episodes"])
        norm = R[..., -k:].mean((1, 2)) / np.array([g["optimum"] for g in s["per_goal"]])
        hit = R > 0  # the episode of each stream's first reward (n_episodes if never)
        first = np.where(hit.any(-1), hit.argmax(-1), cfg["eval_episodes"]).flatten()
        print(f"in-context, {cfg['eval_episodes']} episodes at T={cfg['eval_temperature']}, eval_seed {cfg['eval_seed']}: mean "
              f"{s['mean_return']:.2f}, last {k} {R[..., -k:].mean():.2f} (optimum {s['optimum_mean']:.2f}); "
              f"worst goal last {k} / optimum {norm.min():.2f} (goal {goals[norm.argmin()]}); first reward at "
              f"episode median {np.median(first):.0f}, p90 {np.percentile(first, 90):.0f}, max {first.max()} "
              f"({time.perf_counter() - start:.0f} s)")
        if "compression" in s:
            print(rollout_compression_line(s["compression"]))
    if backs:
        from summary import reach

        goals = task_split(cfg, args.split)[:4]
        r = reach(model, cfg, goals, backs, n_streams=2, n_episodes=args.reach_episodes, seed=cfg["eval_seed"],
                  temperature=cfg["eval_temperature"])
        print(f"summary reach ({args.split} goals {goals}, {args.reach_episodes} episodes x 2 streams, "
              f"T={cfg['eval_temperature']}): total-variation distance between the evaluation's policy and the training "
              f"sample's with b pruned regions, largest per region, mean / max over {r[backs[0]]['n_regions']} regions:")
        for b, v in r.items():
            print(f"  b={b}: {v['mean_tv']:.2e} / {v['max_tv']:.2e}")


if __name__ == "__main__":
    run_main(main)
