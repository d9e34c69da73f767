"""Benchmark: PPO collection, training throughput and memory, in-context evaluation speed, flat eval memory.

    python bench.py                 # small sizes, a few minutes on 2 cores
    python bench.py --full          # real sizes: all 81 goals, 100 training steps, 500 evaluation episodes
    python bench.py --json out.json # also write every figure as JSON

Prints one table: each figure, its target and `ratio` = how far past the target it is (> 1 = target met;
`target / measured` for upper bounds, `measured / target` for lower bounds). Every measurement runs in a fresh
subprocess, so peak memory and thread settings of one cannot leak into another. Without a history file (a fresh
clone) it first collects 2 training goals with the default PPO config into datasets/bench/ (~15 s).

- collection: `collect.collect_goal` (SB3 PPO, default config) on randomly drawn goals, `n_process` goals at a
  time in a process pool like `collect.py`; seconds per goal per core, the 81-goal time this projects, and the
  last-region PPO return as a fraction of the optimum. Nothing is written.
- training: the `train.py` step (forward, backward, grad clip, AdamW) on real batches of
  `HistoryDataset(...).batch(step)` from the history file, batch generation included, timed per step after
  warm-up steps (steps/s = 1 / median step time; best of 2-3 fresh processes per option, as the same step runs
  up to ~30% faster or slower from one process to the next); peak RSS growth over the baseline after a 2-row
  step, and the bytes of activations autograd saves for backward in one step. Options, each measured on its own
  against the baseline of this same run (fp32, torch's default threads, eager, one pass over the batch):
  `mixed_precision=bf16`, `compile=true` (fp32 and bf16), the default (its precision with the config's `train_shards`
  row shards, shards.py) on the run's threads and on one thread; and the two modes trained at once, one thread each
  (what the workflow and the study do); summary tokens (config/model/ad_dr_summary.yaml, summary_train_regions pruned
  regions in front of every sample) at the default precision, one thread, against compressed AD's same option. FLOPs per step are
  counted with torch's FlopCounterMode; the limit is the measured matmul rate of this CPU at the model's shapes
  (fp32 and bf16); a profile (torch.profiler) says where a step's time goes.
- projection: the default main job (collect, train both modes at once, evaluate both) from the measured parts.
- evaluation: `evaluate.run_in_context` on the 8 held-out goals x `eval_streams`, cached and uncached, on a
  randomly initialised model of the default config. A random model's token-type head says `</compress>` at
  random steps, so in compressed mode the head is biased never to say it and regions close by the
  `max_region_len` rule (every 82 steps; a trained model closes every 80), which is what a trained model costs.
  `--run-dir` evaluates a trained checkpoint instead. Summary tokens (config/model/ad_dr_summary.yaml) are timed the same
  way (a summary is written at each close), and their cached time is compared with compressed AD's (bound 1.5x).
- memory over a long evaluation: the peak RSS of one cached run after 1/5 of its episodes and at the end, and
  the longest context any stream held (must stay <= n_transit).
- gpu (`--only gpu`, never by default): on cuda:0, both modes trained 300 steps in bf16, eager and `torch.compile`d
  (steps/s, targets/s, peak GPU memory), and a cached evaluation of 500 episodes x 8 goals x 4 streams (seconds, peak
  GPU memory). On a machine without CUDA it stops with one line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
STANDARD_CONFIG = ROOT / "config" / "model" / "ad_dr.yaml"
COMPRESSED_CONFIG = ROOT / "config" / "model" / "ad_dr_compressed.yaml"
MODES = {"standard": STANDARD_CONFIG, "compressed": COMPRESSED_CONFIG}
SUMMARY_CONFIG = ROOT / "config" / "model" / "ad_dr_summary.yaml"
EVAL_MODES = {**MODES, "summary": SUMMARY_CONFIG}  # the evaluation and memory sections also time summary tokens
SUMMARY_EVAL_RATIO = 1.5  # summary tokens' cached evaluation time / compressed AD's (the summary-token issue's bound)

# targets (2-core CPU, default configs): the performance issue's, training as a multiple of the fp32 baseline
COLLECT_81_S = 300.0
COLLECT_FRACTION = 0.90
TARGET_SPEEDUP = 2.0  # training targets/s vs this run's fp32 / default-threads / eager baseline
TARGETS_PER_S = {"standard": 115_000.0, "compressed": 110_000.0}
MAIN_JOB_S = 1200.0
COMPRESSED_SPEEDUP = 1.4
DEFAULT_VS_FASTEST = 0.9  # the default precision's training speed / the fastest option's (within step-to-step noise)
MEMORY_REDUCTION = 0.30
EVAL_500_S = 30.0
FLAT_MEMORY_MB = 10.0  # "no growth with episode count": the peak RSS may not grow by more over the last 4/5 of a run

SIZES = {  # small / --full
    "collect_goals": (2, 81),
    "train_steps": (15, 40),
    "train_repeats": (2, 3),
    "train_warmup": (3, 5),
    "eval_cached_episodes": (50, 500),
    "eval_uncached_episodes": (15, 50),
    "memory_episodes": ((20, 100), (100, 500)),
}


# ---- measurements (each runs in its own subprocess) ----------------------------------------------------------------
def rss_mb() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS, so a later peak excludes earlier transients."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak RSS since the last `reset_peak_rss` (VmHWM), else since the process started."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_collection(n_goals: int, seed: int) -> dict:
    import multiprocessing as mp

    import numpy as np

    from collect import _worker, region_returns
    from common import DEFAULT_COLLECT_CONFIG, load_config
    from env import optimal_return

    cfg = load_config(DEFAULT_COLLECT_CONFIG)
    n_all = cfg["grid_size"] ** 2
    goals = sorted(random.Random(seed).sample(range(n_all), min(n_goals, n_all)))
    n_proc = min(cfg["n_process"], len(goals))
    start = time.perf_counter()
    with mp.get_context("fork").Pool(n_proc) as pool:
        results = list(pool.imap_unordered(_worker, [(g, cfg) for g in goals]))
    wall = time.perf_counter() - start
    first, last, opt, secs = [], [], [], []
    for goal, data, s in results:
        ret = region_returns(data["rewards"], cfg["n_steps"], cfg["horizon"])
        first.append(ret[0])
        last.append(ret[-1])
        opt.append(optimal_return(goal, cfg["grid_size"], cfg["horizon"]))
        secs.append(s)
    first, last, opt = map(np.array, (first, last, opt))
    return {
        "goals": goals, "n_process": n_proc, "wall_s": wall,
        "s_per_goal_per_core": wall * n_proc / len(goals), "mean_goal_s": float(np.mean(secs)),
        # projected from the measured throughput; the measured time itself when all goals ran
        "projected_81_goals_s": wall * n_all / len(goals),
        "first_region_return": float(first.mean()), "last_region_return": float(last.mean()),
        "optimum": float(opt.mean()), "last_region_fraction": float(last.sum() / opt.sum()),
        "worst_goal_fraction": float(np.min(last / opt)),
    }


def history_file_stats() -> dict | None:
    """First/last-region PPO returns of the history file on disk (all goals), if it exists: read only."""
    import h5py
    import numpy as np

    from collect import region_returns
    from common import DEFAULT_COLLECT_CONFIG, history_path, load_config
    from env import optimal_return

    cfg = load_config(DEFAULT_COLLECT_CONFIG)
    path = history_path(cfg)
    if not path.is_file():
        return None
    first, last, opt = [], [], []
    with h5py.File(path, "r") as f:
        n_steps, horizon, grid = int(f.attrs["n_steps"]), int(f.attrs["horizon"]), int(f.attrs["grid_size"])
        for key in f:
            ret = region_returns(f[key]["rewards"][:], n_steps, horizon)
            first.append(ret[0])
            last.append(ret[-1])
            opt.append(optimal_return(int(key), grid, horizon))
    first, last, opt = map(np.array, (first, last, opt))
    return {"path": str(path), "n_goals": len(opt), "first_region_return": float(first.mean()),
            "last_region_return": float(last.mean()), "optimum": float(opt.mean()),
            "last_region_fraction": float(last.sum() / opt.sum()), "worst_goal_fraction": float(np.min(last / opt))}


def saved_activation_bytes(model, batch) -> int:
    """Bytes of the tensors autograd saves for backward in one forward pass (parameters excluded, storages
    counted once): the activation memory of a training step."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(batch)
    out["loss"].backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def train_config(mode: str, options: dict) -> dict:
    from common import load_config

    keys = [f"{k}={v}" for k, v in options.items() if k in ("mixed_precision", "traj_dir")]
    return load_config(EVAL_MODES[mode], keys + list(options.get("overrides", ())))  # overrides: tests' tiny histories


