"""study.py end to end on a tiny history: every arm x seed trained, tuned on validation goals, evaluated on the test
goals with every evaluation seed, and a report whose numbers are those of the saved evaluations."""

import json

import numpy as np
import pytest
from conftest import TINY_COLLECT, run_script

import study_stats as st
from common import ENV_CONFIGS, env_configs, load_config
from env import optimal_return, task_split

TINY = ["d_model=16", "n_layer=1", "n_head=2", "train_batch_size=4", "train_timesteps=4", "log_interval=2", "test_interval=2",
        "test_batches=1", "ckpt_interval=2", "warmup_steps=2", "eval_episodes=4", "eval_streams=2", "val_episodes=2",
        "compress_interval=20", "n_transit=48"]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("study")
    data = [*TINY_COLLECT, f"traj_dir={root / 'data'}"]
    cfg = load_config("config/model/ad_dr.yaml", data + TINY)
    goals = task_split(cfg, "train")[:2] + task_split(cfg, "val") + task_split(cfg, "test")
    run_script("collect.py", "--goals", ",".join(map(str, goals)), *data)
    args = ["--runs-root", str(root / "study"), "--seeds", "0,1", "--eval-seeds", "0,1", "--temperatures", "0.5,1.0",
            "--tune-episodes", "3", "--reps", "200", *data, *TINY]
    proc = run_script("study.py", *args, timeout=600)
    return {"root": root / "study", "proc": proc, "args": args, "cfg": cfg}


