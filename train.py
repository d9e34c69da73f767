"""Train the AD transformer on the PPO histories (single process or `accelerate launch`).

    python train.py [--config config/model/ad_dr.yaml] [--run-dir DIR] [--force] [key=value ...]
    accelerate launch --num_processes N train.py ...   # DDP; effective batch = N x train_batch_size

Resumes automatically from DIR/ckpt.pt; refuses to touch a finished run unless --force.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common import DEFAULT_MODEL_CONFIG, UserError, add_config_args, default_run_dir, history_path, load_config, run_main
from dataset import HistoryDataset
from model import MODEL, ADConfig

CKPT = "ckpt.pt"
# keys that may differ between a checkpoint and the config that resumes it
RESUMABLE_KEYS = {
    "train_timesteps", "log_interval", "test_interval", "test_batches", "ckpt_interval", "n_process", "traj_dir",
    "eval_episodes", "eval_streams", "eval_temperature", "eval_window_shift", "eval_cache",
}
METRICS = ("loss_action", "acc_action", "loss_token_type", "acc_token_type")


def lr_lambda(cfg: dict):
    """Linear warmup to `lr`, then cosine decay to 10 % of it at `train_timesteps`."""
    warm, total = cfg["warmup_steps"], cfg["train_timesteps"]

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class MetricSum:
    """Sums per-batch metrics (weighted by targets) and </compress> counts; reduced over ranks."""

    def __init__(self):
        self.s: dict[str, float] = {}

    def add(self, out: dict) -> None:
        n = float(out["n_targets"])
        for k in METRICS:
            if k in out:
                self.s[k] = self.s.get(k, 0.0) + float(out[k]) * n
        self.s["n"] = self.s.get("n", 0.0) + n
        for k in ("n_true_positive", "n_pred_end", "n_true_end"):
            if k in out:
                self.s[k] = self.s.get(k, 0.0) + float(out[k])

    def result(self, accelerator: Accelerator) -> dict:
        keys = sorted(self.s)
        if not keys:
            return {}
        tot = accelerator.reduce(torch.tensor([self.s[k] for k in keys], dtype=torch.float64, device=accelerator.device), "sum")
        s = dict(zip(keys, tot.tolist()))
        res = {k: s[k] / s["n"] for k in METRICS if k in s}
        if "n_true_end" in s:
            res["precision_compress_end"] = s["n_true_positive"] / max(s["n_pred_end"], 1.0)
            res["recall_compress_end"] = s["n_true_positive"] / max(s["n_true_end"], 1.0)
        self.s = {}
        return res


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill during torch.save never leaves a corrupt ckpt.pt


def check_resume(ckpt_cfg: dict, cfg: dict, run_dir: Path) -> None:
    diff = [k for k in sorted(set(cfg) | set(ckpt_cfg)) if k not in RESUMABLE_KEYS and ckpt_cfg.get(k) != cfg.get(k)]
    if diff:
        k = diff[0]
        raise UserError(f"checkpoint in {run_dir} was trained with {k}={ckpt_cfg.get(k)!r}, not {cfg.get(k)!r}; "
                        "use another --run-dir (or --force to start over)")


@torch.no_grad()
def test_metrics(model, test_data: HistoryDataset, cfg: dict, accelerator: Accelerator) -> dict:
    """Teacher-forced metrics on the held-out goals' histories (same batches every time, split over ranks)."""
    model.eval()
    m = MetricSum()
    for i in range(accelerator.process_index, cfg["test_batches"], accelerator.num_processes):
        batch = {k: v.to(accelerator.device) for k, v in test_data.batch(i).items()}
        with accelerator.autocast():
            m.add(model(batch))
    model.train()
    return m.result(accelerator)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, DEFAULT_MODEL_CONFIG)
    parser.add_argument("--run-dir", default=None, help="output directory (default: runs/<run_name>-seed<seed>)")
    parser.add_argument("--force", action="store_true", help="start over in a run dir that already holds a run")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg)
    accelerator = Accelerator(mixed_precision=cfg["mixed_precision"], cpu=not torch.cuda.is_available())
    main_proc = accelerator.is_main_process

    # ---- resume or start ---------------------------------------------------------------------------------
    ckpt_path = run_dir / CKPT
    ckpt = None
    if ckpt_path.exists() and not args.force:
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        except Exception:
            raise UserError(f"checkpoint {ckpt_path} is unreadable; move it away or pass --force to start over") from None
        check_resume(ckpt["config"], cfg, run_dir)
        if ckpt["step"] >= cfg["train_timesteps"]:
            raise UserError(f"run {run_dir} is already finished ({ckpt['step']} steps); use another --run-dir, "
                            "raise train_timesteps to continue it, or pass --force to start over")
    elif run_dir.exists() and any(run_dir.iterdir()) and not args.force and not ckpt_path.exists():
        raise UserError(f"run dir {run_dir} exists and holds no checkpoint; use another --run-dir or pass --force")
    start_step = ckpt["step"] if ckpt else 0

    seed = cfg["seed"]
    torch.manual_seed(seed + accelerator.process_index)
    random.seed(seed)
    np.random.seed(seed)
    hist = history_path(cfg)
    train_data = HistoryDataset(hist, cfg, "train", cfg["train_batch_size"], seed, accelerator.process_index, start_step)
    test_data = HistoryDataset(hist, cfg, "test", cfg["train_batch_size"], seed + 10_000)

    model = MODEL[cfg["model"]](ADConfig.from_dict(cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    if ckpt:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])
    # the scheduler is stepped by hand once per optimiser step (accelerate would step it N times under DDP)
    model, opt = accelerator.prepare(model, opt)
    loader = torch.utils.data.DataLoader(train_data, batch_size=None)

    writer = None
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
        writer = SummaryWriter(str(run_dir))
        if not ckpt:
            table = "\n".join(f"| {k} | {v} |" for k, v in cfg.items())
            writer.add_text("hparams", "| key | value |\n|---|---|\n" + table, 0)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{'resuming' if ckpt else 'training'} {cfg['model']} "
              f"({'compressed' if cfg['use_compressed_context'] else 'standard'}, {n_params / 1e3:.0f}k params) "
              f"in {run_dir} from step {start_step}, {accelerator.num_processes} process(es) on {accelerator.device}, "
              f"history {hist}")

    def save(step: int):
        if main_proc:
            atomic_save({
                "model": accelerator.unwrap_model(model).state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "step": step,
                "config": cfg,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            }, ckpt_path)
        accelerator.wait_for_everyone()

    running, last_test = MetricSum(), {}
    bar = tqdm(total=cfg["train_timesteps"], initial=start_step, desc="train", disable=not main_proc, unit="step")
    t_start, n_targets, step = time.perf_counter(), 0, start_step
    t_log, targets_log = t_start, 0
    model.train()
    for step, batch in zip(range(start_step, cfg["train_timesteps"]), loader):
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        with accelerator.autocast():
            out = model(batch)
        accelerator.backward(out["loss"])
        if cfg["grad_clip"] > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        running.add({k: v.detach() for k, v in out.items() if not k.startswith("logits")})
        n_targets += int(out["n_targets"])
        targets_log += int(out["n_targets"])
        done = step + 1

        if done % cfg["log_interval"] == 0 or done == cfg["train_timesteps"]:
            res = running.result(accelerator)
            now = time.perf_counter()
            if main_proc:
                for k, v in res.items():
                    writer.add_scalar(f"train/{k}", v, done)
                writer.add_scalar("train/lr", sched.get_last_lr()[0], done)
                writer.add_scalar("perf/targets_per_s", targets_log * accelerator.num_processes / (now - t_log), done)
                bar.set_postfix(loss=f"{res['loss_action']:.3f}", acc=f"{res['acc_action']:.3f}")
            t_log, targets_log = now, 0
        if done % cfg["test_interval"] == 0 or done == cfg["train_timesteps"]:
            res = last_test = test_metrics(model, test_data, cfg, accelerator)
            if main_proc:
                for k, v in res.items():
                    writer.add_scalar(f"test/{k}", v, done)
                tqdm.write(f"step {done}: " + ", ".join(f"test/{k} {v:.4f}" for k, v in res.items()))
        if done % cfg["ckpt_interval"] == 0 or done == cfg["train_timesteps"]:
            save(done)
        bar.update()
    bar.close()

    elapsed = time.perf_counter() - t_start
    steps_done = cfg["train_timesteps"] - start_step
    if main_proc:
        summary = {
            "steps": cfg["train_timesteps"],
            "steps_this_session": steps_done,
            "seconds": elapsed,
            "steps_per_s": steps_done / elapsed,
            "targets_per_s": n_targets * accelerator.num_processes / elapsed,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "num_processes": accelerator.num_processes,
            **{f"test/{k}": v for k, v in last_test.items()},
        }
        (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        writer.close()
        print(f"done: {steps_done} steps in {elapsed:.0f} s ({summary['steps_per_s']:.2f} steps/s, "
              f"{summary['targets_per_s']:.0f} targets/s); checkpoint {ckpt_path}")
    accelerator.end_training()


if __name__ == "__main__":
    run_main(main)
