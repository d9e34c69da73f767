"""Pictures of the compression regions: in one PPO history stream, across all goals (tasks), and as a model chose them.

    python visualize_compression.py --goal 38 --max-steps 400 [--stream 0]      # one stream of the history file
    python visualize_compression.py --analyze                                    # every goal: regions and return
    python visualize_compression.py --run-dir runs/AD-darkroom-compressed-seed0  # the model's </compress> in evaluation

- default: row, column, action and reward of one stream over time; each compression region (one PPO rollout)
  shaded green, `<compress>` as green bars and `</compress>` as red bars (also in the top marker strip).
- `--analyze`: per goal, the region count and lengths, reward per region and return per episode in the first
  and last region; then, per region index, the mean return over goals (printed and plotted with the oracle).
- `--run-dir`: when the model closed regions during `evaluate.py` (eval_summary.json compression.close_steps)
  against the true grid of `compress_interval` steps from the run's config.yaml.
The history file is the one `--config` / key=value name (collection keys only: traj_dir=, alg_seed=, ...); `--run-dir`
reads the run's own config.yaml instead. PNGs go to --out-dir. `--goal` takes a task id as `--goals` does elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import yaml

from common import (
    COLLECTION_KEYS,
    DEFAULT_COLLECT_CONFIG,
    UserError,
    add_config_args,
    add_print_config,
    add_renamed_flag,
    apply_overrides,
    history_path,
    load_config,
    make_parser,
    parse_cli,
    print_config,
    run_main,
)
from history import open_history, stream_n_steps
from plots import pyplot, task_label

ACTION_NAMES = ("row+1", "row-1", "col+1", "col-1", "stay")  # docs/design.md §1
REGION_SHADES = ("#c8e6c9", "#a5d6a7")  # alternating greens, so neighbouring regions stay apart
START_COLOR, END_COLOR = "tab:green", "tab:red"


def goals_in(f: h5py.File) -> list[int]:
    return sorted(int(k) for k in f if k.isdigit())


def regions(cstart: np.ndarray, cend: np.ndarray) -> list[tuple[int, int]]:
    """Half-open [start, end) step ranges of one stream's regions, pairing each `<compress>` with the next `</compress>`."""
    out, ends = [], np.flatnonzero(cend)
    for s in np.flatnonzero(cstart):
        later = ends[ends >= s]
        if len(later):
            out.append((int(s), int(later[0]) + 1))
    return out


def shade_regions(ax, bounds: list[tuple[int, int]]) -> None:
    for k, (a, b) in enumerate(bounds):
        ax.axvspan(a - 0.5, b - 0.5, color=REGION_SHADES[k % 2], alpha=0.6, linewidth=0, zorder=0)


# ---- one stream of the history -------------------------------------------------------------------------------


