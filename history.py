"""The PPO history file (docs/design.md §2): its fields, the keys that define it, and the one check that a file
fits a config. collect.py writes it; dataset.py, the workflow, probe.py and visualize_compression.py read it."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import yaml

from common import UserError

FORMAT_VERSION = 1
FIELDS = ("states", "actions", "rewards", "next_states", "dones", "compress_start", "compress_end")


def empty_history(n_total: int, n_stream: int) -> dict:
    """Zeroed time-major arrays `[n_total, n_stream, ...]` of every field (FIELDS), in the file's dtypes: what a source
    (collect.HistoryCallback, searcher.noisy_history) fills in."""
    shape = (n_total, n_stream)
    return {"states": np.zeros(shape + (2,), np.int8), "actions": np.zeros(shape, np.int8),
            "rewards": np.zeros(shape, np.int8), "next_states": np.zeros(shape + (2,), np.int8),
            "dones": np.zeros(shape, bool), "compress_start": np.zeros(shape, bool), "compress_end": np.zeros(shape, bool)}
# every collection key that changes what is in the file; the file stores them (attrs["collect_keys"]) and a config
# that differs on any of them is refused: a smoke collection at the default path is not the real dataset. The keys of
# one source algorithm count only for files of that algorithm (a PPO file does not depend on source_eps_*).
SHARED_COLLECT_KEYS = ("env", "grid_size", "horizon", "alg", "alg_seed", "n_steps", "n_steps_per", "n_stream",
                       "total_source_timesteps")
ALG_COLLECT_KEYS = {
    "PPO": ("ppo_batch_size", "ppo_n_epochs", "ppo_lr", "ppo_ent_coef", "ppo_gamma", "ppo_gae_lambda", "ppo_clip_range",
            "ppo_net_arch", "ppo_observe_stage", "ppo_fused_adam"),
    "searcher-eps": ("source_eps_start", "source_eps_regions"),
}
# keys a config (and a file written before they existed) may leave out
COLLECT_DEFAULTS = {"ppo_observe_stage": False, "n_steps_per": "task", "ppo_fused_adam": False, "source_eps_start": 1.0,
                    "source_eps_regions": 1}


def collect_key_names(alg: str) -> tuple[str, ...]:
    """The collection keys that define a file of source algorithm `alg`."""
    return SHARED_COLLECT_KEYS + ALG_COLLECT_KEYS.get(alg, ())


def collect_keys(cfg: dict) -> dict:
    return {k: cfg.get(k, COLLECT_DEFAULTS[k]) if k in COLLECT_DEFAULTS else cfg[k] for k in collect_key_names(cfg["alg"])}


def open_history(path: str | Path) -> h5py.File:
    """Open a history file for reading; a missing, corrupt or old-format file is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"history file not found: {path}; run `python collect.py` first (or set traj_dir=)")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise UserError(f"history file {path} is truncated or corrupt; delete it and re-run collect.py") from None
    if f.attrs.get("format_version") != FORMAT_VERSION:
        version = f.attrs.get("format_version")
        f.close()
        raise UserError(f"history file {path} has format {version}, expected {FORMAT_VERSION}; re-run collect.py")
    return f


def history_mismatch(f: h5py.File, cfg: dict) -> dict:
    """{key: (value in the file, value in cfg)} for every collection key on which they differ."""
    try:
        stored = yaml.safe_load(f.attrs.get("collect_keys", "")) or {}
    except yaml.YAMLError:
        stored = {}
    want = collect_keys(cfg)
    stored = {k: stored.get(k, COLLECT_DEFAULTS.get(k)) for k in want}
    return {k: (stored[k], want[k]) for k in want if stored[k] != want[k]}


def check_history(f: h5py.File, path: str | Path, cfg: dict) -> None:
    """Refuse a history file collected with other collection keys than `cfg`, naming every difference."""
    diff = history_mismatch(f, cfg)
    if diff:
        said = ", ".join(f"{k}={old!r} (config: {new!r})" for k, (old, new) in diff.items())
        raise UserError(f"history file {path} was collected with {said}; collect this config's history "
                        f"(`python collect.py --force` with the same keys, or traj_dir= for another file) or set those keys")


def stream_n_steps(group: h5py.Group) -> np.ndarray:
    """The PPO rollout length of each stream of one goal's group, `[S]`: collect.py stores one integer when every stream
    shares it, one per stream otherwise (`n_steps_per: stream`)."""
    n = np.asarray(group.attrs["n_steps"], np.int64)
    return np.broadcast_to(n, (group["actions"].shape[1],)).copy() if n.ndim == 0 else n


def complete_goals(f: h5py.File) -> set[int]:
    """Goals whose group was written to the end (collect.py sets `complete` last)."""
    return {int(k) for k in f if k.isdigit() and f[k].attrs.get("complete", False)}


def history_problem(path: Path, goals: list[int], cfg: dict) -> str | None:
    """None if `path` is a complete history of this config holding `goals`, else what is wrong with it (to collect
    again); a complete file of another config (say a smoke collection at the default path) is an error."""
    if not path.exists():
        return "does not exist"
    try:
        f = open_history(path)
    except UserError as e:
        return f"is unreadable or of an old format ({str(e).split(';')[0]})"
    with f:
        check_history(f, path, cfg)
        missing = set(goals) - complete_goals(f)
    return f"is missing {len(missing)} of the {len(goals)} goals asked for" if missing else None
