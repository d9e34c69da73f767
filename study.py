"""The study: does compressed-context AD learn in context as well as standard AD? One command, several training seeds,
four arms, tuned on validation goals only, reported on the test goals with rliable statistics.

    python study.py                                     # defaults: seeds 0,1,2; all four arms; eval seeds 0-3
    python study.py --seeds 0 --arms compressed,compressed-fixed --runs-root /tmp/study train_timesteps=500
    python study.py --env dark_key_to_door             # another env: its configs (common.ENV_CONFIGS), runs/study-<env>

Arms (docs/design.md §8; named by Darkroom's sizes, the windows are in rollouts whatever the env's n_steps):
- standard-240: standard AD, a FIFO window of 3 PPO rollouts (3 x n_steps = 240 steps), shifted by one rollout.
- standard-160: standard AD with a window of 2 rollouts (160 steps): the context budget of compressed mode.
- compressed: compressed AD, the model's `</compress>` closes a region and prunes the oldest (the env's compressed config's
  max_regions: 2, or 3 on Key-to-Door).
- compressed-fixed: the compressed checkpoint, pruning every compress_interval steps whatever the head says.

Stages (each skipped where its output exists and matches; interrupt and re-run the same command to resume):
1. collect the PPO histories (collect.py) unless the history file is complete for this config;
2. train every (trained arm, seed) with train.py, `--jobs` runs at once with one thread each;
3. tune: for each arm its own eval_temperature from `--temperatures`, chosen by the mean optimum-normalised return
   over the VALIDATION goals (all seeds, `--tune-episodes` episodes, evaluation seed 1000): the same budget per arm;
4. test: each (arm, seed) on the TEST goals with every evaluation seed at its chosen temperature;
5. report: RUNS_ROOT/report.md, report.json, learning_curves.png, aggregates.png (study_stats.py, rliable).
Overrides `key=value` go to every training (and fix the evaluation keys, e.g. eval_episodes=200).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from common import CONFIG_DIR, ENV_CONFIGS, ENV_KEYS, EVAL_KEYS, UserError, env_configs, load_config, parse_overrides, run_main

ARMS = ("standard-240", "standard-160", "compressed", "compressed-fixed")  # the default study
OPTIONAL_ARMS = ("compressed-adaptive",)  # Darkroom histories whose rollout length differs by stream (its own file)
TRAINED = {  # arm -> (the env's model config: standard, compressed or adaptive, extra overrides from its n_steps);
    # compressed-fixed reuses compressed
    "standard-240": ("standard", lambda n: [f"n_transit={3 * n}", f"eval_window_shift={n}"]),
    "standard-160": ("standard", lambda n: [f"n_transit={2 * n}", f"eval_window_shift={n}"]),
    "compressed": ("compressed", lambda n: []),
    "compressed-adaptive": ("adaptive", lambda n: []),
}
CHECKPOINT_OF = {"standard-240": "standard-240", "standard-160": "standard-160", "compressed": "compressed",
                 "compressed-fixed": "compressed", "compressed-adaptive": "compressed-adaptive"}
EVAL_PRUNE = {"compressed": "model", "compressed-fixed": "fixed", "compressed-adaptive": "model"}
ADAPTIVE = {"collect": CONFIG_DIR / "algorithm" / "ppo_darkroom_adaptive_streams.yaml",
            "model": CONFIG_DIR / "model" / "ad_dr_adaptive.yaml"}
TUNE_EVAL_SEED = 1000  # validation rollouts use their own sampling seed, never one of the test evaluation seeds
COLORS = {"standard-240": "tab:blue", "standard-160": "tab:cyan", "compressed": "tab:green", "compressed-fixed": "tab:olive",
          "compressed-adaptive": "tab:purple", "PPO (source)": "tab:gray"}


def say(msg: str) -> None:
    print(f"[study] {msg}", flush=True)


# ---- stage 1-2: data and training ---------------------------------------------------------------------------------
def arm_configs(env: str, arm: str) -> tuple[Path, Path]:
    """(collection config, model config) an arm trains with."""
    mode = TRAINED[CHECKPOINT_OF[arm]][0]
    if mode == "adaptive":
        if env != "darkroom":
            raise UserError(f"arm {arm} exists for darkroom only (config/model/ad_dr_adaptive.yaml); drop it from --arms")
        return ADAPTIVE["collect"], ADAPTIVE["model"]
    return env_configs(env)["collect"], env_configs(env)[mode]


def stage_collect(overrides: list[str], env: str, arms: list[str]) -> None:
    """For each history the arms train on: collect every task unless the file of that config exists and holds the
    validation and test tasks (training uses whichever training tasks it holds; a file of another config is refused)."""
    from common import history_path
    from env import selected_tasks, task_split
    from example_compressed_training import history_problem, run_stage

    for config in sorted({arm_configs(env, a)[0] for a in arms}):
        keys = set(load_config(config)) | set(ENV_KEYS)
        over = [o for o in overrides if o.split("=", 1)[0].strip() in keys]
        cfg = load_config(config, over)
        path = history_path(cfg)
        problem = history_problem(path, sorted(task_split(cfg, "val") + task_split(cfg, "test")), cfg)
        if problem is None:
            say(f"skip collection: {path} holds the validation and test goals")
            continue
        say(f"history {path} {problem}: collecting all {len(selected_tasks(cfg))} goals")
        run_stage("collect", "collect.py", ["--config", str(config), *(["--force"] if path.exists() else []), *over])


def run_dir_of(root: Path, arm: str, seed: int) -> Path:
    return root / "runs" / f"{CHECKPOINT_OF[arm]}-seed{seed}"


def train_config(arm: str, seed: int, overrides: list[str], env: str) -> tuple[Path, list[str]]:
    """(model config, overrides) one (arm, seed) trains with."""
    _, extra = TRAINED[arm]
    config = arm_configs(env, arm)[1]
    return config, [*overrides, *extra(load_config(config, overrides)["n_steps"]), f"seed={seed}"]


def finished(run_dir: Path, steps: int, cfg: dict | None = None) -> bool:
    """Has `run_dir` a finished training? With `cfg` (what the study would train), one trained with another config is
    refused rather than skipped: a changed config key must never reuse an old run's weights."""
    summary = run_dir / "train_summary.json"
    if not (summary.is_file() and json.loads(summary.read_text())["steps"] >= steps):
        return False
    saved = run_dir / "config.yaml"
    if cfg is not None and saved.is_file():
        from train import config_diff

        diff = config_diff(yaml.safe_load(saved.read_text()), cfg)
        if diff:
            raise UserError(f"{run_dir} was trained with {diff}; move it away (or pass another --runs-root) to train "
                            "this config")
    return True


