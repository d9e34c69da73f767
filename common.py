"""What every script shares: the YAML config loader, file names, and the one-line error convention."""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent
CONFIG_DIR = ROOT / "config"
DEFAULT_COLLECT_CONFIG = CONFIG_DIR / "algorithm" / "ppo_darkroom.yaml"
DEFAULT_MODEL_CONFIG = CONFIG_DIR / "model" / "ad_dr.yaml"
# env name -> its collection config and its standard / compressed model configs: the one list of env names (env/registry.py
# holds their tasks and dynamics)
ENV_CONFIGS = {
    "darkroom": ("ppo_darkroom.yaml", "ad_dr.yaml", "ad_dr_compressed.yaml"),
    "darkroom_permuted": ("ppo_darkroom_permuted.yaml", "ad_dp.yaml", "ad_dp_compressed.yaml"),
    "dark_key_to_door": ("ppo_dark_key_to_door.yaml", "ad_kd.yaml", "ad_kd_compressed.yaml"),
}


class UserError(Exception):
    """Bad input from the user: reported as one line and a non-zero exit, never a traceback."""


# Every key a config may hold, with its type. Anything else is a typo and is rejected.
SCHEMA: dict[str, type] = {
    # env
    "env": str, "grid_size": int, "horizon": int, "env_split_seed": int, "train_env_ratio": float, "n_val_tasks": int,
    "n_train_tasks": int, "n_test_tasks": int,
    # source algorithm / collection
    "alg": str, "alg_seed": int, "n_steps": (int, list), "n_steps_per": str, "n_stream": int, "total_source_timesteps": int,
    "ppo_batch_size": int, "ppo_n_epochs": int, "ppo_lr": float, "ppo_ent_coef": float,
    "ppo_gamma": float, "ppo_gae_lambda": float, "ppo_clip_range": float, "ppo_net_arch": int,
    "ppo_observe_stage": bool, "ppo_fused_adam": bool, "source_eps_start": float, "source_eps_regions": int,
    "n_process": int, "traj_dir": str,
    # model
    "model": str, "run_name": str, "use_compressed_context": bool, "n_transit": int,
    "compress_interval": int, "max_regions": int, "token_type_loss_weight": float, "min_source_return": float,
    "region_stride": int, "first_region_any": bool, "first_region_steps": int, "target": str,
    "d_model": int, "n_layer": int, "n_head": int, "dropout": float, "state_embedding": str, "compile": bool,
    "use_summary": bool, "n_summary": int, "max_summaries": int, "summary_mode": str, "summary_train_regions": int,
    # training
    "seed": int, "train_timesteps": int, "train_batch_size": int, "lr": float, "weight_decay": float, "weight_decay_on": str,
    "warmup_steps": int, "grad_clip": float, "mixed_precision": str, "deterministic": bool, "log_interval": int,
    "val_interval": int, "val_batches": int, "ckpt_interval": int, "num_threads": int, "train_shards": int, "val_episodes": int,
    "val_streams": int,
    # evaluation
    "eval_episodes": int, "eval_streams": int, "eval_temperature": float, "eval_window_shift": int,
    "eval_cache": bool, "eval_seed": int, "eval_prune": str, "eval_close_threshold": float,
    "eval_first_region": int,
}
# the env keys (config/env/*.yaml, and n_train_tasks / n_test_tasks where an env's file leaves them out): they choose the
# tasks, so a collection takes them as well as a model config
ENV_KEYS = ("env", "grid_size", "horizon", "env_split_seed", "train_env_ratio", "n_val_tasks", "n_train_tasks", "n_test_tasks")
# every key collect.py reads: the env keys, the source algorithm's, and where / how (n_process, traj_dir);
# history.collect_key_names(alg) is the subset that defines what is in the file. visualize_compression.py reads the same.
COLLECTION_KEYS = ENV_KEYS + (
    "alg", "alg_seed", "n_steps", "n_steps_per", "n_stream", "total_source_timesteps", "ppo_batch_size", "ppo_n_epochs",
    "ppo_lr", "ppo_ent_coef", "ppo_gamma", "ppo_gae_lambda", "ppo_clip_range", "ppo_net_arch", "ppo_observe_stage",
    "ppo_fused_adam", "source_eps_start", "source_eps_regions", "n_process", "traj_dir",
)
# the source algorithms collect.py runs: SB3 PPO, or the searcher with noise falling region by region (AD-eps,
# searcher.noisy_history; its source_eps_* keys)
ALGS = ("PPO", "searcher-eps")
POSITIVE = {
    "grid_size", "horizon", "n_steps", "n_stream", "total_source_timesteps", "ppo_batch_size",
    "ppo_n_epochs", "ppo_lr", "ppo_net_arch", "n_process", "n_transit", "compress_interval",
    "max_regions", "region_stride", "d_model", "n_layer", "n_head", "train_timesteps", "train_batch_size", "train_shards", "lr",
    "log_interval", "val_interval", "val_batches", "ckpt_interval", "eval_episodes", "eval_streams",
    "eval_temperature", "eval_window_shift",
}


