"""Summary tokens (model/summary.py, summary.py): the mask lets a token see a pruned region only through its
summaries; cached evaluation equals a teacher-forced pass over the whole stream; evaluation contexts are training
samples; the cache stays bounded; and a tiny model solves a memory task with summaries that pruning alone cannot."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import evaluate
from common import ROOT, UserError, load_config
from model import AD, ADConfig
from model.ad import COMPRESS_END, COMPRESS_START, IGNORE, STEP, SUMMARY, masked_attention
from model.summary import attention_mask, key_ranges, layout_positions
from summary import SummarySampler, logged_stream, reach

N_SUMMARY, L = 2, 3  # summary tokens per region, steps per region of the constructed streams


def stream(n_regions: int, steps: int = L, seed: int = 0) -> dict:
    """One task's data as dataset.load_history holds it: one stream of `n_regions` regions of `steps` steps each."""
    g = np.random.default_rng(seed)
    T = n_regions * steps
    ends = np.zeros((T, 1), bool)
    ends[steps - 1 :: steps] = True
    return {"state_ids": g.integers(0, 81, (T, 1)), "prev_ids": g.integers(0, 22, (T, 1)), "actions": g.integers(0, 5, (T, 1)),
            "compress_end": ends, "regions": [np.stack([np.arange(0, T, steps), np.arange(steps, T + 1, steps)], 1)]}


def sampler_cfg(max_regions=2, mode="accumulate", kept=2, back=0, n_transit=24):
    return {"max_regions": max_regions, "n_summary": N_SUMMARY, "summary_mode": mode, "max_summaries": kept,
            "summary_train_regions": back, "grid_size": 9, "n_transit": n_transit}


def sample(cfg: dict, d: dict, k: int, back: int | None = None) -> dict:
    s = SummarySampler({0: d}, cfg, 1, seed=0)
    b = s.empty(1, back)
    length = s.put(b, 0, d, 0, k, back)
    return {key: torch.from_numpy(np.ascontiguousarray(v[:, :length]) if v.ndim == 2 and key != "region_lens" else v)
            for key, v in b.items()}


def model_for(cfg: dict, seed=0, n_layer=2) -> AD:
    torch.manual_seed(seed)
    c = ADConfig(n_transit=cfg["n_transit"], d_model=32, n_layer=n_layer, n_head=2, use_compressed_context=True,
                 use_summary=True, n_summary=N_SUMMARY, summary_mode=cfg["summary_mode"], max_summaries=cfg["max_summaries"])
    return AD(c).eval()


def mask_of(b: dict, cfg: dict) -> torch.Tensor:
    return attention_mask(b["region_ids"], b["type_ids"] >= SUMMARY, b["first_raw"], cfg["summary_mode"],
                          cfg["max_summaries"])[0]


def seen_summary_regions(b, mask, q) -> set[int]:
    """The regions whose summary tokens token q sees (other than its own group)."""
    reg, summ = b["region_ids"][0], b["type_ids"][0] >= SUMMARY
    return {int(reg[k]) for k in range(len(reg)) if mask[q, k] and summ[k] and reg[k] != reg[q]}


# ---- 1. the layout and the mask on constructed sequences ------------------------------------------------------------
def test_layout_of_a_sample_with_pruned_regions():
    cfg = sampler_cfg()
    b = sample(cfg, stream(4), k=3)  # regions 0, 1 pruned (their summaries kept), 2 and 3 raw
    block = [COMPRESS_START] + [STEP] * L + [COMPRESS_END] + [SUMMARY, SUMMARY + 1]
    assert b["type_ids"][0].tolist() == block * 3 + [COMPRESS_START] + [STEP] * L
    assert b["region_ids"][0].tolist() == sum([[r] * len(block) for r in range(3)], []) + [3] * (L + 1)
    assert int(b["first_raw"][0]) == 2 and int(b["n_regions"][0]) == 2
    pos = layout_positions(b["region_ids"], b["first_raw"])[0].tolist()
    assert pos == list(range(7)) * 2 + list(range(7 + L + 1))  # each pruned region from 0, the raw part from 0
    raw = b["region_ids"][0] >= 2
    steps = b["type_ids"][0] == STEP
    assert ((b["target_action"][0] != IGNORE) == (raw & steps)).all()  # targets at raw step tokens only
    assert (b["target_token_type"][0][b["type_ids"][0] >= SUMMARY] == IGNORE).all()  # summaries: no targets


