"""The checks the compressed-context docs promise, plus evaluation pruning and position invariants.

    python test_compressed_context.py        # or: python -m pytest test_compressed_context.py
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import evaluate
from common import load_config
from dataset import HistoryDataset
from env import split_goals
from model import AD, ADConfig
from model.ad import COMPRESS_END, COMPRESS_START, IGNORE, STEP
from tests.conftest import tiny_history  # noqa: F401  (the session fixture: a tiny history file)


def _cfg(tiny, mode="compressed", extra=()):
    name = "ad_dr_compressed.yaml" if mode == "compressed" else "ad_dr.yaml"
    return load_config(f"config/model/{name}", list(tiny[mode]) + list(extra))


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return AD(ADConfig.from_dict(cfg)).eval()


def test_1_compress_tokens_are_inserted_not_replacing(tiny_history):
    cfg = _cfg(tiny_history)
    b = HistoryDataset(tiny_history["path"], cfg, "train", batch_size=16, seed=0).batch(0)
    pairs = (b["prev_region_len"] > 0).nonzero().flatten()
    assert len(pairs)
    for i in pairs:
        types = b["type_ids"][i]
        n_steps = int(b["prev_region_len"][i] + b["curr_region_len"][i])
        # every step of both regions keeps its own token; 3 markers come on top: C r E C r
        assert int((types == STEP).logical_and(b["target_action"][i] != IGNORE).sum()) == n_steps == 40
        assert [int((types == t).sum()) for t in (COMPRESS_START, COMPRESS_END)] == [2, 1]
        assert len(types) >= n_steps + 3


def test_2_forward_on_region_pairs(tiny_history):
    cfg = _cfg(tiny_history)
    batch = HistoryDataset(tiny_history["path"], cfg, "train", batch_size=8, seed=0).batch(0)
    out = _model(cfg)(batch)
    # the batch is as long as its longest sample: C r E C r = 2 x 20 + 3 = 43 of the n_transit=48 positions
    assert (batch["prev_region_len"] > 0).any() and cfg["n_transit"] == 48
    assert batch["type_ids"].shape == batch["target_token_type"].shape == (8, 43)
    assert out["logits_action"].shape == (8, 43, 5)
    assert out["logits_token_type"].shape == (8, 43, 3)
    assert torch.isfinite(out["loss"]) and out["n_targets"] == int((batch["target_action"] != IGNORE).sum())


def test_3_token_type_prediction_and_loss(tiny_history):
    cfg = _cfg(tiny_history)
    batch = HistoryDataset(tiny_history["path"], cfg, "train", batch_size=8, seed=0).batch(0)
    out = _model(cfg)(batch)
    tt = batch["target_token_type"]
    sup = tt != IGNORE
    assert set(tt[sup].unique().tolist()) == {STEP, COMPRESS_END}
    want = torch.nn.functional.cross_entropy(out["logits_token_type"][sup], tt[sup])
    torch.testing.assert_close(out["loss_token_type"], want)
    torch.testing.assert_close(out["loss"], out["loss_action"] + cfg["token_type_loss_weight"] * want)
    assert out["n_true_end"] == int((tt == COMPRESS_END).sum())
    # a few optimiser steps on the token-type loss teach the head where regions end (1 step in 20 here)
    model = _model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = model(batch)["loss_token_type"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = model(batch)
    assert out["n_true_positive"] == out["n_true_end"] == out["n_pred_end"]  # precision = recall = 1


def test_4_dataset_yields_consecutive_regions_of_one_stream(tiny_history):
    cfg = _cfg(tiny_history)
    ds = HistoryDataset(tiny_history["path"], cfg, "train", batch_size=32, seed=2)
    b = {k: v.numpy() for k, v in ds.batch(0).items()}
    seen_single = seen_pair = False
    for i in range(32):
        steps = np.flatnonzero(b["target_action"][i] != IGNORE)
        sid, act = b["state_ids"][i, steps], b["target_action"][i, steps]
        n = len(steps)
        assert n == b["prev_region_len"][i] + b["curr_region_len"][i]
        # the steps are one contiguous stretch of one stream, starting on a region boundary
        hits = [(g, s, t0) for g, d in ds.data.items() for s in range(d["actions"].shape[1]) for t0 in range(0, 80 - n + 1, 20)
                if (d["state_ids"][t0 : t0 + n, s] == sid).all() and (d["actions"][t0 : t0 + n, s] == act).all()]
        assert hits, f"sample {i} is not a contiguous region sequence of one stream"
        ends = np.flatnonzero(b["target_token_type"][i, steps] == COMPRESS_END)
        assert ends.tolist() == ([19, 39] if n == 40 else [19])
        seen_single |= n == 20
        seen_pair |= n == 40
    assert seen_single and seen_pair


GOLDEN = [0.02989, 0.01093, -0.08297, 0.20581, -0.06509, -0.01, 0.03545, -0.07194, 0.12983, -0.05275]


def test_5_standard_mode_unchanged():
    torch.manual_seed(0)
    m = AD(ADConfig(n_transit=16, d_model=16, n_layer=1, n_head=2, state_embedding="table")).eval()
    g = torch.Generator().manual_seed(1)
    b = {"type_ids": torch.zeros(2, 8, dtype=torch.long), "state_ids": torch.randint(0, 81, (2, 8), generator=g),
         "prev_ids": torch.randint(0, 22, (2, 8), generator=g), "target_action": torch.randint(0, 5, (2, 8), generator=g)}
    out = m(b)
    assert m.head_token_type is None and "loss_token_type" not in out
    np.testing.assert_allclose(out["logits_action"][:, -1].flatten().tolist(), GOLDEN, atol=1e-5)  # frozen reference
    # the compressed model with the same weights gives the same action logits on a marker-free sequence
    c = AD(ADConfig(n_transit=16, d_model=16, n_layer=1, n_head=2, state_embedding="table", use_compressed_context=True)).eval()
    c.load_state_dict(m.state_dict(), strict=False)
    torch.testing.assert_close(c(b)["logits_action"], out["logits_action"])


class Spy:
    """Wraps `Contexts.logits`: forces the token-type head's answer on a schedule and checks invariants."""

    def __init__(self, monkeypatch, close_at, max_regions, n_transit, snapshot_at=()):
        self.close_at, self.max_regions, self.n_transit = close_at, max_regions, n_transit
        self.t, self.said_end, self.snapshots, self.max_len = -1, [], {}, 0
        orig = evaluate.Contexts.logits
        spy = self

        def logits(ctx, use_cache):
            la, lt = orig(ctx, use_cache)
            spy.t += 1
            says = torch.tensor([spy.t in spy.close_at(b) for b in range(len(la))])
            lt = torch.where(says[:, None], torch.tensor([0.0, 0.0, 9.0]), torch.tensor([9.0, 0.0, 0.0]))
            spy.said_end.append(says.numpy())
            for b in range(len(la)):
                n_regions = int((ctx.type[b, : ctx.length[b]] == COMPRESS_START).sum())
                assert n_regions <= spy.max_regions, f"{n_regions} regions in context at step {spy.t}"
            spy.max_len = max(spy.max_len, int(ctx.length.max()))
            if spy.t in snapshot_at:
                L = int(ctx.length[0])
                spy.snapshots[spy.t] = {k: getattr(ctx, k)[0, :L].clone() for k in ("type", "state", "prev")} | {"la": la[0]}
            return la, lt

        monkeypatch.setattr(evaluate.Contexts, "logits", logits)


