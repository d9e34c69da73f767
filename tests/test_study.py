"""study.py end to end on a tiny history: every arm x seed trained, tuned on validation goals, evaluated on the test
goals with every evaluation seed, and a report whose numbers are those of the saved evaluations."""

import json

import numpy as np
import pytest
from conftest import TINY_COLLECT, run_script

import study
import study_stats as st
from common import ENV_CONFIGS, env_configs, load_config
from env import optimal_return, task_split

TINY = ["d_model=16", "n_layer=1", "n_head=2", "train_batch_size=4", "train_timesteps=4", "log_interval=2", "val_interval=2",
        "val_batches=1", "ckpt_interval=2", "warmup_steps=2", "eval_episodes=4", "eval_streams=2", "val_episodes=2",
        "compress_interval=20", "n_transit=48"]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("study")
    data = [*TINY_COLLECT, f"traj_dir={root / 'data'}"]
    cfg = load_config("config/model/ad_dr.yaml", data + TINY)
    goals = task_split(cfg, "train")[:2] + task_split(cfg, "val") + task_split(cfg, "test")
    run_script("collect.py", "--goals", ",".join(map(str, goals)), *data)
    args = ["--runs-root", str(root / "study"), "--seeds", "0,1", "--eval-seeds", "0,1", "--temperatures", "0.5,1.0",
            "--tune-episodes", "3", "--reps", "200", *data, *TINY]
    proc = run_script("study.py", *args, timeout=600)
    return {"root": root / "study", "proc": proc, "args": args, "cfg": cfg}


def table_of(tuning: dict, arm: str) -> dict:
    """An arm's validation row at its chosen temperature."""
    return tuning["val_table"][arm][f"{tuning['temperatures'][arm]:g}"]


