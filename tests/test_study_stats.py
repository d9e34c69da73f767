"""study_stats on synthetic returns with known answers (small bootstrap reps so the file runs in seconds)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

import study_stats as ss

REPS = 200


def _returns(values_per_goal: np.ndarray, n_seeds: int, n_streams: int, n_episodes: int) -> np.ndarray:
    """Constant returns: value per goal broadcast to [S, G, K, E]."""
    return np.broadcast_to(np.asarray(values_per_goal, float)[None, :, None, None],
                           (n_seeds, len(values_per_goal), n_streams, n_episodes)).copy()


def test_normalized_and_run_scores():
    optimum = np.array([10.0, 20.0])
    returns = np.zeros((2, 2, 3, 4))
    returns[1, 1, 2] = [0, 0, 20, 10]  # seed 1, goal 1, stream 2
    norm = ss.normalized(returns, optimum)
    assert norm.shape == returns.shape and norm[1, 1, 2].tolist() == [0, 0, 1.0, 0.5]
    scores = ss.run_scores(returns, optimum)
    assert scores.shape == (6, 2)  # runs = seeds x streams, seed-major
    assert scores[5, 1] == pytest.approx(0.375) and scores.sum() == pytest.approx(0.375)
    assert ss.run_scores(returns, optimum, last=2)[5, 1] == pytest.approx(0.75)
    assert ss.run_scores(returns, optimum, streams_as_runs=False).shape == (2, 2)
    with pytest.raises(ValueError):
        ss.normalized(returns, np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError):
        ss.normalized(returns, np.array([1.0, 0.0]))


def test_aggregate_constant_scores_have_zero_width_cis():
    optimum = np.array([10.0, 15.0, 20.0])
    returns = _returns(0.7 * optimum, n_seeds=3, n_streams=4, n_episodes=5)
    out = ss.aggregate({"arm": ss.run_scores(returns, optimum)}, reps=REPS)
    arm = out["arm"]
    for key in ("mean", "iqm"):
        assert arm[key] == pytest.approx(0.7)
        lo, hi = arm[f"{key}_ci"]
        assert lo == pytest.approx(0.7) and hi == pytest.approx(0.7)
    json.dumps(out)


def test_iqm_ignores_top_and_bottom_quarter():
    values = np.array([0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 100.0, 100.0])
    for scores in (values[:, None], values.reshape(4, 2)):  # IQM trims over all runs x tasks
        arm = ss.aggregate({"a": scores}, reps=REPS)["a"]
        assert arm["iqm"] == pytest.approx(2.5)  # mean of 1, 2, 3, 4
        assert arm["mean"] == pytest.approx(26.25)


def test_ci_contains_true_mean_and_shrinks_with_more_runs():
    rng = np.random.default_rng(123)
    widths = {}
    for n_runs in (8, 128):
        scores = 0.5 + 0.1 * rng.standard_normal((n_runs, 3))
        arm = ss.aggregate({"a": scores}, reps=REPS)["a"]
        lo, hi = arm["mean_ci"]
        assert lo < 0.5 < hi and lo < arm["mean"] < hi
        assert arm["iqm_ci"][0] < arm["iqm"] < arm["iqm_ci"][1]
        widths[n_runs] = hi - lo
    assert widths[128] < widths[8] / 2  # ~1/sqrt(16) in theory


def test_probability_of_improvement():
    rng = np.random.default_rng(0)
    b = rng.random((6, 3))
    scores = {"A": b + 1.0, "B": b, "B2": b.copy()}
    out = ss.probability_of_improvement(scores, [("A", "B"), ("B", "B2"), ("B", "A")], reps=REPS)
    assert out["A vs B"] == {"p": 1.0, "ci": [1.0, 1.0]}
    assert out["B vs B2"]["p"] == 0.5
    assert out["B vs A"] == {"p": 0.0, "ci": [0.0, 0.0]}
    json.dumps(out)
    with pytest.raises(ValueError, match="same n_tasks"):
        ss.probability_of_improvement({"A": b, "C": b[:, :2]}, [("A", "C")], reps=REPS)


def test_paired_differences_identical_and_shifted():
    rng = np.random.default_rng(1)
    optimum = np.array([10.0, 12.0, 20.0])
    base = rng.random((3, 3, 4, 20)) * optimum[None, :, None, None]
    same = ss.paired_goal_differences(base, base.copy(), optimum, reps=REPS)
    assert same["mean_diff"] == 0.0 and same["per_goal_diff"] == [0.0, 0.0, 0.0]
    assert same["ci_includes_zero"] and "includes 0" in same["description"]

    shifted = ss.paired_goal_differences(base + 0.1 * optimum[None, :, None, None], base, optimum, reps=REPS)
    assert shifted["mean_diff"] == pytest.approx(0.1)
    assert shifted["per_goal_diff"] == pytest.approx([0.1] * 3)
    assert shifted["ci"] == pytest.approx([0.1, 0.1])
    assert not shifted["ci_includes_zero"] and "excludes 0" in shifted["description"]
    json.dumps(shifted)


def test_paired_differences_noisy():
    rng = np.random.default_rng(2)
    optimum = np.ones(4)
    b = rng.random((4, 4, 8, 10))
    noise = 0.05 * rng.standard_normal((4, 4, 8, 1))
    out = ss.paired_goal_differences(b + noise, b, optimum, reps=REPS)  # zero-mean noise
    assert out["ci"][0] < out["mean_diff"] < out["ci"][1]
    assert all(lo <= d <= hi for d, (lo, hi) in zip(out["per_goal_diff"], out["per_goal_ci"], strict=True))
    assert out["ci_includes_zero"]
    out = ss.paired_goal_differences(b + noise + 0.05, b, optimum, reps=REPS)
    assert out["mean_diff"] == pytest.approx(0.05 + noise.mean()) and not out["ci_includes_zero"]


def test_episodes_to_threshold_hand_built():
    optimum = np.array([2.0, 4.0])
    n_episodes = 60
    returns = np.zeros((1, 2, 2, n_episodes))
    returns[0, 0, 0, 30:] = 2.0  # goal 0 stream 0: step to the optimum at episode 30
    returns[0, 1, 0, 45:] = 4.0  # goal 1 stream 0: at episode 45
    # streams 1 never reach
    out = ss.episodes_to_threshold(returns, optimum, frac=0.9, window=1, reps=REPS)
    assert out["values"] == [[[30, 60], [45, 60]]]
    assert out["never_frac"] == 0.5 and out["n_episodes"] == n_episodes
    assert out["median"] == pytest.approx(np.median([30, 60, 45, 60]))
    lo, hi = out["median_ci"]
    assert 30 <= lo <= out["median"] <= hi <= 60
    # window 10: the moving average first reaches 0.9 once the window holds 9 ones (ends at 30 + 8)
    assert ss.episodes_to_threshold(returns, optimum, frac=0.9, window=10, reps=REPS)["values"][0][0][0] == 38
    assert ss.episodes_to_threshold(returns, optimum, frac=1.0, window=10, reps=REPS)["values"][0][0][0] == 39

    never = ss.episodes_to_threshold(np.zeros((2, 2, 3, 25)), optimum, reps=REPS)
    assert never["never_frac"] == 1.0 and never["median"] == 25 and never["median_ci"] == [25.0, 25.0]
    long_window = ss.episodes_to_threshold(np.full((1, 2, 1, 5), 4.0), optimum, window=10, reps=REPS)
    assert long_window["never_frac"] == 1.0


def test_first_reward_episode_hand_built():
    returns = np.zeros((1, 1, 5, 10))
    for stream, first in enumerate([0, 3, 3, 9]):
        returns[0, 0, stream, first] = 1.0
    returns[0, 0, 1, 7] = 1.0  # later rewards do not matter
    returns[0, 0, 2, 1] = -1.0  # negative returns do not count
    out = ss.first_reward_episode(returns)
    assert out["values"] == [[[0, 3, 3, 9, 10]]]  # stream 4 never: n_episodes
    assert out["median"] == 3.0 and out["max"] == 10 and out["never_frac"] == 0.2
    assert out["p90"] == pytest.approx(np.percentile([0, 3, 3, 9, 10], 90))
    json.dumps(out)


def test_curve_with_ci():
    rng = np.random.default_rng(3)
    optimum = np.array([5.0, 10.0])
    returns = rng.random((2, 2, 3, 40)) * optimum[None, :, None, None]
    curve = ss.curve_with_ci(returns, optimum, reps=REPS)
    mean, lo, hi = (np.array(curve[k]) for k in ("mean", "lo", "hi"))
    assert mean.shape == lo.shape == hi.shape == (40,)
    np.testing.assert_allclose(mean, ss.normalized(returns, optimum).mean(axis=(0, 1, 2)))
    assert np.all(lo <= mean + 1e-12) and np.all(mean <= hi + 1e-12) and np.all(hi > lo)
    flat = ss.curve_with_ci(_returns(0.5 * optimum, 2, 3, 7), optimum, reps=REPS)
    assert flat["lo"] == pytest.approx([0.5] * 7) and flat["hi"] == pytest.approx([0.5] * 7)


def test_curve_with_ci_is_vectorised():
    returns = np.random.default_rng(4).random((4, 8, 3, 500))  # 96 runs x 500 episodes
    start = time.perf_counter()
    ss.curve_with_ci(returns, np.ones(8), reps=1000)
    assert time.perf_counter() - start < 5.0  # ~0.2 s on one core; a per-replicate Python loop would take far longer


def test_weighted_median_matches_np_median():
    rng = np.random.default_rng(5)
    x = rng.integers(0, 20, size=12).astype(float)
    weights = rng.integers(0, 4, size=(30, 12)).astype(float)
    weights[:, 0] += 1  # never all-zero
    expected = [np.median(np.repeat(x, w.astype(int))) for w in weights]
    np.testing.assert_allclose(ss._weighted_median(x, weights), expected)


def test_deterministic_given_seed_and_global_rng_untouched():
    rng = np.random.default_rng(6)
    optimum = np.array([1.0, 2.0, 3.0])
    ra, rb = (rng.random((3, 3, 2, 30)) * optimum[None, :, None, None] for _ in range(2))
    scores = {"a": ss.run_scores(ra, optimum), "b": ss.run_scores(rb, optimum)}

    def everything(seed):
        return json.dumps([ss.aggregate(scores, reps=REPS, seed=seed),
                           ss.probability_of_improvement(scores, [("a", "b")], reps=REPS, seed=seed),
                           ss.paired_goal_differences(ra, rb, optimum, reps=REPS, seed=seed),
                           ss.episodes_to_threshold(ra, optimum, frac=0.5, window=3, reps=REPS, seed=seed),
                           ss.curve_with_ci(ra, optimum, reps=REPS, seed=seed)])

    np.random.seed(99)
    before = np.random.random()
    np.random.seed(99)
    first = everything(0)
    assert np.random.random() == before  # the caller's global NumPy RNG stream is restored
    assert everything(0) == first
    assert everything(1) != first
    # an arm's result does not depend on which other arms are in the dict
    assert ss.aggregate({"a": scores["a"]}, reps=REPS)["a"] == ss.aggregate(scores, reps=REPS)["a"]


def test_describe_interval():
    assert "includes 0: no detectable difference" in ss.describe_interval(-0.1, 0.2)
    assert "includes 0" in ss.describe_interval(0.0, 0.0)
    assert "excludes 0" in ss.describe_interval(0.01, 0.2) and "higher" in ss.describe_interval(0.01, 0.2)
    assert "excludes 0" in ss.describe_interval(-0.3, -0.1) and "lower" in ss.describe_interval(-0.3, -0.1)


def _step_runs(optimum, jumps, n_episodes, n_seeds=1):
    """Returns [S, G, K, E]: run k of every goal earns 0 until episode jumps[k] (None: never), the optimum from then on."""
    R = np.zeros((n_seeds, len(optimum), len(jumps), n_episodes))
    for k, j in enumerate(jumps):
        if j is not None:
            R[:, :, k, j:] = np.asarray(optimum, float)[None, :, None]
    return R


def test_first_episode_windows_of_run_scores():
    optimum = np.array([10.0, 20.0])
    R = _step_runs(optimum, [0, 5, 20, None], 100)
    assert ss.run_scores(R, optimum, first=10).mean() == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    assert ss.run_scores(R, optimum, first=500).mean() == pytest.approx(ss.run_scores(R, optimum).mean())  # all of it
    with pytest.raises(ValueError):
        ss.run_scores(R, optimum, first=0)
    with pytest.raises(ValueError):
        ss.run_scores(R, optimum, first=10, last=10)


def test_last_window_is_the_last_fifth():
    assert [ss.last_window(n) for n in (500, 100, 52, 4)] == [100, 20, 10, 1]


def test_arm_summary_on_step_returns_with_known_answers():
    """Runs that jump to the optimum at episodes 0, 5, 20 and never, on two goals: the table's columns by hand."""
    optimum = np.array([10.0, 20.0])
    out = ss.arm_summary(_step_runs(optimum, [0, 5, 20, None], 100), optimum, reps=REPS)
    assert out["n_episodes"] == 100 and out["last_episodes"] == 20 and out["n_runs"] == 4
    assert out["first10"]["mean"] == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    assert out["first50"]["mean"] == pytest.approx((1 + 0.9 + 0.6 + 0) / 4)
    assert out["all"]["mean"] == pytest.approx((1 + 0.95 + 0.8 + 0) / 4)
    assert out["last"]["mean"] == pytest.approx(0.75)
    for key in ("first10", "first50", "all", "last"):
        assert out[key]["ci"][0] <= out[key]["mean"] <= out[key]["ci"][1]
    # 10-episode moving average >= 0.9: the window ending at episode 9 (jump 0, the floor), 5 + 8, 20 + 8, never (100)
    to90 = out["to_threshold"]
    assert to90["values"] == [[[9, 13, 28, 100]] * 2]
    assert to90["median"] == pytest.approx(20.5) and to90["never_frac"] == 0.25
    json.dumps(out)


