"""The optimiser's parameter groups: which parameters weight decay applies to (`weight_decay_on`).

- `all`: every parameter, the repo's original AdamW setting.
- `matrices`: only parameters with two or more dimensions (linear weights and embedding tables), not LayerNorm gains
  or biases, as nanoGPT does (docs/experiments.md E31 measured both on validation goals: no difference, so `all` stays).
"""

from __future__ import annotations

import torch

DECAY_RULES = ("all", "matrices")


def param_groups(model: torch.nn.Module, weight_decay: float, on: str) -> list[dict]:
    """AdamW parameter groups: one with `weight_decay`, one without (empty groups left out)."""
    if on not in DECAY_RULES:
        raise ValueError(f"weight_decay_on must be one of {', '.join(DECAY_RULES)}; got {on!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    decay = params if on == "all" else [p for p in params if p.dim() >= 2]
    ids = {id(p) for p in decay}
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) not in ids], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
