"""Train SB3 PPO on every task (goal) of an env and log each stream's whole learning history to one HDF5 file
(or, with `alg: searcher-eps`, log the searcher with noise that falls region by region: AD-eps, searcher.py).

    python collect.py [--config config/algorithm/ppo_darkroom.yaml] [--force] [key=value ...]
    python collect.py --config config/algorithm/ppo_dark_key_to_door.yaml --goals 0:3000 --out shard0.hdf5  # a shard

The env (`env` key) decides the tasks (env/registry.py): by default every task of its train/val/test selection;
`--goals` names ids or ranges A:B of them (merge_histories.py joins shards). Each goal runs `n_stream`
parallel streams for `total_source_timesteps` steps each, in PPO rollouts of `n_steps` (or, with a list such as
`n_steps: [40, 80, 120]`, of a length drawn per goal from (alg_seed, goal), or with `n_steps_per: stream` every length
in every goal, one PPO learner per length on its share of the streams; stored in the goal's attrs). A `<compress>`
marker precedes the first step of every PPO rollout and a `</compress>` follows its last (docs/design.md §2). The file is
built under `<name>.partial` and renamed when complete; a killed run resumes from the goals it finished.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import yaml
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from tqdm import tqdm

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
    parse_goals,
    print_config,
    run_main,
    stream_n_steps,
)
from env import selected_tasks, task_family
from history import FIELDS, FORMAT_VERSION, collect_keys, empty_history, history_mismatch
from searcher import noisy_history


class HistoryCallback(BaseCallback):
    """Copies every transition of every stream into time-major arrays, with rollout-boundary markers."""

    def __init__(self, n_total: int, n_stream: int):
        super().__init__()
        self.data = empty_history(n_total, n_stream)
        self.t = 0

    def _on_rollout_start(self) -> None:
        if self.t < len(self.data["actions"]):
            self.data["compress_start"][self.t] = True

    def _on_step(self) -> bool:
        t, d, loc = self.t, self.data, self.locals
        # the position the action was taken in (not a stage PPO may see): the observation SB3's rollout loop fed the
        # policy this step, from the callback's locals rather than the private `_last_obs` (the same array, E31)
        d["states"][t] = loc["obs_tensor"].cpu().numpy()[:, :2]
        d["actions"][t] = loc["actions"]
        d["rewards"][t] = loc["rewards"]
        d["dones"][t] = loc["dones"]
        next_states = loc["new_obs"].copy()  # already the reset state where an episode ended
        for i in np.flatnonzero(loc["dones"]):
            next_states[i] = loc["infos"][i]["terminal_observation"]
        d["next_states"][t] = next_states[:, :2]
        self.t += 1
        return True

    def _on_rollout_end(self) -> None:
        self.data["compress_end"][self.t - 1] = True


def collect_goal(goal: int, cfg: dict) -> tuple[int, dict, float]:
    """Run the source on one goal; returns (goal, history arrays, seconds). Streams that share a rollout length share one PPO
    learner: one learner for the goal, or with `n_steps_per: stream` one per length (stream s in learner s % lengths)."""
    torch.set_num_threads(1)  # one core per goal process; parallelism comes from n_process
    start = time.perf_counter()
    if cfg["alg"] == "searcher-eps":  # no learner to train: the searcher with decaying noise (searcher.noisy_history)
        data = noisy_history(cfg, goal, cfg["n_stream"], seed=cfg["alg_seed"] * 1000 + goal)
        return goal, data, time.perf_counter() - start
    per_stream = stream_n_steps(cfg, goal)
    T, S = cfg["total_source_timesteps"], cfg["n_stream"]
    data = None
    for j, n_steps in enumerate(dict.fromkeys(per_stream.tolist())):  # the lengths in order of first stream
        streams = np.flatnonzero(per_stream == n_steps)
        part = run_ppo(goal, cfg, int(n_steps), len(streams), seed=cfg["alg_seed"] * 1000 + goal + 1_000_003 * j)
        if data is None:
            data = {k: np.zeros((T, S) + v.shape[2:], v.dtype) for k, v in part.items()}
        for k, v in part.items():
            data[k][:, streams] = v
    return goal, data, time.perf_counter() - start


def adam_kwargs(cfg: dict) -> dict:
    """SB3's Adam settings for the PPO policy (its default eps 1e-5), with `ppo_fused_adam: true` torch's fused kernel: the
    same update in one call instead of a Python loop over tensors, ~0.86x a Key-to-Door goal's time (docs/experiments.md
    E42); other float rounding, so a history collected with it differs from one without."""
    return {"eps": 1e-5, "fused": True} if cfg.get("ppo_fused_adam", False) else {"eps": 1e-5}


def run_ppo(goal: int, cfg: dict, n_steps: int, n_stream: int, seed: int) -> dict:
    """One SB3 PPO learner on `n_stream` parallel streams of the goal for `total_source_timesteps` steps each."""
    venv = task_family(cfg).vec_env(cfg, n_stream, goal)
    rollout = n_steps * n_stream
    model = PPO(
        "MlpPolicy",
        venv,
        n_steps=n_steps,
        batch_size=min(cfg["ppo_batch_size"], rollout),
        n_epochs=cfg["ppo_n_epochs"],
        learning_rate=cfg["ppo_lr"],
        ent_coef=cfg["ppo_ent_coef"],
        gamma=cfg["ppo_gamma"],
        gae_lambda=cfg["ppo_gae_lambda"],
        clip_range=cfg["ppo_clip_range"],
        policy_kwargs={"net_arch": [cfg["ppo_net_arch"]] * 2, "optimizer_kwargs": adam_kwargs(cfg)},
        seed=seed,
        device="cpu",
    )
    callback = HistoryCallback(cfg["total_source_timesteps"], n_stream)
    model.learn(total_timesteps=cfg["total_source_timesteps"] * n_stream, callback=callback)
    assert callback.t == cfg["total_source_timesteps"], "PPO stopped before the history was complete"
    return callback.data


def _worker(args):
    return collect_goal(*args)


def _die_with_parent() -> None:
    """Pool initializer: on Linux, a SIGKILLed collect.py takes its workers with it instead of leaving them
    to burn a core on a goal nobody will write."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def region_returns(rewards: np.ndarray, n_steps: int, horizon: int) -> np.ndarray:
    """Mean episode return of each PPO rollout (region), averaged over streams: `[T // n_steps]`."""
    per_region = rewards.reshape(-1, n_steps, rewards.shape[1]).sum(1)  # [K, S]
    return per_region.mean(1) / (n_steps / horizon)