@pytest.mark.parametrize("mode", ["accumulate", "recurrent"])
def test_a_pruned_region_is_seen_only_through_its_summaries(mode):
    kept = 2 if mode == "accumulate" else 1
    cfg = sampler_cfg(mode=mode, kept=kept, back=2)
    b = sample(cfg, stream(4), k=3)
    mask = mask_of(b, cfg)
    reg, types = b["region_ids"][0], b["type_ids"][0]
    summ, first_raw = types >= SUMMARY, int(b["first_raw"][0])
    T = len(reg)
    for q in range(T):
        for k in range(T):
            if k > q:
                assert not mask[q, k], "causal"
            elif not summ[k] and reg[k] < first_raw and reg[k] != reg[q]:
                assert not mask[q, k], f"token {q} (region {int(reg[q])}) sees a raw token of pruned region {int(reg[k])}"
            elif summ[q] and not summ[k] and reg[k] != reg[q]:
                assert not mask[q, k], "a summary reads the raw tokens of its own region only"
    last = T - 1  # a step token of the open region 3
    first_of = {r: int((reg == r).nonzero()[0]) + 1 for r in range(4)}  # the first step token of each region
    summary_of = {r: int(((reg == r) & summ).nonzero()[0]) for r in range(3)}
    if mode == "accumulate":  # the last 2 pruned regions' summaries and the closed raw region's
        assert seen_summary_regions(b, mask, last) == {0, 1, 2}
        assert seen_summary_regions(b, mask, first_of[2]) == {0, 1}
        assert seen_summary_regions(b, mask, summary_of[2]) == {0, 1}
        assert seen_summary_regions(b, mask, first_of[1]) == {0}
        assert seen_summary_regions(b, mask, first_of[0]) == set()
    else:  # one recurrent summary: the previous region's, which read the one before it
        for r in range(1, 4):
            assert seen_summary_regions(b, mask, first_of[r]) == {r - 1}
        assert seen_summary_regions(b, mask, summary_of[2]) == {1}
    assert mask[last, first_of[2]] and mask[last, first_of[3]]  # the raw regions stay visible
    assert mask[summary_of[2] + 1, summary_of[2]] and not mask[summary_of[2], summary_of[2] + 1]  # causal in a group


@pytest.mark.parametrize("mode", ["accumulate", "recurrent"])
def test_perturbing_a_pruned_region_reaches_later_tokens_only_through_summaries(mode):
    kept = 2 if mode == "accumulate" else 1
    cfg = sampler_cfg(mode=mode, kept=kept, back=2)
    # 4 layers: a summary reads the one before it at the same layer, so region 0 reaches region 3 through the recurrent
    # chain S_0 -> S_1 -> S_2 only with one layer per hop (accumulate reads S_0 directly)
    model = model_for(cfg, n_layer=4)
    b = sample(cfg, stream(4), k=3)
    reg, summ = b["region_ids"][0], b["type_ids"][0] >= SUMMARY
    raw = reg >= int(b["first_raw"][0])
    perturbed = {**b, "state_ids": b["state_ids"].clone()}
    in_region0 = (reg == 0) & (b["type_ids"][0] == STEP)
    perturbed["state_ids"][0, in_region0] = (perturbed["state_ids"][0, in_region0] + 7) % 81

    def raw_logits(batch, ablate: bool):
        pos, mask = model.summary_layout(batch["type_ids"], batch["region_ids"], batch["first_raw"])
        if ablate:  # the raw part no longer sees any summary of a pruned region
            mask = mask.clone()
            mask[0][raw[:, None] & (summ & ~raw)[None, :]] = False
        with torch.no_grad():
            h, _ = model.trunk(batch["type_ids"], batch["state_ids"], batch["prev_ids"], pos, mask)
        return model.heads(h)[0][0, raw]

    assert (raw_logits(b, False) - raw_logits(perturbed, False)).abs().max() > 1e-4  # the cue reaches them...
    torch.testing.assert_close(raw_logits(b, True), raw_logits(perturbed, True), rtol=0, atol=0)  # ...only this way
    torch.testing.assert_close(model(b)["logits_action"][0, raw], raw_logits(b, False))  # forward = this layout


