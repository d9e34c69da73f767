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
Optional arms (`--arms`; not in the default study, so its cost is unchanged):
- compressed-stride<s> (s >= 2): compressed AD trained with region_stride=s (samples C r_{k-s} E C r_k), evaluated as
  compressed; compressed-stride<s>-any (s >= 1): the same with first_region_any=true (the one-region samples' region
  drawn from the whole history, not only PPO's first s rollouts);
- dpt: DPT (Lee et al. 2023), standard-240's model and window trained with target=oracle (the env's optimal action at
  every step; config/model/ad_dr_dpt.yaml on Darkroom), evaluated in context like AD;
- searcher: the hand-written searcher with memory across episodes (searcher.py), on the same test streams
  (eval_streams x every evaluation seed); not trained, no temperature;
- ppo: the source PPO's own learning, per stream, from the history file's rewards (each update pools a goal's n_stream
  streams); not trained or evaluated, no temperature; source-eps: the same for the AD-eps source (compressed-eps's).
- compressed-adaptive: compressed AD on Darkroom histories whose rollout length differs by stream (its own file).
- compressed-eps: compressed AD on histories of the AD-eps source (the searcher, with the noise falling region by region
  that config/algorithm/searcher_eps_<env>.yaml sets: none, chosen on Darkroom's validation goals; its own file) instead
  of PPO's; the env's config/model/ad_{dr,kd,dp}_eps.yaml; compressed-eps-stride<s> (s >= 2): the same with
  region_stride=s. The noise is the collection config's (override source_eps_start / source_eps_regions for another).
- compressed-summary: compressed AD with summary tokens (summary.py): max_regions raw regions plus the summaries
  of older ones, the env's config/model/ad_{dr,kd,dp}_summary.yaml (one recurrent summary, chosen on validation goals:
  docs/experiments.md E41), evaluated with the model's `</compress>`; compressed-summary-accumulate: the same config
  with the other variant (summary_mode=accumulate: the summaries of the last 3 pruned regions kept, trained as far back);
  compressed-summary-feedback: the same config with summary_mode=feedback (every layer reads a pruned summary through
  its last-layer states, so content travels past n_layer regions: model/summary.py);
  compressed-summary-back<b> (b >= 1): the summary config trained with summary_train_regions=b (b pruned regions in
  front of each sample: the summary chain backpropagated b closes deep; the config's own b is compressed-summary; in
  recurrent mode a sample computes every decision as evaluation does from b = n_layer + 1 - max_regions on, and b
  beyond n_layer trains the loss of b = n_layer exactly: docs/experiments.md E68);
  compressed-summary-r<m> (m >= 1): the summary config with max_regions=m raw regions (n_transit sized for them; the
  config's own m is compressed-summary), paired with compressed AD at m regions;
- the compression-quality sweep: standard-<w> (w = 80 k: a FIFO window of k rollouts, e.g. standard-80, standard-320) and
  compressed-r<m> (compressed AD trained and evaluated with max_regions=m, n_transit sized for it; the m of the env's
  compressed config is the compressed arm itself and is refused).
Every arm's KV-cache size per stream (the tokens a step attends over, max and mean over the evaluation) is a column of
the report, and quality.png plots the return against it, one point per arm (`quality_points`).

Stages (each skipped where its output exists and matches; interrupt and re-run the same command to resume):
1. collect the PPO histories (collect.py) unless the history file is complete for this config;
2. train every (trained arm, seed) with train.py, `--jobs` runs at once with one thread each;
3. tune: for each trained arm its own eval_temperature from `--temperatures`, on the VALIDATION goals (all seeds,
   `--tune-episodes` episodes, evaluation seed 1000; the same budget per arm), by one rule for every env
   (study_stats.choose_temperature): among the temperatures whose fraction of runs that never reach 90 % of the optimum
   is within `--tune-never-slack` of the grid's lowest, the best mean normalised return over the last fifth;
4. test: each (arm, seed) on the TEST goals with every evaluation seed at its chosen temperature;
5. report: RUNS_ROOT/report.md, report.json, learning_curves.png, aggregates.png, quality.png (study_stats.py, rliable).
Overrides `key=value` go to every training (and fix the evaluation keys, e.g. eval_episodes=200).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from common import (
    CONFIG_DIR,
    ENV_CONFIGS,
    ENV_KEYS,
    EVAL_KEYS,
    UserError,
    env_configs,
    load_config,
    make_parser,
    parse_cli,
    parse_overrides,
    print_config,
    run_main,
)
from plots import pyplot

ARMS = ("standard-240", "standard-160", "compressed", "compressed-fixed")  # the default study
OPTIONAL_ARMS = ("compressed-adaptive", "compressed-eps", "dpt", "searcher", "ppo", "source-eps", "compressed-summary",
                 "compressed-summary-accumulate", "compressed-summary-feedback")  # and the patterns below
REFERENCE_ARMS = ("searcher", "ppo", "source-eps")  # reference learners: no checkpoint, no temperature
SOURCE_MODE = {"source-eps": "eps"}  # reference arms read from a history file other than PPO's: the mode they source
STRIDE_ARM = re.compile(r"compressed(-eps)?-stride([0-9]+)(-any)?")  # compressed AD (-eps: compressed-eps) trained with
# region_stride=s (-any: and first_region_any=true)
REGIONS_ARM = re.compile(r"compressed-r([0-9]+)")  # compressed AD with max_regions=m (the compression-quality sweep)
SUMMARY_BACK_ARM = re.compile(r"compressed-summary-back([0-9]+)")  # compressed-summary with summary_train_regions=b
SUMMARY_REGIONS_ARM = re.compile(r"compressed-summary-r([0-9]+)")  # compressed-summary with max_regions=m raw regions
SUMMARY_TOKENS = 4  # n_summary of the summary configs: compressed-summary-r<m>'s n_transit is sized for it
WINDOW_ARM = re.compile(r"standard-([0-9]+)")  # standard AD, a FIFO window of w / 80 rollouts (Darkroom's sizes)
ARM_PATTERNS = ("compressed-stride<s> (s >= 2; compressed is stride 1), compressed-stride<s>-any (s >= 1), "
                "compressed-eps-stride<s> (s >= 2; compressed-eps is stride 1), "
                "compressed-r<m> (m >= 1 regions), "
                "compressed-summary-back<b> (b >= 1 pruned regions in front of a training sample), "
                "compressed-summary-r<m> (m >= 1 raw regions), "
                "standard-<w> (w = 80 k: a window of k >= 1 rollouts)")
ACCUMULATE_SUMMARIES = 3  # compressed-summary-accumulate's max_summaries: the summary configs' summary_train_regions
TRAINED = {  # arm -> (the env's model config: standard, compressed, adaptive, eps or summary, extra overrides from its n_steps);
    # compressed-fixed reuses compressed
    "standard-240": ("standard", lambda n: [f"n_transit={3 * n}", f"eval_window_shift={n}"]),
    "standard-160": ("standard", lambda n: [f"n_transit={2 * n}", f"eval_window_shift={n}"]),
    "compressed": ("compressed", lambda n: []),
    "compressed-adaptive": ("adaptive", lambda n: []),
    "compressed-eps": ("eps", lambda n: []),
    "dpt": ("standard", lambda n: [f"n_transit={3 * n}", f"eval_window_shift={n}", "target=oracle"]),
    "compressed-summary": ("summary", lambda n: []),
    # the summary config's other variant: the summaries of the last 3 pruned regions kept, trained as far back as the
    # recurrent default is (summary_train_regions 0 = max_summaries)
    "compressed-summary-accumulate": ("summary", lambda n: ["summary_mode=accumulate",
                                                            f"max_summaries={ACCUMULATE_SUMMARIES}",
                                                            "summary_train_regions=0"]),
    # the recurrent summary with a feedback memory: a pruned summary is read through its last-layer states (E69)
    "compressed-summary-feedback": ("summary", lambda n: ["summary_mode=feedback"]),
}
CHECKPOINT_OF = {"standard-240": "standard-240", "standard-160": "standard-160", "compressed": "compressed",
                 "compressed-fixed": "compressed", "compressed-adaptive": "compressed-adaptive", "dpt": "dpt",
                 "compressed-eps": "compressed-eps",
                 "compressed-summary": "compressed-summary",
                 "compressed-summary-accumulate": "compressed-summary-accumulate",
                 "compressed-summary-feedback": "compressed-summary-feedback"}
EVAL_PRUNE = {"compressed": "model", "compressed-fixed": "fixed", "compressed-adaptive": "model", "compressed-eps": "model",
              "compressed-summary": "model", "compressed-summary-accumulate": "model", "compressed-summary-feedback": "model"}
OWN_SOURCE = {  # env -> mode -> (collection config, model config) of the arms with a history file of their own
    "darkroom": {
        "adaptive": (CONFIG_DIR / "algorithm" / "ppo_darkroom_adaptive_streams.yaml",
                     CONFIG_DIR / "model" / "ad_dr_adaptive.yaml"),
        "eps": (CONFIG_DIR / "algorithm" / "searcher_eps_darkroom.yaml", CONFIG_DIR / "model" / "ad_dr_eps.yaml"),
    },
    "dark_key_to_door": {
        "eps": (CONFIG_DIR / "algorithm" / "searcher_eps_dark_key_to_door.yaml", CONFIG_DIR / "model" / "ad_kd_eps.yaml"),
    },
    "darkroom_permuted": {
        "eps": (CONFIG_DIR / "algorithm" / "searcher_eps_darkroom_permuted.yaml", CONFIG_DIR / "model" / "ad_dp_eps.yaml"),
    },
}
OWN_SOURCE_MODES = {mode for modes in OWN_SOURCE.values() for mode in modes}
SUMMARY_NUMBERS = ("n_summary", "max_summaries", "n_summaries_written", "summary_tokens_written", "kept_summaries_max")
TUNE_EVAL_SEED = 1000  # validation rollouts use their own sampling seed, never one of the test evaluation seeds
COLORS = {"standard-240": "tab:blue", "standard-160": "tab:cyan", "compressed": "tab:green", "compressed-fixed": "tab:olive",
          "compressed-adaptive": "tab:purple", "compressed-eps": "magenta",
          "PPO (source)": "tab:gray", "dpt": "tab:red", "searcher": "tab:brown",
          "ppo": "tab:gray", "source-eps": "violet", "compressed-summary": "tab:orange",
          "compressed-summary-accumulate": "chocolate", "compressed-summary-feedback": "crimson"}
STRIDE_COLORS = ("tab:pink", "darkgreen", "lime", "teal")
STRIDE_ANY_COLORS = ("gold", "sienna", "orchid", "black")  # compressed-stride<s>-any, by s
EPS_STRIDE_COLORS = ("darkviolet", "indigo", "mediumvioletred", "plum")  # compressed-eps-stride<s>, by s
REGIONS_COLORS = ("darkseagreen", "yellowgreen", "forestgreen", "darkolivegreen", "seagreen")  # by m
SUMMARY_BACK_COLORS = ("darkorange", "peru", "orangered", "goldenrod")  # compressed-summary-back<b>, by b
SUMMARY_REGIONS_COLORS = ("coral", "sandybrown", "tomato", "khaki", "salmon")  # compressed-summary-r<m>, by m
WINDOW_COLORS = ("steelblue", "lightsteelblue", "navy", "slateblue", "royalblue")  # by k


def stride_of(arm: str) -> int | None:
    """s of an arm compressed-stride<s> or compressed-eps-stride<s>, else None."""
    m = STRIDE_ARM.fullmatch(arm)
    return int(m.group(2)) if m else None


def first_any_of(arm: str) -> bool:
    """Is `arm` a compressed-stride<s>-any (trained with first_region_any=true)?"""
    m = STRIDE_ARM.fullmatch(arm)
    return bool(m and m.group(3))


def stride_base(arm: str) -> str:
    """The stride-1 arm a strided arm is compared with: compressed, or compressed-eps for compressed-eps-stride<s>."""
    m = STRIDE_ARM.fullmatch(arm)
    return "compressed-eps" if m and m.group(1) else "compressed"


def regions_of(arm: str) -> int | None:
    """m >= 1 of an arm compressed-r<m>, else None."""
    m = REGIONS_ARM.fullmatch(arm)
    return (int(m.group(1)) or None) if m else None


def summary_back_of(arm: str) -> int | None:
    """b >= 1 of an arm compressed-summary-back<b> (trained with summary_train_regions=b), else None."""
    m = SUMMARY_BACK_ARM.fullmatch(arm)
    return (int(m.group(1)) or None) if m else None


def summary_regions_of(arm: str) -> int | None:
    """m >= 1 of an arm compressed-summary-r<m> (max_regions=m raw regions plus the summaries), else None."""
    m = SUMMARY_REGIONS_ARM.fullmatch(arm)
    return (int(m.group(1)) or None) if m else None


def summary_context(n: int, m: int) -> int:
    """n_transit of a summary arm with m raw regions of n steps and SUMMARY_TOKENS summary tokens per closed one:
    C r E S^k ... C r = m (n + 2 + k) - 1 - k positions plus 5 of slack, as the env's summary configs (172 on Darkroom,
    112 on Key-to-Door and Darkroom-permuted)."""
    return m * (n + 2 + SUMMARY_TOKENS) - 1 - SUMMARY_TOKENS + 5


def rollouts_of(arm: str) -> int | None:
    """k >= 1 of a standard arm standard-<80 k> (a window of k rollouts; 240 -> 3), else None."""
    m = WINDOW_ARM.fullmatch(arm)
    w = int(m.group(1)) if m else 0
    return w // 80 if w > 0 and w % 80 == 0 else None


def compressed_context(n: int, m: int) -> int:
    """n_transit of compressed AD with m regions of n steps: C r E ... C r = m (n + 2) - 1 positions plus 5 of slack for a
    late </compress>, as the env's compressed configs (168 = 2 x 82 + 4 on Darkroom, 160 = 3 x 52 + 4 on Key-to-Door)."""
    return m * (n + 2) + 4


def is_trained(arm: str) -> bool:
    return arm not in REFERENCE_ARMS


def checkpoint_of(arm: str) -> str:
    """The trained arm whose checkpoint an arm evaluates (compressed-fixed: compressed's; a pattern arm: its own)."""
    return arm if stride_of(arm) or regions_of(arm) or rollouts_of(arm) or summary_arm(arm) else CHECKPOINT_OF[arm]


def summary_arm(arm: str) -> bool:
    """Is `arm` one of the summary patterns (compressed-summary-back<b>, compressed-summary-r<m>)?"""
    return bool(summary_back_of(arm) or summary_regions_of(arm))


def trained_spec(arm: str):
    """(the env's model config: standard, compressed, adaptive, eps or summary, extra overrides from its n_steps) of a
    trained arm."""
    s, m, k = stride_of(arm), regions_of(arm), rollouts_of(arm)
    if s:
        return ("eps" if stride_base(arm) == "compressed-eps" else "compressed"), lambda n: [
            f"region_stride={s}", *(["first_region_any=true"] if first_any_of(arm) else [])]
    if m:
        return "compressed", lambda n: [f"max_regions={m}", f"n_transit={compressed_context(n, m)}"]
    if summary_back_of(arm):
        return "summary", lambda n: [f"summary_train_regions={summary_back_of(arm)}"]
    if summary_regions_of(arm):
        return "summary", lambda n: [f"max_regions={summary_regions_of(arm)}",
                                     f"n_transit={summary_context(n, summary_regions_of(arm))}"]
    if k and arm not in TRAINED:
        return "standard", lambda n: [f"n_transit={k * n}", f"eval_window_shift={n}"]
    return TRAINED[arm]


def eval_prune_of(arm: str) -> str | None:
    """eval_prune of a compressed arm, None for a standard one."""
    return "model" if stride_of(arm) or regions_of(arm) or summary_arm(arm) else EVAL_PRUNE.get(arm)


def color_of(arm: str) -> str:
    s, m, k = stride_of(arm), regions_of(arm), rollouts_of(arm)
    if s:
        colors = (EPS_STRIDE_COLORS if stride_base(arm) == "compressed-eps" else
                  STRIDE_ANY_COLORS if first_any_of(arm) else STRIDE_COLORS)
        return colors[s % len(colors)]
    if m:
        return REGIONS_COLORS[m % len(REGIONS_COLORS)]
    if summary_back_of(arm):
        return SUMMARY_BACK_COLORS[summary_back_of(arm) % len(SUMMARY_BACK_COLORS)]
    if summary_regions_of(arm):
        return SUMMARY_REGIONS_COLORS[summary_regions_of(arm) % len(SUMMARY_REGIONS_COLORS)]
    return COLORS.get(arm) or WINDOW_COLORS[(k or 0) % len(WINDOW_COLORS)]


def parse_arms(text: str) -> list[str]:
    """--arms: a comma-separated list of the default and optional arms, or of the patterns (ARM_PATTERNS)."""
    allowed = ARMS + OPTIONAL_ARMS
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed and not (stride_of(x) or 0) >= 2 - first_any_of(x) and not regions_of(x)
           and not rollouts_of(x) and not summary_arm(x)]
    if bad or not items:
        raise UserError(f"--arms: {bad[0] if bad else 'nothing'} is not one of {', '.join(allowed)}, {ARM_PATTERNS}")
    return list(dict.fromkeys(items))


def check_arms(env: str, arms: list[str], overrides: list[str]) -> None:
    """Refuse, in one line and before anything runs, an arm that does not fit `env`: compressed-r<m> with the m of the
    env's compressed config (that is the compressed arm), compressed-summary-back<b> / compressed-summary-r<m> with the b
    / m of its summary config (that is compressed-summary) or one its config refuses, an arm without a config for this
    env."""
    config = env_configs(env)["compressed"]
    regions = load_config(config, overrides)["max_regions"]
    for a in arms:
        if regions_of(a) == regions:
            raise UserError(f"--arms: {a} is the compressed arm on {env} (max_regions={regions} in {config.name}); "
                            "use compressed")
        model_config = arm_configs(env, a)[1]  # compressed-summary / compressed-adaptive without a config for this env
        b = summary_back_of(a)
        if b:
            from summary import train_regions  # torch: only where a compressed-summary-back<b> arm is asked for

            if train_regions(load_config(model_config, overrides)) == b:
                raise UserError(f"--arms: {a} is the compressed-summary arm on {env} (summary_train_regions={b} in "
                                f"{model_config.name}); use compressed-summary")
            load_config(*train_config(a, 0, overrides, env))  # refused by the config itself, e.g. b < max_summaries
        m = summary_regions_of(a)
        if m and load_config(model_config, overrides)["max_regions"] == m:
            raise UserError(f"--arms: {a} is the compressed-summary arm on {env} (max_regions={m} in "
                            f"{model_config.name}); use compressed-summary")


def say(msg: str) -> None:
    print(f"[study] {msg}", flush=True)


# ---- stage 1-2: data and training ---------------------------------------------------------------------------------
def own_source_arm(arm: str) -> str | None:
    """The reference arm that is a trained arm's own source (source-eps for the arms distilled from the AD-eps histories;
    None for PPO-distilled arms, whose source is the speed-up column's PPO, and for the reference arms themselves)."""
    if not is_trained(arm):
        return None
    mode = trained_spec(checkpoint_of(arm))[0]
    return next((ref for ref, m in SOURCE_MODE.items() if m == mode), None)


def arm_configs(env: str, arm: str) -> tuple[Path, Path]:
    """(collection config, model config) an arm trains with (a reference arm: the env's history and standard config)."""
    mode = trained_spec(checkpoint_of(arm))[0] if is_trained(arm) else SOURCE_MODE.get(arm, "standard")
    if mode in OWN_SOURCE_MODES:
        if mode not in OWN_SOURCE.get(env, {}):
            has = [e for e, modes in OWN_SOURCE.items() if mode in modes]
            raise UserError(f"arm {arm} exists for {', '.join(has)} only, not {env}; drop it from --arms")
        return OWN_SOURCE[env][mode]
    if mode == "summary":  # the compressed config's sibling: ad_dr_compressed.yaml -> ad_dr_summary.yaml
        compressed = env_configs(env)["compressed"]
        config = compressed.with_name(compressed.name.replace("_compressed", "_summary"))
        if not config.is_file():
            raise UserError(f"arm {arm} has no config for {env} (config/model/{config.name} does not exist); drop it "
                            "from --arms")
        return env_configs(env)["collect"], config
    return env_configs(env)["collect"], env_configs(env)[mode]


def collection_overrides(config: Path, overrides: list[str]) -> list[str]:
    """The study's overrides a collection config takes: its own keys and the env's."""
    keys = set(load_config(config)) | set(ENV_KEYS)
    return [o for o in overrides if o.split("=", 1)[0].strip() in keys]


def stage_collect(overrides: list[str], env: str, arms: list[str]) -> None:
    """For each history the arms train on: collect every task unless the file of that config exists and holds the
    validation and test tasks (training uses whichever training tasks it holds; a file of another config is refused)."""
    from common import history_path
    from env import selected_tasks, task_split
    from history import history_problem
    from jobs import run_stage

    for config in sorted({arm_configs(env, a)[0] for a in arms if a != "searcher"}):  # the searcher needs no history
        over = collection_overrides(config, overrides)
        cfg = load_config(config, over)
        path = history_path(cfg)
        problem = history_problem(path, sorted(task_split(cfg, "val") + task_split(cfg, "test")), cfg)
        if problem is None:
            say(f"skip collection: {path} holds the validation and test goals")
            continue
        say(f"history {path} {problem}: collecting all {len(selected_tasks(cfg))} goals")
        run_stage("collect", "collect.py", ["--config", str(config), *(["--force"] if path.exists() else []), *over])


def run_dir_of(root: Path, arm: str, seed: int) -> Path:
    return root / "runs" / f"{checkpoint_of(arm)}-seed{seed}"


def train_config(arm: str, seed: int, overrides: list[str], env: str) -> tuple[Path, list[str]]:
    """(model config, overrides) one (arm, seed) trains with."""
    _, extra = trained_spec(arm)
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
        from common import config_diff
        from dataset import TRAINING_DEFAULTS  # keys added since: a run saved without one trained with its default

        diff = config_diff(TRAINING_DEFAULTS | yaml.safe_load(saved.read_text()), cfg)
        if diff:
            raise UserError(f"{run_dir} was trained with {diff}; move it away (or pass another --runs-root) to train "
                            "this config")
    return True


def stage_train(root: Path, arms: list[str], seeds: list[int], overrides: list[str], jobs: int, env: str) -> int:
    """Train every (arm, seed) not finished yet; returns how many were trained."""
    from jobs import run_concurrently, run_stage

    todo = []
    for seed in seeds:
        for arm in sorted({checkpoint_of(a) for a in arms if is_trained(a)},
                          key=lambda a: (list(TRAINED).index(a) if a in TRAINED else len(TRAINED), a)):
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
    cost = {"standard-240": 3, "standard-160": 2, "compressed": 2, "compressed-adaptive": 3, "compressed-eps": 2, "dpt": 3,
            "compressed-summary": 3, "compressed-summary-accumulate": 3,
            "compressed-summary-feedback": 3}

    def cost_of(arm: str) -> int:  # stride arms: compressed's cost; windows / regions: their number of rollouts;
        back = summary_back_of(arm)  # compressed-summary-back<b>: the summary arm's plus its b pruned regions;
        raw = summary_regions_of(arm)  # compressed-summary-r<m>: its m raw regions plus the 3 pruned ones
        return cost.get(arm, rollouts_of(arm) or regions_of(arm) or (3 + back if back else 3 + raw if raw else 2))

    todo.sort(key=lambda job: -cost_of(job[0].split()[1]))
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
    s, res = evaluate.evaluate_config(model, cfg, goals, progress=False, device="cpu")
    comp, kv, summ = s.get("compression", {}), s.get("kv_cache", {}), s.get("summary")

    def number(key: str, d: dict = comp) -> float:  # None (no n_steps grid to score against: per-task rollout lengths)
        value = d.get(key)                          # -> NaN, so the .npz holds plain floats and loads without pickle
        return np.nan if value is None else float(value)

    out = {"returns": res["returns"].astype(np.int16), "goals": np.array(goals), "seconds": time.perf_counter() - start,
           "n_forced_closes": comp.get("n_forced_closes", 0), "n_closes": comp.get("n_closes", 0),
           "precision_compress_end": number("precision_compress_end"), "recall_compress_end": number("recall_compress_end"),
           "kv_entries_max": number("kv_entries_per_stream_max", kv),
           "kv_entries_mean": number("kv_entries_per_stream_mean", kv)}
    if summ is not None:  # summary arms: summaries written and kept
        out |= {f"summary_{k}": summ[k] for k in SUMMARY_NUMBERS} | {"summary_mode": summ["summary_mode"]}
    return out


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
    if eval_prune_of(arm):
        over.append(f"eval_prune={eval_prune_of(arm)}")
    return {"run_dir": str(run_dir_of(root, arm, seed)), "overrides": over, "split": split,
            "path": str(eval_path(root, arm, seed, split, temperature, eval_seed, episodes))}


def load_returns(root: Path, arm: str, seeds: list[int], split: str, temperature: float, eval_seeds: list[int],
                 episodes: int) -> tuple[np.ndarray, dict]:
    """[n_seeds, n_goals, n_eval_seeds x n_streams, n_episodes] returns of one arm, plus the evaluations' side numbers."""
    per_seed, side = [], {"n_forced_closes": 0, "n_closes": 0, "precision": [], "recall": [], "seconds": [],
                          "kv_max": [], "kv_mean": []}
    summaries = []
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
            # KV entries per stream: NaN for an evaluation saved before they were recorded
            side["kv_max"].append(float(z["kv_entries_max"]) if "kv_entries_max" in z else np.nan)
            side["kv_mean"].append(float(z["kv_entries_mean"]) if "kv_entries_mean" in z else np.nan)
            if "summary_n_summaries_written" in z:
                summaries.append(({k: int(z[f"summary_{k}"]) for k in SUMMARY_NUMBERS}, str(z["summary_mode"]),
                                  int(np.prod(z["returns"].shape[:2]))))
        per_seed.append(np.concatenate(parts, axis=1))
    if summaries:  # over every evaluation: the totals, and the most summaries a stream's context kept
        n_streams = sum(s[2] for s in summaries)
        written = sum(s[0]["n_summaries_written"] for s in summaries)
        side["summary"] = {"summary_mode": summaries[0][1], "n_summary": summaries[0][0]["n_summary"],
                           "max_summaries": summaries[0][0]["max_summaries"], "n_evaluations": len(summaries),
                           "n_summaries_written": written,
                           "summary_tokens_written": sum(s[0]["summary_tokens_written"] for s in summaries),
                           "summaries_written_per_stream": written / n_streams,
                           "kept_summaries_max": max(s[0]["kept_summaries_max"] for s in summaries)}
    return np.stack(per_seed), side


def stage_tune(root: Path, out: Path, cfg: dict, arms: list[str], seeds: list[int], temperatures: list[float], episodes: int,
               eval_overrides: list[str], jobs: int, never_slack: float = 0.02) -> tuple[dict[str, float], int]:
    """Each trained arm's eval_temperature on the validation goals (same grid for every arm), by the rule of
    `study_stats.choose_temperature` (no temperature that strands runs; then the last fifth's mean), and how many
    validation evaluations ran."""
    import study_stats as st
    from env import task_family, task_split

    arms = [a for a in arms if is_trained(a)]

    specs = [eval_spec(root, arm, s, "val", t, TUNE_EVAL_SEED, episodes, eval_overrides)
             for arm in arms for s in seeds for t in temperatures]
    n_run = run_evals(root, specs, jobs, "tune on the validation goals")
    opt = np.array([task_family(cfg).optimal_return(g, cfg) for g in task_split(cfg, "val")], dtype=np.float64)
    chosen, table, at_chosen = {}, {}, {}
    last = st.last_window(episodes)
    for arm in arms:
        R = {t: load_returns(root, arm, seeds, "val", t, [TUNE_EVAL_SEED], episodes)[0] for t in temperatures}
        chosen[arm], table[arm] = st.choose_temperature(R, opt, never_slack=never_slack)
        at_chosen[arm] = R[chosen[arm]][..., -last:]
        say(f"tune {arm}: val " + ", ".join(
            f"T={t:g} last {v['mean_last']:.3f} never {v['never_frac']:.1%}{'' if v['eligible'] else ' (strands runs)'}"
            for t, v in table[arm].items()) + f" -> T={chosen[arm]:g}")
    # how far apart the arms are on validation, with the interval a decision between them has to respect
    val_ci = {a: st.aggregate({a: st.run_scores(R, opt)})[a]["mean_ci"] for a, R in at_chosen.items()}
    val_pairs = {f"{a} - {b}": st.paired_goal_differences(at_chosen[a], at_chosen[b], opt)
                 for a, b in comparison_pairs(arms)}
    for name, d in val_pairs.items():
        say(f"val {name}, last {last} at each arm's T: {d['mean_diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]")
    rule = (f"among the temperatures whose fraction of runs never reaching 90 % of the optimum is within {never_slack:g} "
            f"of the lowest, the best mean over the last {last} of {episodes} validation episodes")
    (out / "tuning.json").write_text(json.dumps({
        "temperatures": chosen, "rule": rule, "never_slack": never_slack, "episodes": episodes,
        "val_scores": {a: {f"{t:g}": v["mean"] for t, v in s.items()} for a, s in table.items()},  # all-episode means
        "val_table": {a: {f"{t:g}": v for t, v in s.items()} for a, s in table.items()},
        "val_last_ci": val_ci,  # each arm at its temperature: the last window's mean, 95 % CI (runs x goals)
        "val_pairs": {k: {"mean_diff": d["mean_diff"], "ci": d["ci"]} for k, d in val_pairs.items()}}, indent=1))
    return chosen, n_run


# ---- stage 5: the report --------------------------------------------------------------------------------------------
def ppo_returns(cfg: dict, goals: list[int]) -> np.ndarray:
    """The source PPO's own learning, per stream: [1, n_goals, n_stream, n_episodes] episode returns from the history
    file's rewards (the study's returns layout, one "seed": the one collection). Episodes of every stream are aligned in
    time, and each PPO update pools all n_stream streams of a goal (one learner). The same for any source whose history
    `cfg` names (source-eps: the AD-eps searcher's, one learner per stream)."""
    from common import history_path
    from history import open_history

    H = cfg["horizon"]
    with open_history(history_path(cfg)) as f:
        out = []
        for g in goals:
            r = f[str(g)]["rewards"][:].astype(np.float64)  # [T, S]
            out.append(r.reshape(-1, H, r.shape[1]).sum(1).T)  # [S, episodes]
    return np.stack(out)[None]


def ppo_curve(cfg: dict, goals: list[int]) -> tuple[np.ndarray, int]:
    """The source PPO's learning curve on `goals`: [n_goals, n_episodes] return per episode (mean over streams), and the
    number of streams."""
    R = ppo_returns(cfg, goals)[0]
    return R.mean(1), R.shape[1]


def ppo_reference(cfg: dict, goals: list[int]) -> np.ndarray | None:
    """The source PPO's returns on `goals` for the speed-up column (`ppo_returns`), or None where its history is not
    collected: arms distilled from another source (compressed-eps) need none, and the report says how to add it."""
    from common import history_path
    from history import history_problem

    problem = history_problem(history_path(cfg), goals, cfg)
    if problem is not None:
        say(f"no speed-up over PPO: the PPO history {history_path(cfg)} {problem}; collect it (python collect.py --config "
            f"config/algorithm/{env_configs(cfg.get('env', 'darkroom'))['collect'].name}) and rerun this command for the column")
        return None
    return ppo_returns(cfg, goals)


def searcher_returns(cfg: dict, goals: list[int], eval_seeds: list[int], episodes: int) -> tuple[np.ndarray, dict]:
    """The searcher on the test streams: [1, n_goals, n_eval_seeds x eval_streams, episodes] returns (evaluation seed e
    breaks its ties), and the seconds each evaluation seed took."""
    from searcher import run_searcher

    parts, seconds = [], []
    for e in eval_seeds:
        start = time.perf_counter()
        parts.append(run_searcher(cfg, goals, n_streams=cfg["eval_streams"], n_episodes=episodes, seed=e)["returns"])
        seconds.append(time.perf_counter() - start)
    return np.concatenate(parts, axis=1)[None], {"seconds": seconds}


def arm_returns(root: Path, cfg: dict, arms: list[str], seeds: list[int], eval_seeds: list[int], temps: dict,
                episodes: int, overrides: list[str] = ()) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Every arm's test returns [n_seeds, n_goals, n_runs per seed, n_episodes] (the trained arms' saved evaluations; the
    searcher run here; the source PPO, and source-eps, from their history files: the collection config with the study's
    `overrides`) and its side numbers (closes, seconds)."""
    from env import task_split

    goals = task_split(cfg, "test")
    returns, side = {}, {}
    for arm in arms:
        if arm == "ppo":
            returns[arm], side[arm] = ppo_returns(cfg, goals), {"seconds": [0.0]}
        elif arm in SOURCE_MODE:
            config = arm_configs(cfg.get("env", "darkroom"), arm)[0]
            returns[arm] = ppo_returns(load_config(config, collection_overrides(config, list(overrides))), goals)
            side[arm] = {"seconds": [0.0]}
        elif arm == "searcher":
            returns[arm], side[arm] = searcher_returns(cfg, goals, eval_seeds, episodes)
        else:
            returns[arm], side[arm] = load_returns(root, arm, seeds, "test", temps[arm], eval_seeds, episodes)
            assert side[arm]["goals"] == goals, "evaluations of other goals than the test split"
    return returns, side


def training_costs(root: Path, arms: list[str], seeds: list[int]) -> dict[str, dict]:
    """Per trained arm, the mean over seeds of its train_summary.json's cost numbers."""
    train = {}
    for arm in arms:
        if not is_trained(arm):
            continue
        ts = [json.loads((run_dir_of(root, arm, s) / "train_summary.json").read_text()) for s in seeds]
        train[arm] = {k: float(np.mean([t[k] for t in ts])) for k in ("seconds", "steps_per_s", "targets_per_s", "peak_rss_mb")}
        train[arm]["val_return_end"] = float(np.mean([t.get("val/return", np.nan) for t in ts]))
    return train


