"""Standard vs compressed AD: one report from two finished, evaluated runs.

    python compare.py --standard runs/AD-darkroom-seed0 --compressed runs/AD-darkroom-compressed-seed0 [--out-dir runs/compare]

Reads each run's train_summary.json, eval_summary.json and eval_result.npy (written by train.py and evaluate.py)
and writes OUT_DIR/report.md (Markdown tables), OUT_DIR/report.json (the same numbers), OUT_DIR/learning_curves.png
(in-context return vs episode, both modes, oracle line) and OUT_DIR/per_goal.png (held-out goals, both modes).
`example_compressed_training.py --mode compare` calls `write_report` with its two run dirs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from common import UserError, add_renamed_flag, make_parser, run_main
from plots import pyplot, task_label

MODES = ("standard", "compressed")
COLORS = {"standard": "tab:blue", "compressed": "tab:green"}

# (key in report.json, row label in report.md, source file, key in that file, format)
ROWS = (
    ("train_steps", "training steps", "train", "steps", "{:.0f}"),
    ("steps_per_s", "training steps/s", "train", "steps_per_s", "{:.2f}"),
    ("targets_per_s", "training targets/s", "train", "targets_per_s", "{:,.0f}"),
    ("peak_rss_mb", "peak memory (MB RSS)", "train", "peak_rss_mb", "{:,.0f}"),
    ("train_seconds", "training time (s)", "train", "seconds", "{:,.1f}"),
    ("val_acc_action", "val acc_action (teacher-forced)", "train", "val/acc_action", "{:.3f}"),
    ("val_acc_token_type", "val acc_token_type", "train", "val/acc_token_type", "{:.3f}"),
    ("val_precision_compress_end", "val `</compress>` precision", "train", "val/precision_compress_end", "{:.3f}"),
    ("val_recall_compress_end", "val `</compress>` recall", "train", "val/recall_compress_end", "{:.3f}"),
    ("val_return", "val in-context return at the end of training", "train", "val/return", "{:.2f}"),
    ("mean_return", "held-out mean return ± 95% CI", "eval", "mean_return", "{:.2f}"),
    ("last100_mean", "held-out last-100-episode mean", "eval", "last100_mean", "{:.2f}"),
    ("optimum_mean", "oracle mean return", "eval", "optimum_mean", "{:.2f}"),
    ("normalized_score", "normalised score (mean / oracle)", "eval", "normalized_score", "{:.3f}"),
    ("eval_precision_compress_end", "eval `</compress>` precision", "compression", "precision_compress_end", "{:.3f}"),
    ("eval_recall_compress_end", "eval `</compress>` recall", "compression", "recall_compress_end", "{:.3f}"),
    ("eval_forced_closes", "eval forced region closes", "compression", "n_forced_closes", "{:.0f}"),
    ("reward_per_step_before_prune", "eval reward/step before a prune", "compression", "reward_per_step_before_prune", "{:.3f}"),
    ("reward_per_step_after_prune", "eval reward/step after a prune", "compression", "reward_per_step_after_prune", "{:.3f}"),
    ("eval_seconds", "evaluation time (s)", "eval", "seconds", "{:,.1f}"),
)


def _read_json(path: Path, hint: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path} not found; {hint}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON (cut off?); {hint}") from None


def read_results(run_dir: Path, mode: str) -> dict:
    """The summaries and per-episode returns of one evaluated run, checked to be of the expected mode and to be an
    evaluation of the weights this training produced (not of an earlier training in the same dir)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run dir {run_dir} does not exist; train and evaluate it first (example_compressed_training.py)")
    train = _read_json(run_dir / "train_summary.json", f"finish training first: python train.py --run-dir {run_dir}")
    ev = _read_json(run_dir / "eval_summary.json", f"evaluate first: python evaluate.py --run-dir {run_dir}")
    if ev.get("mode") != mode:
        raise UserError(f"{run_dir} is a {ev.get('mode')}-mode run, but was given as the {mode} run; swap the two run dirs")
    trained = (train.get("weights_sha256_per_rank") or [None])[0]
    if ev.get("weights_sha256") != trained:
        raise UserError(f"{run_dir / 'eval_summary.json'} is an evaluation of other weights than this training's "
                        f"(stale: the run was retrained or the evaluation copied); re-run python evaluate.py --run-dir {run_dir}")
    curves = run_dir / "eval_result.npy"
    if not curves.is_file():
        raise UserError(f"{curves} not found; evaluate first: python evaluate.py --run-dir {run_dir}")
    returns = np.load(curves)  # [n_goals, n_episodes], mean over streams
    if returns.shape != (ev["n_goals"], ev["n_episodes"]):
        raise UserError(
            f"{curves} has shape {returns.shape} but eval_summary.json says {ev['n_goals']} goals x "
            f"{ev['n_episodes']} episodes; re-run python evaluate.py --run-dir {run_dir}"
        )
    return {"dir": run_dir, "train": train, "eval": ev, "compression": ev.get("compression", {}), "returns": returns}


