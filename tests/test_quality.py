"""The compression-quality sweep: the study arms compressed-summary, standard-<80 k> and compressed-r<m> and
their refusals; the KV entries per stream every evaluation records (known values on fixed-rhythm contexts); and the
quality points (return against KV entries, one per arm) on synthetic results with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_script

import evaluate
import study
from common import ENV_CONFIGS, ROOT, UserError, load_config, min_summary_context
from model import AD, ADConfig

TINY = ["d_model=16", "n_layer=2", "n_head=2", "n_steps=10", "compress_interval=10", "eval_streams=2"]


# ---- KV entries per stream ----------------------------------------------------------------------------------------
# 5 episodes of 20 steps, regions / rollouts of 10 steps, fixed pruning so that every context length is known:
# - standard, n_transit=40, shift 20: lengths 1..40, then 21..40 three times: max 40, mean (820 + 3 x 610) / 100;
# - compressed, 2 regions: C r (2..11), C r E C r (14..23) for the 9 later regions: mean (65 + 9 x 185) / 100;
# - summaries (2 tokens, 2 kept groups, 2 raw regions): 2..11, then C r E S S C r (16..25), then + 2 and + 4 kept
#   summary tokens (18..27, then 20..29 for the 7 last regions): mean (65 + 205 + 225 + 7 x 245) / 100.
KV_CASES = {
    "standard": ("ad_dr.yaml", ["n_transit=40", "eval_window_shift=20"], 40, (820 + 3 * 610) / 100),
    "compressed": ("ad_dr_compressed.yaml", ["n_transit=24", "eval_prune=fixed"], 23, (65 + 9 * 185) / 100),
    "summary": ("ad_dr_summary.yaml", ["n_transit=30", "eval_prune=fixed", "summary_mode=accumulate", "n_summary=2",
                                       "max_summaries=2"], 29,
                (65 + 205 + 225 + 7 * 245) / 100),
}


@pytest.mark.parametrize("mode", sorted(KV_CASES))
def test_every_mode_records_its_kv_entries_per_stream(mode):
    name, over, kv_max, kv_mean = KV_CASES[mode]
    cfg = load_config(ROOT / "config" / "model" / name, TINY + over)
    torch.manual_seed(0)
    model = AD(ADConfig.from_dict(cfg)).eval()
    for use_cache in (True, False):  # the uncached reference holds the same context
        res = evaluate.run_in_context(model, cfg, [38, 51], n_streams=2, n_episodes=5, seed=0, use_cache=use_cache,
                                      progress=False)
        kv = res["kv_cache"]
        assert kv["kv_entries_per_stream_max"] == kv_max and kv["kv_entries_per_stream_mean"] == pytest.approx(kv_mean)
        assert kv["kv_entries_per_stream_max"] <= kv["kv_slots_per_stream"]
    s = evaluate.summarize(res, [38, 51], cfg)
    assert s["kv_cache"] == kv
    if mode == "summary":  # the summary statistics say the same
        assert s["summary"]["kv_entries_per_stream_max"] == kv_max and s["summary"]["n_summaries_written"] == 2 * 2 * 10
    json.dumps(s)


# ---- arms ---------------------------------------------------------------------------------------------------------
def test_sweep_arms_map_to_their_configs_on_every_env():
    arms = "compressed-summary,standard-80,standard-320,compressed-r1,compressed-r3"
    assert study.parse_arms(arms) == arms.split(",")
    assert study.ARMS == ("standard-240", "standard-160", "compressed", "compressed-fixed")  # the default is unchanged
    for env in ENV_CONFIGS:
        n = load_config(study.env_configs(env)["collect"])["n_steps"]
        config, over = study.train_config("compressed-summary", 2, [], env)
        assert config.name == study.env_configs(env)["compressed"].name.replace("_compressed", "_summary")
        cfg = load_config(config, over)
        assert cfg["use_summary"] and cfg["use_compressed_context"] and cfg["seed"] == 2
        assert {k for k in cfg if cfg[k] != load_config(config)[k]} == {"seed"}  # the config as it is
        for k in (1, 2, 3, 4):  # FIFO windows of k rollouts, shifted by one
            c = load_config(*study.train_config(f"standard-{80 * k}", 0, [], env))
            assert not c["use_compressed_context"] and c["n_transit"] == k * n and c["eval_window_shift"] == n
        compressed = load_config(study.env_configs(env)["compressed"])
        for m in (1, 2, 3):  # the env's own m reproduces its compressed config's n_transit
            c = load_config(*study.train_config(f"compressed-r{m}", 0, [], env))
            assert c["max_regions"] == m and c["n_transit"] == m * (n + 2) + 4 and c["use_compressed_context"]
            if m == compressed["max_regions"]:
                assert c["n_transit"] == compressed["n_transit"]
    for arm in ("compressed-summary", "compressed-r1", "standard-80"):
        assert study.checkpoint_of(arm) == arm and study.run_dir_of(study.Path("r"), arm, 1).name == f"{arm}-seed1"
        study.color_of(arm)
    assert study.eval_prune_of("compressed-summary") == study.eval_prune_of("compressed-r3") == "model"
    assert study.eval_prune_of("standard-80") is None
    assert ("compressed-summary", "compressed") in study.comparison_pairs(["compressed", "compressed-summary"])


def test_summary_back_arms_train_the_summary_config_deeper_on_every_env():
    """compressed-summary-back<b>: the env's summary config with summary_train_regions=b and nothing else changed, its own
    run dir, evaluated with the model's </compress> and compared with compressed-summary and compressed."""
    assert study.parse_arms("compressed-summary,compressed-summary-back6") == ["compressed-summary",
                                                                                "compressed-summary-back6"]
    for env in ENV_CONFIGS:
        base = load_config(*study.train_config("compressed-summary", 1, [], env))
        cfg = load_config(*study.train_config("compressed-summary-back6", 1, [], env))
        assert {k for k in cfg if cfg[k] != base[k]} == {"summary_train_regions"} and cfg["summary_train_regions"] == 6
    assert study.run_dir_of(study.Path("r"), "compressed-summary-back6", 2).name == "compressed-summary-back6-seed2"
    assert study.eval_prune_of("compressed-summary-back6") == "model"
    assert study.color_of("compressed-summary-back6") != study.color_of("compressed-summary-back5")
    pairs = study.comparison_pairs(["compressed", "compressed-summary", "compressed-summary-back6"])
    assert {("compressed-summary-back6", "compressed-summary"), ("compressed-summary-back6", "compressed")} <= set(pairs)
    study.check_arms("darkroom_permuted", ["compressed-summary-back6"], [])
    with pytest.raises(UserError, match=r"^--arms: compressed-summary-back3 is the compressed-summary arm on darkroom "
                                        r"\(summary_train_regions=3 in ad_dr_summary.yaml\); use compressed-summary$"):
        study.check_arms("darkroom", ["compressed-summary-back3"], [])
    with pytest.raises(UserError, match="^summary_train_regions=2 must be 0 .* or >= max_summaries=3"):  # the config's rule
        study.check_arms("darkroom", ["compressed-summary-back2"], ["summary_mode=accumulate", "max_summaries=3"])