def comparison_pairs(arms: list[str]) -> list[tuple[str, str]]:
    """The paired comparisons among `arms` (arms evaluated on the same seeds and streams; not the reference arms)."""
    pairs = [("compressed", "standard-240"), ("compressed", "standard-160"), ("compressed", "compressed-fixed"),
             ("standard-160", "standard-240"), ("compressed-adaptive", "compressed"), ("dpt", "standard-240"),
             ("compressed-eps", "compressed")]
    pairs += [(a, stride_base(a)) for a in arms if stride_of(a)]
    pairs += [(a, f"compressed-stride{stride_of(a)}") for a in arms if first_any_of(a) and stride_of(a) > 1]
    # summaries against pruning: at the compressed arm's budget, and at the same raw regions without summaries (the
    # summary configs keep 2 raw regions; compressed keeps 3 on Key-to-Door and Darkroom-permuted)
    pairs += [("compressed-summary", "compressed"), ("compressed-summary", "compressed-r2"),
              ("compressed-summary", "compressed-summary-accumulate"), ("compressed-summary-accumulate", "compressed"),
              ("compressed-summary-feedback", "compressed-summary"), ("compressed-summary-feedback", "compressed")]
    pairs += [(a, b) for a in arms if summary_back_of(a) for b in ("compressed-summary", "compressed")]
    # with m raw regions: against the default summary arm, and against pruning alone at m regions (compressed-r<m>, or
    # compressed itself where its config keeps m)
    pairs += [(a, b) for a in arms if summary_regions_of(a)
              for b in ("compressed-summary", f"compressed-r{summary_regions_of(a)}", "compressed")]
    return [(a, b) for a, b in pairs if a in arms and b in arms]