def test_eval_prunes_exactly_when_the_head_says_end(tiny_history, monkeypatch):
    cfg = _cfg(tiny_history)
    # irregular per-stream schedules: the model, not the grid, decides
    sched = {0: {5, 19, 30, 31, 50, 70}, 1: {10, 39, 59}, 2: set(), 3: {0, 1, 2, 3}}
    spy = Spy(monkeypatch, lambda b: sched[b % 4], cfg["max_regions"], cfg["n_transit"])
    res = evaluate.run_in_context(_model(cfg), cfg, [38, 51], n_streams=2, n_episodes=4, seed=0, progress=False)
    said = np.stack(spy.said_end, 1)  # [B, steps]
    for b in range(4):
        closes = res["closes"][b] + res["forced_closes"][b]
        assert sorted(res["closes"][b]) == np.flatnonzero(said[b]).tolist()
        # with max_regions = 2 every close after the first drops the oldest region, and nothing else does
        assert res["prunes"][b] == sorted(closes)[1:]
    assert spy.max_len <= cfg["n_transit"]


def test_eval_region_never_exceeds_budget_when_head_never_closes(tiny_history, monkeypatch):
    cfg = _cfg(tiny_history)
    spy = Spy(monkeypatch, lambda b: set(), cfg["max_regions"], cfg["n_transit"])
    res = evaluate.run_in_context(_model(cfg), cfg, [38], n_streams=2, n_episodes=10, seed=0, progress=False)
    assert all(len(c) == 0 for c in res["closes"]) and all(len(f) > 0 for f in res["forced_closes"])
    assert spy.max_len <= cfg["n_transit"]


def test_positions_at_evaluation_equal_training(tiny_history, monkeypatch):
    cfg = _cfg(tiny_history)
    interval = cfg["compress_interval"]
    snap = [interval - 1, interval + 5, 2 * interval + 5, 3 * interval + 2]
    spy = Spy(monkeypatch, lambda b: {t for t in range(200) if (t + 1) % interval == 0}, 2, cfg["n_transit"], snap)
    model = _model(cfg)
    evaluate.run_in_context(model, cfg, [38], n_streams=1, n_episodes=5, seed=0, progress=False)
    pair = [COMPRESS_START] + [STEP] * interval + [COMPRESS_END, COMPRESS_START] + [STEP] * interval
    for t, s in spy.snapshots.items():
        types = s["type"].tolist()
        if t < interval:
            assert types == pair[: t + 2]  # C x_0 .. x_t: a prefix of the single first region
        else:
            assert types == pair[: len(types)] and len(types) == interval + 3 + (t % interval) + 1
        # the model sees the same positions as in training: a teacher-forced pass over the same tokens agrees
        batch = {"type_ids": s["type"][None], "state_ids": s["state"][None], "prev_ids": s["prev"][None],
                 "target_action": torch.zeros_like(s["type"])[None]}
        torch.testing.assert_close(model(batch)["logits_action"][0, -1], s["la"], atol=1e-5, rtol=1e-5)


def test_test_goals_are_held_out():
    train, test = split_goals()
    assert len(test) == 8 and not set(train) & set(test)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