def test_summary_regions_arms_keep_more_raw_regions_on_every_env():
    """compressed-summary-r<m>: the env's summary config with max_regions=m and n_transit sized for m raw regions (and
    nothing else changed), which its sampler accepts; compared with compressed-summary and compressed."""
    for env in ENV_CONFIGS:
        base = load_config(*study.train_config("compressed-summary", 1, [], env))
        cfg = load_config(*study.train_config("compressed-summary-r3", 1, [], env))
        assert {k for k in cfg if cfg[k] != base[k]} == {"max_regions", "n_transit"} and cfg["max_regions"] == 3
        # as the env's summary config sizes its 2 regions: the positions of C r E S^n ... C r plus 5 of slack
        need = min_summary_context(cfg["n_steps"], 3, cfg["n_summary"])
        assert cfg["n_transit"] == need + 5 and base["n_transit"] == min_summary_context(base["n_steps"], 2, 4) + 5
    assert study.eval_prune_of("compressed-summary-r3") == "model" and study.checkpoint_of("compressed-summary-r3") == (
        "compressed-summary-r3")
    assert study.color_of("compressed-summary-r3") != study.color_of("compressed-summary-r4")
    pairs = study.comparison_pairs(["compressed", "compressed-summary", "compressed-summary-r3"])
    assert {("compressed-summary-r3", "compressed-summary"), ("compressed-summary-r3", "compressed")} <= set(pairs)
    study.check_arms("darkroom_permuted", ["compressed-summary-r3"], [])
    with pytest.raises(UserError, match=r"^--arms: compressed-summary-r2 is the compressed-summary arm on darkroom_permuted "
                                        r"\(max_regions=2 in ad_dp_summary.yaml\); use compressed-summary$"):
        study.check_arms("darkroom_permuted", ["compressed-summary-r2"], [])