def arm_kv(side: dict[str, dict]) -> dict[str, dict]:
    """Per arm with recorded KV sizes: {"max": the most KV entries a stream's step attended over in any of its
    evaluations, "mean": their mean over steps and streams}; arms without (reference learners, evaluations saved
    before the sizes were recorded) are left out. Pure."""
    out = {}
    for a, sd in side.items():
        mx, mean = np.asarray(sd.get("kv_max", []), float), np.asarray(sd.get("kv_mean", []), float)
        if len(mx) and np.isfinite(mx).all() and np.isfinite(mean).all():
            out[a] = {"max": float(mx.max()), "mean": float(mean.mean())}  # equal-sized evaluations: mean of means
    return out


def quality_points(summary: dict[str, dict], kv: dict[str, dict], window: str = "all") -> dict:
    """The compression-quality plot's points, one per arm with a KV size: x = KV entries per stream (max over the
    evaluation, `arm_kv`), y = the mean normalised return over `window` ("all" or "last": `study_stats.arm_summary`'s
    columns) with its 95 % CI, and y / x (return per KV entry), sorted by x. `pareto`: no other arm holds at most as
    many entries and scores at least as high (strictly better in one); `best_per_entry`: the arm of the most return per
    KV entry; `missing`: arms without a KV size. Pure."""
    points = [{"arm": a, "kv_entries": kv[a]["max"], "kv_entries_mean": kv[a]["mean"], "mean": s[window]["mean"],
               "ci": list(s[window]["ci"]), "return_per_kv_entry": s[window]["mean"] / kv[a]["max"]}
              for a, s in summary.items() if a in kv and kv[a]["max"] > 0]
    points.sort(key=lambda p: (p["kv_entries"], -p["mean"]))
    for p in points:
        p["pareto"] = not any(q["kv_entries"] <= p["kv_entries"] and q["mean"] >= p["mean"]
                              and (q["kv_entries"] < p["kv_entries"] or q["mean"] > p["mean"]) for q in points)
    best = max(points, key=lambda p: p["return_per_kv_entry"])["arm"] if points else None  # max: first of ties
    return {"window": window, "points": points, "best_per_entry": best,
            "missing": [a for a in summary if a not in {p["arm"] for p in points}]}


