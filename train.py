"""Train the AD transformer on the PPO histories (single process or `accelerate launch`).

    python train.py [--config config/model/ad_dr.yaml] [--run-dir DIR] [--force] [key=value ...]
    accelerate launch --num_processes N train.py ...   # DDP; effective batch = N x train_batch_size

Resumes automatically from DIR/ckpt.pt; refuses to touch a finished run unless --force. Raising `train_timesteps`
continues a run: the LR schedule keeps the horizon it started with (its cosine ends at 0.1 x lr, and steps past it
run at 0.1 x lr), so a continued run is well defined but is not the same as a fresh longer run.
Every `val_interval` steps: teacher-forced metrics on the validation goals' histories (val/loss_action, ...) and an
in-context rollout on the validation goals (val/return, val/return_last), in TensorBoard and DIR/metrics.jsonl.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import resource
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common import (
    DEFAULT_MODEL_CONFIG,
    UserError,
    add_config_args,
    add_print_config,
    config_diff,
    default_run_dir,
    history_path,
    load_config,
    make_parser,
    parse_cli,
    print_config,
    run_main,
)
from dataset import HistoryDataset
from env import task_family, task_split
from hardware import bf16_warning, cpu_info, resolve_precision
from model import MODEL, ADConfig, weights_digest
from model.optim import param_groups
from shards import ShardedStep, shards_apply

CKPT = "ckpt.pt"
LAUNCHER_LOG = "train.log"  # the workflow / study write train.py's output here before it starts
METRICS = ("loss_action", "acc_action", "loss_token_type", "acc_token_type")
COUNTS = ("n_true_positive", "n_pred_end", "n_true_end")  # </compress> counts (compressed mode)


def lr_lambda(cfg: dict, horizon: int | None = None):
    """Linear warmup to `lr`, then cosine decay to 10 % of it at `horizon` (default `train_timesteps`); flat after."""
    warm, total = cfg["warmup_steps"], horizon or cfg["train_timesteps"]

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class MetricSum:
    """Sums per-batch metrics (weighted by targets) and </compress> counts; reduced over ranks.

    The key set is fixed by the mode, not by what a rank happened to see, so every rank joins the same
    all-reduce even when it had no batch (e.g. `val_batches` < number of processes)."""

    def __init__(self, compressed: bool):
        self.keys = [*METRICS, *COUNTS, "n"] if compressed else [*METRICS[:2], "n"]
        self.s = dict.fromkeys(self.keys, 0.0)

    def add(self, out: dict) -> None:
        n = float(out["n_targets"])
        for k in self.keys:
            if k in METRICS:
                self.s[k] += float(out[k]) * n
            elif k in COUNTS:
                self.s[k] += float(out[k])
        self.s["n"] += n

    def result(self, accelerator: Accelerator) -> dict:
        vec = torch.tensor([self.s[k] for k in self.keys], dtype=torch.float64, device=accelerator.device)
        s = dict(zip(self.keys, accelerator.reduce(vec, "sum").tolist(), strict=True))
        self.s = dict.fromkeys(self.keys, 0.0)
        if s["n"] == 0:
            return {}
        res = {k: s[k] / s["n"] for k in METRICS if k in s}
        if "n_true_end" in s:
            res["precision_compress_end"] = s["n_true_positive"] / max(s["n_pred_end"], 1.0)
            res["recall_compress_end"] = s["n_true_positive"] / max(s["n_true_end"], 1.0)
        return res


def build(cfg: dict, horizon: int | None = None):
    """Model, optimiser and LR schedule (cosine over `horizon` steps, default `train_timesteps`). The initial weights
    depend on `seed` only, so every rank builds the same model (DDP would broadcast rank 0's anyway) and tests can
    rebuild it."""
    torch.manual_seed(cfg["seed"])
    model = MODEL[cfg["model"]](ADConfig.from_dict(cfg))
    groups = param_groups(model, cfg["weight_decay"], cfg.get("weight_decay_on", "all"))  # runs from before the key: all
    opt = torch.optim.AdamW(groups, lr=cfg["lr"], betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, horizon))
    return model, opt, sched


def rng_state() -> dict:
    """This process's random generators; the checkpoint holds one such dict per rank."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill during torch.save never leaves a corrupt ckpt.pt


def load_checkpoint(ckpt_path: Path, cfg: dict, run_dir: Path) -> dict:
    """Read the checkpoint a run resumes from, refusing one that is unreadable, foreign or finished."""
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if not isinstance(ckpt, dict):
            raise TypeError("not a dict")
        diff = config_diff(ckpt["config"], cfg)
        step = int(ckpt["step"])
        _ = ckpt["model"], ckpt["optimizer"], ckpt["scheduler"]
    except Exception as e:
        raise UserError(f"checkpoint {ckpt_path} is unreadable or not a train.py checkpoint ({e.__class__.__name__}); "
                        "move it away, use another --run-dir, or pass --force to start over") from None
    if diff:
        raise UserError(f"checkpoint in {run_dir} was trained with {diff}; use another --run-dir (or --force to start over)")
    if step >= cfg["train_timesteps"]:
        raise UserError(f"run {run_dir} is already finished ({step} steps); use another --run-dir, "
                        "raise train_timesteps to continue it, or pass --force to start over")
    return ckpt


def check_fresh_run_dir(run_dir: Path, cfg: dict) -> bool:
    """May a run start from step 0 in `run_dir` (which has no checkpoint)? True if it holds a run of this same
    config that was stopped before its first checkpoint; an empty or missing dir is fine; anything else is refused."""
    if not run_dir.exists() or not any(p.name != LAUNCHER_LOG for p in run_dir.iterdir()):
        return False
    saved = run_dir / "config.yaml"
    try:
        old = yaml.safe_load(saved.read_text()) if saved.is_file() else None
    except yaml.YAMLError:
        old = None
    same = isinstance(old, dict) and config_diff(old, cfg) is None
    if not same:
        raise UserError(f"run dir {run_dir} exists and holds no checkpoint of this config; use another --run-dir or pass --force")
    return True


@torch.no_grad()
def val_metrics(model, val_data: HistoryDataset, cfg: dict, accelerator: Accelerator) -> dict:
    """Teacher-forced metrics on held-out (validation) goals' histories (same batches every time, split over ranks).
    `model` is the unwrapped module: ranks see different numbers of batches, so no DDP forward here."""
    model.eval()
    m = MetricSum(cfg["use_compressed_context"])
    for i in range(accelerator.process_index, cfg["val_batches"], accelerator.num_processes):
        batch = {k: v.to(accelerator.device) for k, v in val_data.batch(i).items()}
        with accelerator.autocast():
            m.add(model(batch))
    model.train()
    return m.result(accelerator)


@torch.no_grad()
def val_return(model, cfg: dict) -> dict:
    """A short in-context rollout on the validation goals (KV cache, no weight updates): what the model is for."""
    from evaluate import evaluate_config  # imported here: evaluate imports the env, which imports SB3

    goals = task_split(cfg, "val")
    model.eval()
    _, res = evaluate_config(model, cfg, goals, episodes=cfg["val_episodes"], streams=cfg["val_streams"], progress=False)
    model.train()
    R = res["returns"]  # [goal, stream, episode]
    opt = np.array([task_family(cfg).optimal_return(g, cfg) for g in goals], dtype=np.float64)
    last = max(1, cfg["val_episodes"] // 5)
    return {"return": float(R.mean()), "return_last": float(R[..., -last:].mean()),
            "return_normalized": float((R.mean((1, 2)) / opt).mean())}


def start_or_resume(args, cfg: dict, run_dir: Path) -> tuple[dict | None, bool]:
    """(checkpoint to resume from or None, whether a run stopped before its first checkpoint restarts). Every rank
    reads the run dir and reaches the same decision; nothing is written here."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir} is a file, not a directory; pass a directory")
    ckpt_path = run_dir / CKPT
    ckpt = load_checkpoint(ckpt_path, cfg, run_dir) if ckpt_path.exists() and not args.force else None
    restart = not ckpt and not args.force and check_fresh_run_dir(run_dir, cfg)
    return ckpt, restart


def restore(ckpt: dict, model, opt, sched, accelerator: Accelerator, ckpt_path: Path) -> None:
    """Model, optimiser, scheduler, grad scaler (fp16) and every rank's random generators from a checkpoint."""
    try:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"checkpoint {ckpt_path} does not fit the model of its config ({e.__class__.__name__}); "
                        "move it away or pass --force to start over") from None
    rngs = ckpt.get("rng") or []
    rngs = [rngs] if isinstance(rngs, dict) else rngs  # older checkpoints hold rank 0's generators only
    if len(rngs) == accelerator.num_processes:
        set_rng_state(rngs[accelerator.process_index])
    elif accelerator.is_main_process:
        print(f"note: checkpoint written by {len(rngs)} process(es), resuming with {accelerator.num_processes}: "
              "random generators re-seeded and each rank draws a new data stream")


class Logger:
    """TensorBoard + DIR/metrics.jsonl on the main process (no-ops elsewhere); a resumed run drops the records past
    its checkpoint that a killed session left, so both continue from the checkpoint without duplicate steps."""

    def __init__(self, run_dir: Path, start_step: int, resumed: bool, enabled: bool):
        self.enabled, self.path = enabled, run_dir / "metrics.jsonl"
        if not enabled:
            return
        # purge_step: TensorBoard drops events past the checkpoint (and a fresh start hides an old run's curve)
        self.writer = SummaryWriter(str(run_dir), purge_step=start_step + 1 if resumed else 0)
        kept = []
        if resumed and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= start_step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, prefix: str, values: dict) -> None:
        if not self.enabled or not values:
            return
        for k, v in values.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **{f"{prefix}/{k}": v for k, v in values.items()}}) + "\n")

    def flush(self) -> None:
        if self.enabled:
            self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()