def uses_bf16(cfg: dict, on_gpu: bool = False) -> bool:
    """Whether train.py would autocast to bf16 with this config on this CPU or GPU (`auto` resolved as train.py does)."""
    from hardware import resolve_precision

    return resolve_precision(cfg["mixed_precision"], on_gpu=on_gpu)[0] == "bf16"


def measure_training(mode: str, n_steps: int, n_warmup: int, options: dict) -> dict:
    """Time the training step with `options` (mixed_precision, compile, traj_dir, device: "cpu" or "cuda")."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from common import history_path
    from dataset import HistoryDataset
    from model import MODEL, ADConfig
    from model.optim import param_groups
    from shards import ShardedStep, shards_apply

    cfg = train_config(mode, options)
    data = HistoryDataset(history_path(cfg), cfg, "train", cfg["train_batch_size"], cfg["seed"])
    torch.manual_seed(cfg["seed"])
    device = options.get("device", "cpu")
    on_gpu = device.startswith("cuda")
    model = MODEL[cfg["model"]](ADConfig.from_dict(cfg)).train().to(device)
    fn = torch.compile(model) if options.get("compile") else model
    bf16 = uses_bf16(cfg, on_gpu)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)  # GPU kernels run asynchronously: wait before timing
    opt = torch.optim.AdamW(param_groups(model, cfg["weight_decay"], cfg["weight_decay_on"]), lr=cfg["lr"], betas=(0.9, 0.99))

    lengths = {}  # step -> tokens per sample of its batch (batches are trimmed to their longest sample)

    def batch_on_device(i: int) -> dict:
        b = data.batch(i)
        lengths[i] = b["type_ids"].shape[1]
        return {k: v.to(device) for k, v in b.items()}

    def autocast():
        return torch.autocast("cuda" if on_gpu else "cpu", dtype=torch.bfloat16, enabled=bf16)  # as accelerate does

    # train.py's row shards (shards.py) where the option asks for them: `train_shards` rows, the run's threads as cores
    n_shards = options.get("train_shards", 1)
    shards = ShardedStep(model, n_shards, torch.get_num_threads(), autocast) \
        if shards_apply(n_shards, "cuda" if on_gpu else "cpu", compile=options.get("compile", False)) else None

    def step(i: int, rows: int | None = None, f=fn, one_pass: bool = False) -> int:
        batch = batch_on_device(i)
        if shards is not None and rows is None and not one_pass:
            out = shards(batch)
        else:
            with autocast():
                out = f({k: v[:rows] for k, v in batch.items()} if rows else batch)
            out["loss"].backward()
        if cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(out["n_targets"])

    # one step on 2 rows pages in the kernels' code and creates the optimiser state: the baseline then holds
    # everything but what scales with the batch (activations, their gradients, allocator caches)
    step(0, rows=2, f=model)
    base = rss_mb()
    reset_ok = reset_peak_rss()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    threads = torch.get_num_threads()  # the run's (shards set torch's own count to 1 per shard)
    t0 = time.perf_counter()
    for i in range(n_warmup + (5 if options.get("compile") else 0)):  # compile: its first steps compile
        step(i)
    sync()
    warmup_s = time.perf_counter() - t0
    times, targets = [], 0
    for i in range(n_warmup, n_warmup + n_steps):
        start = time.perf_counter()
        targets += step(i)  # int(n_targets) waits for the forward pass; sync() for the backward and the update
        sync()
        times.append(time.perf_counter() - start)
    peak = peak_rss_mb()
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None
    with FlopCounterMode(display=False) as counter:  # forward + backward FLOPs of one step (eager model, one pass: the
        step(0, f=model, one_pass=True)                # counter sees only this thread's operations, not the shards')
    saved = saved_activation_bytes(model, batch_on_device(0))
    step_s = statistics.median(times)  # robust to a step slowed by something else on the machine
    return {
        "mode": mode, "options": options, "batch_size": cfg["train_batch_size"], "seq_len": cfg["n_transit"],
        "tokens_per_sample": float(statistics.mean(lengths[i] for i in range(n_warmup, n_warmup + n_steps))),
        "steps": n_steps, "threads": threads, "train_shards": options.get("train_shards", 1), "warmup_s": warmup_s,
        "median_step_s": step_s, "mean_step_s": sum(times) / n_steps,
        "steps_per_s": 1 / step_s, "targets_per_s": targets / n_steps / step_s, "targets_per_step": targets / n_steps,
        "gflop_per_step": counter.get_total_flops() / 1e9, "gflop_per_s": counter.get_total_flops() / 1e9 / step_s,
        "saved_activations_mb": saved / 2**20, "baseline_rss_mb": base, "peak_rss_mb": peak,
        "peak_rss_growth_mb": peak - base if reset_ok else float("nan"), "device": device, "bf16": bf16,
        "peak_gpu_mb": peak_gpu,
    }


def measure_profile(mode: str, options: dict, n_steps: int = 4) -> dict:
    """Where a training step's time goes (torch.profiler, self CPU time): attention, matmuls, the rest."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from common import history_path
    from dataset import HistoryDataset
    from model import MODEL, ADConfig

    cfg = train_config(mode, options)
    data = HistoryDataset(history_path(cfg), cfg, "train", cfg["train_batch_size"], cfg["seed"])
    torch.manual_seed(cfg["seed"])
    model = MODEL[cfg["model"]](ADConfig.from_dict(cfg)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    bf16 = uses_bf16(cfg)

    def step(i):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(data.batch(i))
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(2):
        step(i)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(n_steps):
            step(i)
    ops = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(t for _, t in ops)
    groups = {"attention (SDPA flash, fwd + bwd)": ("scaled_dot_product", "flash"),
              "matmul (mm / addmm / bmm)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
              "dtype casts / copies": ("aten::copy_", "aten::_to_copy"),
              "GELU, LayerNorm, embeddings, loss": ("gelu", "layer_norm", "embedding", "softmax", "nll")}
    shares = {}
    for name, keys in groups.items():
        shares[name] = sum(t for k, t in ops if any(x in k for x in keys)) / total
    shares["everything else (optimiser, indexing, Python)"] = 1 - sum(shares.values())
    top = sorted(ops, key=lambda x: -x[1])[:6]
    return {"mode": mode, "options": options, "ms_per_step": total / 1000 / n_steps, "shares": shares,
            "top_ops": [(k, t / total) for k, t in top]}


def measure_matmul_peak(mode: str, options: dict) -> dict:
    """GFLOP/s of this CPU's matmuls at the model's shapes (tokens x 64 -> 192 / 256, 256 -> 64), fp32 and bf16: the
    limit a training step could approach if it were all matmul."""
    import torch

    cfg = train_config(mode, options)
    rows = cfg["train_batch_size"] * cfg["n_transit"]
    D = cfg["d_model"]
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        rates = []
        for k, n in ((D, 3 * D), (D, 4 * D), (4 * D, D)):
            a, b = torch.randn(rows, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            for _ in range(3):
                a @ b
            reps, t0 = 20, time.perf_counter()
            for _ in range(reps):
                a @ b
            rates.append(2 * rows * k * n * reps / (time.perf_counter() - t0) / 1e9)
        out[str(dtype).split(".")[1]] = statistics.mean(rates)
    return {"gflop_per_s": out, "threads": torch.get_num_threads()}


def eval_model(mode: str, run_dir: str | None, device: str = "cpu"):
    """(model, cfg, trained): the checkpoint in `run_dir` if it was trained in this mode, else a randomly
    initialised default-config model (compressed: token-type head biased never to say </compress>)."""
    import torch

    from common import load_config
    from model import MODEL, ADConfig
    from model.ad import COMPRESS_END

    if run_dir:
        from evaluate import load_run

        model, cfg = load_run(Path(run_dir), [], device)
        trained_mode = "summary" if cfg.get("use_summary") else "compressed" if cfg["use_compressed_context"] else "standard"
        if trained_mode == mode:
            return model, cfg, True
    cfg = load_config(EVAL_MODES[mode])
    torch.manual_seed(cfg["seed"])
    model = MODEL[cfg["model"]](ADConfig.from_dict(cfg)).eval()
    if cfg["use_compressed_context"]:
        with torch.no_grad():
            model.head_token_type.bias[COMPRESS_END] = -10.0  # regions close at max_region_len, as scheduled
    return model.to(device), cfg, False


def measure_eval(mode: str, use_cache: bool, n_episodes: int, run_dir: str | None, rss_at: tuple[int, ...] = (),
                 device: str = "cpu") -> dict:
    """Time `run_in_context`. With `rss_at` (episode counts), also record the peak RSS so far after those episodes
    and the longest context any stream held (this costs a little time, so only memory runs do it)."""
    import torch

    import evaluate
    import summary
    from env import task_split

    model, cfg, trained = eval_model(mode, run_dir, device)
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    test_goals = task_split(cfg, "test")
    longest, rss, steps_done = [0], {}, [0]
    if rss_at:
        marks = {n * cfg["horizon"]: n for n in rss_at}
        contexts = summary.SummaryContexts if cfg.get("use_summary") else evaluate.Contexts
        logits = contexts.logits

        def tracked(ctx, use_cache):
            if steps_done[0] in marks:  # before the step: exactly `n` episodes done
                rss[marks[steps_done[0]]] = peak_rss_mb()
            steps_done[0] += 1
            longest[0] = max(longest[0], int(ctx.length.max()))
            return logits(ctx, use_cache)

        contexts.logits = tracked
    base = rss_mb()
    reset_ok = reset_peak_rss()
    start = time.perf_counter()
    res = evaluate.run_in_context(model, cfg, test_goals, n_streams=cfg["eval_streams"], n_episodes=n_episodes,
                                  seed=cfg["eval_seed"], use_cache=use_cache, progress=False, device=device)
    secs = time.perf_counter() - start  # the loop reads every step's actions back to the CPU: no sync needed
    if n_episodes in rss_at:
        rss[n_episodes] = peak_rss_mb()
    steps = n_episodes * cfg["horizon"]
    return {
        "mode": mode, "model": "trained " + str(run_dir) if trained else "random", "cached": use_cache,
        "episodes": n_episodes, "streams": len(test_goals) * cfg["eval_streams"], "seconds": secs,
        "steps_per_s": steps / secs, "projected_500_s": secs * 500 / n_episodes,
        "streams_recomputed": res["recomputed"], "n_closes": sum(map(len, res["closes"])),
        "n_forced_closes": sum(map(len, res["forced_closes"])), "n_transit": cfg["n_transit"],
        "longest_context": longest[0] if rss_at else None, "peak_rss_mb_after_episodes": rss,
        "mean_return": float(res["returns"].mean()), "baseline_rss_mb": base,
        "peak_rss_growth_mb": peak_rss_mb() - base if reset_ok else float("nan"), "torch_threads": torch.get_num_threads(),
        "device": device, "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None,
    }


def ensure_history() -> Path:
    """The history the training benchmark reads: the default file if it exists, else 2 training goals collected with the
    default PPO config into datasets/bench/ (kept for the next run). Returns its traj_dir."""
    from common import DEFAULT_COLLECT_CONFIG, history_path, load_config

    cfg = load_config(DEFAULT_COLLECT_CONFIG)
    if history_path(cfg).is_file():
        return history_path(cfg).parent
    bench_dir = ROOT / "datasets" / "bench"
    if not history_path({**cfg, "traj_dir": str(bench_dir)}).is_file():
        from env import task_split

        goals = ",".join(map(str, task_split(load_config(STANDARD_CONFIG), "train")[:2]))
        print(f"no history file at {history_path(cfg)}: collecting goals {goals} into {bench_dir} for the benchmark", flush=True)
        subprocess.run([sys.executable, str(ROOT / "collect.py"), "--goals", goals, f"traj_dir={bench_dir}"], cwd=ROOT,
                       check=True, capture_output=True)
    return bench_dir


def default_train_steps() -> int:
    from common import load_config

    return load_config(STANDARD_CONFIG)["train_timesteps"]


def run_workers_at_once(specs: list[dict]) -> list[dict]:
    """Several measurements in fresh interpreters at the same time (e.g. two single-thread trainings)."""
    before, start = cpu_snapshot(), time.perf_counter()
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(sp)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for sp in specs]
    outs = [p.communicate() for p in procs]
    busy = busy_others(before, cpu_snapshot(), time.perf_counter() - start)
    res = []
    for sp, p, (out, err) in zip(specs, procs, outs, strict=True):
        if p.returncode != 0:
            raise SystemExit(f"benchmark step {sp} failed:\n{err[-3000:]}")
        res.append(json.loads(out.strip().splitlines()[-1]) | {"busy": busy})
    return res


def worker(spec: dict) -> dict:
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    kind = spec["kind"]
    if kind == "collect":
        return measure_collection(spec["n_goals"], spec["seed"])
    if kind == "history":
        return {"history": history_file_stats()}
    if kind == "train":
        return measure_training(spec["mode"], spec["steps"], spec["warmup"], spec["options"])
    if kind == "profile":
        return measure_profile(spec["mode"], spec["options"])
    if kind == "matmul":
        return measure_matmul_peak(spec["mode"], spec["options"])
    if kind == "eval":
        return measure_eval(spec["mode"], spec["cached"], spec["episodes"], spec.get("run_dir"), tuple(spec.get("rss_at", ())),
                            spec.get("device", "cpu"))
    raise ValueError(f"unknown benchmark kind {kind!r}")


def run_worker(spec: dict, retries: int = 0) -> dict:
    """Run one measurement in a fresh interpreter and return its JSON result, with `busy`: the other processes
    that competed for the CPU meanwhile. A contended measurement is repeated up to `retries` times."""
    for attempt in range(retries + 1):
        before, start = cpu_snapshot(), time.perf_counter()
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], cwd=ROOT,
                              capture_output=True, text=True)
        busy = busy_others(before, cpu_snapshot(), time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"benchmark step {spec} failed:\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["busy"] = busy
        if not busy:
            break
        if attempt < retries:
            print(f"  other processes were busy ({', '.join(busy)}): measuring again", flush=True)
    return res


# ---- the table ----------------------------------------------------------------------------------------------------
class Table:
    HEADER = ("figure", "measured", "target", "ratio")

    def __init__(self):
        self.rows: list[tuple[str, str, str, str]] = []
        self.busy: list[str] = []

    def add(self, name: str, value: float, fmt: str = "{:.1f}", target: float | None = None, upper: bool = False,
            unit: str = "", busy: list[str] | None = None):
        """`upper`: the target is a ceiling (seconds, memory); otherwise a floor; no target: an information row.
        `busy`: other processes that competed for the CPU while this was measured (marks the figure with *)."""
        shown = fmt.format(value) + unit + (" *" if busy else "")
        self.busy += [b for b in busy or [] if b not in self.busy]
        if target is None or value is None or (isinstance(value, float) and math.isnan(value)):
            self.rows.append((name, shown, "", ""))
            return
        ratio = (target / value if value > 0 else math.inf) if upper else value / target
        tgt = ("<= " if upper else ">= ") + fmt.format(target).lstrip("+") + unit
        self.rows.append((name, shown, tgt, (f"{ratio:.2f}" if ratio < 100 else ">99") + ("" if ratio >= 1 else " MISSED")))

    def print(self, title: str):
        rows = [self.HEADER, *self.rows]
        w = [max(len(r[i]) for r in rows) for i in range(4)]
        print(f"\n{title}\n")
        for j, r in enumerate(rows):
            print("| " + " | ".join(r[i].ljust(w[i]) for i in range(4)) + " |")
            if j == 0:
                print("|" + "|".join("-" * (x + 2) for x in w) + "|")
        if self.busy:
            print(f"\n* measured while other processes competed for the CPU (timings depressed): {', '.join(self.busy)}")


def bench_collect(args, k: int, table: Table, res: dict) -> None:
    """PPO collection: seconds per goal per core, the 81-goal projection, the source's returns."""
    n = SIZES["collect_goals"][k]
    print(f"collection: PPO on {n} goals ...", flush=True)
    c = res["collect"] = run_worker({"kind": "collect", "n_goals": n, "seed": args.seed}, args.retries)
    table.add(f"collect: s per goal per core ({len(c['goals'])} goals, {c['n_process']} procs)",
              c["s_per_goal_per_core"], target=COLLECT_81_S * c["n_process"] / 81, upper=True, unit=" s", busy=c["busy"])
    table.add(f"collect: 81 goals on {c['n_process']} procs ({'measured' if len(c['goals']) == 81 else 'projected'})",
              c["projected_81_goals_s"], "{:.0f}", COLLECT_81_S, upper=True, unit=" s", busy=c["busy"])
    table.add("collect: PPO first-region return / optimum", c["first_region_return"] / c["optimum"], "{:.2f}")
    table.add("collect: PPO last-region return / optimum", c["last_region_fraction"], "{:.2f}", COLLECT_FRACTION)
    h = res["history_file"] = run_worker({"kind": "history"})["history"]
    if h:
        table.add(f"history file ({h['n_goals']} goals): last-region / optimum", h["last_region_fraction"], "{:.2f}",
                  COLLECT_FRACTION)


def default_shards() -> int:
    from common import load_config

    return load_config(STANDARD_CONFIG)["train_shards"]


def train_variants(threads: int | None, default: str) -> dict:
    """name -> (options, threads) of the training options compared; the first is the reference of every ratio (one
    pass over the batch, intra-op threads). `default`: what the config's mixed_precision (auto) resolves to on this
    machine ("no" or "bf16"); the default also runs the config's `train_shards` row shards (shards.py)."""
    name, n = {"no": "fp32", "bf16": "bf16"}[default], default_shards()
    return {
        "baseline (fp32, eager)": ({"mixed_precision": "no"}, threads),
        "bf16": ({"mixed_precision": "bf16"}, threads),
        "fp32 + compile": ({"mixed_precision": "no", "compile": True}, threads),
        "bf16 + compile": ({"mixed_precision": "bf16", "compile": True}, threads),
        f"default ({name}, {n} row shards)": ({"mixed_precision": default, "train_shards": n}, threads),
        f"default ({name}, {n} row shards), 1 thread": ({"mixed_precision": default, "train_shards": n}, 1),
    }


def time_variants(variants: dict, traj: dict, k: int, retries: int) -> dict:
    """(mode, variant) -> the best of several fresh processes (compile: one, it is slow to start): the same step runs
    up to ~30% faster or slower from one process to the next (where the allocator puts things)."""
    n, warm, reps = SIZES["train_steps"][k], SIZES["train_warmup"][k], SIZES["train_repeats"][k]
    tr: dict = {}
    for mode in MODES:
        for name, (options, thr) in variants.items():
            r = []
            for rep in range(1 if "compile" in name else reps):
                print(f"training: {mode}, {name} ({rep + 1}) ...", flush=True)
                r.append(run_worker({"kind": "train", "mode": mode, "steps": n, "warmup": warm, "threads": thr,
                                     "options": {**options, **traj}}, retries))
            tr[mode, name] = max(r, key=lambda x: x["steps_per_s"]) | {"all_steps_per_s": [x["steps_per_s"] for x in r]}
    return tr


def bench_train(args, k: int, table: Table, res: dict, default: str) -> None:
    """Training throughput per option against this run's fp32 baseline, the default against the fastest option, both
    modes at once, a profile, the matmul peak, memory."""
    traj = {"traj_dir": str(ensure_history())}
    variants = train_variants(args.threads, default)
    tr = time_variants(variants, traj, k, args.retries)
    n, warm = SIZES["train_steps"][k], SIZES["train_warmup"][k]
    print(f"training: both modes at once, default precision ({default}), 1 thread each ...", flush=True)
    as_trained = {"mixed_precision": default, "train_shards": default_shards(), **traj}
    pair = run_workers_at_once([{"kind": "train", "mode": m, "steps": n, "warmup": warm, "threads": 1,
                                 "options": as_trained} for m in MODES])
    one_thread = next(name for name in variants if "1 thread" in name)  # the default, 1 thread (train_variants)
    print(f"training: summary tokens, {one_thread} ...", flush=True)
    summ = max((run_worker({"kind": "train", "mode": "summary", "steps": n, "warmup": warm, "threads": 1,
                            "options": as_trained}, args.retries)
                for _ in range(SIZES["train_repeats"][k])), key=lambda x: x["steps_per_s"])
    print("profile and matmul peak ...", flush=True)
    prof = {(m, p): run_worker({"kind": "profile", "mode": m, "threads": args.threads,
                                "options": {"mixed_precision": p, **traj}}) for m in MODES for p in ("no", "bf16")}
    peak = run_worker({"kind": "matmul", "mode": "standard", "threads": args.threads, "options": traj})
    res["train"] = {f"{m}/{name}": r for (m, name), r in tr.items()} | {
        "pair_1_thread_each": pair, "summary_1_thread": summ, "profile": {f"{m}/{p}": r for (m, p), r in prof.items()},
        "matmul_peak": peak}
    baseline = next(iter(variants))
    default_name = next(name for name in variants if name.startswith("default") and "1 thread" not in name)
    for mode in MODES:
        base = tr[mode, baseline]
        for name in variants:
            r = tr[mode, name]
            table.add(f"train {mode}: targets/s, {name} (batch {r['batch_size']} x {r['seq_len']}, {r['threads']} thr)",
                      r["targets_per_s"], "{:,.0f}", busy=r["busy"])
            if name != baseline:
                table.add(f"train {mode}: {name} / baseline", r["targets_per_s"] / base["targets_per_s"], "{:.2f}",
                          unit="x", busy=r["busy"])
        multi = [name for name in variants if "1 thread" not in name]
        fastest = max(multi, key=lambda name: tr[mode, name]["targets_per_s"])
        # the default is right when it is the fastest option, or within the ~10% a step varies between processes
        table.add(f"train {mode}: default ({default_name}) / fastest option ({fastest})",
                  tr[mode, default_name]["targets_per_s"] / tr[mode, fastest]["targets_per_s"], "{:.2f}", DEFAULT_VS_FASTEST,
                  unit="x")
        best = tr[mode, fastest]
        table.add(f"train {mode}: fastest option vs target", best["targets_per_s"], "{:,.0f}", TARGETS_PER_S[mode],
                  busy=best["busy"])
        table.add(f"train {mode}: GFLOP/s achieved ({default_name}; {base['gflop_per_step']:.1f} GFLOP per step)",
                  tr[mode, default_name]["gflop_per_s"], "{:.0f}")
    both = sum(r["targets_per_s"] for r in pair)
    base_both = statistics.mean(tr[m, baseline]["targets_per_s"] for m in MODES)
    table.add(f"train: both modes at once ({default}, 1 thread each), machine targets/s", both, "{:,.0f}",
              busy=[b for r in pair for b in r["busy"]])
    table.add("train: machine throughput / baseline (one run on all cores)", both / base_both, "{:.2f}", unit="x")
    for dt, rate in peak["gflop_per_s"].items():
        table.add(f"matmul peak at the model's shapes, {dt} ({peak['threads']} thr)", rate, "{:.0f}", unit=" GFLOP/s")
    for (m, p), r in prof.items():
        shares = ", ".join(f"{name.split(' (')[0]} {v:.0%}" for name, v in r["shares"].items())
        table.add(f"profile {m} {'bf16' if p == 'bf16' else 'fp32'}: ms/step; {shares}", r["ms_per_step"], "{:.0f}")
    res["train_pair_s"] = {r["mode"]: r["median_step_s"] for r in pair}
    s, c = tr["standard", default_name], tr["compressed", default_name]
    table.add(f"train compressed / standard steps/s ({default_name})", c["steps_per_s"] / s["steps_per_s"], "{:.2f}",
              COMPRESSED_SPEEDUP, busy=s["busy"] + c["busy"])
    c1 = tr["compressed", one_thread]  # summary tokens: summary_train_regions pruned regions in front of every sample
    table.add(f"train summary / compressed: step time ({one_thread}; {summ['tokens_per_sample']:.0f} vs "
              f"{c1['tokens_per_sample']:.0f} tokens per sample)", c1["steps_per_s"] / summ["steps_per_s"], "{:.2f}", unit="x",
              busy=summ["busy"] + c1["busy"])
    table.add("train memory reduction (saved activations)", 1 - c["saved_activations_mb"] / s["saved_activations_mb"],
              "{:.3f}", MEMORY_REDUCTION)
    table.add("train memory reduction (peak RSS growth)", 1 - c["peak_rss_growth_mb"] / s["peak_rss_growth_mb"],
              "{:.3f}", MEMORY_REDUCTION)
    res["projected_train_s"] = max(r["median_step_s"] for r in pair) * default_train_steps()


def bench_eval(args, k: int, threads: int, table: Table, res: dict) -> None:
    """In-context evaluation speed, cached and uncached, per mode (and one thread); summary tokens against compressed."""
    ev = {}
    for mode in EVAL_MODES:
        for cached in (True, False):
            n = SIZES["eval_cached_episodes" if cached else "eval_uncached_episodes"][k]
            print(f"evaluation: {mode}, {'cached' if cached else 'uncached'}, {n} episodes ...", flush=True)
            ev[f"{mode}_{'cached' if cached else 'uncached'}"] = run_worker(
                {"kind": "eval", "mode": mode, "cached": cached, "episodes": n, "threads": args.threads,
                 "run_dir": args.run_dir}, args.retries)
    if threads != 1:  # one thread is slower on an idle machine but far steadier when other jobs share the cores
        for mode in EVAL_MODES:
            n = SIZES["eval_cached_episodes"][k]
            print(f"evaluation: {mode}, cached, {n} episodes, 1 thread ...", flush=True)
            ev[f"{mode}_cached_1-thread"] = run_worker({"kind": "eval", "mode": mode, "cached": True, "episodes": n,
                                                        "threads": 1, "run_dir": args.run_dir}, args.retries)
    res["eval"] = ev
    for key, r in ev.items():
        how = "measured" if r["episodes"] == 500 else f"projected from {r['episodes']}"
        table.add(f"eval {key.replace('_', ' ')}: steps/s ({r['streams']} streams, {r['model']} model)", r["steps_per_s"],
                  "{:.0f}", busy=r["busy"])
        table.add(f"eval {key.replace('_', ' ')}: 500 episodes ({how})", r["projected_500_s"], "{:.1f}",
                  EVAL_500_S if r["cached"] else None, upper=True, unit=" s", busy=r["busy"])
    for mode in EVAL_MODES:
        c, u = ev[f"{mode}_cached"], ev[f"{mode}_uncached"]
        table.add(f"eval {mode}: cached / uncached speed", c["steps_per_s"] / u["steps_per_s"], "{:.1f}", unit="x",
                  busy=c["busy"] + u["busy"])
    s, c = ev["summary_cached"], ev["compressed_cached"]
    if (s["model"] == "random") == (c["model"] == "random"):  # a trained one against a random one would say nothing
        table.add("eval summary / compressed: cached time", c["steps_per_s"] / s["steps_per_s"], "{:.2f}",
                  SUMMARY_EVAL_RATIO, upper=True, unit="x", busy=s["busy"] + c["busy"])


def bench_memory(args, k: int, table: Table, res: dict) -> None:
    """Peak RSS of a long cached evaluation after 1/5 of its episodes and at the end; the longest context held."""
    short, long = SIZES["memory_episodes"][k]
    mem = {}
    for mode in EVAL_MODES:
        print(f"memory: {mode}, cached, RSS after {short} and {long} episodes ...", flush=True)
        r = mem[mode] = run_worker({"kind": "eval", "mode": mode, "cached": True, "episodes": long,
                                    "threads": args.threads, "run_dir": args.run_dir, "rss_at": [short, long]},
                                   args.retries)
        rss = {int(n): v for n, v in r["peak_rss_mb_after_episodes"].items()}
        table.add(f"eval {mode}: peak RSS growth, {short} -> {long} episodes", rss[long] - rss[short], "{:+.1f}",
                  FLAT_MEMORY_MB, upper=True, unit=" MB")
        table.add(f"eval {mode}: longest context (n_transit {r['n_transit']})", r["longest_context"], "{:.0f}",
                  r["n_transit"], upper=True)
    res["memory"] = mem


GPU_TRAIN_STEPS, GPU_WARMUP = 300, 10
SECTIONS = {"collect", "train", "eval", "memory", "gpu"}


def bench_gpu(args, table: Table, res: dict) -> None:
    """The GPU path (`--only gpu`; not in the default sections): both modes trained GPU_TRAIN_STEPS steps in bf16, eager
    and compiled, then 500 episodes x the 8 test goals x eval_streams in context with the KV cache, on cuda:0."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: bench.py --only gpu needs a CUDA device and a CUDA build of torch; none is visible here "
                         "(torch.cuda.is_available() is False): run the CPU sections instead")
    name = torch.cuda.get_device_name(0)
    print(f"GPU: {name}, bf16 {'supported' if torch.cuda.is_bf16_supported() else 'NOT supported'}", flush=True)
    traj = {"traj_dir": str(ensure_history()), "device": "cuda", "mixed_precision": "bf16"}
    gpu: dict = {"device": name}
    for mode in MODES:
        for compiled in (False, True):
            how = "bf16 + compile" if compiled else "bf16, eager"
            print(f"gpu training: {mode}, {how}, {GPU_TRAIN_STEPS} steps ...", flush=True)
            r = gpu[f"train {mode} {how}"] = run_worker(
                {"kind": "train", "mode": mode, "steps": GPU_TRAIN_STEPS, "warmup": GPU_WARMUP,
                 "options": {**traj, "compile": compiled}})
            table.add(f"gpu train {mode} ({how}): steps/s (batch {r['batch_size']} x {r['seq_len']})", r["steps_per_s"])
            table.add(f"gpu train {mode} ({how}): targets/s", r["targets_per_s"], "{:,.0f}")
            table.add(f"gpu train {mode} ({how}): peak GPU memory", r["peak_gpu_mb"], "{:.0f}", unit=" MB")
        print(f"gpu evaluation: {mode}, cached, 500 episodes ...", flush=True)
        r = gpu[f"eval {mode}"] = run_worker({"kind": "eval", "mode": mode, "cached": True, "episodes": 500,
                                              "run_dir": args.run_dir, "device": "cuda"})
        table.add(f"gpu eval {mode}: 500 episodes x {r['streams']} streams, KV cache ({r['model']} model)", r["seconds"],
                  "{:.1f}", EVAL_500_S, upper=True, unit=" s")
        table.add(f"gpu eval {mode}: peak GPU memory", r["peak_gpu_mb"], "{:.0f}", unit=" MB")
    res["gpu"] = gpu


def bench_projection(table: Table, res: dict) -> None:
    """The default main job from the measured parts (needs the collect, train and eval sections)."""
    ev = res["eval"]
    ev_s = ev["standard_cached"]["projected_500_s"] + ev["compressed_cached"]["projected_500_s"]
    total = res["collect"]["projected_81_goals_s"] + res["projected_train_s"] + ev_s
    res["projected_main_job_s"] = total
    table.add(f"main job projected: collect {res['collect']['projected_81_goals_s']:.0f} s + train both at once "
              f"{res['projected_train_s']:.0f} s + evaluate {ev_s:.0f} s (no val rollouts / checkpoints)",
              total, "{:.0f}", MAIN_JOB_S, upper=True, unit=" s")


def machine_line(threads: int) -> tuple[str, str]:
    """(the CPU line printed first, what mixed_precision=auto resolves to here: "no" or "bf16")."""
    import torch

    from hardware import cpu_info, resolve_precision

    cpu = cpu_info()
    default, _ = resolve_precision("auto", on_gpu=False, cpu=cpu)
    line = (f"CPU: {cpu['model']}, {os.cpu_count()} cores, torch capability {cpu['capability']}, bf16 "
            f"{'native' if cpu['bf16_native'] else 'emulated'} ({cpu['bf16_reason']}) -> mixed_precision=auto trains in "
            f"{'bf16' if default == 'bf16' else 'fp32'}; torch {torch.__version__}, {threads} torch thread(s) for "
            "training/evaluation, 1 per collection process")
    return line, default


def main():
    from common import make_parser

    parser = make_parser(__doc__)
    parser.add_argument("--full", action="store_true", help="real sizes (all 81 goals, 500 episodes; ~10 min on 2 cores)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for training and evaluation (default: torch's default, one per core)")
    parser.add_argument("--only", default="collect,train,eval,memory",
                        help="comma-separated sections to run: collect, train, eval, memory (default: these four); "
                        "gpu: the GPU path on cuda:0 (bf16 training eager and compiled, a cached evaluation)")
    parser.add_argument("--run-dir", default=None,
                        help="evaluate this trained run's checkpoint instead of a random model, in the mode it was trained in")
    parser.add_argument("--seed", type=int, default=0, help="seed that draws the goals collected (default 0)")
    parser.add_argument("--retries", type=int, default=2,
                        help="repeat a measurement up to this many times while other processes compete for the CPU (default 2)")
    parser.add_argument("--json", default=None, help="also write all measurements to this JSON file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one measurement, JSON spec
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import torch

    k = 1 if args.full else 0
    sections = {s.strip() for s in args.only.split(",")}
    if sections - SECTIONS:
        raise SystemExit(f"error: unknown --only section(s) {', '.join(sorted(sections - SECTIONS))}: use a comma-separated "
                         f"list of {', '.join(sorted(SECTIONS))}")
    threads = args.threads or torch.get_num_threads()
    machine, default = machine_line(threads)
    others = busy_processes()
    print(f"bench: {'--full' if args.full else 'small'} sizes; {machine}")
    if others:
        print(f"WARNING: other busy processes share the CPU, timings are depressed: {others}")
    res: dict = {"full": args.full, "threads": threads, "cpus": os.cpu_count(), "other_busy_processes": others,
                 "machine": machine, "default_precision": default}
    table = Table()
    t0 = time.perf_counter()
    if "collect" in sections:
        bench_collect(args, k, table, res)
    if "train" in sections:
        bench_train(args, k, table, res, default)
    if "eval" in sections:
        bench_eval(args, k, threads, table, res)
    if "memory" in sections:
        bench_memory(args, k, table, res)
    if "gpu" in sections:
        bench_gpu(args, table, res)
    if "projected_train_s" in res and "collect" in res and "eval" in res:
        bench_projection(table, res)
    title = (f"`python bench.py{' --full' if args.full else ''}`: {machine}; {time.perf_counter() - t0:.0f} s"
             + (", OTHER PROCESSES WERE BUSY" if others else ""))
    table.print(title)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
        print(f"wrote {args.json}")


def cpu_snapshot() -> dict:
    """CPU seconds used so far by the whole machine and by this process with its (reaped) descendants, plus
    per-process ticks to name the others."""
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    t = os.times()
    procs = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    name, rest = f.read().rsplit(")", 1)
                procs[int(pid)] = (name.split("(", 1)[1], sum(int(x) for x in rest.split()[11:13]) / hz)
            except (OSError, IndexError, ValueError):
                pass
    return {"machine": (user + nice + system + irq + softirq + steal) / hz,
            "mine": t.user + t.system + t.children_user + t.children_system, "procs": procs}


def busy_others(before: dict, after: dict, seconds: float, threshold: float = 0.1) -> list[str]:
    """What else used the CPU between two `cpu_snapshot`s (machine total less this process and everything it
    started), if more than `threshold` of a core: that competes for the cores and depresses timings."""
    others = (after["machine"] - before["machine"]) - (after["mine"] - before["mine"])
    if others / max(seconds, 1e-9) <= threshold:
        return []
    names = [f"{name}[{pid}]" for pid, (name, t) in after["procs"].items()
             if (t - before["procs"].get(pid, (name, 0.0))[1]) / seconds > threshold]
    return [f"{100 * others / seconds:.0f}% of a core" + (f" ({', '.join(names[:4])})" if names else "")]


def busy_processes(seconds: float = 0.5) -> list[str]:
    """Whether other processes use the CPU right now."""
    a = cpu_snapshot()
    time.sleep(seconds)
    return busy_others(a, cpu_snapshot(), seconds)


if __name__ == "__main__":
    main()