def compute_statistics(returns: dict[str, np.ndarray], opt: np.ndarray, ppo: np.ndarray | None, reps: int,
                       kv: dict[str, dict] | None = None) -> dict:
    """Everything the report says, from the arms' returns, the goals' optima, the source PPO's returns
    [1, n_goals, n_stream, n_ppo_episodes] (the speed-up reference, whether or not `ppo` is an arm; None without its
    history: no speed-up, no PPO curve) and the arms' KV sizes (`arm_kv`; the compression-quality points). Pure: no I/O."""
    import study_stats as st

    arms, kv = list(returns), kv or {}
    summary = {a: st.arm_summary(R, opt, reps=reps) for a, R in returns.items()}
    ppo_to90 = (summary["ppo"]["to_threshold"] if "ppo" in summary
                else None if ppo is None else st.episodes_to_threshold(ppo, opt, reps=reps))
    pairs = comparison_pairs(arms)
    scores = {a: st.run_scores(returns[a], opt) for a in {x for p in pairs for x in p}}
    def agg(window: str) -> dict:  # rliable's mean and IQM of one column, as report.json has always held them
        return {a: {"mean": s[window]["mean"], "mean_ci": s[window]["ci"], "iqm": s[window]["iqm"],
                    "iqm_ci": s[window]["iqm_ci"]} for a, s in summary.items()}

    return {
        "arms": arms, "summary": summary, "ppo_to_90": ppo_to90,
        "speedup": {a: None if ppo_to90 is None else st.speedup(ppo_to90, summary[a]["to_threshold"], reps=reps)
                    for a in arms},
        "speedup_over_source": {a: st.speedup(summary[own_source_arm(a)]["to_threshold"], summary[a]["to_threshold"],
                                              reps=reps) for a in arms if own_source_arm(a) in summary},
        "aggregate": agg("all"), "aggregate_last": agg("last"),
        "probability_of_improvement": st.probability_of_improvement(scores, pairs, reps=reps),
        "paired_differences": {f"{a} vs {b}": st.paired_goal_differences(returns[a], returns[b], opt, reps=reps)
                               for a, b in pairs},
        "first_reward": {a: st.first_reward_episode(R) for a, R in returns.items()},
        "curves": {a: st.curve_with_ci(R, opt, reps=min(reps, 1000)) for a, R in returns.items()},
        "per_goal": {a: (R.mean(axis=(0, 2, 3)) / opt).tolist() for a, R in returns.items()},
        "ppo_normalised_curve": None if ppo is None else (ppo[0].mean(1) / opt[:, None]).mean(0).tolist(),
        "ppo_streams": None if ppo is None else int(ppo.shape[2]),
        "kv": {a: kv[a] for a in arms if a in kv},
        "quality": {w: quality_points(summary, kv, w) for w in ("all", "last")},
    }