def announce(cfg: dict, run_dir: Path, model, accelerator: Accelerator, log, ckpt, restart: bool, start_step: int,
             horizon: int, hist: Path, precision: dict) -> None:
    """The main process's first lines: what is trained where, and the hyper-parameters in TensorBoard."""
    if restart:
        print(f"no checkpoint in {run_dir} yet (stopped before the first one): starting again from step 0")
    if not ckpt:
        table = "\n".join(f"| {k} | {v} |" for k, v in (cfg | precision).items())  # + the precision auto chose
        log.writer.add_text("hparams", "| key | value |\n|---|---|\n" + table, 0)
    if horizon != cfg["train_timesteps"]:
        print(f"note: the LR schedule keeps the horizon of {horizon} steps this run started with; "
              f"steps past it run at 0.1 x lr")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{'resuming' if ckpt else 'training'} {cfg['model']} "
          f"({'compressed' if cfg['use_compressed_context'] else 'standard'}, {n_params / 1e3:.0f}k params) "
          f"in {run_dir} from step {start_step}, {accelerator.num_processes} process(es) on {accelerator.device}, "
          f"history {hist}")


def make_accelerator(cfg: dict) -> tuple[Accelerator, dict]:
    """Threads, determinism and precision, then the Accelerator (CPU unless a GPU is present). Returns it with the
    precision decision: {"mixed_precision": what was asked, "precision": what trains, "precision_reason": why}."""
    if cfg["deterministic"]:  # before CUDA starts: cuBLAS reads its workspace setting once
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if cfg["num_threads"]:
        torch.set_num_threads(cfg["num_threads"])
    on_gpu = torch.cuda.is_available()
    if cfg["mixed_precision"] == "fp16" and not on_gpu:
        raise UserError("mixed_precision=fp16 needs a GPU (on CPU accelerate would silently train in fp32); "
                        "use mixed_precision=auto, bf16 or no")
    gpu_bf16 = on_gpu and torch.cuda.is_bf16_supported()
    cpu = None if on_gpu else cpu_info()  # read once: the choice and the warning use the same facts
    precision, reason = resolve_precision(cfg["mixed_precision"], on_gpu, gpu_bf16, cpu)
    accelerator = Accelerator(mixed_precision=precision, cpu=not on_gpu)
    warning = bf16_warning(precision, on_gpu, cpu)
    if accelerator.is_main_process:
        print(warning or reason, file=sys.stderr if warning else sys.stdout, flush=True)
    return accelerator, {"mixed_precision": cfg["mixed_precision"], "precision": precision, "precision_reason": reason}


