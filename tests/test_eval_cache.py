"""Cached evaluation (key/value cache, rebuilt only after a prune or window shift) must be a pure speed-up: the same
logits (to 1e-5) and the same sampled actions as recomputing every step from the full context, with the context
never longer than n_transit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import evaluate
from common import ROOT, load_config
from model import AD, ADConfig
from model.ad import COMPRESS_END

TINY = ["d_model=16", "n_layer=2", "n_head=2", "n_steps=10", "compress_interval=10", "eval_streams=3"]
GOALS = [38, 51]  # two held-out goals
N_EPISODES = 5  # 100 steps


def _setup(compressed: bool, overrides: list[str], close_bias: float | None = None, seed: int = 0):
    name = "ad_dr_compressed.yaml" if compressed else "ad_dr.yaml"
    cfg = load_config(ROOT / "config" / "model" / name, TINY + overrides)
    torch.manual_seed(seed)
    model = AD(ADConfig.from_dict(cfg)).eval()
    if close_bias is not None:  # steer how often the random token-type head says </compress>
        with torch.no_grad():
            model.head_token_type.bias[COMPRESS_END] = close_bias
    return model, cfg


def _run(model, cfg, use_cache: bool, monkeypatch) -> tuple[dict, int]:
    """Run in context; returns the result and the longest context any stream held when the model was called.
    Also checks that no buffer ever outgrows its fixed capacity, even for a moment (between </compress> and the
    prune that follows it)."""
    longest = [0]
    append, logits = evaluate.Contexts.append, evaluate.Contexts.logits

    def tracked_append(ctx, *args, **kwargs):
        append(ctx, *args, **kwargs)
        assert int(ctx.length.max()) <= ctx.cap == cfg["n_transit"] + evaluate.SLACK

    def tracked_logits(ctx, use_cache):
        longest[0] = max(longest[0], int(ctx.length.max()))
        return logits(ctx, use_cache)

    monkeypatch.setattr(evaluate.Contexts, "append", tracked_append)
    monkeypatch.setattr(evaluate.Contexts, "logits", tracked_logits)
    res = evaluate.run_in_context(model, cfg, GOALS, n_streams=cfg["eval_streams"], n_episodes=N_EPISODES, seed=1,
                                  use_cache=use_cache, progress=False, record_logits=True)
    monkeypatch.undo()
    return res, longest[0]


def _assert_same(cached: dict, uncached: dict) -> None:
    diff = (cached["logits"] - uncached["logits"]).abs().max().item()
    assert diff < 1e-5, f"cached and uncached logits differ by {diff}"
    np.testing.assert_array_equal(cached["rewards"], uncached["rewards"])  # same sampled actions -> same rewards
    for key in ("closes", "forced_closes", "prunes"):
        assert cached[key] == uncached[key], key


# standard: window shifts of 10 (and a full reset: shift = n_transit) every 10 / 30 steps after the first 30
@pytest.mark.parametrize("shift", [10, 30])
def test_standard_cached_equals_uncached_through_window_shifts(shift, monkeypatch):
    model, cfg = _setup(False, ["n_transit=30", f"eval_window_shift={shift}"])
    cached, longest_c = _run(model, cfg, True, monkeypatch)
    uncached, longest_u = _run(model, cfg, False, monkeypatch)
    _assert_same(cached, uncached)
    n_streams = len(GOALS) * cfg["eval_streams"]
    n_shifts = cached["recomputed"] // n_streams - 1  # every stream is rebuilt at the start and after each shift
    assert n_shifts >= 2
    assert max(longest_c, longest_u) <= cfg["n_transit"]


# compressed: the random head closing at random steps (irregular per stream), never (regions closed at
# max_region_len, all streams in step) or always (a prune after every step); and keeping a single region
@pytest.mark.parametrize("close_bias,max_regions", [(None, 2), (-10.0, 2), (10.0, 2), (None, 1)])
def test_compressed_cached_equals_uncached_through_prunes(close_bias, max_regions, monkeypatch):
    model, cfg = _setup(True, ["n_transit=24", f"max_regions={max_regions}"], close_bias)
    cached, longest_c = _run(model, cfg, True, monkeypatch)
    uncached, longest_u = _run(model, cfg, False, monkeypatch)
    _assert_same(cached, uncached)
    assert min(len(p) for p in cached["prunes"]) >= 2  # every stream went through at least two prunes
    assert max(longest_c, longest_u) <= cfg["n_transit"]
    assert cached["logits"].shape[-1] == 5 + 3  # the token-type logits were compared too


def test_cached_evaluation_is_deterministic_for_a_seed(monkeypatch):
    model, cfg = _setup(True, ["n_transit=24"])
    a, _ = _run(model, cfg, True, monkeypatch)
    b, _ = _run(model, cfg, True, monkeypatch)
    torch.testing.assert_close(a["logits"], b["logits"], rtol=0, atol=0)
    np.testing.assert_array_equal(a["rewards"], b["rewards"])


@pytest.mark.parametrize("close_bias", [-10.0, 10.0])
@pytest.mark.parametrize("key", ["eval_first_region", "first_region_steps"])
def test_first_region_closed_for_the_model_then_the_head_decides(close_bias, key, monkeypatch):
    """eval_first_region=4 (or a run trained with first_region_steps=4, evaluated as trained): every stream's first
    region closes after 4 steps whatever the head says (a head that never closes, or one that always does); after it the
    head, or the forced close at the longest region, decides. Cached and uncached runs agree, and the report counts how
    many later regions kept the set length."""
    model, cfg = _setup(True, ["n_transit=24", f"{key}=4"], close_bias)
    assert cfg["eval_first_region"] == (4 if key == "eval_first_region" else 0)
    cached, _ = _run(model, cfg, True, monkeypatch)
    uncached, _ = _run(model, cfg, False, monkeypatch)
    _assert_same(cached, uncached)
    assert cached["set_closes"] == uncached["set_closes"] == [[3]] * 6  # after the 4th step of every stream
    stats = evaluate.region_stats(cached["closes"], cached["forced_closes"], cached["set_closes"])
    assert stats["first_region_lengths"] == [4] * 6
    if close_bias < 0:  # never closes: forced at the longest region, (24 + 1) // 2 - 2 = 10 steps
        assert all(ls[1:-1] == [10] * (len(ls) - 2) for ls in stats["region_lengths"]) and not any(cached["closes"])
    else:  # closes at every step once the first region is over
        assert all(set(ls[1:]) == {1} for ls in stats["region_lengths"])
    assert stats["kept_first_length"] == 0.0


def test_kept_first_length_counts_later_regions_of_the_set_length():
    reader = evaluate.region_stats([[7, 11, 15], [7, 11]], [[], []], [[3], [3]])  # keeps 4-step regions
    counter = evaluate.region_stats([[13, 23], [13]], [[], []], [[3], [3]])  # goes back to its own 10
    assert reader["kept_first_length"] == 1.0 and reader["consistency"] == 1.0
    assert counter["kept_first_length"] == 0.0 and counter["consistency"] == pytest.approx(1 / 3)
    assert "kept_first_length" not in evaluate.region_stats([[3, 7]], [[]])  # the head chose every length


def test_first_region_that_cannot_be_played_is_refused():
    from common import UserError

    with pytest.raises(UserError, match="eval_first_region=11 cannot be played: set eval_first_region<=10"):
        _setup(True, ["n_transit=24", "eval_first_region=11"])
    with pytest.raises(UserError, match="eval_first_region=4 cannot be played: it is for compressed mode"):
        _setup(False, ["n_transit=30", "eval_first_region=4"])
    with pytest.raises(UserError, match="eval_first_region must be >= 0"):
        _setup(True, ["n_transit=24", "eval_first_region=-1"])