def plot_stream(path: Path, goal: int, stream: int, max_steps: int, out_dir: Path, n_tasks: int) -> Path:
    with open_history(path) as f:
        if not 0 <= goal < n_tasks:
            raise UserError(f"--goal {goal} is outside the grid's tasks: use 0..{n_tasks - 1}")
        if str(goal) not in f:
            raise UserError(f"goal {goal} is not in {path} (it holds goals {','.join(map(str, goals_in(f)))}); pick one of those")
        g = f[str(goal)]
        T, S = g["actions"].shape
        if not 0 <= stream < S:
            raise UserError(f"--stream {stream} is outside 0..{S - 1} ({path} has {S} streams per goal)")
        if max_steps <= 0:
            raise UserError(f"--max-steps must be > 0, got {max_steps}")
        n = min(max_steps, T)
        d = {k: g[k][:n, stream] for k in ("states", "actions", "rewards", "dones", "compress_start", "compress_end")}
        # where the task's hidden cells are (collect.py's group attrs): the goal, or the key and the door
        marks = {k: tuple(int(x) for x in g.attrs[k]) for k in ("goal", "key", "door") if k in g.attrs}
        horizon, n_steps = int(f.attrs["horizon"]), int(stream_n_steps(g)[stream])
    if max_steps > T:
        print(f"note: the stream has {T} steps; plotting all of them")
    bounds = regions(d["compress_start"], d["compress_end"])
    t = np.arange(n)

    plt = pyplot()
    fig, axes = plt.subplots(5, 1, figsize=(13, 8.5), sharex=True, gridspec_kw={"height_ratios": [0.6, 1, 1, 1, 0.8]})
    mk, ax_row, ax_col, ax_act, ax_rew = axes
    for ax in axes[1:]:
        shade_regions(ax, bounds)
        for s in np.flatnonzero(d["compress_start"]):
            ax.axvline(s - 0.7, color=START_COLOR, linewidth=1.2, zorder=1)
        for e in np.flatnonzero(d["compress_end"]):
            ax.axvline(e + 0.7, color=END_COLOR, linewidth=1.2, zorder=1)
    # marker strip: <compress> up in green, </compress> down in red, so both show where they meet
    mk.bar(np.flatnonzero(d["compress_start"]) - 0.5, 1, width=max(1.0, n / 250), color=START_COLOR, label="<compress>")
    mk.bar(np.flatnonzero(d["compress_end"]) + 0.5, -1, width=max(1.0, n / 250), color=END_COLOR, label="</compress>")
    mk.axhline(0, color="black", linewidth=0.5)
    mk.set(ylim=(-1.3, 1.3), yticks=[], ylabel="markers")
    mk.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)

    for ax, col, name in ((ax_row, 0, "row"), (ax_col, 1, "col")):
        ax.step(t, d["states"][:, col], where="mid", color="tab:blue", linewidth=1, label=f"agent {name}")
        for (mark, cell), style in zip(marks.items(), ("--", ":"), strict=False):
            ax.axhline(cell[col], color="black", linestyle=style, linewidth=1, label=f"{mark} {name}")
        ax.set(ylabel=name, ylim=(-0.5, 8.5), yticks=range(0, 9, 2))
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax_act.scatter(t, d["actions"], s=6, color="tab:purple")
    ax_act.set(ylabel="action", yticks=range(len(ACTION_NAMES)), yticklabels=ACTION_NAMES, ylim=(-0.5, len(ACTION_NAMES) - 0.5))
    ax_rew.bar(t, d["rewards"], width=1.0, color="tab:orange", label="reward")
    for e in np.flatnonzero(d["dones"]):
        ax_rew.axvline(e + 0.5, color="grey", linestyle=":", linewidth=0.6)
    ax_rew.set(ylabel="reward", ylim=(0, 1.15), yticks=[0, 1], xlabel="step of the PPO learning history", xlim=(-1, n))
    ax_rew.plot([], [], color="grey", linestyle=":", label="episode end")
    ax_rew.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)

    per_ep = [d["rewards"][a:b].sum() * horizon / (b - a) for a, b in bounds]
    trend = f"; return per episode {per_ep[0]:.1f} in the first region, {per_ep[-1]:.1f} in the last shown" if per_ep else ""
    mk.set_title(
        f"goal {goal} ({', '.join(f'{k} {v}' for k, v in marks.items())}), stream {stream}: steps 0-{n - 1}, "
        f"{len(bounds)} regions "
        f"(PPO rollouts of {n_steps} steps, shaded){trend}",
        fontsize=10,
    )
    fig.tight_layout()
    out = out_dir / f"history_goal{goal}_stream{stream}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---- all goals -----------------------------------------------------------------------------------------------


def analyze(path: Path, cfg: dict, out_dir: Path) -> Path:
    """--analyze: print the regions of every goal of the history file and their return by region index; plot it."""
    stats = history_region_stats(path, cfg)
    print_region_stats(stats)
    return plot_region_stats(stats, out_dir)