SHARDS: list = []  # the run's ShardedStep, where it has one (take_free_core hands the freed core to it)


def shard_runner(cfg: dict, model, accelerator: Accelerator) -> ShardedStep | None:
    """The step's row shards (shards.py) where they apply: `train_shards` > 1, on CPU, one process, eager; else None
    (one pass). The shards run in parallel on the run's cores unless there is dropout."""
    if not shards_apply(cfg.get("train_shards", 1), accelerator.device.type, accelerator.num_processes, cfg["compile"]):
        return None
    runner = ShardedStep(model, cfg["train_shards"], torch.get_num_threads(), accelerator.autocast,
                         parallel=cfg["dropout"] == 0)
    SHARDS[:] = [runner]
    return runner


def take_free_core(signum=None, frame=None) -> None:
    """SIGUSR1: a core was freed (the workflow and the study send it when another of their trainings ends), so use one
    more thread, up to the core count: for one more row shard at once (shards.py), else one more intra-op thread. Two
    trainings at once end together instead of one idling a core."""
    limit = os.cpu_count() or 1
    if SHARDS:
        before = SHARDS[0].cores
        n = SHARDS[0].add_core(limit)
        if n != before:
            print(f"\nSIGUSR1: a core was freed, training on {n} cores from here ({SHARDS[0].shards} row shards)", flush=True)
        return
    n = min(torch.get_num_threads() + 1, limit)
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
        print(f"\nSIGUSR1: a core was freed, training on {n} threads from here", flush=True)