# old key -> its new name: an old key is refused in one line naming the new one (a checkpoint's config may still hold it)
RENAMED_KEYS = {"test_interval": "val_interval", "test_batches": "val_batches"}
# keys that may differ between a checkpoint and the config that resumes it (old names included: runs trained before)
RESUMABLE_KEYS = {
    "train_timesteps", "log_interval", "val_interval", "val_batches", "ckpt_interval", "n_process", "traj_dir",
    "eval_episodes", "eval_streams", "eval_temperature", "eval_window_shift", "eval_cache", "eval_seed", "eval_prune",
    "eval_close_threshold", "eval_first_region", "num_threads", "train_shards", "val_episodes", "val_streams", *RENAMED_KEYS,
}


def config_diff(old: dict, cfg: dict) -> str | None:
    """The first key (other than RESUMABLE_KEYS) on which a saved run's config and this one differ, as text."""
    diff = [k for k in sorted(set(cfg) | set(old)) if k not in RESUMABLE_KEYS and old.get(k) != cfg.get(k)]
    return f"{diff[0]}={old.get(diff[0])!r}, not {cfg.get(diff[0])!r}" if diff else None


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise UserError(f"config include loop: {path} includes itself; remove the cycle")
    if not path.is_file():
        raise UserError(f"config file not found: {path}; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML ({e.__class__.__name__}); fix its syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of key: value")
    includes = data.pop("include", [])
    merged: dict = {}
    for inc in [includes] if isinstance(includes, str) else includes:
        merged.update(_read_yaml(path.parent / inc, seen + (path,)))  # includes are relative to the file
    merged.update(data)
    return merged


def _check_type(key: str, value, source: str):
    if key in RENAMED_KEYS:
        raise UserError(f"config key '{key}' is now '{RENAMED_KEYS[key]}' ({source}); rename it")
    if key not in SCHEMA:
        raise UserError(f"unknown config key '{key}' ({source}); valid keys: see config/*/*.yaml")
    want = SCHEMA[key]
    if want == (int, list):  # n_steps: one rollout length, or a set of them drawn per task (docs/design.md §2)
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items):
            raise UserError(f"config key '{key}' must be a positive int or a list of them, got {value!r} ({source})")
        return value
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise UserError(f"config key '{key}' must be {want.__name__}, got {value!r} ({source})")
    if key in POSITIVE and value <= 0:
        raise UserError(f"config key '{key}' must be > 0, got {value!r} ({source})")
    return value


def parse_overrides(items: list[str]) -> dict:
    """`key=value` strings -> dict; values are parsed as YAML scalars (`lr=3e-4`, `eval_cache=false`)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"bad override '{item}': write overrides as key=value, e.g. train_timesteps=100")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if SCHEMA.get(key.strip()) is str and value is not None:
            value = str(raw)
        elif SCHEMA.get(key.strip()) is float and isinstance(value, str):
            try:
                value = float(raw)  # YAML 1.1 reads `1e-3` (no dot) as a string
            except ValueError:
                pass
        out[key.strip()] = value
    return out


def rollout_lengths(cfg: dict) -> list[int]:
    """The PPO rollout lengths a config's history holds: [n_steps], or the set tasks draw theirs from."""
    return list(cfg["n_steps"]) if isinstance(cfg["n_steps"], list) else [cfg["n_steps"]]


N_STEPS_PER = ("task", "stream")  # with a list of n_steps: one length per task, or every length in every task


