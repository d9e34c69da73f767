"""A tiny collect -> train -> evaluate run through the scripts, checking what each writes."""

import json

import numpy as np
import pytest
import torch
from conftest import run_script


@pytest.mark.parametrize("mode", ["standard", "compressed"])
def test_train_then_evaluate(tiny_history, tmp_path, mode):
    config = "config/model/ad_dr_compressed.yaml" if mode == "compressed" else "config/model/ad_dr.yaml"
    run_dir = tmp_path / "run"
    out = run_script("train.py", "--config", config, "--run-dir", str(run_dir), "train_timesteps=6", *tiny_history[mode])
    assert "done: 6 steps" in out.stdout
    ckpt = torch.load(run_dir / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 6 and ckpt["config"]["use_compressed_context"] == (mode == "compressed")
    assert not any(k.startswith("module.") for k in ckpt["model"])  # the unwrapped model's state dict
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["steps"] == 6 and summary["targets_per_s"] > 0
    assert (mode == "compressed") == ("val/recall_compress_end" in summary)
    assert {"val/return", "val/return_last", "val/loss_action"} <= set(summary)
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "config.yaml").exists()

    # a finished run is never clobbered
    again = run_script("train.py", "--config", config, "--run-dir", str(run_dir), "train_timesteps=6", *tiny_history[mode],
                       check=False)
    assert again.returncode != 0 and "already finished" in again.stderr

    ev = run_script("evaluate.py", "--run-dir", str(run_dir))
    res = np.load(run_dir / "eval_result.npy")
    assert res.shape == (8, 3)  # 8 held-out goals x eval_episodes
    s = json.loads((run_dir / "eval_summary.json").read_text())
    # no episode beats the oracle of its goal: a reward or episode-boundary bug would break this
    optimum = np.array([g["optimum"] for g in s["per_goal"]])
    assert (res >= 0).all() and (res <= optimum[:, None]).all()
    assert s["split"] == "test" and s["goals"] == [38, 51, 62, 65, 33, 5, 53, 49] and s["checkpoint_step"] == 6
    assert s["weights_sha256"] == summary["weights_sha256_per_rank"][0]
    assert len(s["per_goal"]) == 8 and s["n_streams"] == 2 and s["mode"] == mode
    assert s["optimum_mean"] == 17.25
    assert np.isclose(s["mean_return"], res.mean()) and np.isclose(s["last20_mean"], res[:, -20:].mean())
    assert all(set(g) >= {"mean", "last20", "last50", "optimum", "normalized"} for g in s["per_goal"])
    assert "95% CI" in ev.stdout
    if mode == "compressed":
        c = s["compression"]
        assert {"precision_compress_end", "recall_compress_end", "n_closes", "close_steps"} <= set(c)
        assert len(c["close_steps"]) == 16

        # a run (and an evaluation) from before eval_close_threshold existed: evaluated with the default rule, the
        # same numbers, and its summary is not taken for one of other settings
        ckpt["config"].pop("eval_close_threshold")
        torch.save(ckpt, run_dir / "ckpt.pt")
        old = json.loads((run_dir / "eval_summary.json").read_text())
        old["eval_config"].pop("eval_close_threshold")
        (run_dir / "eval_summary.json").write_text(json.dumps(old))
        run_script("evaluate.py", "--run-dir", str(run_dir))
        assert np.array_equal(np.load(run_dir / "eval_result.npy"), res)
        assert json.loads((run_dir / "eval_summary.json").read_text())["eval_config"]["eval_close_threshold"] == 0.0


def test_tensorboard_has_the_metrics(tiny_history, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    run_script("train.py", "--config", "config/model/ad_dr_compressed.yaml", "--run-dir", str(run_dir), "train_timesteps=6",
               *tiny_history["compressed"])
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for split in ("train", "val"):
        for m in ("loss_action", "acc_action", "loss_token_type", "acc_token_type", "precision_compress_end",
                  "recall_compress_end"):
            assert f"{split}/{m}" in tags
    assert {"train/lr", "val/return", "val/return_last", "val/return_normalized"} <= tags
    assert [e.step for e in acc.Scalars("val/acc_action")] == [e.step for e in acc.Scalars("val/return")] == [3, 6]
    # the same numbers in the run's metrics file
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val/return" in r]
    assert [r["step"] for r in val] == [3, 6]
    assert [r["val/return"] for r in val] == pytest.approx([e.value for e in acc.Scalars("val/return")])


def test_help_for_every_script():
    for script in ("collect.py", "train.py", "evaluate.py", "probe.py"):
        out = run_script(script, "--help")
        assert "key=value" in out.stdout
