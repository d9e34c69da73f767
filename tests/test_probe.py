"""probe.py: teacher-forced accuracy counts exactly the steps of the last PPO region of each held-out stream."""

import pytest
import torch
import torch.nn.functional as F

from common import load_config
from model.ad import COMPRESS_END, IGNORE
from probe import last_region_accuracy


class Scripted(torch.nn.Module):
    """Predicts the target action on the last region's steps (or everywhere else), and a wrong one elsewhere."""

    def __init__(self, compressed: bool, n_steps: int, right_on_last: bool):
        super().__init__()
        self.compressed, self.n_steps, self.right_on_last = compressed, n_steps, right_on_last

    def forward(self, b):
        tgt = b["target_action"]
        pos = torch.arange(tgt.shape[1])[None]
        if self.compressed:  # the last region starts after </compress> (every sample here is a pair)
            last = pos > (b["type_ids"] == COMPRESS_END).float().argmax(1, keepdim=True)
        else:
            n_valid = (tgt != IGNORE).sum(1, keepdim=True)
            last = (pos >= n_valid - self.n_steps) & (pos < n_valid)
        right = last if self.right_on_last else ~last
        a = tgt.clamp(min=0)
        return {"logits_action": F.one_hot(torch.where(right, a, (a + 1) % 5), 5).float()}


@pytest.mark.parametrize("mode", ["standard", "compressed"])
@pytest.mark.parametrize("right_on_last", [True, False])
def test_last_region_accuracy_counts_only_the_last_region(tiny_history, mode, right_on_last):
    name = "ad_dr_compressed.yaml" if mode == "compressed" else "ad_dr.yaml"
    cfg = load_config(f"config/model/{name}", list(tiny_history[mode]) + [f"traj_dir={tiny_history['traj_dir']}"])
    acc = last_region_accuracy(Scripted(mode == "compressed", cfg["n_steps"], right_on_last), cfg, "test")
    assert sorted(acc) == [38, 51]  # the held-out goals in the tiny history
    assert all(a == (1.0 if right_on_last else 0.0) for a in acc.values())