def history_region_stats(path: Path, cfg: dict) -> dict:
    """Per goal of a history file, its regions (count, lengths, first / last reward and return per episode), and per
    region index k, the return per episode over goals (`by_k`) and as a fraction of each goal's optimum (`norm_k`)."""
    from env import task_family, task_split  # imported here: env pulls in SB3, which takes seconds

    with open_history(path) as f:
        horizon, family = int(f.attrs["horizon"]), task_family(cfg)
        file_cfg = {**cfg, "grid_size": int(f.attrs["grid_size"]), "horizon": horizon}
        split_of = {g: name for name in ("train", "val", "test") for g in task_split(cfg, name)}
        rows, returns = [], {}  # returns[goal] = per-region return per episode, mean over streams
        for goal in goals_in(f):
            g = f[str(goal)]
            rewards, cs, ce = g["rewards"][:].astype(np.float64), g["compress_start"][:], g["compress_end"][:]
            if not cs.any() or not ce.any():
                raise UserError(f"No compression markers found: goal {goal} of {path} has none; re-run collect.py")
            bounds = regions(cs[:, 0], ce[:, 0])
            same = bool((cs == cs[:, :1]).all() and (ce == ce[:, :1]).all())
            lengths = [b - a for a, b in bounds]
            reward_sum = np.array([rewards[a:b].sum(0).mean() for a, b in bounds])  # per region, mean over streams
            returns[goal] = reward_sum * horizon / np.array(lengths)
            rows.append(
                {
                    "goal": goal,
                    "task": family.describe(goal, file_cfg),
                    "split": split_of.get(goal, "-"),  # "-": outside the config's train/val/test selection
                    "optimum": family.optimal_return(goal, file_cfg),
                    "n_regions": len(bounds),
                    "lengths": lengths,
                    "same_in_all_streams": same,
                    "reward_first": reward_sum[0],
                    "reward_last": reward_sum[-1],
                    "return_first": returns[goal][0],
                    "return_last": returns[goal][-1],
                }
            )
    if not rows:
        raise UserError(f"{path} holds no goals; re-run collect.py")
    # region k of every goal (goals with fewer regions drop out of the later indices)
    n_regions = max(len(v) for v in returns.values())
    opt = {r["goal"]: r["optimum"] for r in rows}
    by_k = [np.array([v[k] for v in returns.values() if len(v) > k]) for k in range(n_regions)]
    norm_k = [np.array([v[k] / opt[g] for g, v in returns.items() if len(v) > k]) for k in range(n_regions)]
    return {"rows": rows, "optimum": opt, "by_k": by_k, "norm_k": norm_k}


def print_region_stats(stats: dict) -> None:
    """`history_region_stats`'s dict as two tables: per goal, and per region index."""
    rows, opt, by_k, norm_k = stats["rows"], stats["optimum"], stats["by_k"], stats["norm_k"]
    print(
        f"{'goal':>4} {'task':>22} {'split':>5} {'opt':>4} {'regions':>7} {'length':>8} {'reward/region':>15} "
        f"{'return/episode':>15} {'last/opt':>8}"
    )
    for r in rows:
        lens = f"{min(r['lengths'])}-{max(r['lengths'])}" if min(r["lengths"]) != max(r["lengths"]) else str(r["lengths"][0])
        note = "" if r["same_in_all_streams"] else "  (markers differ between streams: stream 0 shown)"
        print(
            f"{r['goal']:>4} {r['task']:>22} {r['split']:>5} {r['optimum']:>4} {r['n_regions']:>7} {lens:>8} "
            f"{r['reward_first']:>6.1f} -> {r['reward_last']:<6.1f} {r['return_first']:>6.2f} -> {r['return_last']:<6.2f} "
            f"{r['return_last'] / r['optimum']:>8.2f}{note}"
        )

    n_regions = len(by_k)
    print(f"\nreturn per episode by region index, over {len(rows)} goals (oracle mean {np.mean(list(opt.values())):.2f}):")
    print(f"{'region':>6} {'mean':>6} {'p25':>6} {'p75':>6} {'of oracle':>9} {'goals>=0.9':>10}")
    for k in range(n_regions):
        print(
            f"{k:>6} {by_k[k].mean():>6.2f} {np.percentile(by_k[k], 25):>6.2f} {np.percentile(by_k[k], 75):>6.2f} "
            f"{norm_k[k].mean():>9.2f} {(norm_k[k] >= 0.9).mean():>10.0%}"
        )