def first_last_returns(rewards: np.ndarray, per_stream: np.ndarray, horizon: int) -> tuple[float, float]:
    """Mean episode return of each stream's first and last PPO rollout, averaged over streams (of any rollout length)."""
    first = last = 0.0
    for n in np.unique(per_stream):
        ret = region_returns(rewards[:, per_stream == n], int(n), horizon)
        w = float((per_stream == n).mean())
        first, last = first + w * ret[0], last + w * ret[-1]
    return first, last


def write_goal(f: h5py.File, goal: int, data: dict, cfg: dict) -> None:
    if str(goal) in f:
        del f[str(goal)]
    g = f.create_group(str(goal))
    for name, value in task_family(cfg).attrs(goal, cfg).items():  # e.g. the goal (row, col), or key and door
        g.attrs[name] = value
    per_stream = stream_n_steps(cfg, goal)  # PPO rollout length (one region) of each stream: one int if they share it
    g.attrs["n_steps"] = per_stream if len(set(per_stream.tolist())) > 1 else int(per_stream[0])
    for name in FIELDS:
        arr = data[name]
        chunks = (min(arr.shape[0], 320), arr.shape[1]) + arr.shape[2:]
        g.create_dataset(name, data=arr, chunks=chunks, compression="gzip", compression_opts=4)
    g.attrs["complete"] = True  # written last: a group without it was cut off by a kill


def recover_goals(partial: Path, f: h5py.File, cfg: dict) -> set:
    """Copy the complete, readable goals of an interrupted run's `.partial` file into `f`; returns them.

    Copying into a fresh file, rather than appending to the old one, matters: a kill while a goal was being
    written can leave HDF5 metadata half-updated, and only the goals that read back in full are kept."""
    done = set()
    try:
        with h5py.File(partial, "r") as old:
            if history_mismatch(old, cfg):  # a key added since reads as its default, as for a finished file
                print(f"found {partial} from a different config: starting clean")
                return done
            for k in old:
                try:
                    if old[k].attrs.get("complete", False):
                        for name in FIELDS:
                            old[k][name][:]  # decompress every chunk: a damaged goal is collected again
                        old.copy(old[k], f, name=k)
                        done.add(int(k))
                except Exception:  # any damage: this goal is collected again
                    pass
    except Exception:  # unreadable: the kill hit the file's own metadata
        print(f"found unreadable {partial} (killed mid-write): starting clean")
        return done
    print(f"resuming interrupted collection: {len(done)} finished goals recovered from {partial}")
    return done


