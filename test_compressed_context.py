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
    pairs = (b["n_regions"] == 2).nonzero().flatten()
    assert len(pairs)
    for i in pairs:
        types = b["type_ids"][i]
        n_steps = int(b["region_lens"][i].sum())
        # every step of both regions keeps its own token; 3 markers come on top: C r E C r
        assert int((types == STEP).logical_and(b["target_action"][i] != IGNORE).sum()) == n_steps == 40
        assert [int((types == t).sum()) for t in (COMPRESS_START, COMPRESS_END)] == [2, 1]
        assert len(types) >= n_steps + 3


def test_2_forward_on_region_pairs(tiny_history):
    cfg = _cfg(tiny_history)
    batch = HistoryDataset(tiny_history["path"], cfg, "train", batch_size=8, seed=0).batch(0)
    out = _model(cfg)(batch)
    # the batch is as long as its longest sample: C r E C r = 2 x 20 + 3 = 43 of the n_transit=48 positions
    assert (batch["n_regions"] == 2).any() and cfg["n_transit"] == 48
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


def synthetic_region_pairs(n: int, gen: torch.Generator, lengths=range(6, 15)) -> tuple[dict, torch.Tensor]:
    """`C r E C r` with both regions of one length L drawn per sample from `lengths`: the boundary of the second region
    sits at a different position in every layout, so only a model that reads the first region's length from its
    context can find it. Returns the batch and the (n,) lengths."""
    T = 2 * max(lengths) + 3
    b = {"type_ids": torch.full((n, T), STEP), "state_ids": torch.full((n, T), 81), "prev_ids": torch.full((n, T), 22),
         "target_action": torch.full((n, T), IGNORE), "target_token_type": torch.full((n, T), IGNORE)}
    lens = torch.tensor(list(lengths))[torch.randint(len(lengths), (n,), generator=gen)]
    for i, L in enumerate(lens.tolist()):
        for r, at in enumerate((0, L + 2)):
            b["type_ids"][i, at] = COMPRESS_START
            steps = slice(at + 1, at + 1 + L)
            b["state_ids"][i, steps] = torch.randint(0, 81, (L,), generator=gen)
            b["prev_ids"][i, steps] = torch.randint(0, 22, (L,), generator=gen)
            b["target_action"][i, steps] = torch.randint(0, 5, (L,), generator=gen)
            b["target_token_type"][i, steps] = torch.tensor([STEP] * (L - 1) + [COMPRESS_END])
            if r == 0:
                b["type_ids"][i, at + 1 + L] = COMPRESS_END
    return b, lens


def second_region_precision_recall(pred_end: torch.Tensor, lens: torch.Tensor) -> tuple[float, float]:
    """`</compress>` precision / recall over the step tokens of the second region (which has a region before it)."""
    T = pred_end.shape[1]
    pos = torch.arange(T)[None]
    second = (pos >= lens[:, None] + 3) & (pos < 2 * lens[:, None] + 3)
    true_end = pos == 2 * lens[:, None] + 2
    tp = int((pred_end & true_end & second).sum())
    return tp / max(int((pred_end & second).sum()), 1), tp / int((true_end & second).sum())


