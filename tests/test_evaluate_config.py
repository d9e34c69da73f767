"""One way to run an evaluation: evaluate.py, study.py, probe.py and train.py's validation rollout all go
through evaluate.evaluate_config, which reads every eval_* key from the config, so the same run with the same eval
settings gets the same returns from each of them."""

from __future__ import annotations

import inspect
import sys

import numpy as np
import pytest
import torch

import evaluate
from common import EVAL_KEYS, load_config
from model import MODEL, ADConfig
from tests.conftest import TINY_MODEL

TINY = {"standard": ("config/model/ad_dr.yaml", ["n_transit=40", "compress_interval=20"]),
        "compressed": ("config/model/ad_dr_compressed.yaml", ["n_transit=48", "compress_interval=20", "n_steps=20"])}
EVAL = ["eval_episodes=3", "eval_streams=2", "eval_seed=3", "eval_temperature=0.7", "val_episodes=3", "val_streams=2"]


def _run_dir(tmp_path, mode: str):
    """A run dir holding an untrained tiny model's checkpoint (evaluation needs no history file)."""
    config, extra = TINY[mode]
    cfg = load_config(config, [*TINY_MODEL, *extra, *EVAL])
    torch.manual_seed(0)
    model = MODEL[cfg["model"]](ADConfig.from_dict(cfg))
    run_dir = tmp_path / mode
    run_dir.mkdir()
    torch.save({"config": cfg, "model": model.state_dict(), "step": 0}, run_dir / "ckpt.pt")
    return run_dir, cfg


def test_evaluate_config_forwards_every_eval_key(monkeypatch):
    seen = {}

    def fake_run(model, cfg, goals, **kw):
        seen.update(kw, cfg=cfg, goals=goals)
        return {"returns": np.zeros((len(goals), kw["n_streams"], kw["n_episodes"]))}

    monkeypatch.setattr(evaluate, "run_in_context", fake_run)
    monkeypatch.setattr(evaluate, "summarize", lambda res, goals, cfg: {"goals": goals})
    cfg = load_config("config/model/ad_dr_compressed.yaml", [
        "eval_episodes=7", "eval_streams=3", "eval_seed=5", "eval_cache=false", "eval_temperature=0.3",
        "eval_prune=fixed", "eval_close_threshold=0.25", "eval_first_region=4", "eval_window_shift=2"])
    s, res = evaluate.evaluate_config(None, cfg, [38, 51], progress=False, device="cpu")
    assert s == {"goals": [38, 51]} and res["returns"].shape == (2, 3, 7)
    assert {k: seen[k] for k in ("n_streams", "n_episodes", "seed", "use_cache", "temperature", "progress", "device")} == {
        "n_streams": 3, "n_episodes": 7, "seed": 5, "use_cache": False, "temperature": 0.3, "progress": False,
        "device": "cpu"}
    assert {k: seen["cfg"][k] for k in EVAL_KEYS} == {k: cfg[k] for k in EVAL_KEYS}  # read inside run_in_context
    evaluate.evaluate_config(None, cfg, "val", episodes=2, streams=1, device="cpu")  # train.py's val_episodes / streams
    assert seen["n_episodes"] == 2 and seen["n_streams"] == 1 and seen["seed"] == 5 and seen["use_cache"] is False
    assert seen["goals"] == evaluate.task_split(cfg, "val")


def test_no_call_site_calls_run_in_context_itself():
    import probe
    import study
    import train

    for fn in (evaluate.main, study._evaluate, probe.main, train.val_return):
        src = inspect.getsource(fn)
        assert "evaluate_config(" in src and "run_in_context(" not in src, fn.__qualname__


@pytest.mark.parametrize("mode", ["standard", "compressed"])
def test_evaluate_study_and_train_agree_on_the_same_run(tmp_path, monkeypatch, mode):
    import study
    import train

    run_dir, cfg = _run_dir(tmp_path, mode)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--run-dir", str(run_dir), "--split", "val", "--out-dir", str(out)])
    evaluate.main()
    by_evaluate = np.load(out / "eval_result.npy")  # [goals, episodes], mean over streams
    by_study = study._evaluate({"run_dir": str(run_dir), "overrides": [], "split": "val"})["returns"]
    np.testing.assert_array_equal(by_study.mean(1), by_evaluate)
    model, _ = evaluate.load_run(run_dir, [], "cpu")
    by_train = train.val_return(model, cfg)  # val_episodes / val_streams = eval_episodes / eval_streams here
    assert by_train["return"] == pytest.approx(float(by_study.mean()))