@pytest.mark.parametrize("mode", ["accumulate", "recurrent"])
@pytest.mark.parametrize("chunk", [1, 4, 7, 1000])
def test_chunked_attention_sees_every_visible_key_and_equals_one_call(mode, chunk):
    kept = 2 if mode == "accumulate" else 1
    cfg = sampler_cfg(mode=mode, kept=kept, back=2)
    b = sample(cfg, stream(4), k=3)
    mask = mask_of(b, cfg)[None]
    ranges = key_ranges(mask, chunk)
    T = mask.shape[1]
    assert [a for a, _, _ in ranges] == list(range(0, T, chunk)) and ranges[-1][1] == T
    for a, stop, lo in ranges:  # every key a query of the chunk sees is inside lo..stop-1, and lo is the first one seen
        assert not mask[0, a:stop, :lo].any() and not mask[0, a:stop, stop:].any() and mask[0, a:stop, lo].any()
    if mode == "recurrent" and chunk == 4:  # a pruned region's chunk skips the regions before it
        assert max(lo for _, _, lo in ranges) > 0
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, T, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(masked_attention(q, k, v, mask[:, None], 0.0, ranges),
                               masked_attention(q, k, v, mask[:, None], 0.0))


def test_forward_on_sampler_batches_and_no_summary_targets():
    cfg = sampler_cfg()
    s = SummarySampler({0: stream(5), 1: stream(5, seed=1)}, cfg, 8, seed=0)
    b = s.batch(0)
    assert (b["region_ids"] >= -1).all() and b["type_ids"].shape == b["region_ids"].shape
    torch.testing.assert_close(b["type_ids"], s.batch(0)["type_ids"])  # a pure function of the step
    out = model_for(cfg)(b)
    assert torch.isfinite(out["loss"]) and int(out["n_targets"]) == int(b["n_regions"].sum()) * L


def test_model_without_summaries_is_unchanged_by_the_new_code_paths():
    """A compressed model gives the same logits through `trunk` with no mask as before, and an explicit causal mask at
    positions 0..T-1 gives the same too (the mask path is the causal path when nothing is pruned)."""
    torch.manual_seed(0)
    m = AD(ADConfig(n_transit=16, d_model=32, n_layer=2, n_head=2, use_compressed_context=True)).eval()
    ids = torch.randint(0, 81, (2, 12)), torch.randint(0, 22, (2, 12))
    types = torch.full((2, 12), STEP)
    h0, _ = m.trunk(types, *ids)
    causal = torch.ones(12, 12, dtype=torch.bool).tril().expand(2, 12, 12)
    h1, _ = m.trunk(types, *ids, torch.arange(12).expand(2, 12), causal)
    torch.testing.assert_close(h0, h1)


# ---- 2. cached evaluation = teacher-forced pass; evaluation contexts = training samples; bounded cache ----------
TINY = ["d_model=16", "n_layer=2", "n_head=2", "n_steps=10", "compress_interval=10", "eval_streams=2", f"n_summary={N_SUMMARY}"]


