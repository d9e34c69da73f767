"""Merge history shards (collect.py --goals A:B --out SHARD) into one history file.

    python merge_histories.py OUT SHARD [SHARD ...] [--expect-all] [--force]
    python merge_histories.py datasets/history_dark_key_to_door_PPO_alg-seed42.hdf5 kd0.hdf5 kd1.hdf5 --expect-all

Every shard must be a complete collect.py file of the same format and collection keys (history.py), and no task may be
in two shards. `--expect-all` also requires every task of the env's train/val/test selection (the first shard's config,
env/registry.py) to be present. The groups are copied as they are (same data, chunks and compression); the file attrs
are the first shard's. OUT is written as OUT.tmp and renamed when complete.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import yaml

from common import UserError, make_parser, run_main
from history import complete_goals, history_mismatch, open_history


def merge(out: Path, shards: list[Path], expect_all: bool = False) -> list[int]:
    """Write the merged file; returns its tasks (sorted)."""
    if out.resolve() in {s.resolve() for s in shards}:
        raise UserError(f"{out} is one of the shards: write the merged file under another name")
    files = [open_history(s) for s in shards]
    try:
        cfg = yaml.safe_load(files[0].attrs["config"])
        owner: dict[int, Path] = {}
        for f, path in zip(files, shards, strict=True):
            diff = history_mismatch(f, cfg)
            if diff:
                said = ", ".join(f"{k}={new!r} (first shard: {old!r})" for k, (new, old) in diff.items())
                raise UserError(f"shard {path} was collected with {said}; collect every shard with the same config")
            tasks = complete_goals(f)
            if len(tasks) != len(f):
                raise UserError(f"shard {path} holds groups that are not complete tasks; re-collect it")
            clash = sorted(tasks & set(owner))
            if clash:
                raise UserError(f"task {clash[0]} is in both {owner[clash[0]]} and {path} ({len(clash)} tasks overlap); "
                                "give each shard its own --goals range")
            owner.update(dict.fromkeys(tasks, path))
        if expect_all:
            from env import selected_tasks  # imported here: env pulls in SB3, which takes seconds

            missing = sorted(set(selected_tasks(cfg)) - set(owner))
            if missing:
                raise UserError(f"{len(missing)} tasks of {cfg['env']}'s train/val/test selection are in no shard (first: "
                                f"{missing[0]}); collect them (collect.py --goals ...) or drop --expect-all")
        tmp = out.with_name(out.name + ".tmp")
        out.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(tmp, "w") as dst:
            for k, v in files[0].attrs.items():
                dst.attrs[k] = v
            for task in sorted(owner):
                src = files[shards.index(owner[task])]
                src.copy(src[str(task)], dst, name=str(task))
        os.replace(tmp, out)  # atomic: the final name only ever holds a complete file
    finally:
        for f in files:
            f.close()
    return sorted(owner)


def main():
    parser = make_parser(__doc__)
    parser.add_argument("out", help="the merged history file to write")
    parser.add_argument("shards", nargs="+", help="history files written by collect.py --goals A:B --out SHARD")
    parser.add_argument("--expect-all", action="store_true",
                        help="require every task of the env's train/val/test selection to be in some shard")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists() and not args.force:
        raise UserError(f"{out} already exists: pass --force to replace it, or another OUT")
    tasks = merge(out, [Path(s) for s in args.shards], args.expect_all)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {len(tasks)} tasks from {len(args.shards)} shards)")


if __name__ == "__main__":
    run_main(main)
