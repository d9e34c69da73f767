"""Statistics for a multi-seed study comparing evaluation "arms" (e.g. standard-240, standard-160, compressed).

Data model: for each arm `returns[arm]` has shape [n_train_seeds, n_goals, n_streams, n_episodes] (raw episode
returns; the evaluation seeds' streams are stacked along the streams axis) and `optimum` has shape [n_goals]
(oracle return per goal). Normalised score = return / optimum.

rliable does the aggregate metrics (mean, IQM) and probability of improvement, with its stratified bootstrap
(runs resampled within each task). rliable draws its resampling indices from NumPy's *global* RNG
(`np.random.choice`) and ignores `random_state`, so those calls run under `np.random.seed(seed)` and the caller's
global state is restored afterwards. Everything else here uses its own `np.random.default_rng(seed)` and a
two-stage bootstrap: training seeds are resampled (one draw per replicate, shared by all goals, since one
trained model plays every goal), then streams within each (drawn seed, goal); goals are fixed strata.

All functions take numpy arrays and return JSON-serialisable dicts / floats / lists.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

CI_SIZE = 0.95
_MAX_CHUNK_ELEMS = 4_000_000  # bootstrap weights held in memory at once (float64 elements)


def _rliable():
    """(rliable.library, rliable.metrics), imported on first use (rliable pulls in arch, pandas and seaborn)."""
    from rliable import library, metrics

    return library, metrics


@contextlib.contextmanager
def _global_np_seed(seed: int) -> Iterator[None]:
    """Seed NumPy's global RNG (what rliable resamples with) and restore the caller's state afterwards."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _check(returns: np.ndarray, optimum: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    returns = np.asarray(returns, dtype=np.float64)
    if returns.ndim != 4:
        raise ValueError(f"returns must be [n_train_seeds, n_goals, n_streams, n_episodes], got shape {returns.shape}")
    if optimum is None:
        return returns, None
    optimum = np.asarray(optimum, dtype=np.float64)
    if optimum.shape != (returns.shape[1],):
        raise ValueError(f"optimum must have shape [n_goals]=({returns.shape[1]},), got {optimum.shape}")
    if np.any(optimum <= 0):
        raise ValueError("optimum must be positive for every goal")
    return returns, optimum