def stage_train(root: Path, arms: list[str], seeds: list[int], overrides: list[str], jobs: int, env: str) -> int:
    """Train every (arm, seed) not finished yet; returns how many were trained."""
    from example_compressed_training import run_concurrently, run_stage

    todo = []
    for seed in seeds:
        for arm in sorted({CHECKPOINT_OF[a] for a in arms}, key=list(TRAINED).index):
            run_dir = run_dir_of(root, arm, seed)
            config, over = train_config(arm, seed, overrides, env)
            cfg = load_config(config, over)  # each arm's own budget: the configs may set different train_timesteps
            if finished(run_dir, cfg["train_timesteps"], cfg):
                say(f"skip training {arm} seed {seed}: {run_dir} is finished")
            else:
                args = ["--config", str(config), "--run-dir", str(run_dir), *over]
                todo.append((f"train {arm} seed {seed}", args, run_dir / "train.log"))
    if jobs == 1:
        for name, args, _ in todo:
            run_stage(name, "train.py", args)
        return len(todo)
    # the longest first (standard-240 of every seed), so that the two cores stay busy to the end
    cost = {"standard-240": 3, "standard-160": 2, "compressed": 2, "compressed-adaptive": 3}
    todo.sort(key=lambda job: -cost[job[0].split()[1]])
    run_concurrently({name: ("train.py", args, log) for name, args, log in todo}, max_jobs=jobs)
    return len(todo)


