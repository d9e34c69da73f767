"""probe.py: teacher-forced accuracy counts exactly the steps of the last PPO region of each held-out stream."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common import load_config
from model.ad import COMPRESS_END, COMPRESS_START, IGNORE
from probe import last_region_accuracy


class Scripted(torch.nn.Module):
    """Predicts the target action on the last region's steps (or everywhere else), and a wrong one elsewhere."""

    def __init__(self, compressed: bool, n_steps: int, right_on_last: bool):
        super().__init__()
        self.compressed, self.n_steps, self.right_on_last = compressed, n_steps, right_on_last

    def forward(self, b):
        tgt = b["target_action"]
        pos = torch.arange(tgt.shape[1])[None]
        if self.compressed:  # the last region starts after the last <compress> (pairs, and summary.py's layout)
            last = pos > torch.where(b["type_ids"] == COMPRESS_START, pos, -1).amax(1, keepdim=True)
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


class ScriptedCloser(torch.nn.Module):
    """Token-type head only: closes the newest region after `fallback` steps, or, with `read_context`, after as many
    steps as the previous region in its context had (a position counter vs a model that reads the context)."""

    def __init__(self, fallback: int, read_context: bool):
        super().__init__()
        self.fallback, self.read_context = fallback, read_context

    def forward(self, b):
        types = b["type_ids"]
        B, T = types.shape
        pos = torch.arange(T)[None]
        last_c = torch.where(types == COMPRESS_START, pos, -1).amax(1, keepdim=True)
        first_e = torch.where(types == COMPRESS_END, pos, T).amin(1, keepdim=True)
        has_prev = first_e < T
        length = torch.full_like(last_c, self.fallback)
        if self.read_context:  # ... C r_{k-1} E C r_k: the previous region lies between the two last <compress>
            prev_c = torch.where((types == COMPRESS_START) & (pos < last_c), pos, -1).amax(1, keepdim=True)
            length = torch.where(has_prev, last_c - prev_c - 2, length)
        end = (pos - last_c == length) & (pos > last_c)
        logits = torch.where(end[..., None], torch.tensor([0.0, 0.0, 9.0]), torch.tensor([9.0, 0.0, 0.0]))
        return {"logits_token_type": logits, "logits_action": torch.zeros(B, T, 5)}


def test_boundary_report_separates_reading_the_context_from_counting_positions(adaptive_history):
    """On histories with rollout lengths 10 and 20 by goal, the position-only rule (close after the most common trained
    length, 20) misses the 10-step goal's boundaries; a closer that reads the previous region's length gets them all."""
    from probe import boundary_report, trained_region_length

    cfg = load_config("config/model/ad_dr_compressed.yaml", [*adaptive_history["overrides"], "compress_interval=20",
                                                              "n_transit=44"])
    assert trained_region_length(cfg) == 20  # train goals: three of 20 steps (12 regions) and one of 10 (8 regions)
    reader = boundary_report(ScriptedCloser(20, read_context=True), cfg, "test")
    counter = boundary_report(ScriptedCloser(20, read_context=False), cfg, "test")
    assert reader["with_previous"]["precision"] == reader["with_previous"]["recall"] == 1.0
    # test goals 38 (20 steps: 3 regions after the first per stream) and 51 (10 steps: 7): the rule gets 3 in 10
    assert reader["baseline_with_previous"]["recall"] == pytest.approx(0.3)
    assert counter["with_previous"] == reader["baseline_with_previous"]  # a position counter is the baseline
    assert reader["recall_by_goal"] == {(38, 20): 1.0, (51, 10): 1.0}
    assert counter["recall_by_goal"] == {(38, 20): 1.0, (51, 10): 0.0}  # the goal it misses, with its rollout length
    assert counter["first"] == reader["first"] == reader["baseline_first"]  # nothing to read before the first close
    assert reader["first"]["recall"] == pytest.approx(0.5)  # right on goal 38's first region, not on 51's
    # where it closed, in history steps, and the plot of it against PPO's rollout ends
    assert reader["ends"][38, 0] == [19, 39, 59, 79] and reader["ends"][51, 1] == list(range(9, 80, 10))
    assert reader["closes"][38, 0] == [19, 39, 59, 79]  # every boundary of the 20-step goal
    assert reader["closes"][51, 0] == list(range(19, 80, 10))  # all but the first of the 10-step goal's


