"""Weight decay's parameter groups (`weight_decay_on`)."""

import pytest
import torch

from model import MODEL, ADConfig
from model.optim import param_groups


def small_model():
    return MODEL["AD"](ADConfig(n_transit=48, d_model=16, n_layer=1, n_head=2, use_compressed_context=True))


def test_matrices_decay_only_2d_weights():
    model = small_model()
    decay, no_decay = param_groups(model, 0.1, "matrices")
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert any("ln" in names[id(p)] or "norm" in names[id(p)] for p in no_decay["params"])  # LayerNorm gains
    assert any(names[id(p)].endswith("bias") for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_all_decays_everything_and_optimiser_accepts_groups():
    model = small_model()
    groups = param_groups(model, 0.01, "all")
    assert len(groups) == 1 and len(groups[0]["params"]) == len(list(model.parameters()))
    torch.optim.AdamW(param_groups(model, 0.01, "matrices"), lr=1e-3)  # no parameter in two groups


def test_unknown_rule_refused():
    with pytest.raises(ValueError, match="all, matrices"):
        param_groups(small_model(), 0.01, "norms")