def test_3b_token_type_head_reads_the_region_length_from_context():
    """Trained on pairs of varied lengths, the head closes held-out second regions where the first region's length says,
    while a rule that closes at the most common trained length (position only) cannot."""
    torch.manual_seed(0)
    model = AD(ADConfig(n_transit=32, d_model=32, n_layer=2, n_head=2, use_compressed_context=True))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        batch, _ = synthetic_region_pairs(64, gen)
        loss = model(batch)["loss_token_type"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    held_out, lens = synthetic_region_pairs(256, torch.Generator().manual_seed(123))  # new sequences and layouts
    with torch.no_grad():
        pred_end = model.eval()(held_out)["logits_token_type"].argmax(-1) == COMPRESS_END
    precision, recall = second_region_precision_recall(pred_end, lens)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    # the position-only baseline: close the second region after the most common length (here all are equally common)
    L0 = int(torch.mode(lens).values)
    baseline = torch.zeros_like(pred_end)
    baseline[:, 2 * L0 + 2] = True
    b_precision, b_recall = second_region_precision_recall(baseline, lens)
    assert b_precision <= 0.3 and b_recall <= 0.2, (b_precision, b_recall)  # right only where L happens to be L0


# check 4 of the docs (the dataset yields consecutive regions of one stream, for max_regions 1, 2 and 3, with the prev
# ids chaining across region and episode starts) is tests/test_dataset.py::test_compressed_samples_are_the_last_...


def test_5_standard_mode_unchanged(tiny_history):
    """The compressed model is the standard one plus a token-type head: with the same weights it gives the same action
    logits on a marker-free standard window, and standard mode has no token-type output or loss."""
    cfg = _cfg(tiny_history, "standard")
    batch = HistoryDataset(tiny_history["path"], cfg, "train", batch_size=4, seed=0).batch(0)
    standard = _model(cfg)
    out = standard(batch)
    assert standard.head_token_type is None and "loss_token_type" not in out and "logits_token_type" not in out
    compressed = _model({**cfg, "use_compressed_context": True})
    missing, unexpected = compressed.load_state_dict(standard.state_dict(), strict=False)
    assert sorted(missing) == ["head_token_type.bias", "head_token_type.weight"] and not unexpected
    torch.testing.assert_close(compressed(batch)["logits_action"], out["logits_action"])


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


@pytest.mark.parametrize(("max_regions", "stride"), [(1, 1), (2, 1), (3, 1), (2, 2), (2, 3)])
def test_evaluation_contexts_equal_training_contexts(tiny_history, monkeypatch, max_regions, stride):
    """At every step, the context evaluation feeds the model has the token layout of a training sample with the same
    number of regions (the dataset's own sample, for max_regions 1, 2 and 3, and with region_stride: evaluation is the
    same, its regions follow each other), and the model sees it at the positions it was trained on: a teacher-forced
    pass over the same tokens gives the cached logits."""
    n_transit = max_regions * 22 + 2
    cfg = _cfg(tiny_history, extra=[f"max_regions={max_regions}", f"n_transit={n_transit}", f"region_stride={stride}"])
    interval = cfg["compress_interval"]
    ds = HistoryDataset(tiny_history["path"], cfg, "train", batch_size=64, seed=0)
    b = ds.batch(0)
    layouts = {}  # number of regions -> the type ids of a training sample with that many (full) regions
    for i in range(64):
        n = int(b["n_regions"][i])
        layouts[n] = b["type_ids"][i, : n * (interval + 2) - 1].tolist()
    assert set(layouts) == set(range(1, max_regions + 1))
    snap = [interval - 1, interval + 5, 2 * interval + 5, 3 * interval + 2, 4 * interval + 7]
    spy = Spy(monkeypatch, lambda b: {t for t in range(400) if (t + 1) % interval == 0}, max_regions, n_transit, snap)
    model = _model(cfg)
    evaluate.run_in_context(model, cfg, [38], n_streams=1, n_episodes=5, seed=0, progress=False)
    assert set(spy.snapshots) == set(snap)
    for t, s in spy.snapshots.items():
        types = s["type"].tolist()
        n = min(max_regions, t // interval + 1)  # regions in context: the open one and up to max_regions - 1 before it
        assert types == layouts[n][: len(types)], f"step {t}: context layout differs from a {n}-region training sample"
        assert len(types) == (n - 1) * (interval + 2) + 1 + (t % interval) + 1
        batch = {"type_ids": s["type"][None], "state_ids": s["state"][None], "prev_ids": s["prev"][None],
                 "target_action": torch.zeros_like(s["type"])[None]}
        torch.testing.assert_close(model(batch)["logits_action"][0, -1], s["la"], atol=1e-5, rtol=1e-5)


def test_region_stats_on_constructed_closes():
    """Region lengths per stream from its close steps; consistency = regions after the first as long as the previous."""
    closes = [[9, 19, 29], [19, 29], []]  # stream 0: 10, 10, 10; stream 1: 20, 10; stream 2: never closed
    forced = [[], [], [81]]  # stream 2's only region was closed by the safety rule at 82 steps
    s = evaluate.region_stats(closes, forced)
    assert s["region_lengths"] == [[10, 10, 10], [20, 10], [82]]
    assert s["first_region_lengths"] == [10, 20, 82]
    assert s["n_region_pairs"] == 3 and s["consistency"] == pytest.approx(2 / 3)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