def test_study_trains_tunes_evaluates_and_reports(tiny_study):
    root, out = tiny_study["root"], tiny_study["proc"].stdout
    assert "skip collection" in out
    arms = ("standard-240", "standard-160", "compressed", "compressed-fixed")
    for arm in ("standard-240", "standard-160", "compressed"):  # compressed-fixed evaluates compressed's checkpoint
        for seed in (0, 1):
            assert json.loads((root / "runs" / f"{arm}-seed{seed}" / "train_summary.json").read_text())["steps"] == 4
    assert not (root / "runs" / "compressed-fixed-seed0").exists()
    cfg_std = json.loads((root / "runs" / "standard-160-seed0" / "train_summary.json").read_text())
    assert cfg_std["num_processes"] == 1
    tuning = json.loads((root / "tuning.json").read_text())
    assert set(tuning["temperatures"]) == set(arms) and set(tuning["temperatures"].values()) <= {0.5, 1.0}
    for arm in arms:  # the chosen temperature: no more stranded runs than the grid's fewest (+ slack), then the best tail
        table = tuning["val_table"][arm]
        eligible = {t: v["mean_last"] for t, v in table.items() if v["eligible"]}
        floor = min(v["never_frac"] for v in table.values())
        assert all(v["eligible"] == (v["never_frac"] <= floor + tuning["never_slack"] + 1e-12) for v in table.values())
        assert f"{tuning['temperatures'][arm]:g}" == max(eligible, key=eligible.get)
        lo, hi = tuning["val_last_ci"][arm]  # the chosen temperature's last-window mean, inside its interval
        assert lo <= table[f"{tuning['temperatures'][arm]:g}"]["mean_last"] <= hi
    # the arms' paired validation differences at their temperatures, for the study's pairs
    assert set(tuning["val_pairs"]) == {f"{a} - {b}" for a, b in study.comparison_pairs(list(arms))}
    for a_b, d in tuning["val_pairs"].items():
        a, b = a_b.split(" - ")
        want = table_of(tuning, a)["mean_last"] - table_of(tuning, b)["mean_last"]
        assert d["mean_diff"] == pytest.approx(want) and d["ci"][0] <= d["mean_diff"] <= d["ci"][1]
    report = json.loads((root / "report.json").read_text())
    assert report["goals"] == [38, 51, 62, 65, 33, 5, 53, 49] and report["seeds"] == [0, 1]
    # the report's numbers are those of the saved test evaluations
    opt = np.array([optimal_return(g) for g in report["goals"]], dtype=float)
    for arm in arms:
        T = tuning["temperatures"][arm]
        per_seed = []
        for seed in (0, 1):
            parts = [np.load(root / "evals" / f"{arm}-seed{seed}-test-T{T:g}-e{e}-n4.npz")["returns"] for e in (0, 1)]
            assert all(p.shape == (8, 2, 4) for p in parts)  # goals x streams x episodes
            per_seed.append(np.concatenate(parts, axis=1))
        R = np.stack(per_seed).astype(float)
        assert report["aggregate"][arm]["mean"] == pytest.approx(st.run_scores(R, opt).mean())
        lo, hi = report["aggregate"][arm]["mean_ci"]
        assert lo <= report["aggregate"][arm]["mean"] <= hi
    assert set(report["probability_of_improvement"]) == {"compressed vs standard-240", "compressed vs standard-160",
                                                         "compressed vs compressed-fixed", "standard-160 vs standard-240"}
    md = (root / "report.md").read_text()
    for phrase in ("| arm | T (val) | runs | first 10 | first 50 | all episodes | last | episodes to 90 % (median) | speed-up "
                   "over PPO |", "## Comparisons", "includes 0", "Source PPO on the same goals", "pools its 4 streams"):
        assert phrase in md
    assert set(report["speedup_over_ppo"]) == set(arms) and report["ppo_streams"] == 4
    for png in ("learning_curves.png", "aggregates.png"):
        assert (root / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_study_rerun_skips_finished_work(tiny_study):
    timing = tiny_study["root"] / "timing.json"
    first = json.loads(timing.read_text())
    assert first["trained_runs"] == 6 and first["evaluations_run"] == 32
    out = run_script("study.py", *tiny_study["args"]).stdout
    assert out.count("skip training") == 6
    assert "tune on the validation goals: 16 evaluations done before, 0 to run" in out
    assert "test evaluation: 16 evaluations done before, 0 to run" in out
    assert "nothing trained or evaluated: kept" in out and json.loads(timing.read_text()) == first  # the real timings stay


def test_study_refuses_a_finished_run_of_another_config(tiny_study):
    """A changed training key must not silently reuse the old run's weights: the rerun names the key and stops."""
    args = [a if a != "warmup_steps=2" else "warmup_steps=3" for a in tiny_study["args"]]
    bad = run_script("study.py", *args, check=False)
    assert bad.returncode != 0 and "was trained with warmup_steps=2, not 3; move it away" in bad.stderr
    assert bad.stderr.strip().count("\n") == 0  # one line


def test_an_evaluation_with_no_boundary_grid_saves_and_loads_without_pickle(tiny_study, monkeypatch, tmp_path):
    """With per-task rollout lengths there is no n_steps grid, so evaluate reports the boundary precision as None;
    the study's .npz must still hold plain numbers (NaN), or reading it back fails."""
    import evaluate
    import study

    real = evaluate.summarize

    def without_grid(res, goals, cfg):
        s = real(res, goals, cfg)
        s["compression"].update(precision_compress_end=None, recall_compress_end=None)
        return s

    monkeypatch.setattr(evaluate, "summarize", without_grid)
    spec = study.eval_spec(tiny_study["root"], "compressed", 0, "val", 1.0, 1000, 2, [])
    np.savez(tmp_path / "e.npz", **study._evaluate(spec))
    z = np.load(tmp_path / "e.npz")  # allow_pickle=False
    assert np.isnan(z["precision_compress_end"]) and np.isnan(z["recall_compress_end"]) and z["returns"].shape[-1] == 2


def test_study_refuses_bad_arguments(tmp_path):
    bad = run_script("study.py", "--runs-root", str(tmp_path), "--arms", "compressed,everything", check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --arms: everything is not one of standard-240, standard-160, compressed, compressed-fixed, compressed-adaptive, "
        "compressed-eps, "
        "dpt, searcher, ppo, source-eps, compressed-summary, compressed-summary-accumulate, compressed-summary-feedback, "
        "compressed-stride<s> (s >= 2; "
        "compressed is stride 1), compressed-stride<s>-any (s >= 1), compressed-eps-stride<s> (s >= 2; compressed-eps is "
        "stride 1), compressed-r<m> (m >= 1 regions), compressed-summary-back<b> (b >= 1 pruned regions in front of a training "
        "sample), compressed-summary-r<m> (m >= 1 raw regions), standard-<w> (w = 80 k: a window of k >= 1 rollouts)"]
    bad = run_script("study.py", "--runs-root", str(tmp_path), "--arms", "compressed-stride1", check=False)
    assert bad.returncode == 2 and "compressed-stride1 is not one of" in bad.stderr
    assert not any(tmp_path.iterdir())  # nothing written
    bad = run_script("study.py", "--runs-root", str(tmp_path), "--eval-seeds", "0,1000", check=False)
    assert "may not include 1000" in bad.stderr
    bad = run_script("study.py", "--runs-root", str(tmp_path), "eval_close_threshold=0.1", check=False)
    assert bad.returncode != 0 and bad.stderr.strip() == (
        "error: eval_close_threshold is set by the study itself (per arm, --temperatures, --eval-seeds), not by an "
        "override; evaluate a run with evaluate.py to try another value")
    bad = run_script("study.py", "--runs-root", str(tmp_path), "eval_first_region=40", check=False)
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error: eval_first_region is set by the study itself")
    assert not any(tmp_path.iterdir())


# What may differ between an env's standard and compressed model configs: the context itself, the run's name and the
# sampling temperature (the study tunes it per arm on validation goals). Anything else (data, filter, budget, model size,
# evaluation protocol) differing would make the study compare more than the context.
MODE_KEYS = {"use_compressed_context", "n_transit", "max_regions", "run_name", "eval_temperature"}


@pytest.mark.parametrize("env", sorted(ENV_CONFIGS))
def test_both_modes_of_every_env_train_and_evaluate_alike(env):
    configs = env_configs(env)
    standard, compressed = load_config(configs["standard"]), load_config(configs["compressed"])
    differ = {k for k in standard.keys() | compressed.keys() if standard.get(k) != compressed.get(k)}
    assert differ <= MODE_KEYS, f"{env}: the two modes' configs also differ in {sorted(differ - MODE_KEYS)}"
    assert standard["use_compressed_context"] is False and compressed["use_compressed_context"] is True
    assert standard["env"] == compressed["env"] == env


def test_evaluations_pass_eval_cache_on(monkeypatch):
    """study.py accepts eval_cache=...: _evaluate must hand it to run_in_context (it used to drop it)."""
    import evaluate
    import study

    seen = {}
    cfg = load_config("config/model/ad_dr.yaml", ["eval_episodes=2", "eval_streams=1"])

    def fake_run(model, cfg, goals, **kw):
        seen.update(kw)
        return {"returns": np.zeros((len(goals), 1, 2))}

    for cache in (False, True):
        monkeypatch.setattr(evaluate, "load_run", lambda run_dir, over, device, c=cache: (None, {**cfg, "eval_cache": c}))
        monkeypatch.setattr(evaluate, "run_in_context", fake_run)
        monkeypatch.setattr(evaluate, "summarize", lambda res, goals, cfg: {})
        study._evaluate({"run_dir": "unused", "overrides": [f"eval_cache={str(cache).lower()}"], "split": "test"})
        assert seen["use_cache"] is cache


def test_new_arms_train_evaluate_and_name_their_configs():
    import study

    assert study.parse_arms("compressed,compressed-stride2,dpt,searcher,ppo") == [
        "compressed", "compressed-stride2", "dpt", "searcher", "ppo"]
    assert all(a not in study.ARMS for a in ("dpt", "searcher", "ppo", "compressed-stride2"))  # the default is unchanged
    config, over = study.train_config("compressed-stride3", 1, ["lr=0.002"], "darkroom")
    cfg = load_config(config, over)
    assert cfg["region_stride"] == 3 and cfg["use_compressed_context"] and cfg["seed"] == 1 and cfg["lr"] == 0.002
    assert study.run_dir_of(study.Path("r"), "compressed-stride3", 1).name == "compressed-stride3-seed1"
    assert "eval_prune=model" in study.eval_spec(study.Path("r"), "compressed-stride3", 0, "val", 0.5, 1000, 4, [])["overrides"]
    # -any: the same stride with the one-region samples drawn from the whole history; stride 1 allowed, compared pairwise
    any_arms = ["compressed-stride1-any", "compressed-stride2-any"]
    assert study.parse_arms(",".join(any_arms)) == any_arms
    for arm, stride in (("compressed-stride1-any", 1), ("compressed-stride2-any", 2)):
        cfg = load_config(*study.train_config(arm, 0, [], "darkroom"))
        assert cfg["region_stride"] == stride and cfg["first_region_any"] and study.is_trained(arm)
    assert not load_config(*study.train_config("compressed-stride2", 0, [], "darkroom"))["first_region_any"]
    arms = ["compressed", "compressed-stride2", "compressed-stride4", *any_arms, "compressed-stride4-any", "dpt", "searcher"]
    assert len({study.color_of(a) for a in arms}) == len(arms)  # each arm its own colour on the curves
    assert study.comparison_pairs(["compressed", "compressed-stride2", "compressed-stride2-any", "compressed-stride1-any"]) == [
        ("compressed-stride2", "compressed"), ("compressed-stride2-any", "compressed"), ("compressed-stride1-any", "compressed"),
        ("compressed-stride2-any", "compressed-stride2")]
    assert not study.is_trained("searcher") and not study.is_trained("ppo") and study.is_trained("dpt")
    # the dpt arm is config/model/ad_dr_dpt.yaml (standard-240's model and window, oracle targets) on Darkroom
    dpt = load_config(*study.train_config("dpt", 0, [], "darkroom"))
    assert dpt["target"] == "oracle" and not dpt["use_compressed_context"]
    ref = load_config("config/model/ad_dr_dpt.yaml")
    assert {k for k in dpt.keys() | ref.keys() if dpt.get(k) != ref.get(k)} == {"run_name"}
    for env in ENV_CONFIGS:  # and on every env: standard-240 with oracle targets
        std = load_config(*study.train_config("standard-240", 0, [], env))
        d = load_config(*study.train_config("dpt", 0, [], env))
        assert {k for k in d if d[k] != std[k]} == {"target"}


def jump_returns(opt, js, n_seeds, n_episodes):
    """Synthetic returns [seeds, goals, streams, episodes]: stream k scores 0, then each goal's optimum from episode js[k]
    on (its 10-episode moving average is at 90 % at js[k] + 8)."""
    R = np.zeros((n_seeds, len(opt), len(js), n_episodes))
    for k, j in enumerate(js):
        R[:, :, k, j:] = opt[None, :, None]
    return R


def test_statistics_are_apart_from_rendering_on_synthetic_returns():
    """compute_statistics is pure (returns in, numbers out) and render_markdown only formats them: on runs that jump to
    the optimum at known episodes, the table holds the known first-10 mean, episodes to 90 % and speed-up."""
    import study

    opt = np.array([10.0, 20.0])

    def jumps(js, n_seeds, n_episodes):
        return jump_returns(opt, js, n_seeds, n_episodes)

    returns = {"compressed": jumps([0, 0, 0, 0], 2, 40), "standard-240": jumps([0, 5, 5, 5], 2, 40),
               "ppo": jumps([20, 20, 20, 30], 1, 52)}
    stats = study.compute_statistics(returns, opt, returns["ppo"], reps=50)
    s = stats["summary"]
    assert s["compressed"]["first10"]["mean"] == 1.0 and s["standard-240"]["first10"]["mean"] == pytest.approx(0.625)
    assert s["compressed"]["to_threshold"]["median"] == 9 and s["standard-240"]["to_threshold"]["median"] == 13
    assert s["ppo"]["to_threshold"]["median"] == 28 and s["ppo"]["last_episodes"] == 10
    assert stats["speedup"]["compressed"]["ratio"] == pytest.approx(29 / 10)
    assert stats["speedup"]["ppo"]["ratio"] == 1.0
    assert set(stats["paired_differences"]) == {"compressed vs standard-240"}  # the reference arm is in no pair
    meta = {"goals": [38, 51], "opt": opt, "seeds": [0, 1], "eval_seeds": [0], "episodes": 40, "reps": 50,
            "windows": "Arms: ...", "temps": {"compressed": 0.5, "standard-240": 1.0, "ppo": None},
            "train": {}, "side": {a: {"seconds": [1.0], "n_closes": 0, "n_forced_closes": 0} for a in returns}}
    md = study.render_markdown(stats, meta)
    row = next(line for line in md.splitlines() if line.startswith("| compressed |"))
    assert "| 1.000 [1.000, 1.000] |" in row and "| 9 [9, 9] of 40 (never: 0.0%) |" in row and "| 2.90 [" in row
    assert next(line for line in md.splitlines() if line.startswith("| ppo |")).startswith("| ppo | - | 4 |")
    json.dumps(study.report_json(stats, meta))


def test_reference_arms_dpt_and_a_stride_in_the_tiny_study(tiny_study, tmp_path):
    """--arms with the optional arms: dpt and compressed-stride2 are trained (with target=oracle, region_stride=2) and
    tuned, the searcher and the source PPO are not; every arm is a row of the report, the searcher's returns are
    run_searcher's on the test streams and PPO's are its history's, per stream."""
    import yaml

    from searcher import run_searcher

    root, out = tiny_study["root"], tmp_path / "report"
    args = [*tiny_study["args"], "--arms", "compressed,compressed-stride2,dpt,searcher,ppo", "--report-dir", str(out)]
    proc = run_script("study.py", *args, timeout=600)
    assert "skip training compressed seed 0" in proc.stdout
    for arm, key, value in (("compressed-stride2", "region_stride", 2), ("dpt", "target", "oracle")):
        for seed in (0, 1):
            assert yaml.safe_load((root / "runs" / f"{arm}-seed{seed}" / "config.yaml").read_text())[key] == value
    tuning = json.loads((out / "tuning.json").read_text())
    assert set(tuning["temperatures"]) == {"compressed", "compressed-stride2", "dpt"}
    report = json.loads((out / "report.json").read_text())
    assert list(report["table"]) == ["compressed", "compressed-stride2", "dpt", "searcher", "ppo"]
    assert report["temperatures"]["searcher"] is None and report["table"]["ppo"]["n_runs"] == 4  # the history's 4 streams
    assert report["table"]["searcher"]["n_runs"] == 2 * 2  # eval_streams x evaluation seeds
    cfg = tiny_study["cfg"]
    goals = task_split(cfg, "test")
    opt = np.array([optimal_return(g) for g in goals], dtype=float)
    R = np.concatenate([run_searcher(cfg, goals, n_streams=2, n_episodes=4, seed=e)["returns"] for e in (0, 1)], axis=1)
    assert report["aggregate"]["searcher"]["mean"] == pytest.approx(st.run_scores(R[None], opt).mean())
    assert set(report["paired_differences"]) == {"compressed-stride2 vs compressed"}  # no standard-240 for dpt here
    md = (out / "report.md").read_text()
    assert "| searcher | - |" in md and "| ppo | - |" in md and "| dpt |" in md


def test_summary_and_sweep_arms_in_the_tiny_study(tiny_study, tmp_path):
    """--arms with compressed-summary and arms of the compression-quality sweep: the summary arm trains its env's summary
    config, standard-80 / compressed-r1 their window / region count; every arm's KV entries per stream (those of its saved
    evaluations) reach report.json and the table, the summaries written too, and quality.png has a point per arm."""
    import yaml

    root, out = tiny_study["root"], tmp_path / "report"
    arms = ["compressed", "compressed-summary", "compressed-summary-accumulate", "standard-80", "compressed-r1"]
    proc = run_script("study.py", *tiny_study["args"], "--arms", ",".join(arms), "--report-dir", str(out), timeout=600)
    assert "skip training compressed seed 0" in proc.stdout

    def saved(arm: str, seed: int = 0) -> dict:
        return yaml.safe_load((root / "runs" / f"{arm}-seed{seed}" / "config.yaml").read_text())

    assert saved("compressed-summary")["use_summary"] and saved("compressed-summary", 1)["max_regions"] == 2
    rec = saved("compressed-summary", 1)  # the config's recurrent default, trained 3 closes deep
    assert (rec["summary_mode"], rec["max_summaries"], rec["summary_train_regions"]) == ("recurrent", 1, 3)
    acc = saved("compressed-summary-accumulate")  # the other variant, trained as far back as it keeps summaries
    assert (acc["summary_mode"], acc["max_summaries"], acc["summary_train_regions"]) == ("accumulate", 3, 0)
    assert saved("compressed-r1", 1)["max_regions"] == 1 and saved("compressed-r1")["n_transit"] == 1 * (20 + 2) + 4
    assert saved("standard-80")["n_transit"] == 20 and not saved("standard-80")["use_compressed_context"]
    report = json.loads((out / "report.json").read_text())
    tuning = json.loads((out / "tuning.json").read_text())
    kv = report["kv_cache"]
    assert set(kv) == set(arms) and set(report["temperatures"]) == set(arms)
    for arm in arms:  # the saved evaluations' sizes
        T = tuning["temperatures"][arm]
        z = [np.load(root / "evals" / f"{arm}-seed{s}-test-T{T:g}-e{e}-n4.npz") for s in (0, 1) for e in (0, 1)]
        assert kv[arm]["max"] == max(float(x["kv_entries_max"]) for x in z)
        assert kv[arm]["mean"] == pytest.approx(np.mean([float(x["kv_entries_mean"]) for x in z]))
    assert kv["standard-80"]["max"] == 20  # a FIFO window of one 20-step rollout
    assert kv["compressed-r1"]["max"] <= 26 and kv["compressed"]["max"] <= 48
    assert kv["compressed-summary-accumulate"]["max"] <= 48 + 3 * 4  # raw part + the kept summaries (3 regions x 4 tokens)
    assert kv["compressed-summary"]["max"] <= 48 + 4  # raw part + one kept summary
    assert report["summary"]["compressed-summary-accumulate"]["kept_summaries_max"] == 3
    s = report["summary"]["compressed-summary"]
    assert s["n_evaluations"] == 4 and s["summaries_written_per_stream"] >= 4  # a region closes within 20 steps
    assert s["kept_summaries_max"] == 1 and s["summary_tokens_written"] == 4 * s["n_summaries_written"]
    q = report["quality"]["all"]
    assert sorted(p["arm"] for p in q["points"]) == sorted(arms) and q["best_per_entry"] in arms
    assert {p["arm"]: p["mean"] for p in q["points"]} == pytest.approx({a: report["aggregate"][a]["mean"] for a in arms})
    assert "compressed-summary vs compressed" in report["paired_differences"]
    assert "compressed-summary vs compressed-summary-accumulate" in report["paired_differences"]
    md = (out / "report.md").read_text()
    for phrase in ("| KV entries / stream (max / mean) |", "## Compression quality", "Most return per KV entry: ",
                   "Summaries (compressed-summary, recurrent, 4 tokens each"):
        assert phrase in md
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_a_ppo_history_leaves_the_speed_up_column_empty(tmp_path, monkeypatch):
    """Arms of another source (compressed-eps, the searcher) need no PPO history: without one the report is written
    with '-' for the speed-up, no PPO line or curve, and a line that says how to get the column."""
    import study
    from common import history_path, load_config

    opt = np.array([10.0, 20.0])
    R = np.zeros((2, 2, 4, 40))
    R[..., 3:] = opt[None, :, None, None]
    returns = {"compressed-eps": R, "searcher": R[:1]}
    stats = study.compute_statistics(returns, opt, None, reps=50)
    assert stats["speedup"] == {"compressed-eps": None, "searcher": None} and stats["ppo_to_90"] is None
    meta = {"goals": [38, 51], "opt": opt, "seeds": [0, 1], "eval_seeds": [0], "episodes": 40, "reps": 50,
            "windows": "Arms: ...", "temps": {"compressed-eps": 0.5, "searcher": None}, "train": {},
            "side": {a: {"seconds": [1.0], "n_closes": 0, "n_forced_closes": 0} for a in returns}}
    md = study.render_markdown(stats, meta)
    row = next(line for line in md.splitlines() if line.startswith("| compressed-eps |"))
    assert row.split("|")[9].strip() == "-" and "No speed-up column" in md and "Source PPO" not in md
    assert json.loads(json.dumps(study.report_json(stats, meta)))["ppo_episodes_to_90"] is None
    study.plot_learning_curves(stats, meta["temps"], 2, 2, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0

    cfg = load_config(study.env_configs("darkroom")["standard"], [f"traj_dir={tmp_path}"])  # no history file there
    assert not history_path(cfg).exists() and study.ppo_reference(cfg, [38, 51]) is None


def test_eps_stride_arms_and_the_eps_source_as_a_reference(monkeypatch):
    """compressed-eps-stride<s> is compressed-eps (the AD-eps history, its model config) with region_stride=s, compared
    with compressed-eps; source-eps is a reference arm (not trained) whose returns come from the AD-eps history file of
    the collection config with the study's overrides, as ppo's come from PPO's."""
    import study

    assert study.parse_arms("compressed-eps,compressed-eps-stride4,source-eps,ppo") == [
        "compressed-eps", "compressed-eps-stride4", "source-eps", "ppo"]
    assert "source-eps" not in study.ARMS and not study.is_trained("source-eps") and study.is_trained("compressed-eps-stride4")
    over = ["source_eps_start=1.0", "source_eps_regions=12"]
    for env in ENV_CONFIGS:
        base = load_config(*study.train_config("compressed-eps", 0, over, env))
        cfg = load_config(*study.train_config("compressed-eps-stride3", 2, over, env))
        assert cfg["alg"] == "searcher-eps" and cfg["region_stride"] == 3 and cfg["use_compressed_context"]
        assert cfg["source_eps_start"] == 1.0 and cfg["source_eps_regions"] == 12 and cfg["seed"] == 2
        assert {k for k in cfg if cfg[k] != base[k]} == {"region_stride", "seed"}
        assert study.arm_configs(env, "source-eps")[0] == study.arm_configs(env, "compressed-eps")[0]
    assert study.stride_of("compressed-eps-stride4") == 4 and not study.first_any_of("compressed-eps-stride4")
    assert study.run_dir_of(study.Path("r"), "compressed-eps-stride4", 1).name == "compressed-eps-stride4-seed1"
    assert study.eval_prune_of("compressed-eps-stride4") == "model"
    assert study.comparison_pairs(["compressed", "compressed-eps", "compressed-eps-stride4", "compressed-stride4"]) == [
        ("compressed-eps", "compressed"), ("compressed-eps-stride4", "compressed-eps"), ("compressed-stride4", "compressed")]
    arms = ["compressed-stride4", "compressed-stride4-any", "compressed-eps-stride4", "compressed-eps", "source-eps", "ppo"]
    assert len({study.color_of(a) for a in arms}) == len(arms)
    assert "compressed-eps trained on regions 4 source updates apart" in study.arm_windows({"n_steps": 80}, arms)
    assert study.eps_noise("darkroom", []) == "none (eps 0: the searcher itself)"
    noise = study.eps_noise("darkroom", over)
    assert noise == "eps 1 in region 0, falling linearly to 0 at region 12"
    assert f"noise: {noise}" in study.arm_windows({"n_steps": 80}, arms, noise=noise)

    seen = {}

    def fake_returns(cfg, goals):
        seen[cfg["alg"]] = cfg
        return np.zeros((1, len(goals), 3, 52))

    monkeypatch.setattr(study, "ppo_returns", fake_returns)
    cfg = load_config(env_configs("darkroom")["standard"], over)
    returns, _ = study.arm_returns(study.Path("unused"), cfg, ["source-eps", "ppo"], [0], [0], {}, 52, over)
    assert set(seen) == {"searcher-eps", "PPO"} and returns["source-eps"].shape == (1, len(task_split(cfg, "test")), 3, 52)
    assert seen["searcher-eps"]["source_eps_start"] == 1.0 and seen["searcher-eps"]["source_eps_regions"] == 12
    assert seen["searcher-eps"]["env"] == "darkroom"


def test_speedup_over_the_arms_own_source_on_synthetic_returns():
    """An arm distilled from the AD-eps histories gets a speed-up over source-eps (its own source) when that arm is in
    the study, beside the one over PPO; a PPO-distilled arm gets none (PPO is its source: the speed-up column)."""
    import study

    opt = np.array([10.0, 20.0])

    def jumps(js, n_seeds, n_episodes):
        return jump_returns(opt, js, n_seeds, n_episodes)

    assert study.own_source_arm("compressed-eps") == study.own_source_arm("compressed-eps-stride4") == "source-eps"
    assert study.own_source_arm("compressed") is None and study.own_source_arm("source-eps") is None
    returns = {"compressed-eps": jumps([5, 5, 5, 5], 2, 40), "compressed": jumps([0, 0, 0, 0], 2, 40),
               "source-eps": jumps([40, 40, 40, 40], 1, 52), "ppo": jumps([20, 20, 20, 30], 1, 52)}
    stats = study.compute_statistics(returns, opt, returns["ppo"], reps=50)
    assert set(stats["speedup_over_source"]) == {"compressed-eps"}
    assert stats["speedup_over_source"]["compressed-eps"]["ratio"] == pytest.approx(49 / 14)  # at 90 % at j + 8: 49 / 14
    meta = {"goals": [38, 51], "opt": opt, "seeds": [0, 1], "eval_seeds": [0], "episodes": 40, "reps": 50,
            "windows": "Arms: ...", "temps": {"compressed-eps": 0.5, "compressed": 0.5, "source-eps": None, "ppo": None},
            "train": {}, "side": {a: {"seconds": [1.0], "n_closes": 0, "n_forced_closes": 0} for a in returns}}
    md = study.render_markdown(stats, meta)
    assert "Speed-up of compressed-eps over its own source source-eps (the histories it was distilled from, per stream): " \
           "3.50 [" in md
    assert study.report_json(stats, meta)["speedup_over_own_source"]["compressed-eps"]["ratio"] == pytest.approx(3.5)
