"""bench.py's command line and one of its measurements (the timings themselves are the benchmark's, never a test's)."""

import pytest
import torch
from conftest import run_script

import bench


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_section_without_cuda_is_one_line():
    proc = run_script("bench.py", "--only", "gpu", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: bench.py --only gpu needs a CUDA device") and "run the CPU sections" in last


def test_unknown_section_is_refused_naming_the_sections():
    proc = run_script("bench.py", "--only", "train,gpus", check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "unknown --only section(s) gpus" in last and "collect, eval, gpu, memory, train" in last


def test_measure_eval_on_cpu_reports_the_context_bound_and_no_gpu_memory():
    r = bench.measure_eval("compressed", True, 2, None, rss_at=(1, 2))
    assert r["device"] == "cpu" and r["peak_gpu_mb"] is None and r["model"] == "random"
    assert r["streams"] == 8 * 4 and r["episodes"] == 2 and r["steps_per_s"] > 0
    assert 0 < r["longest_context"] <= r["n_transit"] and set(r["peak_rss_mb_after_episodes"]) == {1, 2}


def test_measure_eval_times_summary_tokens_with_their_own_loop():
    r = bench.measure_eval("summary", True, 5, None, rss_at=(1, 5))
    assert r["model"] == "random" and r["streams"] == 8 * 4 and r["episodes"] == 5
    # regions close at max_region_len (82 steps) on a random model: 5 x 20 steps = one close per stream
    assert r["n_forced_closes"] == 8 * 4 and r["n_closes"] == 0
    assert 0 < r["longest_context"] <= r["n_transit"] and set(r["peak_rss_mb_after_episodes"]) == {1, 5}


def test_measure_training_times_summary_tokens_on_their_longer_samples(tiny_history):
    """The training section times summary tokens on their own samples: the pruned regions in front of the raw ones
    make a summary step longer than compressed AD's on the same history."""
    import bench

    opts = {"mixed_precision": "no",
            "overrides": [*tiny_history["compressed"], "summary_mode=accumulate", "n_summary=2", "max_summaries=2"]}
    summ, comp = (bench.measure_training(m, 1, 1, opts) for m in ("summary", "compressed"))
    assert bench.train_config("summary", opts)["use_summary"] and not bench.train_config("compressed", opts).get("use_summary")
    assert summ["tokens_per_sample"] > comp["tokens_per_sample"] and summ["steps_per_s"] > 0


def test_measure_training_runs_the_default_row_shards(tiny_history):
    """The default variant times train.py's row-sharded step (shards.py), on the run's threads."""
    import bench

    opts = {"mixed_precision": "no", "train_shards": 2, "overrides": tiny_history["standard"]}
    r = bench.measure_training("standard", 2, 1, opts)
    assert r["train_shards"] == 2 and r["steps_per_s"] > 0 and r["targets_per_step"] > 0
    assert r["gflop_per_step"] > 0  # counted on one pass: the counter does not see the shards' threads
    names = bench.train_variants(None, "no")
    assert any("2 row shards" in n and "1 thread" not in n for n in names)
    assert next(iter(names)) == "baseline (fp32, eager)"