# ---- stage 3-4: in-context evaluations (worker processes, one thread each) -------------------------------------------
def _evaluate(spec: dict) -> dict:
    """One in-context evaluation of a checkpoint; returns the returns array and what the report needs."""
    import torch

    import evaluate
    from env import task_split

    torch.set_num_threads(1)
    model, cfg = evaluate.load_run(Path(spec["run_dir"]), spec["overrides"], "cpu")
    goals = task_split(cfg, spec["split"])
    start = time.perf_counter()
    res = evaluate.run_in_context(model, cfg, goals, n_streams=cfg["eval_streams"], n_episodes=cfg["eval_episodes"],
                                  seed=cfg["eval_seed"], temperature=cfg["eval_temperature"], progress=False)
    s = evaluate.summarize(res, goals, cfg)
    comp = s.get("compression", {})

    def number(key: str) -> float:  # None (no n_steps grid to score against: per-task rollout lengths) -> NaN, so the
        value = comp.get(key)       # .npz holds plain floats and loads without pickle
        return np.nan if value is None else float(value)

    return {"returns": res["returns"].astype(np.int16), "goals": np.array(goals), "seconds": time.perf_counter() - start,
            "n_forced_closes": comp.get("n_forced_closes", 0), "n_closes": comp.get("n_closes", 0),
            "precision_compress_end": number("precision_compress_end"), "recall_compress_end": number("recall_compress_end")}


def eval_path(root: Path, arm: str, seed: int, split: str, temperature: float, eval_seed: int, episodes: int) -> Path:
    return root / "evals" / f"{arm}-seed{seed}-{split}-T{temperature:g}-e{eval_seed}-n{episodes}.npz"


def run_evals(root: Path, specs: list[dict], jobs: int, what: str) -> int:
    """Evaluate every spec whose .npz is missing (or is of other weights), `jobs` at a time; returns how many ran."""
    todo = []
    for spec in specs:
        path = Path(spec["path"])
        digest = json.loads((Path(spec["run_dir"]) / "train_summary.json").read_text())["weights_sha256_per_rank"][0]
        if path.is_file() and str(np.load(path)["weights_sha256"]) == digest:
            continue
        todo.append(spec | {"digest": digest})
    say(f"{what}: {len(specs) - len(todo)} evaluations done before, {len(todo)} to run ({jobs} at a time)")
    if not todo:
        return 0
    (root / "evals").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with mp.get_context("fork").Pool(jobs) as pool:
        for i, (spec, out) in enumerate(zip(todo, pool.imap(_evaluate, todo), strict=True)):
            tmp = Path(spec["path"]).with_suffix(".tmp.npz")
            np.savez(tmp, weights_sha256=spec["digest"], **out)
            os.replace(tmp, spec["path"])
            say(f"  {i + 1}/{len(todo)} {Path(spec['path']).name}: mean return {out['returns'].mean():.2f} "
                f"({time.perf_counter() - start:.0f} s)")
    return len(todo)


def eval_spec(root: Path, arm: str, seed: int, split: str, temperature: float, eval_seed: int, episodes: int,
              eval_overrides: list[str]) -> dict:
    over = [*eval_overrides, f"eval_temperature={temperature}", f"eval_seed={eval_seed}", f"eval_episodes={episodes}"]
    if arm in EVAL_PRUNE:
        over.append(f"eval_prune={EVAL_PRUNE[arm]}")
    return {"run_dir": str(run_dir_of(root, arm, seed)), "overrides": over, "split": split,
            "path": str(eval_path(root, arm, seed, split, temperature, eval_seed, episodes))}