def eval_setup(mode: str, max_regions: int, kept: int, extra=(), close_bias=None, seed=0):
    n_transit = max_regions * (10 + 2 + N_SUMMARY) + 2
    cfg = load_config(ROOT / "config" / "model" / "ad_dr_summary.yaml",
                      TINY + [f"summary_mode={mode}", f"max_regions={max_regions}", f"max_summaries={kept}",
                              f"n_transit={n_transit}", *extra])
    torch.manual_seed(seed)
    model = AD(ADConfig.from_dict(cfg)).eval()
    if close_bias is not None:
        with torch.no_grad():
            model.head_token_type.bias[COMPRESS_END] = close_bias
    return model, cfg


def run(model, cfg, use_cache=True, n_episodes=5, goals=(38, 51)):
    return evaluate.run_in_context(model, cfg, list(goals), n_streams=cfg["eval_streams"], n_episodes=n_episodes, seed=1,
                                   use_cache=use_cache, progress=False, record_logits=True)


@pytest.mark.parametrize("mode,max_regions,kept,extra", [
    ("accumulate", 2, 2, ["eval_prune=fixed"]), ("accumulate", 1, 3, ["eval_prune=fixed"]),
    ("accumulate", 3, 1, ["eval_prune=fixed"]), ("recurrent", 2, 1, ["eval_prune=fixed"]),
    ("recurrent", 1, 1, []), ("accumulate", 2, 2, []),  # the random head closes irregularly, per stream
    ("feedback", 2, 1, ["eval_prune=fixed"]), ("feedback", 1, 1, []), ("feedback", 2, 1, []),
])
def test_cached_evaluation_equals_a_teacher_forced_pass_with_summaries(mode, max_regions, kept, extra):
    model, cfg = eval_setup(mode, max_regions, kept, extra)
    cached, reference = run(model, cfg, True), run(model, cfg, False)
    diff = (cached["logits"] - reference["logits"]).abs().max().item()
    assert diff < 1e-5, f"cached and teacher-forced logits differ by {diff}"
    np.testing.assert_array_equal(cached["rewards"], reference["rewards"])
    for key in ("closes", "forced_closes", "prunes"):
        assert cached[key] == reference[key], key
    assert min(len(p) for p in cached["prunes"]) >= 3  # every stream pruned (and froze summaries) several times
    s = cached["summary"]
    assert s["n_summaries_written"] == sum(len(c) + len(f) for c, f in zip(cached["closes"], cached["forced_closes"],
                                                                           strict=True))
    assert s["kept_summaries_max"] == kept
    assert s["kv_entries_per_stream_max"] <= kept * N_SUMMARY + cfg["n_transit"]


def sample_logits(model, cfg: dict, d: dict, k: int, back: int | None) -> torch.Tensor:
    """The model's logits (action, token type) at the open region k's steps of the training sample for region k."""
    b = sample(cfg, d, k, back)
    first = int(b["region_ids"][0, 0]) if back is None else max(0, k - cfg["max_regions"] + 1 - back)
    in_k = (b["type_ids"][0] == STEP) & (b["region_ids"][0] == k - first)
    with torch.no_grad():
        out = model(b)
    return torch.cat([out["logits_action"], out["logits_token_type"]], -1)[0, in_k]


@pytest.mark.parametrize("mode,max_regions,kept", [("accumulate", 2, 2), ("recurrent", 1, 1), ("accumulate", 3, 1),
                                                   ("feedback", 2, 1), ("feedback", 1, 1)])