def plot_region_stats(stats: dict, out_dir: Path) -> Path:
    """out_dir/analysis.png from `history_region_stats`'s dict: return by region index, and as a fraction of the oracle."""
    rows, opt, by_k, norm_k = stats["rows"], stats["optimum"], stats["by_k"], stats["norm_k"]
    n_regions = len(by_k)
    plt = pyplot()
    ks = np.arange(n_regions)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    mean = np.array([b.mean() for b in by_k])
    ax.fill_between(
        ks,
        [np.percentile(b, 25) for b in by_k],
        [np.percentile(b, 75) for b in by_k],
        color="tab:green",
        alpha=0.25,
        label="25-75 % of goals",
    )
    ax.plot(ks, mean, "o-", color="tab:green", label=f"mean over {len(rows)} goals")
    ax.axhline(np.mean(list(opt.values())), color="black", linestyle="--", label="oracle (mean optimum)")
    ax.set(
        xlabel="region index (PPO rollout k)",
        ylabel="return per episode (mean over streams)",
        title="PPO return, region by region",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax2.boxplot(norm_k, positions=ks, widths=0.6, showfliers=False)
    ax2.axhline(1.0, color="black", linestyle="--", label="oracle")
    ax2.set(xlabel="region index (PPO rollout k)", ylabel="return / goal's optimum", title="Per-goal fraction of the oracle")
    ax2.set_xticks(ks, [str(k) for k in ks])
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = out_dir / "analysis.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---- a trained model's region closes -------------------------------------------------------------------------


def plot_run_closes(run_dir: Path, max_steps: int | None, out_dir: Path) -> Path:
    summary_path, config_path = run_dir / "eval_summary.json", run_dir / "config.yaml"
    if not summary_path.is_file():
        raise UserError(f"no eval_summary.json in {run_dir}; evaluate the run first: python evaluate.py --run-dir {run_dir}")
    if not config_path.is_file():
        raise UserError(f"no config.yaml in {run_dir}; pass the run dir train.py wrote")
    try:
        s, cfg = json.loads(summary_path.read_text()), yaml.safe_load(config_path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError):
        raise UserError(f"{summary_path} or {config_path} is unreadable; re-run evaluate.py --run-dir {run_dir}") from None
    if "compression" not in s:
        raise UserError(f"{run_dir} is a {s.get('mode', 'standard')}-mode run: it never closes regions; pass a compressed run")
    c, interval = s["compression"], int(cfg["compress_interval"])
    closes = c["close_steps"]  # one list per stream, goal-major: stream b belongs to per_goal[b // n_streams]
    n_total = s["n_episodes"] * int(cfg["horizon"])
    n = min(max_steps, n_total) if max_steps else n_total

    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, max(4.0, 0.16 * len(closes) + 2)), gridspec_kw={"width_ratios": [3.2, 1]})
    shade_regions(ax, [(a, min(a + interval, n)) for a in range(0, n, interval)])
    for e in range(interval - 1, n, interval):
        ax.axvline(e + 0.5, color=END_COLOR, alpha=0.35, linewidth=0.8, zorder=1)
    for b, steps in enumerate(closes):
        steps = np.array([t for t in steps if t < n])
        on_grid = (steps + 1) % interval == 0
        ax.scatter(steps[on_grid] + 0.5, np.full(on_grid.sum(), b), marker="|", s=60, color=END_COLOR, zorder=3)
        ax.scatter(steps[~on_grid] + 0.5, np.full((~on_grid).sum(), b), marker="x", s=18, color="black", zorder=3)
    ax.scatter([], [], marker="|", color=END_COLOR, label="model </compress> on the true grid")
    ax.scatter([], [], marker="x", color="black", label="model </compress> off the grid")
    ax.plot([], [], color=END_COLOR, alpha=0.35, label=f"true </compress> (every {interval} steps)")
    n_streams = s["n_streams"]
    ticks = [i * n_streams + (n_streams - 1) / 2 for i in range(len(s["per_goal"]))]
    ax.set_yticks(ticks, [f"{g['goal']} {task_label(g)}" for g in s["per_goal"]])
    for i in range(1, len(s["per_goal"])):
        ax.axhline(i * n_streams - 0.5, color="grey", linewidth=0.4)
    ax.set(
        xlim=(-1, n),
        ylim=(len(closes) - 0.5, -0.5),
        xlabel="in-context evaluation step",
        ylabel=f"held-out goal ({n_streams} streams each)",
    )
    ax.legend(loc="upper left", bbox_to_anchor=(0, -0.12), ncols=3, fontsize=8, frameon=False)
    ax.set_title(
        f"{run_dir.name}: {c['n_closes']} closes by the model, precision {c['precision_compress_end']:.2f}, "
        f"recall {c['recall_compress_end']:.2f}; {c['n_forced_closes']} forced at the length limit",
        fontsize=10,
    )
    phase = np.array([(t + 1) % interval for steps in closes for t in steps], dtype=np.int64)
    ax2.hist(phase, bins=np.arange(interval + 1) - 0.5, color="tab:red")
    ax2.set(xlabel=f"(step + 1) mod {interval}  (0 = on the grid)", ylabel="model closes", title="where in the region it closed")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    out = out_dir / f"eval_closes_{run_dir.name}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main():
    parser = make_parser(__doc__)
    add_config_args(parser, DEFAULT_COLLECT_CONFIG,
                    keys="a collection key naming the history file (traj_dir=, ...), anywhere among the options")
    add_print_config(parser)
    parser.add_argument("--goal", type=int, default=0, help="task id whose history stream to plot")
    parser.add_argument("--stream", type=int, default=0, help="which parallel PPO stream of that goal")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="plot the first M steps (default: 400 for a history stream, the whole evaluation for --run-dir)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--analyze", action="store_true", help="summarise the regions and their return over all goals of the file")
    mode.add_argument(
        "--run-dir", default=None, help="compressed run evaluated by evaluate.py: plot where the model closed regions "
        "(default: plot the history file)"
    )
    parser.add_argument("--out-dir", default="runs/plots", help="directory for the PNGs")
    for old, new in (("--env_idx", "--goal"), ("--env-idx", "--goal"), ("--max_steps", "--max-steps"), ("--out", "--out-dir")):
        add_renamed_flag(parser, old, new)
    args = parse_cli(parser)
    out_dir = Path(args.out_dir)
    if args.run_dir:
        run_dir = Path(args.run_dir)
        if not run_dir.is_dir():
            raise UserError(f"run dir {run_dir} does not exist; pass a run dir written by train.py and evaluate.py")
        if args.overrides:
            raise UserError(f"--run-dir reads the run's own config.yaml, so key=value overrides do nothing here; drop "
                            f"{args.overrides[0]}")
        if args.print_config:
            print_config(yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {})
        out_dir.mkdir(parents=True, exist_ok=True)
        png = plot_run_closes(run_dir, args.max_steps, out_dir)
    else:
        cfg = apply_overrides(load_config(args.config), args.overrides, COLLECTION_KEYS, "the collection config",
                              script="visualize_compression.py")
        if args.print_config:
            print_config(cfg)
        path = history_path(cfg)
        open_history(path).close()  # a missing file is reported before any directory is made
        out_dir.mkdir(parents=True, exist_ok=True)
        if args.analyze:
            png = analyze(path, cfg, out_dir)
        else:
            from env import task_family  # imported here: env pulls in SB3, which takes seconds

            n_tasks = task_family(cfg).n_tasks(cfg)
            png = plot_stream(path, args.goal, args.stream, args.max_steps or 400, out_dir, n_tasks)
    print(f"wrote {png}")


if __name__ == "__main__":
    run_main(main)