def save_checkpoint(path: Path, raw_model, opt, sched, accelerator: Accelerator, log, cfg: dict, horizon: int,
                    step: int) -> None:
    """Everything a resumed run needs to continue bit for bit, written atomically by the main process."""
    rngs = gather_object([rng_state()])  # every rank's generators, so that each continues where it was
    if accelerator.is_main_process:
        log.flush()  # the logged curve up to `step` reaches the disk before the checkpoint that resumes it
        atomic_save({
            "model": raw_model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "schedule_steps": horizon,
            "step": step,
            "config": cfg,
            "rng": rngs,
        }, path)
    accelerator.wait_for_everyone()


def write_summary(run_dir: Path, cfg: dict, accelerator: Accelerator, start_step: int, seconds: float, n_targets: int,
                  last_val: dict, digests: list[str], precision: dict) -> None:
    steps_done = cfg["train_timesteps"] - start_step
    summary = {
        "steps": cfg["train_timesteps"],
        "steps_this_session": steps_done,
        "seconds": seconds,
        "steps_per_s": steps_done / seconds,
        "targets_per_s": n_targets * accelerator.num_processes / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "num_processes": accelerator.num_processes,
        "weights_sha256_per_rank": digests,
        **precision,
        **{f"val/{k}": v for k, v in last_val.items()},
    }
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"done: {steps_done} steps in {seconds:.0f} s ({summary['steps_per_s']:.2f} steps/s, "
          f"{summary['targets_per_s']:.0f} targets/s); checkpoint {run_dir / CKPT}")