def _value(run: dict, source: str, key: str) -> float | None:
    v = run[source].get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _cell(v: float | None, fmt: str, ci: float | None = None) -> str:
    if v is None:
        return "—"
    return fmt.format(v) + (f" ± {ci:.2f}" if ci is not None else "")


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average that shrinks at the ends (no edge bias towards zero)."""
    if window <= 1 or len(y) < 3:
        return y
    kernel = np.ones(window)
    return np.convolve(y, kernel, "same") / np.convolve(np.ones_like(y), kernel, "same")


def plot_learning_curves(runs: dict, optimum_mean: float, path: Path, env: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for mode, run in runs.items():
        curve = run["returns"].mean(0)  # mean over held-out goals, per episode
        episodes = np.arange(1, len(curve) + 1)
        window = max(1, len(curve) // 20)
        ax.plot(episodes, curve, color=COLORS[mode], alpha=0.25, linewidth=0.8)
        ax.plot(
            episodes,
            smooth(curve, window),
            color=COLORS[mode],
            linewidth=2,
            label=f"{mode} (mean {curve.mean():.2f}; {window}-episode moving average)",
        )
    ax.axhline(optimum_mean, color="black", linestyle="--", linewidth=1.2, label=f"oracle (mean optimum {optimum_mean:.2f})")
    n_goals = next(iter(runs.values()))["returns"].shape[0]
    ax.set(
        xlabel="episode (in context, no weight updates)",
        ylabel=f"return (mean over {n_goals} held-out goals)",
        title=f"In-context learning on held-out {env} tasks",
        ylim=(0, optimum_mean * 1.1),
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_per_goal(per_goal: list[dict], path: Path) -> None:
    plt = pyplot()
    x = np.arange(len(per_goal))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(per_goal) + 2), 4.5))
    for i, mode in enumerate(MODES):
        ax.bar(x + (i - 0.5) * width, [g[f"{mode}_mean"] for g in per_goal], width, color=COLORS[mode], label=f"{mode} AD")
    ax.hlines(
        [g["optimum"] for g in per_goal],
        x - 1.2 * width,
        x + 1.2 * width,
        colors="black",
        linewidth=2.5,
        zorder=3,
        label="oracle optimum",
    )
    ax.set_xticks(x, [f"{g['goal']}\n{g['task']}" for g in per_goal], fontsize=7)
    ax.set(
        xlabel="held-out task: index and description",
        ylabel="mean return per episode",
        title="Held-out goals: in-context return vs the oracle",
        ylim=(0, max(g["optimum"] for g in per_goal) * 1.15),
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right", ncols=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_comparable(runs: dict, standard_dir, compressed_dir) -> None:
    """Refuse two runs evaluated on different goals or with different episode / stream / seed settings."""
    std_eval, cmp_eval = runs["standard"]["eval"], runs["compressed"]["eval"]
    if [g["goal"] for g in std_eval["per_goal"]] != [g["goal"] for g in cmp_eval["per_goal"]]:
        raise UserError(
            f"{standard_dir} and {compressed_dir} were evaluated on different goals; evaluate both with the same split"
        )
    for key in ("eval_episodes", "eval_streams", "eval_seed"):
        a, b = std_eval.get("eval_config", {}).get(key), cmp_eval.get("eval_config", {}).get(key)
        if a != b:
            raise UserError(f"{standard_dir} and {compressed_dir} were evaluated with {key}={a} vs {b}; "
                            f"evaluate both with the same {key} (evaluate.py {key}=... --force)")


def compare_stats(runs: dict) -> dict:
    """report.json's numbers from `read_results` of both modes: {"metrics": {row: {mode: value}}, "per_goal": [...]}."""
    std_eval, cmp_eval = runs["standard"]["eval"], runs["compressed"]["eval"]
    metrics = {}
    for key, _, source, src_key, _ in ROWS:
        metrics[key] = {mode: _value(run, source, src_key) for mode, run in runs.items()}
    metrics["mean_return_ci95"] = {mode: _value(run, "eval", "ci95") for mode, run in runs.items()}
    per_goal = []
    for gs, gc in zip(std_eval["per_goal"], cmp_eval["per_goal"], strict=True):
        per_goal.append(
            {
                "goal": gs["goal"],
                "task": task_label(gs),
                "optimum": gs["optimum"],
                "standard_mean": gs["mean"],
                "compressed_mean": gc["mean"],
                "standard_normalized": gs["normalized"],
                "compressed_normalized": gc["normalized"],
                "standard_last100": gs["last100"],
                "compressed_last100": gc["last100"],
                "standard_last100_normalized": gs["last100_normalized"],
                "compressed_last100_normalized": gc["last100_normalized"],
            }
        )
    return {"metrics": metrics, "per_goal": per_goal}


