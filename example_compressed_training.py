"""The whole workflow in one command: collect PPO histories, train standard and compressed AD on the same
file, evaluate both in context on the held-out goals, and write the comparison report.

    python example_compressed_training.py --mode all                      # defaults (a long CPU run)
    python example_compressed_training.py --mode all train_timesteps=2000 compressed.lr=3e-4 --runs-root /tmp/runs
    python example_compressed_training.py --env dark_key_to_door --runs-root runs/kd     # another env (its own configs)

Each stage runs collect.py / train.py / evaluate.py as a subprocess, so their progress bars show. Interrupt
at any time and re-run the same command: finished stages are skipped.
- `--env NAME` picks the env's collection config and both model configs (common.ENV_CONFIGS; default darkroom).
- collect: skipped when the history file opens and holds every goal asked for (the env's selection, or --goals);
  an unreadable or incomplete file is collected again (collect.py --force keeps it until the new one is done).
- train: skipped when the run reached train_timesteps (train_summary.json, or ckpt.pt's step); otherwise
  train.py is called and resumes from ckpt.pt by itself. With >= 2 cores the two modes train at once, one thread
  each, logging to RUN_DIR/train.log (--sequential: one after the other, progress bars on the terminal).
- evaluate: skipped when eval_summary.json is an evaluation of this training's weights on --split with the same
  eval_* settings; otherwise evaluate.py replaces it (and says so). With >= 2 cores the two evaluations run at once,
  one thread each, logging to RUN_DIR/evaluate.log (--sequential: one after the other, on the terminal).
- compare: always rewritten from the two runs (compare.write_report).
Overrides `key=value` apply to every stage (collect.py gets the collection keys); `standard.key=value` or
`compressed.key=value` apply to one mode only. Run dirs: RUNS_ROOT/<run_name>-seed<seed> (the names train.py
uses under runs/); the report goes to RUNS_ROOT/compare/.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import yaml

from common import (
    ENV_CONFIGS,
    ENV_KEYS,
    EVAL_DEFAULTS,
    EVAL_KEYS,
    SCHEMA,
    UserError,
    add_print_config,
    default_run_dir,
    env_configs,
    history_path,
    load_config,
    make_parser,
    parse_cli,
    parse_goals,
    parse_overrides,
    print_config,
    run_main,
)
from history import history_problem
from jobs import log_text, run_concurrently, run_stage, say

MODES = ("standard", "compressed")
STAGES = {
    "collect": ["collect"],
    "train": ["train"],
    "evaluate": ["evaluate"],
    "compare": ["compare"],
    "all": ["collect", "train", "evaluate", "compare"],
}


class Plan:
    """Everything the stages share, resolved once from the command line."""

    def __init__(self, overrides: list[str], goals: str | None, runs_root: Path, models: bool = True,
                 env: str = "darkroom"):
        from env import selected_tasks, task_family  # imported here: env pulls in SB3, which takes seconds

        shared, per_mode = split_overrides(overrides)
        self.configs = env_configs(env)
        collect_keys = set(load_config(self.configs["collect"])) | set(ENV_KEYS)
        self.collect_overrides = [o for o in shared if o.split("=", 1)[0].strip() in collect_keys]
        self.collect_cfg = load_config(self.configs["collect"], self.collect_overrides)
        self.overrides = {m: shared + per_mode[m] for m in MODES}  # strings, passed on as given
        # collection alone needs no model config (and must not fail on, say, n_steps=20 without compress_interval=20)
        self.cfgs = {m: load_config(self.configs[m], self.overrides[m]) for m in MODES} if models else {}
        for k in sorted(collect_keys):  # both modes must read the very file collect writes
            values = {self.collect_cfg.get(k), *(cfg.get(k) for cfg in self.cfgs.values())}
            if len(values) > 1:
                raise UserError(
                    f"standard and compressed must train on the same history: '{k}' differs between them; "
                    f"set it as {k}=value for both, not per mode"
                )
        self.history = history_path(self.collect_cfg)
        self.goals_arg = goals
        selection = selected_tasks(self.collect_cfg)
        n_tasks = task_family(self.collect_cfg).n_tasks(self.collect_cfg)
        self.goals = parse_goals(goals, n_tasks, selection) if goals else selection
        self.runs_root = runs_root
        self.run_dirs = {m: runs_root / default_run_dir(cfg).name for m, cfg in self.cfgs.items()}
        if models and self.run_dirs["standard"] == self.run_dirs["compressed"]:
            raise UserError(
                f"both modes would write to {self.run_dirs['standard']}: give them different run_name "
                "(standard.run_name=... compressed.run_name=...)"
            )


def split_overrides(items: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """`key=value` for every mode, `standard.key=value` / `compressed.key=value` for one."""
    shared, per_mode = [], {m: [] for m in MODES}
    for item in items:
        key = item.split("=", 1)[0]
        prefix, _, rest = key.partition(".")
        if rest and prefix in per_mode:
            per_mode[prefix].append(item[len(prefix) + 1 :])
        elif rest:
            raise UserError(f"bad override '{item}': a mode prefix must be {' or '.join(MODES)}, e.g. compressed.lr=3e-4")
        else:
            shared.append(item)
    for key in parse_overrides(shared) | parse_overrides([o for items in per_mode.values() for o in items]):
        if key not in SCHEMA:  # checked here too, as --mode collect loads no model config that would catch it
            raise UserError(f"unknown config key '{key}' (command-line override); valid keys: see config/*/*.yaml")
    return shared, per_mode


def stage_collect(plan: Plan) -> None:
    problem = history_problem(plan.history, plan.goals, plan.collect_cfg)
    if problem is None:
        say("collect", f"skip: {plan.history} is complete ({len(plan.goals)} goals)")
        return
    args = ["--config", str(plan.configs["collect"]), *(["--goals", plan.goals_arg] if plan.goals_arg else []),
            *plan.collect_overrides]
    if plan.history.exists():
        say("collect", f"{plan.history} {problem}: collecting again (the old file stays until the new one is complete)")
        args = ["--force", *args]
    else:
        say("collect", f"no history at {plan.history}: collecting {len(plan.goals)} goals with PPO")
    run_stage("collect", "collect.py", args)


def saved_config(run_dir: Path) -> dict | None:
    path = run_dir / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def trained_steps(run_dir: Path, target: int) -> int | None:
    """Steps the run has reached: from train_summary.json, else (or if short of `target`) from ckpt.pt; None if neither."""
    summary, ckpt = run_dir / "train_summary.json", run_dir / "ckpt.pt"
    steps = int(json.loads(summary.read_text())["steps"]) if summary.is_file() else None
    if (steps is None or steps < target) and ckpt.is_file():
        import torch  # only here: importing torch costs seconds, and most finished runs have a summary

        try:
            steps = int(torch.load(ckpt, map_location="cpu", weights_only=False)["step"])
        except Exception:
            pass  # train.py explains an unreadable checkpoint better than we could
    return steps


def train_todo(plan: Plan) -> list[tuple[str, list[str]]]:
    """(mode, train.py arguments) of every run that is not finished yet; finished runs are checked and skipped."""
    todo = []
    for mode, cfg in plan.cfgs.items():
        stage, run_dir = f"train {mode}", plan.run_dirs[mode]
        steps = trained_steps(run_dir, cfg["train_timesteps"])
        if steps is not None and steps >= cfg["train_timesteps"]:
            saved = saved_config(run_dir)
            if saved is not None and saved != cfg:
                from common import config_diff  # the one rule for which keys may change

                diff = config_diff(saved, cfg)
                if diff:
                    raise UserError(f"{run_dir} was trained with {diff}; use another --runs-root, or delete {run_dir} to retrain")
            if not (run_dir / "train_summary.json").is_file():
                say(
                    stage,
                    f"note: {run_dir} has a finished checkpoint but no train_summary.json (killed while finishing); "
                    "the report needs it: delete the run dir to retrain",
                )
            say(stage, f"skip: {run_dir} is finished ({steps} of {cfg['train_timesteps']} steps)")
            continue
        if (run_dir / "ckpt.pt").exists():
            say(stage, f"resuming {run_dir} from its checkpoint ({steps} of {cfg['train_timesteps']} steps)")
        else:
            say(stage, f"training {mode} AD from scratch in {run_dir} ({cfg['train_timesteps']} steps)")
        todo.append((mode, ["--config", str(plan.configs[mode]), "--run-dir", str(run_dir), *plan.overrides[mode]]))
    return todo


def run_modes(plan: Plan, stage: str, script: str, todo: list[tuple[str, list[str]]], echo: bool = False) -> None:
    """Run `script` for each (mode, arguments) of `todo`: at once with one thread each, each logging to
    RUN_DIR/<stage>.log, where there are >= 2 cores and two jobs (`echo`: then print each log as the terminal would
    have shown it); else one after the other on the terminal."""
    if len(todo) > 1 and plan.parallel:
        logs = {m: plan.run_dirs[m] / f"{stage}.log" for m, _ in todo}
        run_concurrently({f"{stage} {m}": (script, args, logs[m]) for m, args in todo})
        for m in logs if echo else ():
            say(f"{stage} {m}", f"{logs[m]}:")
            print(log_text(logs[m]).strip(), flush=True)
        return
    for mode, args in todo:
        run_stage(f"{stage} {mode}", script, args)


def stage_train(plan: Plan) -> None:
    run_modes(plan, "train", "train.py", train_todo(plan))


def eval_staleness(run_dir: Path, cfg: dict, split: str) -> str | None:
    """None if eval_summary.json evaluated this training's weights on `split` with the eval settings asked for now,
    else why not."""
    summary, trained = run_dir / "eval_summary.json", run_dir / "train_summary.json"
    if not summary.is_file():
        return "not evaluated yet"
    try:
        ev = json.loads(summary.read_text())
        weights = (json.loads(trained.read_text()).get("weights_sha256_per_rank") or [None])[0]
    except (json.JSONDecodeError, OSError):
        return "eval_summary.json or train_summary.json is unreadable"
    if ev.get("weights_sha256") != weights:
        return "eval_summary.json is of other weights than this training's"
    changed = [f"{k} {v} -> {cfg.get(k)}" for k, v in ev.get("eval_config", {}).items() if cfg.get(k) != v]
    if ev.get("split") != split:
        changed.insert(0, f"split {ev.get('split')} -> {split}")
    return f"eval settings changed ({', '.join(changed)})" if changed else None


def stage_evaluate(plan: Plan) -> None:
    run_modes(plan, "evaluate", "evaluate.py", eval_todo(plan), echo=True)  # the results, as evaluate.py prints them


def eval_todo(plan: Plan) -> list[tuple[str, list[str]]]:
    """(mode, evaluate.py arguments) of every run whose evaluation is missing or stale; current ones are skipped."""
    todo = []
    for mode, cfg in plan.cfgs.items():
        stage, run_dir = f"evaluate {mode}", plan.run_dirs[mode]
        why = eval_staleness(run_dir, cfg, plan.split)
        if why is None:
            say(stage, f"skip: {run_dir / 'eval_summary.json'} is an evaluation of this training with these settings")
            continue
        # evaluate.py rebuilds the model from the checkpoint's config: pass the eval settings asked for now (from the
        # config files and overrides) where they differ from those the run was trained with; any other changed key
        # is passed too, so that evaluate.py refuses it with its own message
        trained = saved_config(run_dir) or {}
        given = {item.split("=", 1)[0].strip(): item for item in plan.overrides[mode]}  # the last one of a key wins
        args = [item for k, item in given.items() if k not in EVAL_KEYS and trained.get(k, cfg[k]) != cfg[k]]
        now = EVAL_DEFAULTS | cfg  # an eval key neither config sets has its default
        args += [f"{k}={json.dumps(now[k])}" for k in EVAL_KEYS if (EVAL_DEFAULTS | trained).get(k) != now[k]]
        force = ["--force"] if why.startswith("eval settings changed") else []  # said here: the old one is replaced
        say(stage, f"{why}: evaluating {run_dir} in context on the {plan.split} goals ({cfg['eval_episodes']} episodes)")
        todo.append((mode, ["--run-dir", str(run_dir), "--split", plan.split, *force, *args]))
    return todo


def stage_compare(plan: Plan) -> None:
    from compare import write_report  # matplotlib is imported only when a report is written

    out = plan.runs_root / "compare"
    say("compare", f"report from {plan.run_dirs['standard']} and {plan.run_dirs['compressed']}")
    write_report(plan.run_dirs["standard"], plan.run_dirs["compressed"], out)
    print((out / "report.md").read_text())
    for name in ("report.md", "report.json", "learning_curves.png", "per_goal.png"):
        say("compare", f"wrote {out / name}")


def main():
    parser = make_parser(__doc__)
    parser.add_argument(
        "--mode",
        choices=list(STAGES),
        default="all",
        help="collect: PPO histories; train: both models; evaluate: both models in context; "
        "compare: the report; all: the four in order",
    )
    parser.add_argument("--env", choices=list(ENV_CONFIGS), default="darkroom",
                        help="the env: its collection config and both model configs")
    parser.add_argument("--runs-root", default="runs", help="directory for the two run dirs and compare/")
    parser.add_argument(
        "--goals",
        default=None,
        help="task ids / ranges A:B to collect (default: the env's train/val/test selection); the history counts as "
        "complete when it holds these",
    )
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="goals to evaluate on: test (the held-out goals results are reported on) or val")
    parser.add_argument("--sequential", action="store_true",
                        help="train the two modes one after the other (default: concurrently, one thread each, "
                        "when the machine has >= 2 cores)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="[mode.]key=value",
        help="config override for every stage, or for one mode with a standard./compressed. prefix; anywhere among "
        "the options",
    )
    add_print_config(parser)
    args = parse_cli(parser)
    plan = Plan(args.overrides, args.goals, Path(args.runs_root), models=args.mode != "collect", env=args.env)
    if args.print_config:  # the three resolved configs the stages run with
        print_config({"collect": plan.collect_cfg, **plan.cfgs})
    plan.split = args.split
    plan.parallel = not args.sequential and (os.cpu_count() or 1) >= 2
    stages = {"collect": stage_collect, "train": stage_train, "evaluate": stage_evaluate, "compare": stage_compare}
    start, took = time.perf_counter(), {}
    try:
        for name in STAGES[args.mode]:
            t0 = time.perf_counter()
            stages[name](plan)
            took[name] = time.perf_counter() - t0
    except KeyboardInterrupt:
        print("\ninterrupted: re-run the same command to resume (finished stages are skipped)", file=sys.stderr)
        sys.exit(130)
    stage_times = ", ".join(f"{name} {t:.0f} s" for name, t in took.items())
    print(f"--mode {args.mode} finished in {time.perf_counter() - start:.0f} s ({stage_times})")


if __name__ == "__main__":
    run_main(main)