def load_returns(root: Path, arm: str, seeds: list[int], split: str, temperature: float, eval_seeds: list[int],
                 episodes: int) -> tuple[np.ndarray, dict]:
    """[n_seeds, n_goals, n_eval_seeds x n_streams, n_episodes] returns of one arm, plus the evaluations' side numbers."""
    per_seed, side = [], {"n_forced_closes": 0, "n_closes": 0, "precision": [], "recall": [], "seconds": []}
    for seed in seeds:
        parts = []
        for e in eval_seeds:
            z = np.load(eval_path(root, arm, seed, split, temperature, e, episodes))
            parts.append(z["returns"].astype(np.float64))
            side["n_forced_closes"] += int(z["n_forced_closes"])
            side["n_closes"] += int(z["n_closes"])
            side["precision"].append(float(z["precision_compress_end"]))
            side["recall"].append(float(z["recall_compress_end"]))
            side["seconds"].append(float(z["seconds"]))
            side["goals"] = z["goals"].tolist()
        per_seed.append(np.concatenate(parts, axis=1))
    return np.stack(per_seed), side


def stage_tune(root: Path, out: Path, cfg: dict, arms: list[str], seeds: list[int], temperatures: list[float], episodes: int,
               eval_overrides: list[str], jobs: int) -> tuple[dict[str, float], int]:
    """Each arm's eval_temperature: the best mean normalised return on the validation goals (same grid for every arm),
    and how many validation evaluations ran."""
    from env import task_family, task_split

    specs = [eval_spec(root, arm, s, "val", t, TUNE_EVAL_SEED, episodes, eval_overrides)
             for arm in arms for s in seeds for t in temperatures]
    n_run = run_evals(root, specs, jobs, "tune on the validation goals")
    opt = np.array([task_family(cfg).optimal_return(g, cfg) for g in task_split(cfg, "val")], dtype=np.float64)
    chosen, table = {}, {}
    for arm in arms:
        scores = {}
        for t in temperatures:
            R, _ = load_returns(root, arm, seeds, "val", t, [TUNE_EVAL_SEED], episodes)
            scores[t] = float((R.mean(axis=(0, 2, 3)) / opt).mean())
        chosen[arm] = max(temperatures, key=lambda t: scores[t])  # ties: the first in the grid
        table[arm] = scores
        say(f"tune {arm}: val normalised return " + ", ".join(f"T={t:g} {v:.3f}" for t, v in scores.items())
            + f" -> T={chosen[arm]:g}")
    (out / "tuning.json").write_text(json.dumps({"temperatures": chosen, "val_scores": {
        a: {f"{t:g}": v for t, v in s.items()} for a, s in table.items()}, "episodes": episodes}, indent=1))
    return chosen, n_run


# ---- stage 5: the report --------------------------------------------------------------------------------------------
def ppo_curve(cfg: dict, goals: list[int]) -> tuple[np.ndarray, int]:
    """The source PPO's own learning curve on `goals`: [n_goals, n_episodes] return per episode (mean over streams),
    and the number of streams."""
    from common import history_path
    from history import open_history

    H = cfg["horizon"]
    with open_history(history_path(cfg)) as f:
        out = []
        for g in goals:
            r = f[str(g)]["rewards"][:].astype(np.float64)  # [T, S]
            out.append(r.reshape(-1, H, r.shape[1]).sum(1).mean(1))  # episodes of every stream are aligned in time
    return np.stack(out), r.shape[1]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fmt_ci(x: float, ci: list[float], f: str = "{:.3f}") -> str:
    return f"{f.format(x)} [{f.format(ci[0])}, {f.format(ci[1])}]"