def render_report(runs: dict, stats: dict) -> str:
    """report.md from the runs and `compare_stats`'s dict."""
    metrics, per_goal = stats["metrics"], stats["per_goal"]
    env = runs["standard"]["eval"].get("env", "darkroom")
    lines = [f"# Standard vs compressed-context AD on held-out {env} tasks", ""]
    for mode, run in runs.items():
        ev = run["eval"]
        lines.append(
            f"- {mode}: `{run['dir']}` ({ev['n_episodes']} episodes x {ev['n_goals']} goals x "
            f"{ev['n_streams']} streams; " + ", ".join(f"{k}={v}" for k, v in ev.get("eval_config", {}).items()) + ")"
        )
    lines += ["", "| metric | standard | compressed |", "|---|---:|---:|"]
    for key, label, _, _, fmt in ROWS:
        cells = []
        for mode in MODES:
            ci = metrics["mean_return_ci95"][mode] if key == "mean_return" else None
            cells.append(_cell(metrics[key][mode], fmt, ci))
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    for mode, run in runs.items():
        t = run["train"]
        if t.get("steps_this_session", t["steps"]) != t["steps"]:
            lines.append(
                f"\n{mode}: resumed run; speed, memory and time are of the last session "
                f"({t['steps_this_session']} of {t['steps']} steps)."
            )
    lines += [
        "",
        "Val metrics are teacher-forced on the validation goals' PPO histories, at the end of training; the return rows "
        "are in-context rollouts on the evaluated split (actions sampled, no weight updates). `</compress>` "
        "precision/recall count a close as correct "
        "when it falls on the true region grid. Before/after a prune: reward per step in the episode-length "
        "window before vs after the oldest region is dropped.",
        "",
        "## Per evaluated goal",
        "",
        "Mean return over all episodes and streams, over the last 100 episodes, and that last-100 mean as a fraction "
        "of the goal's optimum.",
        "",
        "| goal | task | optimum | standard mean | compressed mean | standard normalised | compressed normalised "
        "| standard last 100 | compressed last 100 | standard last 100 / opt | compressed last 100 / opt |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for g in per_goal:
        lines.append(
            f"| {g['goal']} | {g['task']} | {g['optimum']:.0f} | {g['standard_mean']:.2f} | "
            f"{g['compressed_mean']:.2f} | {g['standard_normalized']:.3f} | {g['compressed_normalized']:.3f} | "
            f"{g['standard_last100']:.2f} | {g['compressed_last100']:.2f} | {g['standard_last100_normalized']:.3f} | "
            f"{g['compressed_last100_normalized']:.3f} |"
        )
    lines += ["", "![learning curves](learning_curves.png)", "", "![per goal](per_goal.png)", ""]
    return "\n".join(lines)


def write_report(standard_dir: str | Path, compressed_dir: str | Path, out_dir: str | Path) -> dict:
    """Write report.md, report.json, learning_curves.png and per_goal.png to `out_dir`; returns report.json's dict."""
    runs = {mode: read_results(Path(d), mode) for mode, d in (("standard", standard_dir), ("compressed", compressed_dir))}
    check_comparable(runs, standard_dir, compressed_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = compare_stats(runs)
    markdown = render_report(runs, stats)
    std_eval = runs["standard"]["eval"]
    plot_learning_curves(runs, std_eval["optimum_mean"], out_dir / "learning_curves.png", std_eval.get("env", "darkroom"))
    plot_per_goal(stats["per_goal"], out_dir / "per_goal.png")
    report = {
        "runs": {mode: str(run["dir"]) for mode, run in runs.items()},
        "metrics": stats["metrics"],
        "per_goal": stats["per_goal"],
        "plots": ["learning_curves.png", "per_goal.png"],
    }
    (out_dir / "report.md").write_text(markdown)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    return report


def main():
    parser = make_parser(__doc__)
    parser.add_argument("--standard", required=True, help="run dir of the standard-mode run (trained and evaluated)")
    parser.add_argument("--compressed", required=True, help="run dir of the compressed-mode run (trained and evaluated)")
    parser.add_argument("--out-dir", default="runs/compare", help="directory for report.md, report.json and the PNGs")
    add_renamed_flag(parser, "--out", "--out-dir")
    args = parser.parse_args()
    write_report(args.standard, args.compressed, args.out_dir)
    out = Path(args.out_dir)
    print((out / "report.md").read_text())
    for name in ("report.md", "report.json", "learning_curves.png", "per_goal.png"):
        print(f"wrote {out / name}")


if __name__ == "__main__":
    run_main(main)