def n_steps_of(cfg: dict, task: int) -> int:
    """The rollout length of one task: n_steps, or with a list, a draw from it fixed by (alg_seed, task)."""
    lengths = rollout_lengths(cfg)
    return lengths[0] if len(lengths) == 1 else random.Random(cfg["alg_seed"] * 100_003 + task).choice(lengths)


def stream_n_steps(cfg: dict, task: int) -> np.ndarray:
    """The rollout length of each of a task's `n_stream` streams, `[n_stream]`. With `n_steps_per: stream` (and a list of
    n_steps) stream s runs lengths[s % len(lengths)], by its own PPO learner per length, so every task holds every length
    and the task cannot tell the model its length; otherwise every stream has the task's `n_steps_of`."""
    if cfg.get("n_steps_per", "task") == "stream":
        lengths = rollout_lengths(cfg)
        return np.array([lengths[s % len(lengths)] for s in range(cfg["n_stream"])], np.int64)
    return np.full(cfg["n_stream"], n_steps_of(cfg, task), np.int64)


def validate(cfg: dict) -> dict:
    """Consistency checks between keys (one line each, naming the fix)."""
    for n in rollout_lengths(cfg) if "n_steps" in cfg else []:
        if "total_source_timesteps" in cfg and cfg["total_source_timesteps"] % n:
            raise UserError(
                f"total_source_timesteps={cfg['total_source_timesteps']} is not a multiple of n_steps={n}; "
                "history regions are whole PPO rollouts"
            )
    if cfg.get("alg", "PPO") not in ALGS:
        raise UserError(f"alg must be one of {', '.join(ALGS)} (the source collect.py runs); got {cfg['alg']!r}")
    if cfg.get("alg") == "searcher-eps":
        if isinstance(cfg.get("n_steps"), list):
            raise UserError("alg=searcher-eps writes regions of one length: set n_steps to one int, not a list")
        if not 0.0 <= cfg.get("source_eps_start", 1.0) <= 1.0 or cfg.get("source_eps_regions", 1) < 1:
            raise UserError(f"searcher-eps needs source_eps_start in [0, 1] and source_eps_regions >= 1; got "
                            f"{cfg.get('source_eps_start')!r}, {cfg.get('source_eps_regions')!r}")
    per = cfg.get("n_steps_per", "task")
    if per not in N_STEPS_PER:
        raise UserError(f"n_steps_per must be one of {', '.join(N_STEPS_PER)}; got {per!r}")
    if per == "stream" and "n_steps" in cfg and cfg.get("n_stream", 0) < len(rollout_lengths(cfg)):
        raise UserError(f"n_steps_per=stream runs one PPO learner per n_steps: n_stream={cfg['n_stream']} is fewer than "
                        f"the {len(rollout_lengths(cfg))} lengths in n_steps; raise n_stream")
    if "d_model" in cfg and "n_head" in cfg and cfg["d_model"] % cfg["n_head"]:
        raise UserError(f"d_model={cfg['d_model']} is not divisible by n_head={cfg['n_head']}")
    if cfg.get("use_compressed_context"):
        longest = max(rollout_lengths(cfg))
        if cfg["compress_interval"] != longest:
            what = "PPO n_steps" if not isinstance(cfg["n_steps"], list) else "the longest PPO n_steps"
            raise UserError(
                f"compress_interval={cfg['compress_interval']} must equal {what}={longest}: "
                f"regions are PPO rollouts; set compress_interval={longest} or re-collect with matching n_steps"
            )
        need = min_compressed_context(cfg["compress_interval"], cfg["max_regions"])
        if cfg["n_transit"] < need:
            raise UserError(
                f"n_transit={cfg['n_transit']} is too small for {cfg['max_regions']} regions of "
                f"{cfg['compress_interval']} steps plus markers: set n_transit>={need}"
            )
    validate_summary(cfg)
    if not 0.0 <= cfg.get("eval_close_threshold", EVAL_DEFAULTS["eval_close_threshold"]) < 1.0:
        raise UserError(f"eval_close_threshold must be in [0, 1) (0: the head's argmax), got {cfg['eval_close_threshold']!r}")
    if not 0.0 <= cfg.get("min_source_return", 0.0) <= 1.0:
        raise UserError(f"min_source_return is a fraction of each task's optimum in [0, 1] (0: train on every task), got "
                        f"{cfg['min_source_return']!r}")
    first = cfg.get("eval_first_region", EVAL_DEFAULTS["eval_first_region"])
    trained_first = cfg.get("first_region_steps", 0)  # >= 0: the loop over counts below
    if trained_first > 0 and cfg.get("use_compressed_context") and first not in (0, trained_first):
        raise UserError(f"first_region_steps={trained_first} trained for a first region of {trained_first} steps: "
                        f"evaluate with eval_first_region={trained_first} or 0 (as trained), not {first}")
    if first < 0:
        raise UserError(f"eval_first_region must be >= 0 (0: the head closes the first region too), got {first!r}")
    if first and "n_transit" in cfg and not (cfg["use_compressed_context"] and first <= max_region_steps(cfg)):
        fix = f"set eval_first_region<={max_region_steps(cfg)}" if cfg["use_compressed_context"] else "it is for compressed mode"
        raise UserError(f"eval_first_region={first} cannot be played: {fix} (0: the head decides)")
    if cfg.get("eval_prune", EVAL_DEFAULTS["eval_prune"]) not in PRUNE_RULES:
        raise UserError(f"eval_prune must be one of {', '.join(PRUNE_RULES)}; got {cfg['eval_prune']!r}")
    if "env" in cfg and cfg["env"] not in ENV_CONFIGS:
        raise UserError(f"unknown env {cfg['env']!r}: use one of {', '.join(ENV_CONFIGS)} (config/env/*.yaml)")
    for k in ("n_val_tasks", "n_train_tasks", "n_test_tasks", "val_episodes", "val_streams", "num_threads",
              "first_region_steps"):
        if cfg.get(k, 0) < 0:
            raise UserError(f"config key '{k}' must be >= 0, got {cfg[k]!r}")
    if cfg.get("weight_decay_on", "all") not in ("all", "matrices"):
        raise UserError(f"weight_decay_on must be all or matrices; got {cfg['weight_decay_on']!r}")
    if cfg.get("mixed_precision", "no") not in ("auto", "no", "fp16", "bf16"):
        raise UserError(f"mixed_precision must be one of auto, no, fp16, bf16; got {cfg['mixed_precision']!r}")
    return cfg