def main():
    parser = make_parser(__doc__)
    add_config_args(parser, DEFAULT_MODEL_CONFIG)
    parser.add_argument("--run-dir", default=None, help="output directory (default: runs/<run_name>-seed<seed>)")
    parser.add_argument("--force", action="store_true", help="start over in a run dir that already holds a run")
    add_print_config(parser)
    args = parse_cli(parser)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print_config(cfg)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg)
    accelerator, precision = make_accelerator(cfg)
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, take_free_core)
    main_proc = accelerator.is_main_process

    # ---- build: resume decision, data, model, optimiser -------------------------------------------------------
    ckpt, restart = start_or_resume(args, cfg, run_dir)
    start_step = ckpt["step"] if ckpt else 0
    # the schedule's horizon is fixed when a run starts: continuing with a larger train_timesteps runs on at 0.1 x lr
    horizon = int(ckpt.get("schedule_steps", ckpt["config"]["train_timesteps"])) if ckpt else cfg["train_timesteps"]
    seed, hist = cfg["seed"], history_path(cfg)
    train_data = HistoryDataset(hist, cfg, "train", cfg["train_batch_size"], seed, accelerator.process_index, start_step)
    val_data = HistoryDataset(hist, cfg, "val", cfg["train_batch_size"], seed + 10_000)
    if train_data.dropped:
        left_out = ", ".join(map(str, train_data.dropped[:10])) + (", ..." if len(train_data.dropped) > 10 else "")
        accelerator.print(f"min_source_return={cfg['min_source_return']}: training on {len(train_data.goals)} tasks, leaving "
                          f"out {len(train_data.dropped)} whose source PPO ended below it ({left_out})")
    model, opt, sched = build(cfg, horizon)
    torch.manual_seed(seed + accelerator.process_index)  # dropout differs per rank
    random.seed(seed)
    np.random.seed(seed)
    if ckpt:
        restore(ckpt, model, opt, sched, accelerator, run_dir / CKPT)
    # the scheduler is stepped by hand once per optimiser step (accelerate would step it N times under DDP)
    model, opt = accelerator.prepare(model, opt)
    if ckpt and ckpt.get("scaler") is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(ckpt["scaler"])  # fp16: the loss scale continues where it was
    raw_model = accelerator.unwrap_model(model)  # what is saved and tested: no DDP wrapper, no "module." prefix
    step_fn = torch.compile(model) if cfg["compile"] else model
    shards = shard_runner(cfg, model, accelerator)
    # its own generator: a DataLoader iterator otherwise draws its base seed from the global torch RNG, which would
    # shift the dropout stream of a resumed run away from the uninterrupted one
    loader = torch.utils.data.DataLoader(train_data, batch_size=None, generator=torch.Generator().manual_seed(seed))
    accelerator.wait_for_everyone()
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    log = Logger(run_dir, start_step, bool(ckpt), main_proc)
    if main_proc:
        announce(cfg, run_dir, model, accelerator, log, ckpt, restart, start_step, horizon, hist, precision)

    # ---- the loop: step, then log / validate / checkpoint on their intervals ----------------------------------
    running, last_val = MetricSum(cfg["use_compressed_context"]), {}
    bar = tqdm(total=cfg["train_timesteps"], initial=start_step, desc="train", disable=not main_proc, unit="step")
    t_start, n_targets = time.perf_counter(), 0
    t_log, targets_log = t_start, 0
    model.train()
    for step, batch in zip(range(start_step, cfg["train_timesteps"]), loader, strict=False):  # the loader never ends
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        if shards is not None:  # gradients summed over row shards into .grad (shards.py)
            out = shards(batch)
        else:
            with accelerator.autocast():
                out = step_fn(batch)
            accelerator.backward(out["loss"])
        if cfg["grad_clip"] > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not opt.step_was_skipped:  # fp16: a step the grad scaler skipped (inf/nan) does not advance the schedule
            sched.step()
        running.add({k: v.detach() for k, v in out.items() if not k.startswith("logits")})
        n_targets += int(out["n_targets"])
        targets_log += int(out["n_targets"])
        done = step + 1
        last = done == cfg["train_timesteps"]

        if done % cfg["log_interval"] == 0 or last:
            res, now = running.result(accelerator), time.perf_counter()
            log.log(done, "train", {**res, "lr": sched.get_last_lr()[0]})
            log.log(done, "perf", {"targets_per_s": targets_log * accelerator.num_processes / (now - t_log)})
            if main_proc and res:
                bar.set_postfix(loss=f"{res['loss_action']:.3f}", acc=f"{res['acc_action']:.3f}")
            t_log, targets_log = now, 0
        if done % cfg["val_interval"] == 0 or last:
            last_val = val_metrics(raw_model, val_data, cfg, accelerator)
            if main_proc and cfg["val_episodes"] and cfg["val_streams"]:
                last_val |= val_return(raw_model, cfg)
            accelerator.wait_for_everyone()
            log.log(done, "val", last_val)
            if main_proc:
                tqdm.write(f"step {done}: " + ", ".join(f"val/{k} {v:.4f}" for k, v in last_val.items()))
        if done % cfg["ckpt_interval"] == 0 or last:
            save_checkpoint(run_dir / CKPT, raw_model, opt, sched, accelerator, log, cfg, horizon, done)
        bar.update()
    bar.close()

    # ---- finish: summary, and every rank checks it holds the same weights -------------------------------------
    digests = gather_object([weights_digest(raw_model.state_dict())])  # one per rank; DDP keeps them equal
    if main_proc:
        write_summary(run_dir, cfg, accelerator, start_step, time.perf_counter() - t_start, n_targets, last_val, digests,
                      precision)
        log.close()
    # Free the DDP wrapper (it holds the process group) on every rank before the group is destroyed together;
    # left to interpreter exit, gloo's threads die with `terminate called without an active exception`.
    accelerator.wait_for_everyone()
    if shards is not None:
        shards.close()
    model, opt, step_fn = accelerator.free_memory(model, opt, step_fn)
    gc.collect()  # the wrapper sits in reference cycles
    accelerator.end_training()
    if len(set(digests)) > 1:
        raise RuntimeError(f"ranks ended with different weights ({digests}): the DDP replicas diverged")


if __name__ == "__main__":
    run_main(main)
