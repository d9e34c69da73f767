"""The one-command workflow, the comparison report and the compression pictures, on tiny data (subprocesses)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import TINY_COLLECT, TINY_COMPRESSED, TINY_GOALS, TINY_STANDARD, run_script

from common import UserError
from compare import ROWS, write_report
from example_compressed_training import Plan, stage_train

EXAMPLE = "example_compressed_training.py"
VISUALIZE = "visualize_compression.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUNS = {"standard": "AD-darkroom-seed0", "compressed": "AD-darkroom-compressed-seed0"}
REPORT_FILES = ("report.md", "report.json", "learning_curves.png", "per_goal.png")


def tiny_overrides(tiny_history: dict, *extra: str) -> list[str]:
    """The tiny overrides as the example script takes them: shared ones bare, per-mode ones (n_transit) prefixed."""
    shared = [o for o in TINY_STANDARD if o in TINY_COMPRESSED]
    per_mode = [f"standard.{o}" for o in TINY_STANDARD if o not in TINY_COMPRESSED]
    per_mode += [f"compressed.{o}" for o in TINY_COMPRESSED if o not in TINY_STANDARD]
    return [*shared, *per_mode, f"traj_dir={tiny_history['traj_dir']}", "train_timesteps=6", *extra]


def example_args(tiny_history: dict, runs_root: Path, *extra: str) -> list[str]:
    return ["--runs-root", str(runs_root), "--goals", TINY_GOALS, *tiny_overrides(tiny_history, *extra)]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000, f"{path} is not a real PNG ({len(data)} bytes)"


def assert_one_line_error(proc, *fragments: str) -> None:
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for frag in fragments:
        assert frag in last, last


@pytest.fixture(scope="module")
def workflow(tiny_history, tmp_path_factory) -> dict:
    """`--mode all` once from scratch (the tiny history already exists, so collection is skipped)."""
    root = tmp_path_factory.mktemp("workflow") / "runs"
    proc = run_script(EXAMPLE, "--mode", "all", *example_args(tiny_history, root))
    return {"root": root, "proc": proc}


def copy_runs(workflow: dict, tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    shutil.copytree(workflow["root"], root)
    return root


def test_mode_all_trains_evaluates_and_reports(workflow):
    out, root = workflow["proc"].stdout, workflow["root"]
    assert "[collect] skip" in out and "--mode all finished" in out
    for mode, name in RUNS.items():
        for f in ("ckpt.pt", "config.yaml", "train_summary.json", "eval_result.npy", "eval_summary.json"):
            assert (root / name / f).is_file(), f"{mode}: {f}"
        assert json.loads((root / name / "eval_summary.json").read_text())["mode"] == mode
        if (os.cpu_count() or 1) >= 2:  # the two evaluations ran at once, each logging to its run dir, echoed after
            log = root / name / "evaluate.log"
            assert f"[evaluate {mode}] {log}:" in out and log.is_file() and "mean return" in log.read_text()
    # the last line gives every stage's time
    assert re.search(r"--mode all finished in \d+ s \(collect \d+ s, train \d+ s, evaluate \d+ s, compare \d+ s\)", out)
    for f in REPORT_FILES:
        assert (root / "compare" / f).is_file()
    for png in ("learning_curves.png", "per_goal.png"):
        assert_png(root / "compare" / png)

    md = (root / "compare" / "report.md").read_text()
    assert "| metric | standard | compressed |" in md
    for _, label, *_ in ROWS:
        assert f"| {label} |" in md
    assert ("| goal | task | optimum | standard mean | compressed mean | standard normalised | compressed normalised "
            "| standard last 100 | compressed last 100 | standard last 100 / opt | compressed last 100 / opt |") in md

    # report.json holds the runs' own numbers, nothing made up
    report = json.loads((root / "compare" / "report.json").read_text())
    m = report["metrics"]
    for mode, name in RUNS.items():
        train = json.loads((root / name / "train_summary.json").read_text())
        ev = json.loads((root / name / "eval_summary.json").read_text())
        assert m["steps_per_s"][mode] == pytest.approx(train["steps_per_s"])
        assert m["peak_rss_mb"][mode] == pytest.approx(train["peak_rss_mb"])
        assert m["val_acc_action"][mode] == pytest.approx(train["val/acc_action"])
        assert m["val_return"][mode] == pytest.approx(train["val/return"])
        assert m["mean_return"][mode] == pytest.approx(ev["mean_return"])
        assert m["mean_return_ci95"][mode] == pytest.approx(ev["ci95"])
        assert m["normalized_score"][mode] == pytest.approx(ev["normalized_score"])
        assert [g[f"{mode}_mean"] for g in report["per_goal"]] == pytest.approx([g["mean"] for g in ev["per_goal"]])
        assert [g[f"{mode}_last100"] for g in report["per_goal"]] == pytest.approx([g["last100"] for g in ev["per_goal"]])
    assert m["val_acc_token_type"]["standard"] is None and m["val_acc_token_type"]["compressed"] is not None
    assert m["eval_precision_compress_end"]["standard"] is None and m["eval_recall_compress_end"]["compressed"] is not None


def test_rerun_skips_finished_stages(workflow, tiny_history, tmp_path):
    root = copy_runs(workflow, tmp_path)
    shutil.rmtree(root / "compare")
    ckpt = root / RUNS["compressed"] / "ckpt.pt"
    before = ckpt.stat().st_mtime_ns
    out = run_script(EXAMPLE, "--mode", "all", *example_args(tiny_history, root)).stdout
    for stage in ("collect", "train standard", "train compressed", "evaluate standard", "evaluate compressed"):
        assert f"[{stage}] skip" in out, stage
    assert ckpt.stat().st_mtime_ns == before
    assert all((root / "compare" / f).is_file() for f in REPORT_FILES)


def test_mode_collect_replaces_a_broken_file_then_skips(tmp_path):
    traj_dir = tmp_path / "datasets"
    traj_dir.mkdir()
    path = traj_dir / "history_darkroom_PPO_alg-seed42.hdf5"
    path.write_bytes(b"cut off")
    args = ["--mode", "collect", "--goals", "0", "--runs-root", str(tmp_path / "runs"), *TINY_COLLECT, f"traj_dir={traj_dir}"]
    out = run_script(EXAMPLE, *args).stdout
    assert "unreadable" in out and "collecting again" in out
    with h5py.File(path, "r") as f:
        assert list(f) == ["0"] and f["0"].attrs["complete"]
    assert "[collect] skip" in run_script(EXAMPLE, *args).stdout


def test_mode_train_resumes_one_and_skips_the_finished_one(workflow, tiny_history, tmp_path):
    root = copy_runs(workflow, tmp_path)
    out = run_script(EXAMPLE, "--mode", "train", *example_args(tiny_history, root, "standard.train_timesteps=8")).stdout
    assert "[train standard] resuming" in out and "[train compressed] skip" in out
    assert json.loads((root / RUNS["standard"] / "train_summary.json").read_text())["steps"] == 8


def test_finished_run_with_other_settings_is_refused(workflow, tiny_history):
    plan = Plan(tiny_overrides(tiny_history, "d_model=32"), TINY_GOALS, workflow["root"])
    with pytest.raises(UserError, match="trained with d_model=16, not 32"):
        stage_train(plan)  # raises before it runs anything: the finished run is not silently reused


def test_mode_evaluate_redoes_only_a_stale_evaluation(workflow, tiny_history, tmp_path):
    root = copy_runs(workflow, tmp_path)
    summary = root / RUNS["compressed"] / "eval_summary.json"
    ev = json.loads(summary.read_text())
    summary.write_text(json.dumps({**ev, "weights_sha256": "0" * 64}))  # as if the run had been retrained since
    # the report refuses the stale pair rather than print an old evaluation next to a new training
    bad = run_script(EXAMPLE, "--mode", "compare", *example_args(tiny_history, root), check=False)
    assert_one_line_error(bad, "is an evaluation of other weights than this training's")
    out = run_script(EXAMPLE, "--mode", "evaluate", *example_args(tiny_history, root)).stdout
    assert "[evaluate standard] skip" in out and "[evaluate compressed] eval_summary.json is of other weights" in out
    assert json.loads(summary.read_text())["weights_sha256"] == ev["weights_sha256"]
    run_script(EXAMPLE, "--mode", "compare", *example_args(tiny_history, root))


def test_mode_evaluate_on_validation_goals_replaces_the_test_evaluation_and_says_so(workflow, tiny_history, tmp_path):
    root = copy_runs(workflow, tmp_path)
    out = run_script(EXAMPLE, "--mode", "evaluate", "--split", "val", *example_args(tiny_history, root)).stdout
    assert "[evaluate standard] eval settings changed (split test -> val)" in out
    assert "note: replaced an evaluation with split='test' (now 'val') (--force)" in out
    ev = json.loads((root / RUNS["standard"] / "eval_summary.json").read_text())
    assert ev["split"] == "val" and ev["goals"] == [12, 68, 36, 17, 64, 27, 45, 61]


def test_run_trained_under_other_eval_defaults_is_evaluated_with_the_current_ones(workflow, tiny_history, tmp_path):
    """A run whose checkpoint carries an older eval default: the report must use the settings asked for now."""
    import torch
    import yaml

    from common import DEFAULT_MODEL_CONFIG, load_config

    root = copy_runs(workflow, tmp_path)
    run = root / RUNS["standard"]
    ckpt = torch.load(run / "ckpt.pt", map_location="cpu", weights_only=False)
    ckpt["config"]["eval_temperature"] = 0.25
    torch.save(ckpt, run / "ckpt.pt")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "eval_temperature": 0.25}))
    summary = json.loads((run / "eval_summary.json").read_text())
    summary["eval_config"]["eval_temperature"] = 0.25
    (run / "eval_summary.json").write_text(json.dumps(summary))  # newer than ckpt.pt: only the settings are stale
    now = load_config(DEFAULT_MODEL_CONFIG)["eval_temperature"]
    assert now != 0.25
    out = run_script(EXAMPLE, "--mode", "evaluate", *example_args(tiny_history, root)).stdout
    assert f"[evaluate standard] eval settings changed (eval_temperature 0.25 -> {now})" in out
    assert json.loads((run / "eval_summary.json").read_text())["eval_config"]["eval_temperature"] == now


def test_mode_compare_and_stage_errors(workflow, tiny_history, tmp_path):
    root = copy_runs(workflow, tmp_path)
    shutil.rmtree(root / "compare")
    out = run_script(EXAMPLE, "--mode", "compare", *example_args(tiny_history, root)).stdout
    assert "| metric | standard | compressed |" in out
    assert all((root / "compare" / f).is_file() for f in REPORT_FILES)
    (root / RUNS["compressed"] / "eval_summary.json").unlink()
    bad = run_script(EXAMPLE, "--mode", "compare", *example_args(tiny_history, root), check=False)
    assert_one_line_error(bad, "eval_summary.json not found")
    # a failing stage script ends the workflow with one line naming the stage
    # (both evaluations fail and run at once: whichever exits first is named, with its own log)
    bad = run_script(EXAMPLE, "--mode", "evaluate", *example_args(tiny_history, tmp_path / "empty"), check=False)
    assert_one_line_error(bad, "failed: ", "exited with 2")
    last = bad.stderr.strip().splitlines()[-1]
    mode = re.search(r"stage 'evaluate (standard|compressed)' failed", last).group(1)
    assert "evaluate.log" not in last or f"{RUNS[mode]}/evaluate.log" in last, last


def test_write_report_function(workflow, tmp_path):
    std, cmp = (workflow["root"] / RUNS[m] for m in ("standard", "compressed"))
    with pytest.raises(UserError, match="swap"):
        write_report(cmp, std, tmp_path / "swapped")
    report = write_report(std, cmp, tmp_path / "report")
    ev = json.loads((cmp / "eval_summary.json").read_text())
    assert report["metrics"]["last100_mean"]["compressed"] == pytest.approx(ev["last100_mean"])
    curves = np.load(cmp / "eval_result.npy")
    assert curves.shape == (ev["n_goals"], ev["n_episodes"])
    assert [g["goal"] for g in report["per_goal"]] == [g["goal"] for g in ev["per_goal"]]


def test_visualize_history_stream(tiny_history, tmp_path):
    out = run_script(VISUALIZE, "--goal", "38", "--max-steps", "60", "--stream", "1", "--out-dir", str(tmp_path),
                     *TINY_COLLECT, f"traj_dir={tiny_history['traj_dir']}").stdout  # fmt: skip
    png = tmp_path / "history_goal38_stream1.png"
    assert f"wrote {png}" in out
    assert_png(png)


def test_visualize_analyze(tiny_history, tmp_path):
    out = run_script(VISUALIZE, "--analyze", "--out-dir", str(tmp_path), f"traj_dir={tiny_history['traj_dir']}").stdout
    assert "return per episode by region index" in out
    assert all(f"\n{g:>4} " in out for g in tiny_history["goals"])
    assert_png(tmp_path / "analysis.png")


def test_visualize_run_closes(workflow, tmp_path):
    run_dir = workflow["root"] / RUNS["compressed"]
    out = run_script(VISUALIZE, "--run-dir", str(run_dir), "--out-dir", str(tmp_path)).stdout
    png = tmp_path / f"eval_closes_{run_dir.name}.png"
    assert f"wrote {png}" in out
    assert_png(png)


@pytest.mark.parametrize("case", ["goal_outside", "goal_not_collected", "standard_run", "run_not_evaluated", "no_history"])
def test_visualize_bad_input_is_one_line(case, workflow, tiny_history, tmp_path):
    traj = f"traj_dir={tiny_history['traj_dir']}"
    args = {
        "goal_outside": (["--goal", "81", traj], "outside the grid"),
        "goal_not_collected": (["--goal", "5", traj], "not in"),
        "standard_run": (["--run-dir", str(workflow["root"] / RUNS["standard"])], "standard-mode run"),
        "run_not_evaluated": (["--run-dir", str(tmp_path)], "no eval_summary.json"),
        "no_history": ([f"traj_dir={tmp_path}"], "history file not found"),
    }[case]
    proc = run_script(VISUALIZE, *args[0], "--out-dir", str(tmp_path / "plots"), check=False)
    assert_one_line_error(proc, args[1])


@pytest.mark.parametrize("script", [EXAMPLE, VISUALIZE, "compare.py"])
def test_help_explains_every_flag(script):
    out = run_script(script, "--help").stdout
    flags = {EXAMPLE: ["--mode", "--runs-root", "--goals", "key=value"],
             VISUALIZE: ["--goal", "--max-steps", "--stream", "--analyze", "--run-dir", "--out-dir", "--config"],
             "compare.py": ["--standard", "--compressed", "--out-dir"]}[script]  # fmt: skip
    assert all(f in out for f in flags)