def arm_windows(cfg: dict, arms: list[str], regions: int = 2) -> str:
    """The arms' context sizes in this env's steps (the arm names are Darkroom's: 240 = 3 x 80, 160 = 2 x 80)."""
    n = cfg["n_steps"]

    def window(k: int) -> str:
        return f"a window of {k} rollouts" + (f" = {k * n} steps" if isinstance(n, int) else "")

    size = {"standard-240": window(3), "standard-160": window(2),
            "compressed": f"the last {regions} regions (rollouts), closed by its </compress> head",
            "compressed-fixed": "the compressed checkpoint, closing every compress_interval steps",
            "compressed-adaptive": "compressed on histories with PPO rollouts of 40, 80 and 120 steps in every goal "
                                   "(one learner per length), closed by its </compress> head"}
    return f"Arms ({cfg.get('env', 'darkroom')}, PPO rollouts of {n} steps): " + "; ".join(f"{a}: {size[a]}" for a in arms) + "."


def write_report(root: Path, out: Path, cfg: dict, arms: list[str], seeds: list[int], eval_seeds: list[int],
                 temps: dict[str, float], episodes: int, reps: int, regions: int = 2) -> dict:
    import study_stats as st
    from env import task_family, task_split

    goals = task_split(cfg, "test")
    opt = np.array([task_family(cfg).optimal_return(g, cfg) for g in goals], dtype=np.float64)
    returns, side = {}, {}
    for arm in arms:
        returns[arm], side[arm] = load_returns(root, arm, seeds, "test", temps[arm], eval_seeds, episodes)
        assert side[arm]["goals"] == goals, "evaluations of other goals than the test split"
    scores = {a: st.run_scores(R, opt) for a, R in returns.items()}
    last = max(1, episodes // 5)  # the last fifth: 100 of Darkroom's 500 episodes, 20 of the 50-step envs' 100
    scores_last = {a: st.run_scores(R, opt, last=last) for a, R in returns.items()}
    agg, agg_last = st.aggregate(scores, reps=reps), st.aggregate(scores_last, reps=reps)
    pairs = [(a, b) for a, b in (("compressed", "standard-240"), ("compressed", "standard-160"),
                                 ("compressed", "compressed-fixed"), ("standard-160", "standard-240"),
                                 ("compressed-adaptive", "compressed")) if a in arms and b in arms]
    poi = st.probability_of_improvement(scores, pairs, reps=reps)
    diffs = {f"{a} vs {b}": st.paired_goal_differences(returns[a], returns[b], opt, reps=reps) for a, b in pairs}
    to90 = {a: st.episodes_to_threshold(R, opt, 0.9, window=10, reps=reps) for a, R in returns.items()}
    first = {a: st.first_reward_episode(R) for a, R in returns.items()}
    curves = {a: st.curve_with_ci(R, opt, reps=min(reps, 1000)) for a, R in returns.items()}
    ppo, n_ppo_streams = ppo_curve(cfg, goals)  # [goals, episodes]
    train = {}
    for arm in arms:
        ts = [json.loads((run_dir_of(root, arm, s) / "train_summary.json").read_text()) for s in seeds]
        train[arm] = {k: float(np.mean([t[k] for t in ts])) for k in ("seconds", "steps_per_s", "targets_per_s", "peak_rss_mb")}
        train[arm]["val_return_end"] = float(np.mean([t.get("val/return", np.nan) for t in ts]))

    n_runs = len(seeds) * returns[arms[0]].shape[2]
    main_pair = "compressed vs standard-240"
    L = [f"# Study: standard vs compressed-context AD on the {len(goals)} held-out test goals", "",
         f"Training seeds {seeds}; evaluation seeds {eval_seeds} x {returns[arms[0]].shape[2] // len(eval_seeds)} streams "
         f"= {n_runs} runs per goal and arm; {episodes} in-context episodes (no weight updates). Temperatures were chosen "
         "per arm on the validation goals (tuning.json); the test goals were evaluated once, at those temperatures. "
         f"Scores are returns / each goal's optimum; 95 % intervals are stratified bootstraps ({reps} replicates) "
         "over runs within goals (rliable).", "", arm_windows(cfg, arms, regions), "",
         f"| arm | T (val) | mean, all episodes | IQM, all episodes | mean, last {last} | IQM, last {last} | episodes to 90 % "
         "(median) | first reward (median / p90 / max) |", "|---|---:|---|---|---|---|---|---|"]
    for a in arms:
        e90 = to90[a]
        L.append(f"| {a} | {temps[a]:g} | {fmt_ci(agg[a]['mean'], agg[a]['mean_ci'])} "
                 f"| {fmt_ci(agg[a]['iqm'], agg[a]['iqm_ci'])} "
                 f"| {fmt_ci(agg_last[a]['mean'], agg_last[a]['mean_ci'])} | {fmt_ci(agg_last[a]['iqm'], agg_last[a]['iqm_ci'])} "
                 f"| {fmt_ci(e90['median'], e90['median_ci'], '{:.0f}')} (never: {e90['never_frac']:.1%}) "
                 f"| {first[a]['median']:.0f} / {first[a]['p90']:.0f} / {first[a]['max']:.0f} |")
    L += ["", "## Comparisons", "", "| comparison | P(improvement) [95 % CI] | mean normalised difference [95 % CI] | reading |",
          "|---|---|---|---|"]
    for key in poi:
        d = diffs[key]
        L.append(f"| {key} | {fmt_ci(poi[key]['p'], poi[key]['ci'], '{:.2f}')} | {fmt_ci(d['mean_diff'], d['ci'], '{:+.3f}')} "
                 f"| {d['description']} |")
    L += ["", "The difference interval resamples training seeds (one draw for all goals: one model plays every goal), then "
          "streams within each seed and goal; P(improvement) is rliable's (the chance a random run of the first arm beats one "
          "of the second on a goal, averaged over goals; 0.5 = no difference).", "",
          "## Per goal (mean normalised return over all episodes"
          + ("; difference compressed - standard-240)" if main_pair in diffs else ")"), "",
          "| goal | optimum | " + " | ".join(arms) + (" | difference [95 % CI] |" if main_pair in diffs else " |"),
          "|---:|---:|" + "---:|" * len(arms) + ("---|" if main_pair in diffs else "")]
    for i, g in enumerate(goals):
        cells = " | ".join(f"{(returns[a][:, i].mean() / opt[i]):.3f}" for a in arms)
        extra = ""
        if main_pair in diffs:
            d = diffs[main_pair]
            extra = f" {d['per_goal_diff'][i]:+.3f} [{d['per_goal_ci'][i][0]:+.3f}, {d['per_goal_ci'][i][1]:+.3f}] |"
        L.append(f"| {g} | {opt[i]:.0f} | {cells} |{extra}")
    L += ["", "## Cost", "", "| arm | training s (mean over seeds) | steps/s | targets/s | peak RSS MB | val return at the end "
          "of training | eval s per run | `</compress>` closes / forced |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for a in arms:
        t, sd = train[a], side[a]
        comp = f"{sd['n_closes']} / {sd['n_forced_closes']}" if a in EVAL_PRUNE else ""
        L.append(f"| {a} | {t['seconds']:.0f} | {t['steps_per_s']:.2f} | {t['targets_per_s']:,.0f} | {t['peak_rss_mb']:.0f} | "
                 f"{t['val_return_end']:.2f} | {np.mean(sd['seconds']):.1f} | {comp} |")
    ppo_norm = (ppo / opt[:, None]).mean(0)
    L += ["", f"Source PPO on the same goals (its own learning, {ppo.shape[1]} episodes per stream, {n_ppo_streams} streams "
          f"sharing one learner): "
          f"normalised return {ppo_norm[0]:.3f} in its first episode, {ppo_norm[-10:].mean():.3f} over its last 10.",
          "", "![learning curves](learning_curves.png)", "", "![aggregates](aggregates.png)", ""]

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    for a in arms:
        c = curves[a]
        x = np.arange(1, len(c["mean"]) + 1)
        ax.plot(x, c["mean"], color=COLORS[a], label=f"{a} (T={temps[a]:g})", linewidth=1.6)
        ax.fill_between(x, c["lo"], c["hi"], color=COLORS[a], alpha=0.2)
    ax.plot(np.arange(1, len(ppo_norm) + 1), ppo_norm, color=COLORS["PPO (source)"], linestyle="-.",
            label="PPO learning (source of the histories)")
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="oracle")
    ax.set(xlabel="episode", ylabel="return / optimum (mean over goals, runs)", ylim=(0, 1.08),
           title=f"In-context learning on {len(goals)} test goals ({len(seeds)} training seeds, 95 % bootstrap bands)")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=120)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, (name, res) in zip(axes, (("all episodes", agg), (f"last {last} episodes", agg_last)), strict=True):
        for i, a in enumerate(arms):
            for j, (m, key) in enumerate((("mean", "mean_ci"), ("iqm", "iqm_ci"))):
                y = i + (j - 0.5) * 0.3
                lo, hi = res[a][key]
                ax.errorbar(res[a][m], y, xerr=[[res[a][m] - lo], [hi - res[a][m]]], fmt="o" if m == "mean" else "s",
                            color=COLORS[a], capsize=3, label=m.upper() if i == 0 else None)
        ax.set_yticks(range(len(arms)), arms)
        ax.set(xlabel="normalised return", title=name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "aggregates.png", dpi=120)
    plt.close(fig)

    report = {"seeds": seeds, "eval_seeds": eval_seeds, "episodes": episodes, "goals": goals, "temperatures": temps,
              "aggregate": agg, "last_episodes": last, "aggregate_last": agg_last, "probability_of_improvement": poi,
              "paired_differences": {k: {kk: vv for kk, vv in d.items()} for k, d in diffs.items()},
              "episodes_to_90": {a: {k: v for k, v in d.items() if k != "values"} for a, d in to90.items()},
              "first_reward": {a: {k: v for k, v in d.items() if k != "values"} for a, d in first.items()},
              "training": train, "ppo_normalised_curve": ppo_norm.tolist(),
              "compression": {a: {k: side[a][k] for k in ("n_closes", "n_forced_closes")} for a in arms if a in EVAL_PRUNE}}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text("\n".join(L))
    return report