def _ci(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """Percentile 95 % interval along `axis` -> array [2, ...]."""
    alpha = 100 * (1 - CI_SIZE) / 2
    return np.percentile(values, [alpha, 100 - alpha], axis=axis)


def _pair(lo: float, hi: float) -> list[float]:
    return [float(lo), float(hi)]


# ---------------------------------------------------------------------------------------------------------------------
# scores for rliable


def normalized(returns: np.ndarray, optimum: np.ndarray) -> np.ndarray:
    """Returns divided by the per-goal optimum; same shape as `returns`."""
    returns, optimum = _check(returns, optimum)
    return returns / optimum[None, :, None, None]


def run_scores(returns: np.ndarray, optimum: np.ndarray, last: int | None = None, streams_as_runs: bool = True,
               first: int | None = None) -> np.ndarray:
    """[n_runs, n_goals] matrix for rliable: mean normalised return over all (or the last `last`, or the first `first`)
    episodes; a window longer than the run is all of it.

    Runs are (train seed x stream), seed-major; with streams_as_runs=False streams are averaged and runs = train seeds.
    """
    norm = normalized(returns, optimum)
    if last is not None and first is not None:
        raise ValueError("pass last or first, not both")
    if last is not None:
        if last < 1:
            raise ValueError("last must be >= 1")
        norm = norm[..., -last:]
    if first is not None:
        if first < 1:
            raise ValueError("first must be >= 1")
        norm = norm[..., :first]
    per_cell = norm.mean(axis=-1)  # [S, G, K]
    if not streams_as_runs:
        return per_cell.mean(axis=2)
    n_seeds, n_goals, n_streams = per_cell.shape
    return per_cell.transpose(0, 2, 1).reshape(n_seeds * n_streams, n_goals)


def aggregate(score_dict: Mapping[str, np.ndarray], reps: int = 2000, seed: int = 0) -> dict[str, dict]:
    """Per arm: mean and IQM of a [n_runs, n_tasks] score matrix with rliable's stratified-bootstrap 95 % CIs."""
    library, metrics = _rliable()
    func = lambda x: np.array([metrics.aggregate_mean(x), metrics.aggregate_iqm(x)])
    out = {}
    for arm, scores in score_dict.items():
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim != 2:
            raise ValueError(f"{arm}: scores must be [n_runs, n_tasks], got shape {scores.shape}")
        with _global_np_seed(seed):  # each arm gets the same seed: results do not depend on the other arms
            point, interval = library.get_interval_estimates({arm: scores}, func, reps=reps,
                                                             confidence_interval_size=CI_SIZE)
        (mean, iqm), ci = point[arm], interval[arm]  # ci: [2 (lo, hi), 2 (mean, iqm)]
        out[arm] = {"mean": float(mean), "mean_ci": _pair(ci[0, 0], ci[1, 0]),
                    "iqm": float(iqm), "iqm_ci": _pair(ci[0, 1], ci[1, 1])}
    return out


def probability_of_improvement(score_dict: Mapping[str, np.ndarray], pairs: Iterable[tuple[str, str]],
                               reps: int = 2000, seed: int = 0) -> dict[str, dict]:
    """{"X vs Y": {"p": P(X > Y), "ci": [lo, hi]}}: rliable's average (over tasks) probability of improvement.

    The two arms' runs are resampled independently within each task (rliable's StratifiedIndependentBootstrap).
    """
    library, metrics = _rliable()
    func = lambda x, y: np.array([metrics.probability_of_improvement(x, y)])
    out = {}
    for x, y in pairs:
        sx, sy = (np.asarray(score_dict[k], dtype=np.float64) for k in (x, y))
        if sx.ndim != 2 or sy.ndim != 2 or sx.shape[1] != sy.shape[1]:
            # rliable does not check: it iterates over x's tasks and indexes y with them
            raise ValueError(f"{x} vs {y}: need [n_runs, n_tasks] matrices with the same n_tasks, got {sx.shape}, {sy.shape}")
        key = f"{x} vs {y}"
        with _global_np_seed(seed):
            point, interval = library.get_interval_estimates({key: [sx, sy]}, func, reps=reps,
                                                             confidence_interval_size=CI_SIZE)
        out[key] = {"p": float(point[key][0]), "ci": _pair(interval[key][0, 0], interval[key][1, 0])}
    return out


# ---------------------------------------------------------------------------------------------------------------------
# own two-stage bootstrap (seeds, then streams within goal)


def _weight_chunks(rng: np.random.Generator, reps: int, n_seeds: int, n_goals: int, n_streams: int) -> Iterator[np.ndarray]:
    """Yield bootstrap count weights [r, S, G, K] (chunks of replicates; each goal's weights sum to S*K).

    Per replicate: draw S training seeds with replacement (shared by all goals), then for every drawn seed and goal
    draw K streams with replacement. Weight = how often cell (seed, goal, stream) was drawn.
    """
    per_rep = n_seeds * n_seeds * n_goals * n_streams
    chunk = max(1, min(reps, _MAX_CHUNK_ELEMS // max(per_rep, 1)))
    done = 0
    while done < reps:
        r = min(chunk, reps - done)
        seed_idx = rng.integers(n_seeds, size=(r, n_seeds))
        onehot = (seed_idx[:, :, None] == np.arange(n_seeds)[None, None, :]).astype(np.float64)  # [r, slot, S]
        streams = rng.multinomial(n_streams, np.full(n_streams, 1.0 / n_streams), size=(r, n_seeds, n_goals))
        yield np.einsum("ris,rigk->rsgk", onehot, streams.astype(np.float64))
        done += r


def _boot_means(values: np.ndarray, reps: int, seed: int) -> np.ndarray:
    """Bootstrap replicates of the per-goal mean of values [S, G, K, ...] -> [reps, G, ...]."""
    n_seeds, n_goals, n_streams = values.shape[:3]
    flat = values.reshape(n_seeds, n_goals, n_streams, -1)
    rng = np.random.default_rng(seed)
    out = [np.einsum("rsgk,sgke->rge", w, flat) for w in _weight_chunks(rng, reps, n_seeds, n_goals, n_streams)]
    return (np.concatenate(out) / (n_seeds * n_streams)).reshape(reps, n_goals, *values.shape[3:])


def _weighted_median(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Median of x [N] repeated by integer weights [R, N] -> [R] (averages the two middle values, like np.median)."""
    order = np.argsort(x, kind="stable")
    xs, cw = x[order], np.cumsum(weights[:, order], axis=1)
    half = cw[:, -1:] / 2
    lower = xs[np.argmax(cw >= half - 1e-9, axis=1)]
    upper = xs[np.argmax(cw > half + 1e-9, axis=1)]
    return (lower + upper) / 2


def _boot_median(values: np.ndarray, reps: int, seed: int) -> np.ndarray:
    """Bootstrap replicates of the median of all cells of values [S, G, K] -> [reps]."""
    rng = np.random.default_rng(seed)
    x = values.reshape(-1).astype(np.float64)
    out = [_weighted_median(x, w.reshape(len(w), -1)) for w in _weight_chunks(rng, reps, *values.shape)]
    return np.concatenate(out)


def describe_interval(lo: float, hi: float) -> str:
    """Plain-English reading of a 95 % interval for a difference."""
    span = f"95% CI [{lo:+.3f}, {hi:+.3f}]"
    if lo <= 0 <= hi:
        return f"{span} includes 0: no detectable difference"
    return f"{span} excludes 0: detectably {'higher' if lo > 0 else 'lower'}"


def paired_goal_differences(returns_a: np.ndarray, returns_b: np.ndarray, optimum: np.ndarray,
                            reps: int = 2000, seed: int = 0) -> dict:
    """Mean normalised difference a - b per goal and overall, with two-stage bootstrap 95 % CIs (paired cells)."""
    a, b = normalized(returns_a, optimum), normalized(returns_b, optimum)
    if a.shape[:3] != b.shape[:3]:
        raise ValueError(f"paired arms need the same [seeds, goals, streams], got {a.shape} and {b.shape}")
    diff = a.mean(axis=-1) - b.mean(axis=-1)  # [S, G, K]
    per_goal = diff.mean(axis=(0, 2))
    boot = _boot_means(diff, reps, seed)  # [R, G]
    goal_ci, overall_ci = _ci(boot), _ci(boot.mean(axis=1))
    lo, hi = float(overall_ci[0]), float(overall_ci[1])
    return {
        "per_goal_diff": [float(v) for v in per_goal],
        "per_goal_ci": [_pair(goal_ci[0, g], goal_ci[1, g]) for g in range(len(per_goal))],
        "mean_diff": float(per_goal.mean()),
        "ci": [lo, hi],
        "ci_includes_zero": bool(lo <= 0 <= hi),
        "description": describe_interval(lo, hi),
    }


# ---------------------------------------------------------------------------------------------------------------------
# per-run learning-speed statistics


def _first_true(mask: np.ndarray, offset: int, never: int) -> np.ndarray:
    """Index (+offset) of the first True along the last axis, `never` where there is none."""
    if mask.shape[-1] == 0:
        return np.full(mask.shape[:-1], never, dtype=np.int64)
    return np.where(mask.any(axis=-1), mask.argmax(axis=-1) + offset, never).astype(np.int64)


def threshold_episodes(returns: np.ndarray, optimum: np.ndarray, frac: float = 0.9, window: int = 10) -> np.ndarray:
    """[S, G, K]: per run, the first episode (0-based, end of the window) whose `window`-episode moving average of the
    normalised return reaches `frac`; n_episodes where it never does (a run shorter than the window never does)."""
    if window < 1:
        raise ValueError("window must be >= 1")
    norm = normalized(returns, optimum)
    n_episodes = norm.shape[-1]
    csum = np.concatenate([np.zeros(norm.shape[:-1] + (1,)), np.cumsum(norm, axis=-1)], axis=-1)
    moving = (csum[..., window:] - csum[..., :-window]) / window  # moving[i] = mean of episodes i .. i+window-1
    return _first_true(moving >= frac - 1e-9, window - 1, n_episodes)


def episodes_to_threshold(returns: np.ndarray, optimum: np.ndarray, frac: float = 0.9, window: int = 10,
                          reps: int = 2000, seed: int = 0) -> dict:
    """First episode (0-based, end of the window) whose `window`-episode moving average of the normalised return
    reaches `frac`, per (seed, goal, stream); n_episodes if never. Summarised as median with a bootstrap 95 % CI.
    """
    first = threshold_episodes(returns, optimum, frac, window)  # [S, G, K]
    n_episodes = np.shape(returns)[-1]
    never = first == n_episodes
    ci = _ci(_boot_median(first, reps, seed))
    return {
        "median": float(np.median(first)),
        "median_ci": _pair(ci[0], ci[1]),
        "never_frac": float(never.mean()),
        "n_episodes": int(n_episodes),
        "values": first.tolist(),
    }


def first_reward_episode(returns: np.ndarray) -> dict:
    """First episode (0-based) with return > 0 per (seed, goal, stream), n_episodes if never; median / p90 / max."""
    returns, _ = _check(returns)
    n_episodes = returns.shape[-1]
    first = _first_true(returns > 0, 0, n_episodes)
    return {
        "median": float(np.median(first)),
        "p90": float(np.percentile(first, 90)),
        "max": int(first.max()),
        "never_frac": float((first == n_episodes).mean()),
        "n_episodes": int(n_episodes),
        "values": first.tolist(),
    }


def curve_with_ci(returns: np.ndarray, optimum: np.ndarray, reps: int = 1000, seed: int = 0) -> dict[str, list[float]]:
    """Mean normalised return per episode over (seed, goal, stream) with a two-stage bootstrap 95 % band."""
    norm = normalized(returns, optimum)
    boot = _boot_means(norm, reps, seed).mean(axis=1)  # [R, E]
    lo, hi = _ci(boot)
    return {"mean": norm.mean(axis=(0, 1, 2)).tolist(), "lo": lo.tolist(), "hi": hi.tolist()}


# ---------------------------------------------------------------------------------------------------------------------
# the study's table: learning speed per arm, and the speed-up over the source PPO


def last_window(n_episodes: int) -> int:
    """The episodes of the "last" column: the last fifth (100 of Darkroom's 500 episodes, 20 of the 50-step envs' 100;
    10 of the source PPO's 52 Darkroom episodes)."""
    return max(1, n_episodes // 5)


def arm_summary(returns: np.ndarray, optimum: np.ndarray, reps: int = 2000, seed: int = 0, frac: float = 0.9,
                window: int = 10, firsts: tuple[int, ...] = (10, 50)) -> dict:
    """One arm's row of the study table, from its returns [S, G, K, E]: the mean normalised return (rliable, stratified
    bootstrap 95 % CI) over the first 10 and first 50 episodes, all episodes and the last fifth (`last_window`), and the
    episodes to `frac` of the optimum (`episodes_to_threshold`: median, CI, the fraction that never get there)."""
    returns, optimum = _check(returns, optimum)
    n_episodes = returns.shape[-1]
    last = last_window(n_episodes)
    windows = {f"first{n}": run_scores(returns, optimum, first=n) for n in firsts}
    windows |= {"all": run_scores(returns, optimum), "last": run_scores(returns, optimum, last=last)}
    agg = aggregate(windows, reps=reps, seed=seed)
    out = {"n_episodes": int(n_episodes), "last_episodes": last, "n_runs": int(returns.shape[0] * returns.shape[2])}
    for name, a in agg.items():
        out[name] = {"mean": a["mean"], "ci": a["mean_ci"], "iqm": a["iqm"], "iqm_ci": a["iqm_ci"]}
    out["to_threshold"] = episodes_to_threshold(returns, optimum, frac, window, reps=reps, seed=seed)
    return out


def speedup(reference: Mapping, arm: Mapping, reps: int = 2000, seed: int = 0) -> dict:
    """The speed-up of an arm over a reference (the source PPO): the ratio of their median episodes to the threshold,
    counted as episodes needed (the 0-based episode + 1), from two `episodes_to_threshold` results; a 95 % interval from
    independent bootstraps of the two medians. A median that is "never" (the run's length) is censored: the ratio is
    then a lower bound where the reference's is (`at_least`) and an upper bound where the arm's is (`at_most`)."""
    ref, mine = (np.asarray(d["values"], dtype=np.float64) for d in (reference, arm))
    ratio = (np.median(ref) + 1) / (np.median(mine) + 1)
    boot = (_boot_median(ref, reps, seed) + 1) / (_boot_median(mine, reps, seed + 1) + 1)
    ci = _ci(boot)
    return {"ratio": float(ratio), "ci": _pair(ci[0], ci[1]),
            "at_least": bool(np.median(ref) >= reference["n_episodes"]), "at_most": bool(np.median(mine) >= arm["n_episodes"])}


def choose_temperature(returns_by_temperature: Mapping[float, np.ndarray], optimum: np.ndarray, never_slack: float = 0.02,
                       frac: float = 0.9, window: int = 10) -> tuple[float, dict]:
    """The tuning rule (every env, every arm): among the temperatures whose fraction of runs that never reach `frac` of
    the optimum (`threshold_episodes`) is within `never_slack` of the grid's lowest, the one with the best mean
    normalised return over the last fifth of the validation episodes (`last_window`); ties go to the first in the grid.
    A temperature that strands runs is out however well its other runs do, and among the rest the tail decides, not the
    early episodes. Returns (the temperature, {temperature: mean, mean_last, never_frac, eligible})."""
    if not returns_by_temperature:
        raise ValueError("no temperatures to choose from")
    table = {}
    for t, R in returns_by_temperature.items():
        R, opt = _check(R, optimum)
        norm = normalized(R, opt)
        never = threshold_episodes(R, opt, frac, window) == R.shape[-1]
        table[t] = {"mean": float(norm.mean()), "mean_last": float(norm[..., -last_window(R.shape[-1]):].mean()),
                    "never_frac": float(never.mean())}
    floor = min(v["never_frac"] for v in table.values())
    for v in table.values():
        v["eligible"] = v["never_frac"] <= floor + never_slack + 1e-12
    chosen = max((t for t, v in table.items() if v["eligible"]), key=lambda t: table[t]["mean_last"])  # max: first of ties
    return chosen, table