def open_partial(partial: Path, cfg: dict) -> tuple[h5py.File, set]:
    """Open a new `.partial` file, holding the finished goals of an interrupted run of this config if one exists."""
    wanted = collect_keys(cfg)
    fresh = partial.with_name(partial.name + ".new")
    with h5py.File(fresh, "w") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["collect_keys"] = yaml.safe_dump(wanted)
        f.attrs["config"] = yaml.safe_dump(cfg)
        for k in ("grid_size", "horizon", "n_steps", "n_stream", "total_source_timesteps"):
            f.attrs[k] = cfg[k]
        done = recover_goals(partial, f, cfg) if partial.exists() else set()
    os.replace(fresh, partial)  # a kill before this line leaves the old .partial untouched
    return h5py.File(partial, "a"), done


def main():
    parser = make_parser(__doc__)
    add_config_args(parser, DEFAULT_COLLECT_CONFIG,
                    keys="a collection key (env, PPO, n_stream, n_process, traj_dir, ...), anywhere among the options")
    add_print_config(parser)
    parser.add_argument("--force", action="store_true",
                        help="replace an existing history file (kept until the new one is complete)")
    parser.add_argument("--goals", default=None,
                        help="task ids and ranges A:B (half-open: the selected tasks with ids in it) to collect, e.g. "
                        "0,5,9 or 0:40 (default: every task of the train/val/test selection)")
    add_renamed_flag(parser, "--tasks", "--goals")
    parser.add_argument("--out", default=None,
                        help="output HDF5 file (default: <traj_dir>/history_<env>_<alg>_alg-seed<seed>.hdf5)")
    args = parse_cli(parser)
    cfg = apply_overrides(load_config(args.config), args.overrides, COLLECTION_KEYS, "the collection config",
                          script="collect.py")
    if args.print_config:
        print_config(cfg)
    family, selection = task_family(cfg), selected_tasks(cfg)
    goals = parse_goals(args.goals, family.n_tasks(cfg), selection) if args.goals else selection
    out = Path(args.out) if args.out else history_path(cfg)
    if out.exists() and not args.force:
        raise UserError(f"history file {out} already exists: pass --force to replace it, or traj_dir=/alg_seed= for a new name")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")

    start = time.perf_counter()
    f, done = open_partial(partial, cfg)
    todo = [g for g in goals if g not in done]
    n_proc = max(1, min(cfg["n_process"], len(todo)))
    try:
        bar = tqdm(total=len(goals), initial=len(goals) - len(todo), desc=f"{cfg['alg']} goals", unit="goal")
        jobs = [(g, cfg) for g in todo]
        if n_proc == 1:
            results = map(_worker, jobs)
        else:
            pool = mp.get_context("spawn" if os.name == "nt" else "fork").Pool(n_proc, initializer=_die_with_parent)
            results = pool.imap_unordered(_worker, jobs)
        for goal, data, secs in results:
            write_goal(f, goal, data, cfg)
            f.flush()
            _, final = first_last_returns(data["rewards"], stream_n_steps(cfg, goal), cfg["horizon"])
            best = family.optimal_return(goal, cfg)
            bar.set_postfix(goal=goal, final=f"{final:.1f}/{best}", s=f"{secs:.1f}")
            bar.update()
        bar.close()
        if n_proc > 1:
            pool.close()
            pool.join()
        missing = [g for g in goals if str(g) not in f]
        assert not missing, f"goals missing from the history: {missing}"
        first, last, opt = [], [], []
        for g in goals:
            a, b = first_last_returns(f[str(g)]["rewards"][:], stream_n_steps(cfg, g), cfg["horizon"])
            first.append(a)
            last.append(b)
            opt.append(family.optimal_return(g, cfg))
    finally:
        f.close()
    os.replace(partial, out)  # atomic: the final name only ever holds a complete file
    first, last, opt = map(np.array, (first, last, opt))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {len(goals)} goals x {cfg['n_stream']} streams x "
          f"{cfg['total_source_timesteps']} steps) in {time.perf_counter() - start:.0f} s")
    print(f"{cfg['alg']} return, first region {first.mean():.2f}, last region {last.mean():.2f} vs optimum {opt.mean():.2f} "
          f"({last.sum() / opt.sum():.1%} of optimum; worst goal {np.min(last / opt):.1%})")


if __name__ == "__main__":
    run_main(main)