def fmt_ci(x: float, ci: list[float], f: str = "{:.3f}") -> str:
    return f"{f.format(x)} [{f.format(ci[0])}, {f.format(ci[1])}]"


def fmt_kv(kv: dict | None) -> str:
    """An arm's KV entries per stream, "max / mean" ("-" without: a reference learner, an evaluation saved before)."""
    return f"{kv['max']:.0f} / {kv['mean']:.1f}" if kv else "-"


def quality_lines(stats: dict, side: dict) -> list[str]:
    """report.md's compression-quality section: the plot's points (`quality_points`), the arm of the most return per
    KV entry, and the summary arms' summaries."""
    q, q_last = stats["quality"]["all"], stats["quality"]["last"]
    last = {p["arm"]: p for p in q_last["points"]}
    L = ["## Compression quality", "",
         "Return against context size: KV entries per stream = the keys/values a step attends over (the raw context, "
         "markers included, plus the summary tokens kept for pruned regions), max over the evaluation; one point per arm "
         "in quality.png. Pareto: no arm with at most as many entries scores at least as high (all episodes).", "",
         "| arm | KV entries / stream, max (mean) | mean, all episodes | mean, last | all-episode mean per 100 KV entries "
         "| Pareto |", "|---|---:|---|---|---:|---|"]
    for p in q["points"]:
        lp = last[p["arm"]]
        L.append(f"| {p['arm']} | {p['kv_entries']:.0f} ({p['kv_entries_mean']:.1f}) | {fmt_ci(p['mean'], p['ci'])} "
                 f"| {fmt_ci(lp['mean'], lp['ci'])} | {100 * p['return_per_kv_entry']:.3f} | {'yes' if p['pareto'] else ''} |")
    if q["best_per_entry"]:
        L += ["", f"Most return per KV entry: {q['best_per_entry']} over all episodes, {q_last['best_per_entry']} over the "
              "last episodes; Pareto front (all episodes): " + ", ".join(p["arm"] for p in q["points"] if p["pareto"]) + "."]
    if q["missing"]:
        L += ["", "No KV size (not in the plot): " + ", ".join(q["missing"]) + " (reference learners, or evaluations saved "
              "before KV sizes were recorded: delete their evals/*.npz to record them)."]
    for a in stats["arms"]:
        s = side.get(a, {}).get("summary")
        if s:
            L += ["", f"Summaries ({a}, {s['summary_mode']}, {s['n_summary']} tokens each, those of up to "
                  f"{s['max_summaries']} pruned regions kept): {s['n_summaries_written']} written over "
                  f"{s['n_evaluations']} evaluations ({s['summaries_written_per_stream']:.1f} per stream, "
                  f"{s['summary_tokens_written']} tokens); a context kept at most {s['kept_summaries_max']} pruned "
                  "regions' summaries."]
    return [*L, "", "![compression quality](quality.png)"]