@pytest.mark.parametrize("arm", ["compressed-r0", "standard-100", "standard-0", "compressed-summaries", "standard",
                                 "compressed-summary-back0", "compressed-summary-r0"])
def test_bad_arm_names_are_refused_in_one_line(arm):
    with pytest.raises(UserError) as e:
        study.parse_arms(f"compressed,{arm}")
    assert str(e.value).startswith(f"--arms: {arm} is not one of ") and "compressed-r<m>" in str(e.value)
    assert "\n" not in str(e.value)


def test_arms_that_do_not_fit_the_env_are_refused(tmp_path, monkeypatch):
    study.check_arms("darkroom", ["compressed-r1", "compressed-r3", "compressed-summary", "standard-80"], [])
    study.check_arms("dark_key_to_door", ["compressed-r2"], [])
    for env, arm, m in (("darkroom", "compressed-r2", 2), ("dark_key_to_door", "compressed-r3", 3)):
        with pytest.raises(UserError, match=f"^--arms: {arm} is the compressed arm on {env} \\(max_regions={m} in "):
            study.check_arms(env, [arm], [])
    with pytest.raises(UserError, match="^arm compressed-adaptive exists for darkroom only, not darkroom_permuted; drop it"):
        study.check_arms("darkroom_permuted", ["compressed-adaptive"], [])
    for env in ("darkroom", "dark_key_to_door", "darkroom_permuted"):  # its own source, the env's compressed model
        collect, model = study.arm_configs(env, "compressed-eps")
        c, m = load_config(collect), load_config(model)
        assert c["alg"] == m["alg"] == "searcher-eps" and c["env"] == m["env"] == env
        compressed = load_config(study.env_configs(env)["compressed"])
        assert m["use_compressed_context"] and m["max_regions"] == compressed["max_regions"]
        assert m["n_steps"] == compressed["n_steps"] and m["train_timesteps"] == compressed["train_timesteps"]
    assert study.eval_prune_of("compressed-eps") == "model"
    compressed = tmp_path / "ad_xx_compressed.yaml"  # an env whose summary config does not exist
    compressed.write_text((ROOT / "config" / "model" / "ad_dr_compressed.yaml").read_text().replace(
        "include: ad_dr.yaml", f"include: {ROOT / 'config' / 'model' / 'ad_dr.yaml'}"))
    real = study.env_configs
    monkeypatch.setattr(study, "env_configs", lambda env: real("darkroom") | {"compressed": compressed})
    with pytest.raises(UserError, match=r"^arm compressed-summary has no config for xx \(config/model/ad_xx_summary.yaml "):
        study.check_arms("xx", ["compressed-summary"], [])


def test_the_study_refuses_an_arm_that_is_the_compressed_arm(tmp_path):
    bad = run_script("study.py", "--runs-root", str(tmp_path), "--arms", "compressed,compressed-r2", check=False)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == [
        "error: --arms: compressed-r2 is the compressed arm on darkroom (max_regions=2 in ad_dr_compressed.yaml); use "
        "compressed"]
    assert not any(tmp_path.iterdir())  # nothing written