# the keys evaluate.py and probe.py may set on top of a checkpoint's config (everything else is fixed by the checkpoint,
# except traj_dir: where to find the history file, which probe.py reads)
EVAL_KEYS = ("eval_episodes", "eval_streams", "eval_temperature", "eval_window_shift", "eval_cache", "eval_seed", "eval_prune",
             "eval_close_threshold", "eval_first_region")
# eval keys added after runs may have been trained: a checkpoint (or an evaluation summary) without one used this value
EVAL_DEFAULTS = {"eval_prune": "model", "eval_close_threshold": 0.0, "eval_first_region": 0}
PRUNE_RULES = ("model", "fixed")  # compressed evaluation: close a region when the head says so / every compress_interval


def first_region_steps(cfg: dict) -> int:
    """The steps after which evaluation closes every stream's first region (0: the head decides): eval_first_region, or
    0 for "as trained" (first_region_steps, the short first region a run was trained for)."""
    return cfg.get("eval_first_region", EVAL_DEFAULTS["eval_first_region"]) or cfg.get("first_region_steps", 0)


def max_region_steps(cfg: dict) -> int:
    """The longest region evaluation keeps open (then closes it, a forced close): `max_regions` of them with their
    markers (and summaries) must fit in `n_transit` positions."""
    if cfg.get("use_summary"):
        n, m = cfg["n_summary"], cfg["max_regions"]
        return min((cfg["n_transit"] + 1 + n) // m - 2 - n, cfg["n_transit"] - 2 - n)  # raw part; one pruned region
    return (cfg["n_transit"] + 1) // cfg["max_regions"] - 2


SUMMARY_MODES = ("accumulate", "recurrent", "feedback")  # model/summary.py


def min_summary_context(interval: int, max_regions: int, n_summary: int) -> int:
    """Positions summary mode needs: the raw part `C r E S^n ... C r` and a pruned region `C r E S^n` (model/summary.py)."""
    return max(max_regions * (interval + 2 + n_summary) - 1 - n_summary, interval + 2 + n_summary)


def validate_summary(cfg: dict) -> None:
    """Summary tokens: one line for each inconsistent setting."""
    if not cfg.get("use_summary"):
        return
    if not cfg.get("use_compressed_context"):
        raise UserError("use_summary=true needs use_compressed_context=true: summaries are written at each </compress>")
    if cfg.get("region_stride", 1) != 1:
        raise UserError(f"use_summary=true trains on consecutive regions, as evaluation keeps them: set region_stride=1 "
                        f"(got {cfg['region_stride']})")
    n, mode, kept = cfg.get("n_summary", 0), cfg.get("summary_mode", "accumulate"), cfg.get("max_summaries", 1)
    if n < 1:
        raise UserError(f"use_summary=true needs n_summary>=1 (summary tokens per closed region), got {n!r}")
    if mode not in SUMMARY_MODES:
        raise UserError(f"summary_mode must be one of {', '.join(SUMMARY_MODES)}; got {mode!r}")
    if kept < 1 or (mode != "accumulate" and kept != 1):
        fix = f"set max_summaries=1 ({mode} keeps one summary) or summary_mode=accumulate" if kept >= 1 else "set it >= 1"
        raise UserError(f"max_summaries={kept} does not fit summary_mode={mode}: {fix}")
    back = cfg.get("summary_train_regions", 0)
    if back < 0 or 0 < back < kept:
        raise UserError(f"summary_train_regions={back} must be 0 (= max_summaries) or >= max_summaries={kept}: a training "
                        "sample holds every pruned region whose summary an evaluation context keeps")
    if "n_transit" in cfg:
        need = min_summary_context(cfg["compress_interval"], cfg["max_regions"], n)
        if cfg["n_transit"] < need:
            raise UserError(f"n_transit={cfg['n_transit']} is too small for {cfg['max_regions']} regions of "
                            f"{cfg['compress_interval']} steps plus markers and {n} summary tokens each: set n_transit>={need}")


def min_compressed_context(interval: int, max_regions: int) -> int:
    """Longest sequence: `C r E` per kept region, less the `E` of the newest one (`C r1 E C r2`)."""
    return max_regions * (interval + 2) - 1


def reader_of(key: str) -> str:
    """The script a config key is for (the one that reads it; train.py also reads the collection and eval keys)."""
    return "collect.py" if key in COLLECTION_KEYS else "evaluate.py" if key in EVAL_KEYS else "train.py"


def apply_overrides(cfg: dict, overrides: list[str] | dict, allowed: tuple[str, ...], what: str,
                    script: str | None = None) -> dict:
    """`cfg` with `key=value` overrides (strings, or a dict of values) of the `allowed` keys only (type-checked, then
    `validate`d); any other key is refused in one line: fixed by `what` (e.g. a checkpoint's config: only eval keys may
    change), or, with `script`, not read by that script (naming the one that reads it)."""
    cfg = dict(cfg)
    for k, v in (parse_overrides(overrides) if isinstance(overrides, list) else overrides).items():
        if k in SCHEMA and k not in allowed:
            if script:
                raise UserError(f"{script} does not read '{k}' ({reader_of(k)} does); it takes {', '.join(allowed)}")
            raise UserError(f"'{k}' is fixed by {what}; only {', '.join(allowed)} can be set here")
        cfg[k] = _check_type(k, v, "command-line override")
    return validate(cfg)


def load_config(path: str | os.PathLike, overrides: list[str] | dict | None = None) -> dict:
    cfg = _read_yaml(Path(path))
    for k, v in cfg.items():
        cfg[k] = _check_type(k, v, f"in {path}")
    ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    for k, v in ov.items():
        cfg[k] = _check_type(k, v, "command-line override")
    return validate(cfg)


def parse_goals(text: str, n_tasks: int, selection: list[int] | None = None, flag: str = "--goals") -> list[int]:
    """`"0,1,38"` and half-open ranges `"0:100"` -> sorted unique task ids in 0..n_tasks-1. A range keeps the tasks of
    `selection` (the env's train/val/test selection; default: every task) whose id is in it, so ranges shard the
    selection; a single id must be in the selection."""
    chosen = set(range(n_tasks) if selection is None else selection)
    tasks = set()
    for item in text.split(","):
        try:
            ends = [int(x) for x in item.split(":")]
        except ValueError:
            raise UserError(f"{flag} must be comma-separated task ids or ranges A:B, got {text!r}") from None
        if len(ends) > 2 or (len(ends) == 2 and not 0 <= ends[0] < ends[1] <= n_tasks):
            raise UserError(f"{flag} range {item!r} must be A:B with 0 <= A < B <= {n_tasks}")
        if len(ends) == 2:
            tasks |= chosen & set(range(*ends))
        elif not 0 <= ends[0] < n_tasks:
            raise UserError(f"{flag} {ends[0]} is outside the task range: use 0..{n_tasks - 1}")
        elif ends[0] not in chosen:
            raise UserError(f"{flag} {ends[0]} is not in the train/val/test selection; raise n_train_tasks/n_test_tasks "
                            "(0 = all) or pick a selected task")
        else:
            tasks.add(ends[0])
    if not tasks:
        raise UserError(f"{flag} {text} holds no task of the train/val/test selection; widen the range")
    return sorted(tasks)


def env_configs(env: str) -> dict[str, Path]:
    """The config files of an env: {"collect": ..., "standard": ..., "compressed": ...}."""
    if env not in ENV_CONFIGS:
        raise UserError(f"unknown env {env!r}: use one of {', '.join(ENV_CONFIGS)}")
    collect, standard, compressed = ENV_CONFIGS[env]
    return {"collect": CONFIG_DIR / "algorithm" / collect, "standard": CONFIG_DIR / "model" / standard,
            "compressed": CONFIG_DIR / "model" / compressed}


def history_path(cfg: dict) -> Path:
    """The one place the history file name is made."""
    traj_dir = Path(cfg["traj_dir"])
    if not traj_dir.is_absolute():
        traj_dir = Path.cwd() / traj_dir
    return traj_dir / f"history_{cfg['env']}_{cfg['alg']}_alg-seed{cfg['alg_seed']}.hdf5"


def default_run_dir(cfg: dict) -> Path:
    return Path("runs") / f"{cfg['run_name']}-seed{cfg['seed']}"


# ---- the command line every script shares (one convention: hyphenated flags, key=value anywhere, defaults in --help) ----


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help of every script: the module docstring as written, and each option's default (where its help does not
    already state it in words, as it must for a default of None)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if re.search(r"\bdefault\b", text) or action.default is None or action.default == []:
            return text
        return super()._get_help_string(action)