def test_evaluation_contexts_are_training_samples(mode, max_regions, kept):
    """Each step's logits at evaluation equal the model's on the training sample (SummarySampler.put, from the same
    tokens) whose open region is that step's, wherever the sample reaches back to the stream's start."""
    model, cfg = eval_setup(mode, max_regions, kept, ["eval_prune=fixed"])
    res = run(model, cfg, True, n_episodes=4)
    d, step_region = logged_stream(res["context_log"])
    K = len(d["regions"][0])
    assert K >= 8
    for k in range(K):
        # the config's sample (summary_train_regions=0: max_summaries pruned regions) where it reaches back to region 0,
        # and for every region the sample that holds the whole stream (summary_train_regions >= k)
        reaches_start = k - max_regions + 1 <= cfg["max_summaries"]
        for back in ([None] if reaches_start else []) + [k]:
            if back is None:
                assert int(sample(cfg, d, k)["first_raw"][0]) == max(0, k - max_regions + 1)
            want = res["logits"][np.flatnonzero(step_region == k), 0]
            torch.testing.assert_close(sample_logits(model, cfg, d, k, back), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_layer,max_regions", [(4, 2), (3, 1), (2, 1)])
def test_recurrent_summary_reaches_n_layer_regions_back_and_no_further(n_layer, max_regions):
    """A summary reads the previous one's keys/values at the same layer, so a token's output at the last layer depends
    on the summary chain n_layer regions back at most (the oldest through its content-free first-layer keys): a training
    sample with `n_layer + 1 - max_regions` pruned regions computes exactly the evaluation's logits at every region of
    an evaluation however long, and one pruned region fewer does not. (docs/experiments.md E68: summary_train_regions
    beyond this changes no decision's logits; beyond n_layer, no loss at all.)"""
    model, cfg = eval_setup("recurrent", max_regions, 1, ["eval_prune=fixed", f"n_layer={n_layer}"])
    with torch.no_grad():  # larger weights: the missing key's effect far above rounding (it is ~1e-7 at init)
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(8)
    res = run(model, cfg, True, n_episodes=6)
    d, step_region = logged_stream(res["context_log"])
    K = len(d["regions"][0])
    enough = n_layer + 1 - max_regions
    assert K >= enough + max_regions + 4  # most regions lie beyond the sample's reach
    short = []
    for k in range(K):
        want = res["logits"][np.flatnonzero(step_region == k), 0]
        torch.testing.assert_close(sample_logits(model, cfg, d, k, enough), want, atol=1e-5, rtol=1e-5)
        short.append((sample_logits(model, cfg, d, k, enough - 1) - want).abs().max().item())
    assert max(short[: enough - 1 + max_regions]) < 1e-5  # a sample that still reaches region 0 is exact
    assert min(short[enough + max_regions:]) > 1e-4, short  # one region short of the chain: not the evaluation's


@pytest.mark.parametrize("mode", ["recurrent", "feedback"])
def test_only_a_feedback_memory_carries_a_region_past_n_layer_regions(mode):
    """Change the states of region 0 of a stream: a decision 3 regions later moves in feedback mode (the summary's memory
    is the last-layer state of the one before, so the chain carries it on; at random weights it fades ~10x per region),
    and not at all in recurrent mode (one region per layer: 2 layers here)."""
    model, cfg = eval_setup(mode, 1, 1, ["eval_prune=fixed"])
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4)
    d, _ = logged_stream(run(model, cfg, True, n_episodes=5)["context_log"])
    assert len(d["regions"][0]) >= 4
    other = dict(d, state_ids=d["state_ids"].copy())
    t0, t1 = d["regions"][0][0]
    other["state_ids"][t0:t1] = (other["state_ids"][t0:t1] + 7) % 81
    for k, moves in [(1, True), (3, mode == "feedback")]:
        diff = (sample_logits(model, cfg, d, k, k) - sample_logits(model, cfg, other, k, k)).abs().max().item()
        assert diff > 1e-4 if moves else diff < 1e-6, (k, diff)


def test_reach_probe_finds_the_depth_a_decision_depends_on():
    """summary.reach (probe.py --summary-reach): rounding-level distance from n_layer + 1 - max_regions pruned regions
    on, a clear one below (the same rule as the test above, measured as policies)."""
    model, cfg = eval_setup("recurrent", 1, 1, ["eval_prune=fixed", "n_layer=2"])
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(8)
    r = reach(model, cfg, [38], [0, 1, 2, 3], n_streams=2, n_episodes=5, seed=0, temperature=1.0)
    assert set(r) == {0, 1, 2, 3} and all(v["n_regions"] >= 2 * 8 for v in r.values())
    assert r[2]["max_tv"] < 1e-5 and r[3]["max_tv"] < 1e-5  # n_layer + 1 - max_regions = 2
    assert r[1]["max_tv"] > 1e-4 and r[0]["mean_tv"] > r[1]["mean_tv"]  # no summary at all is furthest