def test_boundary_plot(adaptive_history, tmp_path):
    from probe import boundary_report, plot_boundaries

    cfg = load_config("config/model/ad_dr_compressed.yaml", [*adaptive_history["overrides"], "compress_interval=20",
                                                              "n_transit=44"])
    png = plot_boundaries(boundary_report(ScriptedCloser(20, read_context=True), cfg, "test"), tmp_path / "b.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class UnsureCloser(ScriptedCloser):
    """Reads the previous region's length like ScriptedCloser, but gives `</compress>` only probability ~0.2 where the
    region ends (below the argmax, which stays the step token) and ~1e-4 elsewhere."""

    def forward(self, b):
        out = super().forward(b)
        end = out["logits_token_type"][..., 2] > 0
        out["logits_token_type"] = torch.where(end[..., None], torch.tensor([1.0, -9.0, -0.386]), out["logits_token_type"])
        return out


def test_close_threshold_sweep_and_rule(adaptive_history):
    """A head that ranks the boundary right but below its argmax: the argmax rule never closes, a threshold under its
    probability closes exactly at the boundaries, one above it never closes; the config's eval_close_threshold is the
    rule the report (and evaluate.py) applies."""
    from probe import boundary_report

    over = [*adaptive_history["overrides"], "compress_interval=20", "n_transit=44"]
    cfg = load_config("config/model/ad_dr_compressed.yaml", over)
    assert torch.softmax(torch.tensor([1.0, -9.0, -0.386]), -1)[2] == pytest.approx(0.2, abs=1e-3)
    r = boundary_report(UnsureCloser(20, read_context=True), cfg, "test", thresholds=(0.1, 0.3))
    assert r["threshold"] == 0.0 and r["with_previous"]["recall"] == 0.0  # argmax: never </compress>
    assert r["sweep"][0.1]["with_previous"] == {"precision": 1.0, "recall": 1.0, "n_true": 10 * 4}  # 4 streams
    assert r["sweep"][0.3]["with_previous"]["recall"] == 0.0
    calibrated = boundary_report(UnsureCloser(20, read_context=True), load_config(
        "config/model/ad_dr_compressed.yaml", [*over, "eval_close_threshold=0.1"]), "test")
    assert calibrated["with_previous"] == r["sweep"][0.1]["with_previous"] and calibrated["sweep"] == {}


def test_boundary_report_with_every_length_in_every_goal(stream_history):
    """Streams of one goal with 10- and 20-step rollouts (`n_steps_per=stream`): the goal cannot tell the length, only
    the previous region can. The position-only rule (the commonest trained length, 10) misses every 20-step stream's
    boundaries; the reader finds all of them; recall is reported per (goal, rollout length)."""
    from probe import boundary_report, trained_region_length

    cfg = load_config("config/model/ad_dr_compressed.yaml", [*stream_history["overrides"], "compress_interval=20",
                                                             "n_transit=44"])
    assert trained_region_length(cfg) == 10  # 2 goals x 2 streams x 8 regions of 10 vs 2 x 2 x 4 of 20
    reader = boundary_report(ScriptedCloser(10, read_context=True), cfg, "test")
    counter = boundary_report(ScriptedCloser(10, read_context=False), cfg, "test")
    assert reader["with_previous"]["precision"] == reader["with_previous"]["recall"] == 1.0
    # per test goal: 2 streams x 7 later regions of 10 steps, 2 x 3 of 20: the rule gets 28 of 40
    assert reader["with_previous"]["n_true"] == 40 and reader["baseline_with_previous"]["recall"] == pytest.approx(0.7)
    assert counter["with_previous"] == reader["baseline_with_previous"]
    assert reader["recall_by_goal"] == {(38, 10): 1.0, (38, 20): 1.0, (51, 10): 1.0, (51, 20): 1.0}
    assert counter["recall_by_goal"] == {(38, 10): 1.0, (38, 20): 0.0, (51, 10): 1.0, (51, 20): 0.0}
    assert reader["ends"][38, 0] == list(range(9, 80, 10)) and reader["ends"][38, 1] == [19, 39, 59, 79]
    assert reader["closes"][38, 1] == [9, 39, 59, 79]  # a first region closed too early (nothing to read), then right


def test_probe_reads_the_histories_of_another_collection(adaptive_history, stream_history, tmp_path):
    """`--histories`: a run trained on one length per goal, probed on held-out histories with every length in every goal;
    the position-only rule keeps the run's own commonest length; another env or longer rollouts are refused."""
    from common import UserError
    from probe import boundary_report, with_histories

    cfg = load_config("config/model/ad_dr_compressed.yaml", [*adaptive_history["overrides"], "compress_interval=20",
                                                              "n_transit=44"])
    other = tmp_path / "streams.yaml"
    keys = dict(o.split("=", 1) for o in stream_history["overrides"])
    other.write_text(f"include: {Path('config/algorithm/ppo_darkroom.yaml').resolve()}\n"
                     + "".join(f"{k}: {v}\n" for k, v in keys.items()))
    hcfg = with_histories(cfg, str(other))
    assert hcfg["n_steps_per"] == "stream" and hcfg["traj_dir"] == keys["traj_dir"] and hcfg["n_transit"] == 44
    counter = boundary_report(ScriptedCloser(20, read_context=False), cfg, "test", histories=hcfg)
    reader = boundary_report(ScriptedCloser(20, read_context=True), cfg, "test", histories=hcfg)
    assert counter["baseline_length"] == 20  # the run's own training histories' commonest length, not the probed file's
    assert reader["with_previous"]["recall"] == 1.0 and counter["with_previous"]["recall"] == pytest.approx(12 / 40)
    assert set(reader["recall_by_goal"]) == {(38, 10), (38, 20), (51, 10), (51, 20)}
    per_task = tmp_path / "per_task.yaml"  # a key the config leaves out (n_steps_per) reads as its default
    per_task.write_text(other.read_text().replace("n_steps_per: stream\n", ""))
    assert with_histories(hcfg, str(per_task))["n_steps_per"] == "task"
    other.write_text(other.read_text() + "horizon: 25\n")
    with pytest.raises(UserError, match="is another task set \\(horizon=25"):
        with_histories(cfg, str(other))
    other.write_text(other.read_text().replace("horizon: 25\n", "") + "n_steps: [10, 40]\n")
    with pytest.raises(UserError, match="rollouts of 40 steps, longer than the run's compress_interval=20"):
        with_histories(cfg, str(other))


# ---- summary tokens: probe.py reads summary runs with the contexts they were trained on -------------------------------
# the accumulate layout (2 pruned regions' summaries); 2 x (20 + 2 + 2) - 1 - 2 = 45 raw positions
SUMMARY_TINY = ["summary_mode=accumulate", "n_summary=2", "max_summaries=2", "n_transit=48"]


def summary_cfg(tiny_history) -> dict:
    return load_config("config/model/ad_dr_summary.yaml", list(tiny_history["compressed"]) + SUMMARY_TINY)


@pytest.mark.parametrize("right_on_last", [True, False])
def test_last_region_accuracy_of_a_summary_run_reads_the_summary_layout(tiny_history, right_on_last):
    from dataset import HistoryDataset
    from model.ad import SUMMARY

    cfg = summary_cfg(tiny_history)
    acc = last_region_accuracy(Scripted(True, cfg["n_steps"], right_on_last), cfg, "test")
    assert sorted(acc) == [38, 51]
    assert all(a == (1.0 if right_on_last else 0.0) for a in acc.values())
    b = HistoryDataset(tiny_history["path"], cfg, "test", batch_size=1, seed=0).final_contexts(38)
    # 4 regions of 20 steps per stream: regions 0 and 1 pruned (their summaries kept), 2 and 3 raw, the last one open
    assert b["first_raw"].tolist() == [2] * 4 and b["region_ids"].max() == 3
    assert int((b["type_ids"][0] >= SUMMARY).sum()) == 3 * 2  # summaries of regions 0, 1 and the closed raw region 2
    assert int(b["in_last"].sum()) == 4 * 20  # the last region's steps of every stream, nothing of the pruned ones


def test_boundary_report_of_a_summary_run_finds_the_newest_region(tiny_history):
    """A closer that counts 20 steps from the last <compress> is exact on 20-step rollouts: in the summary layout too,
    the newest region (the targets the report scores) is the one after the last <compress>."""
    from model.ad import SUMMARY
    from probe import boundary_report

    class Recording(ScriptedCloser):  # what the report gives the model: summary.py's layout, summaries included
        def forward(self, b):
            self.seen.append(("region_ids" in b, int((b["type_ids"] >= SUMMARY).sum(1).max())))
            return super().forward(b)

    closer = Recording(20, read_context=False)
    closer.seen = []
    r = boundary_report(closer, summary_cfg(tiny_history), "test")
    assert all(has_regions for has_regions, _ in closer.seen) and max(n for _, n in closer.seen) == 3 * 2
    for group in ("with_previous", "first"):
        assert r[group]["precision"] == r[group]["recall"] == 1.0
    assert r["with_previous"]["n_true"] == 2 * 4 * 3 and r["first"]["n_true"] == 2 * 4  # 2 goals x 4 streams


def test_probe_cli_on_a_summary_run(tiny_history, tmp_path):
    from conftest import run_script

    from model import AD, ADConfig

    cfg = summary_cfg(tiny_history)
    torch.manual_seed(0)
    run_dir = tmp_path / "summary-run"
    run_dir.mkdir()
    torch.save({"config": cfg, "model": AD(ADConfig.from_dict(cfg)).state_dict(), "step": 0}, run_dir / "ckpt.pt")
    out = run_script("probe.py", "--run-dir", str(run_dir), "--split", "test", "eval_episodes=2", "eval_streams=1").stdout
    assert "teacher-forced acc, last region of the test goals' histories" in out
    assert "teacher-forced </compress>" in out and "in-context, 2 episodes" in out