def test_study_trains_tunes_evaluates_and_reports(tiny_study):
    root, out = tiny_study["root"], tiny_study["proc"].stdout
    assert "skip collection" in out
    arms = ("standard-240", "standard-160", "compressed", "compressed-fixed")
    for arm in ("standard-240", "standard-160", "compressed"):  # compressed-fixed evaluates compressed's checkpoint
        for seed in (0, 1):
            assert json.loads((root / "runs" / f"{arm}-seed{seed}" / "train_summary.json").read_text())["steps"] == 4
    assert not (root / "runs" / "compressed-fixed-seed0").exists()
    cfg_std = json.loads((root / "runs" / "standard-160-seed0" / "train_summary.json").read_text())
    assert cfg_std["num_processes"] == 1
    tuning = json.loads((root / "tuning.json").read_text())
    assert set(tuning["temperatures"]) == set(arms) and set(tuning["temperatures"].values()) <= {0.5, 1.0}
    for arm in arms:  # the chosen temperature is the best validation score of the grid
        scores = tuning["val_scores"][arm]
        assert scores[f"{tuning['temperatures'][arm]:g}"] == max(scores.values())
    report = json.loads((root / "report.json").read_text())
    assert report["goals"] == [38, 51, 62, 65, 33, 5, 53, 49] and report["seeds"] == [0, 1]
    # the report's numbers are those of the saved test evaluations
    opt = np.array([optimal_return(g) for g in report["goals"]], dtype=float)
    for arm in arms:
        T = tuning["temperatures"][arm]
        per_seed = []
        for seed in (0, 1):
            parts = [np.load(root / "evals" / f"{arm}-seed{seed}-test-T{T:g}-e{e}-n4.npz")["returns"] for e in (0, 1)]
            assert all(p.shape == (8, 2, 4) for p in parts)  # goals x streams x episodes
            per_seed.append(np.concatenate(parts, axis=1))
        R = np.stack(per_seed).astype(float)
        assert report["aggregate"][arm]["mean"] == pytest.approx(st.run_scores(R, opt).mean())
        lo, hi = report["aggregate"][arm]["mean_ci"]
        assert lo <= report["aggregate"][arm]["mean"] <= hi
    assert set(report["probability_of_improvement"]) == {"compressed vs standard-240", "compressed vs standard-160",
                                                         "compressed vs compressed-fixed", "standard-160 vs standard-240"}
    md = (root / "report.md").read_text()
    for phrase in ("| arm | T (val) |", "## Comparisons", "includes 0", "Source PPO on the same goals"):
        assert phrase in md
    for png in ("learning_curves.png", "aggregates.png"):
        assert (root / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_study_rerun_skips_finished_work(tiny_study):
    timing = tiny_study["root"] / "timing.json"
    first = json.loads(timing.read_text())
    assert first["trained_runs"] == 6 and first["evaluations_run"] == 32
    out = run_script("study.py", *tiny_study["args"]).stdout
    assert out.count("skip training") == 6
    assert "tune on the validation goals: 16 evaluations done before, 0 to run" in out
    assert "test evaluation: 16 evaluations done before, 0 to run" in out
    assert "nothing trained or evaluated: kept" in out and json.loads(timing.read_text()) == first  # the real timings stay


def test_study_refuses_a_finished_run_of_another_config(tiny_study):
    """A changed training key must not silently reuse the old run's weights: the rerun names the key and stops."""
    args = [a if a != "warmup_steps=2" else "warmup_steps=3" for a in tiny_study["args"]]
    bad = run_script("study.py", *args, check=False)
    assert bad.returncode != 0 and "was trained with warmup_steps=2, not 3; move it away" in bad.stderr
    assert bad.stderr.strip().count("\n") == 0  # one line


def test_an_evaluation_with_no_boundary_grid_saves_and_loads_without_pickle(tiny_study, monkeypatch, tmp_path):
    """With per-task rollout lengths there is no n_steps grid, so evaluate reports the boundary precision as None;
    the study's .npz must still hold plain numbers (NaN), or reading it back fails."""
    import evaluate
    import study

    real = evaluate.summarize

    def without_grid(res, goals, cfg):
        s = real(res, goals, cfg)
        s["compression"].update(precision_compress_end=None, recall_compress_end=None)
        return s

    monkeypatch.setattr(evaluate, "summarize", without_grid)
    spec = study.eval_spec(tiny_study["root"], "compressed", 0, "val", 1.0, 1000, 2, [])
    np.savez(tmp_path / "e.npz", **study._evaluate(spec))
    z = np.load(tmp_path / "e.npz")  # allow_pickle=False
    assert np.isnan(z["precision_compress_end"]) and np.isnan(z["recall_compress_end"]) and z["returns"].shape[-1] == 2


def test_study_refuses_bad_arguments(tmp_path):
    bad = run_script("study.py", "--runs-root", str(tmp_path), "--arms", "compressed,everything", check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --arms: everything is not one of standard-240, standard-160, compressed, compressed-fixed, compressed-adaptive"]
    assert not any(tmp_path.iterdir())  # nothing written
    bad = run_script("study.py", "--runs-root", str(tmp_path), "--eval-seeds", "0,1000", check=False)
    assert "may not include 1000" in bad.stderr
    bad = run_script("study.py", "--runs-root", str(tmp_path), "eval_close_threshold=0.1", check=False)
    assert bad.returncode != 0 and bad.stderr.strip() == (
        "error: eval_close_threshold is set by the study itself (per arm, --temperatures, --eval-seeds), not by an "
        "override; evaluate a run with evaluate.py to try another value")
    bad = run_script("study.py", "--runs-root", str(tmp_path), "eval_first_region=40", check=False)
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error: eval_first_region is set by the study itself")
    assert not any(tmp_path.iterdir())


# What may differ between an env's standard and compressed model configs: the context itself, the run's name and the
# sampling temperature (the study tunes it per arm on validation goals). Anything else (data, filter, budget, model size,
# evaluation protocol) differing would make the study compare more than the context.
MODE_KEYS = {"use_compressed_context", "n_transit", "max_regions", "run_name", "eval_temperature"}


@pytest.mark.parametrize("env", sorted(ENV_CONFIGS))
def test_both_modes_of_every_env_train_and_evaluate_alike(env):
    configs = env_configs(env)
    standard, compressed = load_config(configs["standard"]), load_config(configs["compressed"])
    differ = {k for k in standard.keys() | compressed.keys() if standard.get(k) != compressed.get(k)}
    assert differ <= MODE_KEYS, f"{env}: the two modes' configs also differ in {sorted(differ - MODE_KEYS)}"
    assert standard["use_compressed_context"] is False and compressed["use_compressed_context"] is True
    assert standard["env"] == compressed["env"] == env