def test_kv_cache_is_bounded_over_long_evaluations():
    model, cfg = eval_setup("accumulate", 2, 2, ["eval_prune=fixed"])
    short = evaluate.run_in_context(model, cfg, [38], n_streams=1, n_episodes=5, seed=0, progress=False)
    long = evaluate.run_in_context(model, cfg, [38], n_streams=1, n_episodes=60, seed=0, progress=False)
    assert long["summary"]["n_summaries_written"] == 120 and len(long["prunes"][0]) == 119
    assert long["summary"]["kv_entries_per_stream_max"] == short["summary"]["kv_entries_per_stream_max"]
    assert long["summary"]["kv_slots_per_stream"] == short["summary"]["kv_slots_per_stream"]
    s = evaluate.summarize(long, [38], cfg)
    assert s["summary"]["kv_entries_per_stream_max"] <= 2 * N_SUMMARY + cfg["n_transit"]


# ---- 3. config checks -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    (["use_compressed_context=false"], "use_summary=true needs use_compressed_context=true"),
    (["n_summary=0"], "use_summary=true needs n_summary>=1"),
    (["summary_mode=memo"], "summary_mode must be one of accumulate, recurrent, feedback"),
    (["summary_mode=recurrent", "max_summaries=3"], "set max_summaries=1"),
    (["summary_mode=feedback", "max_summaries=2"], r"set max_summaries=1 \(feedback keeps one summary\)"),
    (["summary_mode=accumulate", "max_summaries=3", "summary_train_regions=2"], "summary_train_regions=2 must be 0"),
    (["n_transit=165"], "set n_transit>=167"),
])
def test_inconsistent_summary_settings_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(ROOT / "config" / "model" / "ad_dr_summary.yaml", overrides)


# ---- 4. a memory task that pruning cannot solve ------------------------------------------------------------------
def cue_task(n: int, seed: int, steps: int = 6) -> list[dict]:
    """Streams of two regions: every step of region 0 is at cell `cue` (0..4), every step of region 1 at a random cell
    >= 5, where the action to imitate is `cue`. With one raw region in context, only region 0's summary can tell."""
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        d = stream(2, steps, int(g.integers(1 << 30)))
        cue = int(g.integers(5))
        d["state_ids"][:steps, 0] = cue
        d["state_ids"][steps:, 0] = g.integers(5, 81, steps)
        d["actions"][steps:, 0] = cue
        out.append(d)
    return out


def cue_batch(cfg, data: list[dict], back: int) -> dict:
    s = SummarySampler({0: data[0]}, cfg, len(data), seed=0)
    b = s.empty(len(data), back)
    length = max(s.put(b, i, d, 0, 1, back) for i, d in enumerate(data))
    return {k: torch.from_numpy(np.ascontiguousarray(v[:, :length]) if k not in ("first_raw", "n_regions", "region_lens")
                                else v) for k, v in b.items()}


def train_on_cue_task(back: int) -> float:
    """Train on the cue task with `back` pruned regions in front of each sample (0: pruning only); return the held-out
    accuracy on region 1's actions."""
    cfg = sampler_cfg(max_regions=1, kept=1, n_transit=12)
    model = model_for(cfg, seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(150):
        loss = model(cue_batch(cfg, cue_task(64, seed=step), back))["loss_action"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(model.eval()(cue_batch(cfg, cue_task(256, seed=10_000), back))["acc_action"])


def test_tiny_model_remembers_a_cue_from_a_pruned_region_only_with_summaries():
    with_summaries, pruning_only = train_on_cue_task(back=1), train_on_cue_task(back=0)
    assert with_summaries >= 0.95, with_summaries
    assert pruning_only <= 0.35, pruning_only  # chance is 0.2