def test_speedup_is_the_ratio_of_median_episodes_needed():
    ppo = {"values": [[[19, 29, 39, 29, 51]]], "n_episodes": 52}  # median 29: 30 episodes needed
    arm = {"values": [[[9, 9, 14, 9]]], "n_episodes": 500}  # median 9: 10 episodes
    out = ss.speedup(ppo, arm, reps=REPS)
    assert out["ratio"] == pytest.approx(3.0) and out["ci"][0] <= 3.0 <= out["ci"][1]
    assert not out["at_least"] and not out["at_most"]
    same = ss.speedup(arm, arm, reps=REPS)
    assert same["ratio"] == 1.0
    censored = ss.speedup({"values": [[[52, 52, 10]]], "n_episodes": 52}, arm, reps=REPS)  # most PPO runs never get there
    assert censored["at_least"] and censored["ratio"] == pytest.approx(53 / 10)
    assert ss.speedup(ppo, {"values": [[[500, 500, 9]]], "n_episodes": 500}, reps=REPS)["at_most"]


def test_tuning_rule_never_picks_a_temperature_that_strands_runs():
    """T=0.5: 80 % of runs at the optimum at once, 20 % never find it (all-episode mean 0.80: the old rule's pick);
    T=1.0: every run at half the optimum for 50 episodes, then at it (mean 0.75, none stranded). The rule picks 1.0."""
    optimum = np.array([10.0, 20.0])
    stranding = _step_runs(optimum, [0, 0, 0, 0, None], 100)
    slow = np.concatenate([np.full((1, 2, 5, 50), 0.5), np.ones((1, 2, 5, 50))], -1) * optimum[None, :, None, None]
    chosen, table = ss.choose_temperature({0.5: stranding, 1.0: slow}, optimum)
    assert table[0.5]["mean"] == pytest.approx(0.8) and table[1.0]["mean"] == pytest.approx(0.75)  # the old rule: 0.5
    assert table[0.5]["never_frac"] == pytest.approx(0.2) and table[1.0]["never_frac"] == 0.0
    assert not table[0.5]["eligible"] and table[1.0]["eligible"] and chosen == 1.0
    # none stranded: the last fifth decides, not the early episodes
    late = _step_runs(optimum, [0, 0, 0, 0, 85], 100)  # every run found it; one only at episode 85
    chosen, table = ss.choose_temperature({0.5: late, 1.0: slow}, optimum)
    assert table[0.5]["mean"] > table[1.0]["mean"] and table[0.5]["mean_last"] < table[1.0]["mean_last"] and chosen == 1.0
    # within never_slack of the lowest never fraction a temperature stays eligible; ties go to the first in the grid
    one_stranded = _step_runs(optimum, [0] * 49 + [None], 100)  # 2 % never, last fifth 0.98
    slower = np.concatenate([np.full((1, 2, 5, 90), 0.5), np.ones((1, 2, 5, 10))], -1) * optimum[None, :, None, None]
    assert ss.choose_temperature({0.5: one_stranded, 1.0: slower}, optimum, never_slack=0.02)[0] == 0.5
    assert ss.choose_temperature({0.5: one_stranded, 1.0: slower}, optimum, never_slack=0.0)[0] == 1.0
    assert ss.choose_temperature({0.7: slow, 1.0: slow.copy()}, optimum)[0] == 0.7