def eps_noise(env: str, overrides: list[str]) -> str | None:
    """The AD-eps source's noise schedule as the study collects it (the env's searcher-eps config with `overrides`), in
    words; None for an env without that source."""
    if "eps" not in OWN_SOURCE.get(env, {}):
        return None
    config = OWN_SOURCE[env]["eps"][0]
    cfg = load_config(config, collection_overrides(config, overrides))
    if cfg["source_eps_start"] == 0:
        return "none (eps 0: the searcher itself)"
    return f"eps {cfg['source_eps_start']:g} in region 0, falling linearly to 0 at region {cfg['source_eps_regions']}"


def arm_windows(cfg: dict, arms: list[str], regions: int = 2, summary: dict | None = None,
                noise: str | None = None) -> str:
    """The arms' context sizes in this env's steps (the arm names are Darkroom's: 240 = 3 x 80, 160 = 2 x 80);
    `summary`: the summary arm's settings (load_returns' side["summary"]), where it has them; `noise`: the AD-eps
    source's (`eps_noise`)."""
    n = cfg["n_steps"]

    def window(k: int) -> str:
        return f"a window of {k} rollout{'s' if k != 1 else ''}" + (f" = {k * n} steps" if isinstance(n, int) else "")

    s = summary or {}
    kept = (f"{s['n_summary']} summary tokens per closed region, the summaries of the last {s['max_summaries']} pruned "
            f"regions kept ({s['summary_mode']})" if s else "the summaries of older regions")

    size = {"standard-240": window(3), "standard-160": window(2),
            "compressed": f"the last {regions} regions (rollouts), closed by its </compress> head",
            "compressed-fixed": "the compressed checkpoint, closing every compress_interval steps",
            "compressed-adaptive": "compressed on histories with PPO rollouts of 40, 80 and 120 steps in every goal "
                                   "(one learner per length), closed by its </compress> head",
            "compressed-eps": "compressed distilled from the searcher's histories instead of PPO's (the AD-eps source, "
                              f"searcher.noisy_history; noise: {noise or 'its collection config'})",
            "dpt": f"DPT: standard-240's model and {window(3)}, trained on the env's optimal action at every step",
            "searcher": "a hand-written searcher with memory across episodes (searcher.py): sweeps the cells not yet "
                        "ruled out, then walks straight to what it found",
            "ppo": f"the source PPO's own learning per stream (each update pools a goal's {cfg.get('n_stream', '?')} "
                   "streams)",
            "source-eps": "the AD-eps source's own learning per stream: the noisy searcher's histories that compressed-eps "
                          f"trains on (noise: {noise or 'its collection config'}; each stream one learner)"}
    size |= {a: f"{stride_base(a)} trained on regions {stride_of(a)} source updates apart (region_stride={stride_of(a)})"
                + (", one-region samples drawn from the whole history (first_region_any=true)" if first_any_of(a) else "")
             for a in arms if stride_of(a)}
    size |= {a: f"compressed trained and evaluated with the last {regions_of(a)} region{'s' if regions_of(a) != 1 else ''} "
                f"(max_regions={regions_of(a)}), closed by its </compress> head" for a in arms if regions_of(a)}
    size |= {a: window(rollouts_of(a)) for a in arms if rollouts_of(a) and a not in size}
    size |= {a: f"compressed-summary trained with {summary_back_of(a)} pruned regions in front of each sample "
                f"(summary_train_regions={summary_back_of(a)}: the summary chain trained {summary_back_of(a)} closes deep)"
             for a in arms if summary_back_of(a)}
    size |= {a: f"compressed-summary with {summary_regions_of(a)} raw regions (max_regions={summary_regions_of(a)}) "
                "plus the summaries" for a in arms if summary_regions_of(a)}
    size["compressed-summary"] = (f"compressed with summary tokens (config/model/ad_*_summary.yaml): max_regions raw "
                                  f"regions plus {kept}, closed by its </compress> head")
    size["compressed-summary-feedback"] = ("compressed-summary with a feedback memory (summary_mode=feedback): a pruned "
                                           "summary is read through its last-layer states, so the chain carries a "
                                           "region on past n_layer regions")
    size["compressed-summary-accumulate"] = ("compressed-summary with accumulated summaries (summary_mode=accumulate, "
                                             f"max_summaries={ACCUMULATE_SUMMARIES}): the summaries of the last "
                                             f"{ACCUMULATE_SUMMARIES} pruned regions kept side by side")
    return f"Arms ({cfg.get('env', 'darkroom')}, PPO rollouts of {n} steps): " + "; ".join(f"{a}: {size[a]}" for a in arms) + "."