# ---- quality points, the KV column and the summaries in the report --------------------------------------------------
def row(mean: float, ci: tuple[float, float], last: float | None = None) -> dict:
    last = mean if last is None else last
    return {"all": {"mean": mean, "ci": list(ci)}, "last": {"mean": last, "ci": [last, last]}}


def test_quality_points_on_synthetic_results():
    summary = {"standard-240": row(0.9, (0.85, 0.95)), "standard-80": row(0.5, (0.4, 0.6), last=0.55),
               "compressed": row(0.9, (0.88, 0.92)), "compressed-summary": row(0.95, (0.9, 1.0), last=1.0),
               "searcher": row(1.0, (1.0, 1.0))}
    kv = {"standard-240": {"max": 240, "mean": 200}, "standard-80": {"max": 80, "mean": 40.5},
          "compressed": {"max": 168, "mean": 120}, "compressed-summary": {"max": 180, "mean": 150}}
    q = study.quality_points(summary, kv)
    assert [p["arm"] for p in q["points"]] == ["standard-80", "compressed", "compressed-summary", "standard-240"]
    p = {p["arm"]: p for p in q["points"]}
    assert p["compressed"]["return_per_kv_entry"] == pytest.approx(0.9 / 168) and p["compressed"]["ci"] == [0.88, 0.92]
    assert p["standard-80"]["kv_entries_mean"] == 40.5
    assert q["best_per_entry"] == "standard-80"  # 0.5 / 80 > 0.9 / 168 > 0.95 / 180
    # standard-240 is dominated by compressed (as high, fewer entries); every other arm is on the front
    assert {a for a, x in p.items() if x["pareto"]} == {"standard-80", "compressed", "compressed-summary"}
    assert q["missing"] == ["searcher"] and q["window"] == "all"
    last = study.quality_points(summary, kv, "last")
    assert {x["arm"]: x["mean"] for x in last["points"]}["compressed-summary"] == 1.0
    assert study.quality_points(summary, {})["best_per_entry"] is None


def test_arm_kv_leaves_out_arms_without_sizes():
    side = {"a": {"kv_max": [80.0, 79.0], "kv_mean": [40.0, 41.0]}, "old": {"kv_max": [np.nan], "kv_mean": [np.nan]},
            "searcher": {"seconds": [1.0]}}
    assert study.arm_kv(side) == {"a": {"max": 80.0, "mean": 40.5}}


