import math

import pytest
import torch

from model import AD, MODEL, ADConfig
from model.ad import COMPRESS_END, COMPRESS_START, IGNORE, N_ACTIONS, STEP, closes_region


def _batch(B=3, T=24, compressed=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = {
        "type_ids": torch.full((B, T), STEP),
        "state_ids": torch.randint(0, 81, (B, T), generator=g),
        "prev_ids": torch.randint(0, 22, (B, T), generator=g),
        "target_action": torch.randint(0, N_ACTIONS, (B, T), generator=g),
    }
    if compressed:
        b["type_ids"][:, 0] = COMPRESS_START
        b["type_ids"][:, 11] = COMPRESS_END
        b["type_ids"][:, 12] = COMPRESS_START
        for k in ("state_ids",):
            b[k][:, [0, 11, 12]] = 81
        b["prev_ids"][:, [0, 11, 12]] = 22
        b["target_action"][:, [0, 11, 12]] = IGNORE
        tt = torch.zeros(B, T, dtype=torch.long)
        tt[:, [10, 23]] = 2
        tt[:, [0, 11, 12]] = IGNORE
        b["target_token_type"] = tt
    return b


def _model(compressed=False, T=32):
    torch.manual_seed(0)
    return AD(ADConfig(n_transit=T, d_model=32, n_layer=2, n_head=2, use_compressed_context=compressed))


def test_closes_region_argmax_or_threshold():
    logits = torch.log(torch.tensor([[0.6, 0.1, 0.3], [0.2, 0.1, 0.7], [0.05, 0.9, 0.05]]))  # P(</compress>) .3 .7 .05
    assert closes_region(logits).tolist() == [False, True, False]  # argmax
    assert closes_region(logits, 0.25).tolist() == [True, True, False]
    assert closes_region(logits, 0.8).tolist() == [False, False, False]
    assert closes_region(logits[None], 0.04).shape == (1, 3)


def test_registry():
    assert MODEL["AD"] is AD


@pytest.mark.parametrize("compressed", [False, True])
def test_forward_shapes_and_losses(compressed):
    m = _model(compressed)
    b = _batch(compressed=compressed)
    out = m(b)
    assert out["logits_action"].shape == (3, 24, N_ACTIONS)
    # the loss is the mean cross-entropy over supervised positions, and a fresh model (std-0.02 init) is near-uniform
    sup = b["target_action"] != IGNORE
    torch.testing.assert_close(out["loss_action"], torch.nn.functional.cross_entropy(out["logits_action"][sup],
                                                                                     b["target_action"][sup]))
    assert abs(out["loss_action"].item() - math.log(N_ACTIONS)) < 0.05
    if compressed:
        assert out["logits_token_type"].shape == (3, 24, 3)
        assert out["n_targets"] == 3 * 21
        torch.testing.assert_close(out["loss"], out["loss_action"] + 0.1 * out["loss_token_type"])
    else:
        assert "logits_token_type" not in out and out["n_targets"] == 3 * 24
        torch.testing.assert_close(out["loss"], out["loss_action"])


@pytest.mark.parametrize("compressed", [False, True])
def test_causality_loss_at_t_ignores_later_steps(compressed):
    m = _model(compressed).eval()
    b1 = _batch(compressed=compressed)
    b2 = {k: v.clone() for k, v in b1.items()}
    t = 15
    b2["state_ids"][:, t + 1 :] = torch.randint(0, 81, b2["state_ids"][:, t + 1 :].shape)
    b2["prev_ids"][:, t + 1 :] = torch.randint(0, 22, b2["prev_ids"][:, t + 1 :].shape)
    b2["target_action"][:, t + 1 :] = (b2["target_action"][:, t + 1 :] + 1) % N_ACTIONS
    l1, l2 = m(b1)["logits_action"], m(b2)["logits_action"]
    torch.testing.assert_close(l1[:, : t + 1], l2[:, : t + 1])
    assert not torch.allclose(l1[:, t + 1 :], l2[:, t + 1 :])
    # the per-position loss at t is unchanged
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(ce(l1[:, t], b1["target_action"][:, t]), ce(l2[:, t], b2["target_action"][:, t]))


def test_training_reduces_loss_on_a_fixed_batch():
    m = _model()
    b = _batch()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = m(b)["loss"].item()
    for _ in range(60):
        loss = m(b)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("state_embedding", ["rowcol", "table"])
def test_marker_and_padding_tokens_carry_no_state_even_after_training(state_embedding):
    """Markers and padding use the padding state / prev ids: their embeddings start at zero and get no gradient, so a
    marker token is its type embedding plus its position only, however long the model trains."""
    torch.manual_seed(0)
    m = AD(ADConfig(n_transit=32, d_model=32, n_layer=2, n_head=2, use_compressed_context=True, state_embedding=state_embedding))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    b = _batch(compressed=True)
    for _ in range(5):
        opt.zero_grad()
        m(b)["loss"].backward()
        opt.step()
    pad_state = m.embed_state(torch.tensor([81]))
    assert pad_state.abs().sum() == 0 and m.prev_emb.weight[22].abs().sum() == 0
    assert m.embed_state(torch.tensor([0])).abs().sum() > 0  # a real cell did train


def _train_losses(precision: str, compile_model: bool, steps: int = 4) -> list[float]:
    """A few optimiser steps of a tiny compressed model under the given speed options, as train.py runs them (one
    layer: inductor's compile time grows with the graph, and one block has every kind of op the model has)."""
    torch.manual_seed(0)
    m = AD(ADConfig(n_transit=32, d_model=32, n_layer=1, n_head=2, use_compressed_context=True))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    fn = torch.compile(m) if compile_model else m
    losses = []
    for step in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = fn(_batch(compressed=True, seed=step))
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out["loss"].detach()))
    return losses


def test_speed_options_do_not_change_the_losses():
    """bf16 autocast (the default on CPU) gives the fp32 losses to 1 %; torch.compile gives the eager losses to 1e-5
    (inductor may reorder float sums, so not bit for bit)."""
    fp32 = _train_losses("no", False)
    assert _train_losses("bf16", False) == pytest.approx(fp32, rel=1e-2)
    assert _train_losses("no", True) == pytest.approx(fp32, rel=1e-5)