def render_markdown(stats: dict, meta: dict) -> str:
    """report.md from `compute_statistics`'s result and `meta` (goals, opt, seeds, eval_seeds, temps, episodes, reps,
    windows: the arms line, train: training_costs, side: the arms' side numbers). Pure: no I/O."""
    arms, summary, goals, opt = stats["arms"], stats["summary"], meta["goals"], meta["opt"]
    temps, side, train = meta["temps"], meta["side"], meta["train"]
    poi, diffs = stats["probability_of_improvement"], stats["paired_differences"]
    main_pair = "compressed vs standard-240"
    n_ppo = stats["ppo_streams"]
    L = [f"# Study: standard vs compressed-context AD on the {len(goals)} held-out test goals", "",
         f"Training seeds {meta['seeds']}; evaluation seeds {meta['eval_seeds']}; {meta['episodes']} in-context episodes "
         "(no weight updates). Temperatures were chosen per trained arm on the validation goals (tuning.json: no "
         "temperature that strands runs, then the best mean over the last fifth); the test goals were evaluated once, at "
         f"those temperatures. Scores are returns / each goal's optimum; 95 % intervals are stratified bootstraps "
         f"({meta['reps']} replicates) over runs within goals (rliable). Episodes to 90 %: the first episode (0-based, so 9 "
         "is the floor) at which a run's 10-episode moving average reaches 0.9 of the optimum, median over runs with a "
         "two-stage bootstrap CI (never: the fraction that do not get there, counted as the run's length). Speed-up: the "
         "source PPO's median episodes needed over the arm's (episode + 1; >= where PPO's median is never, <= where the "
         "arm's is)." + (f" The source PPO learns each goal with one learner whose every update pools its {n_ppo} streams, "
                         f"so per stream it learns from {n_ppo}x the data one AD stream sees in context." if n_ppo else
                         " No speed-up column: the env's PPO history was not collected (collect.py, then rerun the "
                         "study's command)."), "", meta["windows"], "",
         "| arm | T (val) | runs | first 10 | first 50 | all episodes | last | episodes to 90 % (median) | speed-up over "
         "PPO | first reward (median / p90 / max) | KV entries / stream (max / mean) |",
         "|---|---:|---:|---|---|---|---|---|---|---|---:|"]
    kv = stats.get("kv", {})
    for a in arms:
        s, e90, sp, fr = summary[a], summary[a]["to_threshold"], stats["speedup"][a], stats["first_reward"][a]
        t = f"{temps[a]:g}" if temps.get(a) is not None else "-"
        bound = "" if sp is None else ">= " if sp["at_least"] else "<= " if sp["at_most"] else ""
        speed = "-" if sp is None else f"{bound}{fmt_ci(sp['ratio'], sp['ci'], '{:.2f}')}x"
        L.append(f"| {a} | {t} | {s['n_runs']} | {fmt_ci(s['first10']['mean'], s['first10']['ci'])} "
                 f"| {fmt_ci(s['first50']['mean'], s['first50']['ci'])} | {fmt_ci(s['all']['mean'], s['all']['ci'])} "
                 f"| last {s['last_episodes']}: {fmt_ci(s['last']['mean'], s['last']['ci'])} "
                 f"| {fmt_ci(e90['median'], e90['median_ci'], '{:.0f}')} of {e90['n_episodes']} (never: {e90['never_frac']:.1%}) "
                 f"| {speed} "
                 f"| {fr['median']:.0f} / {fr['p90']:.0f} / {fr['max']:.0f} "
                 f"| {fmt_kv(kv.get(a))} |")
    ppo_e90 = stats["ppo_to_90"]
    if ppo_e90:
        L += ["", f"Source PPO (the speed-up reference): episodes to 90 % {ppo_e90['median']:.0f} of its "
              f"{ppo_e90['n_episodes']} (never: {ppo_e90['never_frac']:.1%})."]
    for a, sp in stats.get("speedup_over_source", {}).items():
        bound = ">= " if sp["at_least"] else "<= " if sp["at_most"] else ""
        L += ["", f"Speed-up of {a} over its own source {own_source_arm(a)} (the histories it was distilled from, per "
              f"stream): {bound}{fmt_ci(sp['ratio'], sp['ci'], '{:.2f}')}x."]
    L += ["", "Robust aggregates (IQM):", "",
          "| arm | IQM, all episodes | IQM, last (each arm's last fifth, as above) |", "|---|---|---|"]
    for a in arms:
        s = summary[a]
        L.append(f"| {a} | {fmt_ci(s['all']['iqm'], s['all']['iqm_ci'])} | {fmt_ci(s['last']['iqm'], s['last']['iqm_ci'])} |")
    if "quality" in stats:
        L += ["", *quality_lines(stats, side)]
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
        cells = " | ".join(f"{stats['per_goal'][a][i]:.3f}" for a in arms)
        extra = ""
        if main_pair in diffs:
            d = diffs[main_pair]
            extra = f" {d['per_goal_diff'][i]:+.3f} [{d['per_goal_ci'][i][0]:+.3f}, {d['per_goal_ci'][i][1]:+.3f}] |"
        L.append(f"| {g} | {opt[i]:.0f} | {cells} |{extra}")
    L += ["", "## Cost", "", "| arm | training s (mean over seeds) | steps/s | targets/s | peak RSS MB | val return at the end "
          "of training | eval s per run | `</compress>` closes / forced |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for a in arms:
        sd = side[a]
        if a not in train:
            L.append(f"| {a} | - | - | - | - | - | {np.mean(sd['seconds']):.1f} | |")
            continue
        t = train[a]
        comp = f"{sd['n_closes']} / {sd['n_forced_closes']}" if eval_prune_of(a) else ""
        L.append(f"| {a} | {t['seconds']:.0f} | {t['steps_per_s']:.2f} | {t['targets_per_s']:,.0f} | {t['peak_rss_mb']:.0f} | "
                 f"{t['val_return_end']:.2f} | {np.mean(sd['seconds']):.1f} | {comp} |")
    ppo_norm = stats["ppo_normalised_curve"]
    if ppo_norm:
        L += ["", f"Source PPO on the same goals (its own learning, {len(ppo_norm)} episodes per stream, {n_ppo} streams "
              f"sharing one learner): normalised return {ppo_norm[0]:.3f} in its first episode, "
              f"{np.mean(ppo_norm[-10:]):.3f} over its last 10."]
    L += ["", "![learning curves](learning_curves.png)", "", "![aggregates](aggregates.png)", ""]
    return "\n".join(L)


def plot_learning_curves(stats: dict, temps: dict, n_goals: int, n_seeds: int, path: Path) -> None:
    """Mean normalised return per episode of every arm, with its bootstrap band; the source PPO's mean curve too where
    it is not an arm."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    for a in stats["arms"]:
        c = stats["curves"][a]
        x = np.arange(1, len(c["mean"]) + 1)
        label = f"{a} (T={temps[a]:g})" if temps.get(a) is not None else a
        ax.plot(x, c["mean"], color=color_of(a), label=label, linewidth=1.6)
        ax.fill_between(x, c["lo"], c["hi"], color=color_of(a), alpha=0.2)
    if "ppo" not in stats["arms"] and stats["ppo_normalised_curve"]:
        ppo_norm = stats["ppo_normalised_curve"]
        ax.plot(np.arange(1, len(ppo_norm) + 1), ppo_norm, color=COLORS["PPO (source)"], linestyle="-.",
                label="PPO learning (source of the histories)")
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="oracle")
    ax.set(xlabel="episode", ylabel="return / optimum (mean over goals, runs)", ylim=(0, 1.08),
           title=f"In-context learning on {n_goals} test goals ({n_seeds} training seeds, 95 % bootstrap bands)")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_aggregates(stats: dict, path: Path) -> None:
    """Mean and IQM with their intervals per arm, over all episodes and over the last ones."""
    plt = pyplot()
    arms = stats["arms"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(arms) + 1.5))
    for ax, (name, res) in zip(axes, (("all episodes", stats["aggregate"]), ("last episodes", stats["aggregate_last"])),
                               strict=True):
        for i, a in enumerate(arms):
            for j, (m, key) in enumerate((("mean", "mean_ci"), ("iqm", "iqm_ci"))):
                y = i + (j - 0.5) * 0.3
                lo, hi = res[a][key]
                ax.errorbar(res[a][m], y, xerr=[[res[a][m] - lo], [hi - res[a][m]]], fmt="o" if m == "mean" else "s",
                            color=color_of(a), capsize=3, label=m.upper() if i == 0 else None)
        ax.set_yticks(range(len(arms)), arms)
        ax.set(xlabel="normalised return", title=name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_quality(stats: dict, path: Path) -> None:
    """The compression-quality plot: the mean normalised return (all episodes; last episodes) against the KV entries
    per stream, one point per arm with its 95 % CI (`quality_points`), the Pareto front dashed."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    for ax, (name, q) in zip(axes, (("all episodes", stats["quality"]["all"]), ("last episodes", stats["quality"]["last"])),
                             strict=True):
        for p in q["points"]:
            err = np.clip([[p["mean"] - p["ci"][0]], [p["ci"][1] - p["mean"]]], 0, None)
            ax.errorbar(p["kv_entries"], p["mean"], yerr=err, fmt="o", color=color_of(p["arm"]), capsize=3)
            ax.annotate(p["arm"], (p["kv_entries"], p["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = [p for p in q["points"] if p["pareto"]]
        if len(front) > 1:
            ax.plot([p["kv_entries"] for p in front], [p["mean"] for p in front], "k--", linewidth=0.8, alpha=0.6,
                    label="Pareto front")
            ax.legend(fontsize=8, loc="lower right")
        if not q["points"]:
            ax.text(0.5, 0.5, "no arm has recorded KV sizes", transform=ax.transAxes, ha="center")
        ax.axhline(1.0, color="black", linestyle=":", linewidth=1)
        ax.set(xlabel="KV entries per stream (max over the evaluation)", ylabel="return / optimum (mean, 95 % CI)",
               title=f"Compression quality, {name}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_json(stats: dict, meta: dict) -> dict:
    """report.json: the statistics without the per-run values, and the study's settings."""
    def strip(d: dict) -> dict:
        return {k: v for k, v in d.items() if k != "values"}

    side = meta["side"]
    return {"seeds": meta["seeds"], "eval_seeds": meta["eval_seeds"], "episodes": meta["episodes"], "goals": meta["goals"],
            "temperatures": meta["temps"], "aggregate": stats["aggregate"],
            "last_episodes": {a: s["last_episodes"] for a, s in stats["summary"].items()},
            "aggregate_last": stats["aggregate_last"],
            "table": {a: {k: strip(v) if k == "to_threshold" else v for k, v in s.items()}
                      for a, s in stats["summary"].items()},
            "speedup_over_ppo": stats["speedup"], "speedup_over_own_source": stats.get("speedup_over_source", {}),
            "ppo_episodes_to_90": stats["ppo_to_90"] and strip(stats["ppo_to_90"]),
            "probability_of_improvement": stats["probability_of_improvement"],
            "paired_differences": stats["paired_differences"],
            "episodes_to_90": {a: strip(s["to_threshold"]) for a, s in stats["summary"].items()},
            "first_reward": {a: strip(d) for a, d in stats["first_reward"].items()},
            "training": meta["train"], "ppo_normalised_curve": stats["ppo_normalised_curve"],
            "ppo_streams": stats["ppo_streams"],
            "compression": {a: {k: side[a][k] for k in ("n_closes", "n_forced_closes")}
                            for a in stats["arms"] if eval_prune_of(a)},
            # KV entries per stream ({"max", "mean"}; arm_kv), the compression-quality points, the summary arms' summaries
            "kv_cache": stats.get("kv", {}), "quality": stats.get("quality"),
            "summary": {a: side[a]["summary"] for a in stats["arms"] if "summary" in side.get(a, {})}}


def write_report(root: Path, out: Path, cfg: dict, arms: list[str], seeds: list[int], eval_seeds: list[int],
                 temps: dict[str, float], episodes: int, reps: int, regions: int = 2, overrides: list[str] = ()) -> dict:
    """Load every arm's test returns, compute the statistics, and write report.md, report.json and the three plots."""
    from env import task_family, task_split

    goals = task_split(cfg, "test")
    opt = np.array([task_family(cfg).optimal_return(g, cfg) for g in goals], dtype=np.float64)
    returns, side = arm_returns(root, cfg, arms, seeds, eval_seeds, temps, episodes, overrides)
    stats = compute_statistics(returns, opt, returns["ppo"] if "ppo" in returns else ppo_reference(cfg, goals), reps,
                               kv=arm_kv(side))
    summary = side.get("compressed-summary", {}).get("summary")
    noise = eps_noise(cfg.get("env", "darkroom"), list(overrides))
    meta = {"goals": goals, "opt": opt, "seeds": seeds, "eval_seeds": eval_seeds, "temps": temps, "episodes": episodes,
            "reps": reps, "windows": arm_windows(cfg, arms, regions, summary, noise), "train": training_costs(root, arms, seeds),
            "side": side}
    plot_learning_curves(stats, temps, len(goals), len(seeds), out / "learning_curves.png")
    plot_aggregates(stats, out / "aggregates.png")
    plot_quality(stats, out / "quality.png")
    report = report_json(stats, meta)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(render_markdown(stats, meta))
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
    parser = make_parser(__doc__)
    parser.add_argument("--env", choices=list(ENV_CONFIGS), default="darkroom",
                        help="the env whose collection and model configs to use (default: darkroom)")
    parser.add_argument("--runs-root", default=None,
                        help="where runs/, evals/ and the report go (default: runs/study, runs/study-<env> for other envs)")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds (default: 0,1,2)")
    parser.add_argument("--arms", default=",".join(ARMS),
                        help=f"arms (default: {','.join(ARMS)}; also: {','.join(OPTIONAL_ARMS)}, {ARM_PATTERNS})")
    parser.add_argument("--report-dir", default=None,
                        help="where the report goes (default: --runs-root); e.g. a second report over other arms")
    parser.add_argument("--eval-seeds", default="0,1,2,3", help="evaluation seeds on the test goals (default: 0,1,2,3)")
    parser.add_argument("--temperatures", default="0.5,0.7,1.0", help="eval_temperature grid tuned per arm on validation goals")
    parser.add_argument("--tune-episodes", type=int, default=200, help="episodes of each validation rollout (default: 200)")
    parser.add_argument("--tune-never-slack", type=float, default=0.02,
                        help="tuning: a temperature whose fraction of runs that never reach 90 %% of the optimum exceeds "
                             "the grid's lowest by more than this is out (default: 0.02)")
    parser.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                        help="trainings / evaluations at once, one thread each (default: min(2, cores))")
    parser.add_argument("--reps", type=int, default=2000, help="bootstrap replicates (default: 2000)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every training and evaluation")
    parser.add_argument("--print-config", action="store_true",
                        help="print each trained arm's resolved config (seed 0; include: files merged, overrides applied) as "
                             "YAML and exit")
    args = parse_cli(parser)
    seeds = parse_list(args.seeds, int, "--seeds")
    arms = parse_arms(args.arms)
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
    check_arms(args.env, arms, train_overrides)
    if args.print_config:
        print_config({a: load_config(*train_config(a, 0, train_overrides, args.env))
                      for a in sorted({checkpoint_of(a) for a in arms if is_trained(a)})})
    for a in sorted({checkpoint_of(a) for a in arms if is_trained(a)}):  # every config must load before anything runs
        load_config(*train_config(a, 0, train_overrides, args.env))
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
    temps, n_tuned = stage_tune(root, report_dir, cfg, arms, seeds, temperatures, args.tune_episodes, eval_overrides, args.jobs,
                                args.tune_never_slack)
    temps |= {a: None for a in arms if not is_trained(a)}  # the reference arms sample no actions from a model
    specs = [eval_spec(root, a, s, "test", temps[a], e, episodes, eval_overrides)
             for a in arms if is_trained(a) for s in seeds for e in eval_seeds]
    n_tested = run_evals(root, specs, args.jobs, "test evaluation")
    t_eval = time.perf_counter() - start - t_collect - t_train
    regions = load_config(configs["compressed"], train_overrides)["max_regions"]  # the compressed arms' budget
    timing = {"collect_s": t_collect, "train_s": t_train, "evaluate_s": t_eval, "trained_runs": n_trained,
              "evaluations_run": n_tuned + n_tested}
    did_work = n_trained or n_tuned + n_tested or not (report_dir / "timing.json").is_file()
    if did_work:  # written before the report, so that a report that fails does not lose the work's timing
        (report_dir / "timing.json").write_text(json.dumps(timing, indent=1))
    write_report(root, report_dir, cfg, arms, seeds, eval_seeds, temps, episodes, args.reps, regions, train_overrides)
    total = time.perf_counter() - start
    if did_work:
        (report_dir / "timing.json").write_text(json.dumps(timing | {"total_s": total}, indent=1))
    else:  # a rerun that only rewrote the report: the timing of the run that did the work stays
        say(f"nothing trained or evaluated: kept {report_dir / 'timing.json'} of the run that did the work")
    print((report_dir / "report.md").read_text())
    say(f"wrote {report_dir / 'report.md'}, report.json, learning_curves.png, aggregates.png, quality.png in {total:.0f} s "
        f"(collect {t_collect:.0f} s, train {t_train:.0f} s, evaluate {t_eval:.0f} s)")


if __name__ == "__main__":
    run_main(main)