def test_compute_statistics_puts_the_kv_column_and_quality_points_in_the_report(tmp_path):
    opt = np.array([10.0, 20.0])

    def constant(frac: float, n_seeds: int = 2) -> np.ndarray:
        return np.broadcast_to(frac * opt[None, :, None, None], (n_seeds, 2, 3, 20)).copy()

    returns = {"standard-80": constant(0.5), "compressed": constant(0.9), "compressed-summary": constant(0.95),
               "searcher": constant(1.0, 1)}
    side = {"standard-80": {"seconds": [1.0], "n_closes": 0, "n_forced_closes": 0, "kv_max": [80.0], "kv_mean": [40.5]},
            "compressed": {"seconds": [1.0], "n_closes": 5, "n_forced_closes": 0, "kv_max": [168.0], "kv_mean": [120.0]},
            "compressed-summary": {"seconds": [1.0], "n_closes": 5, "n_forced_closes": 1, "kv_max": [180.0],
                                   "kv_mean": [150.0],
                                   "summary": {"summary_mode": "accumulate", "n_summary": 4, "max_summaries": 3,
                                               "n_evaluations": 2, "n_summaries_written": 60,
                                               "summary_tokens_written": 240, "summaries_written_per_stream": 5.0,
                                               "kept_summaries_max": 3}},
            "searcher": {"seconds": [1.0]}}
    stats = study.compute_statistics(returns, opt, constant(0.5, 1), reps=50, kv=study.arm_kv(side))
    q = stats["quality"]["all"]
    assert [(p["arm"], p["kv_entries"]) for p in q["points"]] == [("standard-80", 80), ("compressed", 168),
                                                                  ("compressed-summary", 180)]
    assert [p["mean"] for p in q["points"]] == pytest.approx([0.5, 0.9, 0.95])
    assert q["best_per_entry"] == "standard-80" and q["missing"] == ["searcher"]
    meta = {"goals": [38, 51], "opt": opt, "seeds": [0, 1], "eval_seeds": [0], "episodes": 20, "reps": 50,
            "windows": study.arm_windows({"n_steps": 80}, list(returns), 2, side["compressed-summary"]["summary"]),
            "temps": {"standard-80": 0.5, "compressed": 0.5, "compressed-summary": 1.0, "searcher": None},
            "train": {}, "side": side}
    assert "standard-80: a window of 1 rollout = 80 steps" in meta["windows"]
    md = study.render_markdown(stats, meta)
    lines = md.splitlines()
    assert "| KV entries / stream (max / mean) |" in md
    assert next(x for x in lines if x.startswith("| standard-80 | 0.5 |")).endswith("| 80 / 40.5 |")
    assert next(x for x in lines if x.startswith("| searcher | - |")).endswith("| - |")
    assert "| compressed-summary | 180 (150.0) | 0.950 [0.950, 0.950] | 0.950 [0.950, 0.950] | 0.528 | yes |" in lines
    assert "Most return per KV entry: standard-80 over all episodes, standard-80 over the last episodes" in md
    assert "60 written over 2 evaluations (5.0 per stream, 240 tokens)" in md and "![compression quality](quality.png)" in md
    report = json.loads(json.dumps(study.report_json(stats, meta)))
    assert report["kv_cache"]["compressed"] == {"max": 168.0, "mean": 120.0} and "searcher" not in report["kv_cache"]
    assert report["summary"] == {"compressed-summary": side["compressed-summary"]["summary"]}
    assert report["quality"]["all"]["best_per_entry"] == "standard-80"
    assert "compressed-summary vs compressed" in report["paired_differences"]
    study.plot_quality(stats, tmp_path / "quality.png")
    assert (tmp_path / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_load_returns_carries_kv_and_summaries_and_reads_older_evaluations(tmp_path):
    """An evaluation saved before KV sizes were recorded loads with NaN sizes (the arm leaves the quality plot)."""
    base = {"returns": np.zeros((2, 3, 4), np.int16), "goals": np.array([38, 51]), "seconds": 1.0, "n_forced_closes": 0,
            "n_closes": 2, "precision_compress_end": 1.0, "recall_compress_end": 1.0, "weights_sha256": "x"}
    summ = {"summary_n_summary": 4, "summary_max_summaries": 3, "summary_mode": "accumulate"}
    (tmp_path / "evals").mkdir()
    for seed, e, mx, written, kept in ((0, 0, 30, 12, 2), (0, 1, 31, 10, 3)):
        extra = {"kv_entries_max": mx, "kv_entries_mean": 20.0, **summ, "summary_n_summaries_written": written,
                 "summary_summary_tokens_written": 4 * written, "summary_kept_summaries_max": kept}
        np.savez(study.eval_path(tmp_path, "compressed-summary", seed, "test", 0.5, e, 4), **base, **extra)
        np.savez(study.eval_path(tmp_path, "compressed", seed, "test", 0.5, e, 4), **base)  # saved before
    R, side = study.load_returns(tmp_path, "compressed-summary", [0], "test", 0.5, [0, 1], 4)
    assert R.shape == (1, 2, 6, 4) and side["kv_max"] == [30.0, 31.0]
    assert side["summary"] == {"summary_mode": "accumulate", "n_summary": 4, "max_summaries": 3, "n_evaluations": 2,
                               "n_summaries_written": 22, "summary_tokens_written": 88,
                               "summaries_written_per_stream": 22 / 12, "kept_summaries_max": 3}
    _, old = study.load_returns(tmp_path, "compressed", [0], "test", 0.5, [0, 1], 4)
    assert "summary" not in old and study.arm_kv({"compressed": old}) == {}