def make_parser(doc: str | None) -> argparse.ArgumentParser:
    """A script's argument parser: `doc` (its module docstring) as the description, defaults shown in --help."""
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)


def parse_cli(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line, taking `key=value` overrides anywhere among the options, in order, into `args.overrides`;
    any other argument the parser does not know is its usual error."""
    args, extra = parser.parse_known_args(argv)
    overrides = [*(getattr(args, "overrides", None) or []), *extra]
    unknown = [a for a in overrides if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (overrides are key=value)")
    args.overrides = overrides
    return args


def add_config_args(parser: argparse.ArgumentParser, default_config: Path,
                    keys: str = "any config key, e.g. train_timesteps=100") -> None:
    """`--config FILE` and the `key=value` overrides (of `keys`, as the help says)."""
    parser.add_argument("--config", default=str(default_config),
                        help=f"YAML config (default: {default_config.relative_to(ROOT)})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"override {keys}")


def add_print_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (include: files merged, key=value overrides applied) as YAML and exit")


def print_config(cfg: dict) -> None:
    """`--print-config`: the resolved config as YAML on stdout, then exit 0."""
    print(yaml.safe_dump(cfg, sort_keys=False), end="")
    sys.exit(0)


def add_renamed_flag(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Refuse a flag's old spelling in one line naming the new one (the old one is hidden from --help)."""

    class Renamed(argparse.Action):
        def __call__(self, *args, **kwargs):
            raise UserError(f"{old} is now {new}; see --help")

    parser.add_argument(old, nargs="?", action=Renamed, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def run_main(main) -> None:
    """Run `main()`, turning a `UserError` (exit code 2) or running out of memory (exit code 3) into one line on
    stderr. Checkpoints and history files are written atomically, so nothing on disk is damaged either way."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        text = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        if not (isinstance(e, MemoryError) or "out of memory" in text.lower() or "can't allocate memory" in text):
            raise
        print(f"error: out of memory ({text[:150]}); lower train_batch_size (training) or eval_streams (evaluation), "
              "or use mixed_precision=bf16; the last checkpoint is kept", file=sys.stderr)
        sys.exit(3)