def parse_list(text: str, kind, flag: str, allowed=None) -> list:
    try:
        items = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} must be a comma-separated list, got {text!r}") from None
    bad = [x for x in items if allowed is not None and x not in allowed]
    if bad or not items:
        raise UserError(f"{flag}: {bad[0] if bad else 'nothing'} is not one of {', '.join(map(str, allowed or []))}")
    return items


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", choices=list(ENV_CONFIGS), default="darkroom",
                        help="the env whose collection and model configs to use (default: darkroom)")
    parser.add_argument("--runs-root", default=None,
                        help="where runs/, evals/ and the report go (default: runs/study, runs/study-<env> for other envs)")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds (default: 0,1,2)")
    parser.add_argument("--arms", default=",".join(ARMS),
                        help=f"arms (default: {','.join(ARMS)}; also: {','.join(OPTIONAL_ARMS)})")
    parser.add_argument("--report-dir", default=None,
                        help="where the report goes (default: --runs-root); e.g. a second report over other arms")
    parser.add_argument("--eval-seeds", default="0,1,2,3", help="evaluation seeds on the test goals (default: 0,1,2,3)")
    parser.add_argument("--temperatures", default="0.5,0.7,1.0", help="eval_temperature grid tuned per arm on validation goals")
    parser.add_argument("--tune-episodes", type=int, default=200, help="episodes of each validation rollout (default: 200)")
    parser.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                        help="trainings / evaluations at once, one thread each (default: min(2, cores))")
    parser.add_argument("--reps", type=int, default=2000, help="bootstrap replicates (default: 2000)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every training and evaluation")
    args = parser.parse_args()
    seeds = parse_list(args.seeds, int, "--seeds")
    arms = parse_list(args.arms, str, "--arms", ARMS + OPTIONAL_ARMS)
    eval_seeds = parse_list(args.eval_seeds, int, "--eval-seeds")
    temperatures = parse_list(args.temperatures, float, "--temperatures")
    if TUNE_EVAL_SEED in eval_seeds:
        raise UserError(f"--eval-seeds may not include {TUNE_EVAL_SEED}: that seed is the validation rollouts'")
    root = Path(args.runs_root or ("runs/study" if args.env == "darkroom" else f"runs/study-{args.env}"))
    given = parse_overrides(args.overrides)
    eval_keys = {"eval_streams", "eval_cache", "traj_dir"}
    fixed_here = sorted(set(given) & set(EVAL_KEYS) - eval_keys - {"eval_episodes"})
    if fixed_here:  # the study sets these per arm / by tuning; a cached evaluation would silently ignore a new value
        raise UserError(f"{fixed_here[0]} is set by the study itself (per arm, --temperatures, --eval-seeds), not by an "
                        "override; evaluate a run with evaluate.py to try another value")
    train_overrides = [o for o in args.overrides if o.split("=", 1)[0].strip() not in {"eval_episodes"}]
    eval_overrides = [o for o in args.overrides if o.split("=", 1)[0].strip() in eval_keys - {"traj_dir"}]
    configs = env_configs(args.env)
    episodes = int(given.get("eval_episodes", load_config(configs["standard"])["eval_episodes"]))
    for a in arms:  # every config must load before anything runs
        load_config(arm_configs(args.env, a)[1], train_overrides)
    root.mkdir(parents=True, exist_ok=True)
    (root / "study_command.txt").write_text("python study.py " + " ".join(sys.argv[1:]) + "\n")
    start = time.perf_counter()

    stage_collect(train_overrides, args.env, arms)
    t_collect = time.perf_counter() - start
    n_trained = stage_train(root, arms, seeds, train_overrides, args.jobs, args.env)
    t_train = time.perf_counter() - start - t_collect
    cfg = load_config(configs["standard"], train_overrides)
    report_dir = Path(args.report_dir) if args.report_dir else root
    report_dir.mkdir(parents=True, exist_ok=True)
    temps, n_tuned = stage_tune(root, report_dir, cfg, arms, seeds, temperatures, args.tune_episodes, eval_overrides, args.jobs)
    specs = [eval_spec(root, a, s, "test", temps[a], e, episodes, eval_overrides)
             for a in arms for s in seeds for e in eval_seeds]
    n_tested = run_evals(root, specs, args.jobs, "test evaluation")
    t_eval = time.perf_counter() - start - t_collect - t_train
    regions = load_config(configs["compressed"], train_overrides)["max_regions"]  # the compressed arms' budget
    write_report(root, report_dir, cfg, arms, seeds, eval_seeds, temps, episodes, args.reps, regions)
    total = time.perf_counter() - start
    timing = {"collect_s": t_collect, "train_s": t_train, "evaluate_s": t_eval, "total_s": total,
              "trained_runs": n_trained, "evaluations_run": n_tuned + n_tested}
    if n_trained or n_tuned + n_tested or not (report_dir / "timing.json").is_file():
        (report_dir / "timing.json").write_text(json.dumps(timing, indent=1))
    else:  # a rerun that only rewrote the report: the timing of the run that did the work stays
        say(f"nothing trained or evaluated: kept {report_dir / 'timing.json'} of the run that did the work")
    print((report_dir / "report.md").read_text())
    say(f"wrote {report_dir / 'report.md'}, report.json, learning_curves.png, aggregates.png in {total:.0f} s "
        f"(collect {t_collect:.0f} s, train {t_train:.0f} s, evaluate {t_eval:.0f} s)")


if __name__ == "__main__":
    run_main(main)
