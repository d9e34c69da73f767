import h5py
import numpy as np
import pytest

from common import load_config
from dataset import HistoryDataset
from model.ad import COMPRESS_END, COMPRESS_START, IGNORE, NO_PREV, PAD_PREV, STEP, encode_prev, encode_state


def _cfg(tiny, mode):
    name = "ad_dr_compressed.yaml" if mode == "compressed" else "ad_dr.yaml"
    return load_config(f"config/model/{name}", tiny[mode])


def _history(tiny, goal):
    with h5py.File(tiny["path"], "r") as f:
        return {k: f[str(goal)][k][:].astype(np.int64) for k in ("states", "actions", "rewards", "dones")}


def _locate(h, state_ids, prev_ids, actions):
    """Find (stream, t0) where the sampled window's steps sit in the history (unique in practice)."""
    S = h["actions"].shape[1]
    st = encode_state(h["states"], 9)
    n = len(actions)
    for s in range(S):
        for t0 in range(h["actions"].shape[0] - n + 1):
            if (st[t0 : t0 + n, s] == state_ids).all() and (h["actions"][t0 : t0 + n, s] == actions).all():
                pa = h["actions"][t0 - 1, s] if t0 else -1
                pr = h["rewards"][t0 - 1, s] if t0 else 0
                ps = 1 if t0 == 0 else h["dones"][t0 - 1, s]
                if prev_ids[0] == encode_prev(np.int64(pa), np.int64(pr), np.int64(ps)):
                    return s, t0
    raise AssertionError("window not found in any stream")


def test_standard_targets_line_up_with_the_stream(tiny_history):
    cfg = _cfg(tiny_history, "standard")
    ds = HistoryDataset(tiny_history["path"], cfg, "train", batch_size=6, seed=0)
    b = ds.batch(0)
    assert b["type_ids"].shape == (6, 40) and (b["type_ids"] == STEP).all()
    assert (b["target_action"] != IGNORE).all()  # a target at every position
    for i in range(6):
        st, pv, act = b["state_ids"][i].numpy(), b["prev_ids"][i].numpy(), b["target_action"][i].numpy()
        for goal in (0, 1):
            try:
                s, t0 = _locate(_history(tiny_history, goal), st, pv, act)
            except AssertionError:
                continue
            h = _history(tiny_history, goal)
            # the token at t holds (a_{t-1}, r_{t-1}): consistent with the target one step earlier
            expect_prev = encode_prev(h["actions"][t0 : t0 + 39, s], h["rewards"][t0 : t0 + 39, s], h["dones"][t0 : t0 + 39, s])
            assert (pv[1:] == expect_prev).all()
            break
        else:
            raise AssertionError("sample not found in the train goals")


def test_batches_are_a_function_of_seed_rank_step(tiny_history):
    cfg = _cfg(tiny_history, "standard")
    a = HistoryDataset(tiny_history["path"], cfg, "train", 4, seed=3, rank=0)
    b = HistoryDataset(tiny_history["path"], cfg, "train", 4, seed=3, rank=0)
    c = HistoryDataset(tiny_history["path"], cfg, "train", 4, seed=3, rank=1)
    assert all((a.batch(5)[k] == b.batch(5)[k]).all() for k in a.batch(5))
    assert not (a.batch(5)["state_ids"] == c.batch(5)["state_ids"]).all()
    it = iter(HistoryDataset(tiny_history["path"], cfg, "train", 4, seed=3, start_step=5))
    assert (next(it)["state_ids"] == a.batch(5)["state_ids"]).all()  # resuming at step 5 draws batch 5


def test_each_split_reads_its_own_goals_only(tiny_history):
    cfg = _cfg(tiny_history, "standard")
    assert HistoryDataset(tiny_history["path"], cfg, "test", 2, seed=0).goals == [38, 51]
    assert HistoryDataset(tiny_history["path"], cfg, "val", 2, seed=0).goals == [12]
    train = HistoryDataset(tiny_history["path"], cfg, "train", 2, seed=0)
    assert train.goals == [0, 1] and set(train.data) == {0, 1}  # the validation goal's history is never loaded


def test_history_of_another_collection_config_is_refused(tiny_history):
    from common import UserError

    cfg = load_config("config/model/ad_dr.yaml", tiny_history["standard"] + ["n_stream=100", "ppo_lr=0.01"])
    with pytest.raises(UserError, match=r"collected with n_stream=4 \(config: 100\), ppo_lr=0.003 \(config: 0.01\)"):
        HistoryDataset(tiny_history["path"], cfg, "train", 2, seed=0)


def test_a_collection_key_a_file_predates_reads_as_its_default(tmp_path):
    """`ppo_observe_stage` came after the first histories: a file that does not store it was collected without it, so
    it fits a config with the default (false) and is refused, by name, for a config that sets it."""
    import h5py
    import yaml

    from common import UserError
    from history import check_history, collect_key_names, collect_keys

    cfg = load_config("config/algorithm/ppo_darkroom.yaml")
    assert "ppo_observe_stage" not in cfg and collect_keys(cfg)["ppo_observe_stage"] is False
    old = {k: v for k, v in collect_keys(cfg).items() if k != "ppo_observe_stage"}
    assert set(old) == set(collect_key_names("PPO")) - {"ppo_observe_stage"}
    with h5py.File(tmp_path / "old.hdf5", "w") as f:
        f.attrs["collect_keys"] = yaml.safe_dump(old)
        check_history(f, "old.hdf5", cfg)  # fits
        with pytest.raises(UserError, match=r"collected with ppo_observe_stage=False \(config: True\)"):
            check_history(f, "old.hdf5", {**cfg, "ppo_observe_stage": True})


def test_first_step_of_a_stream_has_no_previous_step(tiny_history):
    h = _history(tiny_history, 0)
    from dataset import stream_tokens

    _, prev = stream_tokens(h["states"], h["actions"], h["rewards"], h["dones"], 9)
    assert (prev[0] == NO_PREV + NO_PREV + 1).all()  # "none" with the episode-start flag
    assert (prev[20] >= NO_PREV + 1).all() and (prev[1] < NO_PREV).all()  # episode start flag at t=20 only


@pytest.mark.parametrize("max_regions", [1, 2, 3])
def test_compressed_samples_are_the_last_max_regions_regions_of_one_stream(tiny_history, max_regions):
    """`C r_{k-m+1} E ... E C r_k`: consecutive regions of one stream, as many as evaluation keeps; the prev ids chain
    across region and episode starts exactly as in the stream (the first kept region's first token holds the last step
    of the region that was dropped, as at evaluation after a prune)."""
    from dataset import stream_tokens

    cfg = load_config("config/model/ad_dr_compressed.yaml", tiny_history["compressed"] + [f"max_regions={max_regions}",
                                                                                          f"n_transit={max_regions * 22 + 2}"])
    ds = HistoryDataset(tiny_history["path"], cfg, "train", batch_size=48, seed=1)
    b = {k: v.numpy() for k, v in ds.batch(0).items()}
    hist = {g: _history(tiny_history, g) for g in (0, 1)}
    tokens = {g: stream_tokens(h["states"], h["actions"], h["rewards"], h["dones"], 9) for g, h in hist.items()}
    seen = set()
    for i in range(48):
        types = b["type_ids"][i]
        n = int(b["n_regions"][i])
        layout = ([COMPRESS_START] + [STEP] * 20 + [COMPRESS_END]) * (n - 1) + [COMPRESS_START] + [STEP] * 20
        assert types[: len(layout)].tolist() == layout and (types[len(layout) :] == STEP).all()
        assert b["region_lens"][i].tolist() == [20] * n + [0] * (max_regions - n)
        steps = np.flatnonzero(types == STEP)[: 20 * n]
        assert (b["target_action"][i][np.setdiff1d(np.arange(len(types)), steps)] == IGNORE).all()
        tt = b["target_token_type"][i, steps]
        assert np.flatnonzero(tt == COMPRESS_END).tolist() == [20 * j + 19 for j in range(n)]
        st, pv, act = b["state_ids"][i, steps], b["prev_ids"][i, steps], b["target_action"][i, steps]
        hits = [(g, s, t0) for g in (0, 1) for s in range(4) for t0 in range(0, 80 - 20 * n + 1, 20)
                if (tokens[g][0][t0 : t0 + 20 * n, s] == st).all() and (hist[g]["actions"][t0 : t0 + 20 * n, s] == act).all()
                and (tokens[g][1][t0 : t0 + 20 * n, s] == pv).all()]
        assert hits, f"sample {i} is not {n} consecutive regions of one stream with the stream's prev ids"
        g, s, t0 = hits[0]
        k = t0 // 20 + n - 1  # index of the newest region
        assert n == min(max_regions, k + 1)  # fewer regions only at the start of a history
        # prev ids: episode start flag at every region start here (regions = episodes of 20 steps); the very first
        # step of a stream has no previous step; later region starts hold the previous region's last (a, r)
        for j in range(n):
            t = t0 + 20 * j
            want = encode_prev(np.int64(hist[g]["actions"][t - 1, s] if t else -1),
                               np.int64(hist[g]["rewards"][t - 1, s] if t else 0), np.int64(1))
            assert pv[20 * j] == want
        seen.add(k)
    assert seen == {0, 1, 2, 3}  # every region index is sampled, so the short-context samples occur too


def test_batch_is_trimmed_to_its_longest_sample_without_changing_outputs(tiny_history):
    import torch

    from model import AD, ADConfig

    cfg = _cfg(tiny_history, "compressed")  # n_transit=48, regions of 20: pairs are 43 long, first regions 21
    ds = HistoryDataset(tiny_history["path"], cfg, "train", batch_size=8, seed=0)
    for step in range(6):
        b = ds.batch(step)
        used = (b["type_ids"] != STEP) | (b["target_action"] != IGNORE)
        L = b["type_ids"].shape[1]
        assert L == int(used.nonzero()[:, 1].max()) + 1 == (43 if (b["n_regions"] == 2).any() else 21)
        # pad back to n_transit as an untrimmed batch would be: same logits on the real positions, same losses
        pad = {"type_ids": STEP, "state_ids": ds.pad_state, "prev_ids": PAD_PREV, "target_action": IGNORE,
               "target_token_type": IGNORE}
        full = {k: torch.cat([v, torch.full((8, cfg["n_transit"] - L), pad[k])], 1) if k in pad else v
                for k, v in b.items()}
        torch.manual_seed(0)
        model = AD(ADConfig.from_dict(cfg)).eval()
        with torch.no_grad():
            a, f = model(b), model(full)
        torch.testing.assert_close(a["logits_action"], f["logits_action"][:, :L])
        torch.testing.assert_close(a["loss"], f["loss"])


def test_streams_of_one_goal_with_unequal_regions(stream_history):
    """With a rollout length per stream (10 or 20 steps within every goal) each sample's regions are its own stream's,
    every region closes at its own end, a batch holds both lengths from the same goal, and the last-rollout mask of the
    standard mode's final contexts covers each stream's own last rollout."""
    cfg = load_config("config/model/ad_dr_compressed.yaml", [*stream_history["overrides"], "compress_interval=20",
                                                             "n_transit=44"])
    ds = HistoryDataset(stream_history["path"], cfg, "train", batch_size=64, seed=0)
    for g in ds.goals:
        assert [len(r) for r in ds.data[g]["regions"]] == [8, 4, 8, 4]
        assert ds.data[g]["regions"][0] is ds.data[g]["regions"][2]  # one learner's streams share their region table
    b = ds.batch(0)
    by_goal = {}
    for i in range(64):
        types, tt = b["type_ids"][i], b["target_token_type"][i]
        n = int(b["n_regions"][i])
        lens = b["region_lens"][i, :n].tolist()
        assert len(set(lens)) == 1 and lens[0] in (10, 20)
        assert (types == COMPRESS_START).sum() == n and (types == COMPRESS_END).sum() == n - 1
        steps = (tt != IGNORE).nonzero().flatten()
        assert len(steps) == n * lens[0]
        assert (tt[steps] == COMPRESS_END).nonzero().flatten().tolist() == [lens[0] * j + lens[0] - 1 for j in range(n)]
        hits = [g for g in ds.goals for s in range(4) if any(
            (ds.data[g]["actions"][t0 : t0 + len(steps), s] == b["target_action"][i, steps].numpy()).all()
            and (ds.data[g]["state_ids"][t0 : t0 + len(steps), s] == b["state_ids"][i, steps].numpy()).all()
            and (s % 2 == (lens[0] == 20)) for t0 in range(0, 80 - len(steps) + 1, lens[0]))]
        assert hits, f"sample {i} is not consecutive regions of a stream with {lens[0]}-step rollouts"
        by_goal.setdefault(hits[0], set()).add(lens[0])
    assert any(v == {10, 20} for v in by_goal.values())  # one goal, both lengths: the goal does not give the length
    final = ds.final_contexts(0)
    assert (final["type_ids"] == COMPRESS_START).sum(1).tolist() == [2, 2, 2, 2]
    assert (final["in_last"].sum(1)).tolist() == [10, 20, 10, 20]
    std = HistoryDataset(stream_history["path"], load_config("config/model/ad_dr.yaml", [*stream_history["overrides"],
                         "n_transit=40", "compress_interval=20"]), "train", batch_size=4, seed=0)
    assert std.final_contexts(0)["in_last"].sum(1).tolist() == [10, 20, 10, 20]


def test_region_markers_that_do_not_tile_a_stream_are_refused():
    from common import UserError
    from dataset import region_bounds

    cstart, cend = np.zeros((40, 2), bool), np.zeros((40, 2), bool)
    cstart[[0, 20], 0], cend[[19, 39], 0] = True, True  # stream 0: two regions of 20
    cstart[[0, 10, 20, 30], 1], cend[[9, 19, 29, 39], 1] = True, True  # stream 1: four regions of 10
    assert [r.tolist() for r in region_bounds(cstart, cend, "h.hdf5", 5)] == [[[0, 20], [20, 40]],
                                                                              [[0, 10], [10, 20], [20, 30], [30, 40]]]
    cend[29, 1] = False
    with pytest.raises(UserError, match="goal 5 stream 1 do not tile the history"):
        region_bounds(cstart, cend, "h.hdf5", 5)


def test_min_source_return_leaves_out_training_tasks_the_source_never_learned(adaptive_history, tmp_path):
    """min_source_return=f keeps the training tasks whose source PPO's last rollout returned >= f x the optimum (the
    validation and test histories are never filtered); a threshold no task reaches is refused with one line."""
    import shutil

    from common import UserError
    from dataset import last_rollout_return
    from env import optimal_return

    path = tmp_path / adaptive_history["path"].name
    shutil.copy(adaptive_history["path"], path)
    with h5py.File(path, "a") as f:  # the tiny PPO never learns: give two training tasks a source that did, partly
        f["1"]["rewards"][-10:-5] = 1  # goal 1 (10-step rollouts): a reward at half of the last rollout's steps
        f["2"]["rewards"][-20:-16] = 1  # goal 2 (20 steps): at a fifth of them
        frac = {g: last_rollout_return(f[str(g)]["rewards"][:], f[str(g)]["compress_end"][:], 20) / optimal_return(g, 9, 20)
                for g in (0, 1, 2, 3)}
    assert frac[0] == frac[3] == 0 < frac[2] < frac[1] < 1
    over = [*adaptive_history["overrides"], "compress_interval=20", "n_transit=44", f"traj_dir={tmp_path}"]
    for t in (0.0, frac[2], frac[1]):
        cfg = load_config("config/model/ad_dr_compressed.yaml", [*over, f"min_source_return={t}"])
        ds = HistoryDataset(path, cfg, "train", batch_size=4, seed=0)
        assert ds.goals == sorted(g for g, v in frac.items() if v >= t)
        assert sorted(ds.dropped) == sorted(g for g, v in frac.items() if v < t)
        assert HistoryDataset(path, cfg, "test", batch_size=4, seed=0).goals == [38, 51]  # held-out: never filtered
    cfg = load_config("config/model/ad_dr_compressed.yaml", [*over, f"min_source_return={(1 + frac[1]) / 2}"])
    with pytest.raises(UserError, match="leaves no training task"):
        HistoryDataset(path, cfg, "train", batch_size=4, seed=0)
    with pytest.raises(UserError, match="min_source_return is a fraction of each task's optimum in \\[0, 1\\]"):
        load_config("config/model/ad_dr_compressed.yaml", [*over, "min_source_return=1.5"])


def _sample_regions_in_history(b, i, hist, tokens, region_len=20):
    """[(goal, stream, [region indices])] of every stream of the train goals whose regions hold sample i's regions, token
    for token (state ids, prev ids, action targets), in the sample's order."""
    n = int(b["n_regions"][i])
    steps = np.flatnonzero(b["type_ids"][i] == STEP)[: region_len * n]
    st, pv, act = (b[k][i, steps].reshape(n, region_len) for k in ("state_ids", "prev_ids", "target_action"))
    out = []
    for g, h in hist.items():
        T, S = h["actions"].shape
        for s in range(S):
            found = []
            for j in range(n):
                at = [r for r in range(T // region_len) if
                      (tokens[g][0][r * region_len : (r + 1) * region_len, s] == st[j]).all()
                      and (tokens[g][1][r * region_len : (r + 1) * region_len, s] == pv[j]).all()
                      and (h["actions"][r * region_len : (r + 1) * region_len, s] == act[j]).all()]
                if not at:
                    break
                found.append(at)
            if len(found) == n:
                out.append((g, s, found))
    return out


@pytest.mark.parametrize(("max_regions", "stride"), [(2, 2), (2, 3), (3, 2)])
def test_strided_samples_hold_regions_k_minus_js_of_one_stream(tiny_history, max_regions, stride):
    """region_stride=s: a sample is `C r_{k-(m-1)s} E ... E C r_{k-s} E C r_k` of one stream (its tokens are those regions
    of the history), with fewer regions where k < (m-1)s, down to the one-region samples `C r_k` for k < s."""
    from dataset import stream_tokens

    cfg = load_config("config/model/ad_dr_compressed.yaml", tiny_history["compressed"] + [
        f"max_regions={max_regions}", f"n_transit={max_regions * 22 + 2}", f"region_stride={stride}"])
    ds = HistoryDataset(tiny_history["path"], cfg, "train", batch_size=64, seed=2)
    b = {k: v.numpy() for k, v in ds.batch(0).items()}
    hist = {g: _history(tiny_history, g) for g in (0, 1)}
    tokens = {g: stream_tokens(h["states"], h["actions"], h["rewards"], h["dones"], 9) for g, h in hist.items()}
    seen = set()
    for i in range(64):
        n = int(b["n_regions"][i])
        layout = ([COMPRESS_START] + [STEP] * 20 + [COMPRESS_END]) * (n - 1) + [COMPRESS_START] + [STEP] * 20
        assert b["type_ids"][i, : len(layout)].tolist() == layout and (b["type_ids"][i, len(layout) :] == STEP).all()
        tt = b["target_token_type"][i, np.flatnonzero(b["type_ids"][i] == STEP)[: 20 * n]]
        assert np.flatnonzero(tt == COMPRESS_END).tolist() == [20 * j + 19 for j in range(n)]  # every region closes
        # some stream of one goal holds region k - (n-1-j)s at the j-th place, for a k that gives n regions
        fits = [(g, s, k) for g, s, found in _sample_regions_in_history(b, i, hist, tokens) for k in found[-1]
                if all(k - (n - 1 - j) * stride in found[j] for j in range(n)) and n == min(max_regions, k // stride + 1)]
        assert fits, f"sample {i} ({n} regions) is not regions k-(n-1)s..k of one stream for any k"
        seen.add(fits[0][2])
    assert seen == {0, 1, 2, 3}  # every newest region, the one-region samples of k < s included
    assert ds.sample_regions(3) == [3 - j * stride for j in range(min(max_regions, 3 // stride + 1) - 1, -1, -1)]


def test_stride_one_draws_the_batches_it_drew_before(tiny_history):
    """region_stride=1 and first_region_any=false are the sampling every run before them used: the same batches."""
    cfg = _cfg(tiny_history, "compressed")
    assert cfg["region_stride"] == 1 and cfg["first_region_any"] is False and cfg["target"] == "action"
    old = {k: v for k, v in cfg.items() if k not in ("region_stride", "first_region_any", "target")}  # a config from before
    a, b = (HistoryDataset(tiny_history["path"], c, "train", 16, seed=4) for c in (cfg, old))
    for step in range(3):
        assert all((a.batch(step)[k] == b.batch(step)[k]).all() for k in a.batch(step))
    for k in range(4):
        assert a.sample_regions(k) == list(range(max(0, k - 1), k + 1))


@pytest.mark.parametrize("stride", [1, 2])
def test_first_region_any_draws_one_region_samples_from_every_region(tiny_history, stride):
    """first_region_any=true: the one-region samples `C r_k` come from every k (not only k < stride), in the same share
    of the batch; the samples with more regions are unchanged in kind."""
    from dataset import stream_tokens

    over = tiny_history["compressed"] + [f"region_stride={stride}"]
    hist = {g: _history(tiny_history, g) for g in (0, 1)}
    tokens = {g: stream_tokens(h["states"], h["actions"], h["rewards"], h["dones"], 9) for g, h in hist.items()}
    single = {}
    for any_k in (False, True):
        cfg = load_config("config/model/ad_dr_compressed.yaml", over + [f"first_region_any={str(any_k).lower()}"])
        ds = HistoryDataset(tiny_history["path"], cfg, "train", batch_size=256, seed=5)
        b = {k: v.numpy() for k, v in ds.batch(0).items()}
        ks = set()
        for i in np.flatnonzero(b["n_regions"] == 1):
            hits = _sample_regions_in_history(b, i, hist, tokens)
            assert hits, f"one-region sample {i} is not a region of a train stream"
            ks |= set(hits[0][2][0])
        single[any_k] = (ks, (b["n_regions"] == 1).mean())
    assert single[False][0] == set(range(stride)) and single[True][0] == {0, 1, 2, 3}
    assert abs(single[True][1] - stride / 4) < 0.1 and abs(single[False][1] - stride / 4) < 0.1  # the same share: s of 4


@pytest.mark.parametrize("stride", [1, 2])
def test_a_short_first_region_is_trained_where_a_region_plays_the_first(tiny_history, stride):
    """first_region_steps=N (evaluated as eval_first_region=N): a sample whose oldest region plays the first region (a
    one-region sample, or a region r < stride) keeps only that region's first N steps, which close it (`</compress>`
    target at step N); every other sample, and every region after the oldest, is the batch it was without the key."""
    from dataset import stream_tokens

    over = tiny_history["compressed"] + [f"region_stride={stride}"]
    hist = {g: _history(tiny_history, g) for g in (0, 1)}
    tokens = {g: stream_tokens(h["states"], h["actions"], h["rewards"], h["dones"], 9) for g, h in hist.items()}
    full, short = (HistoryDataset(tiny_history["path"], load_config("config/model/ad_dr_compressed.yaml", over + o),
                                  "train", batch_size=64, seed=3).batch(0)
                   for o in ([], ["first_region_steps=8"]))
    full, short = ({k: v.numpy() for k, v in x.items()} for x in (full, short))
    assert (full["n_regions"] == short["n_regions"]).all()
    cut = 0
    for i in range(64):
        n = int(full["n_regions"][i])
        hits = _sample_regions_in_history(full, i, hist, tokens)
        assert hits, f"sample {i} is not regions of a train stream"
        first = n == 1 or min(hits[0][2][0]) < stride  # the oldest region plays the first region
        assert short["region_lens"][i, 0] == (8 if first else 20) and (short["region_lens"][i, 1:n] == 20).all()
        if not first:
            assert all((full[k][i] == short[k][i]).all() for k in full if k not in ("n_regions", "region_lens"))
            continue
        cut += 1
        for k in ("type_ids", "state_ids", "prev_ids", "target_action", "target_token_type"):
            want = np.concatenate([full[k][i, :9], full[k][i, 21 : 21 + 22 * (n - 1)]])
            if k == "target_token_type":
                want[8] = COMPRESS_END  # the short region closes after its 8th step
            assert (short[k][i, : len(want)] == want).all(), k
        assert short["type_ids"][i, :10].tolist() == [COMPRESS_START] + [STEP] * 8 + [COMPRESS_END if n > 1 else STEP]
    assert 0 < cut and (cut < 64) == (stride == 1)  # 4 regions a stream: at stride 2 every oldest region is r < 2


def test_the_stage_before_each_step_counts_the_episode_rewards():
    from dataset import episode_stage

    rewards = np.array([[0, 1], [1, 1], [0, 0], [1, 1], [1, 0], [0, 1]])
    dones = np.zeros_like(rewards, bool)
    dones[2] = True  # episodes of 3 steps
    assert episode_stage(rewards, dones).tolist() == [[0, 0], [0, 1], [1, 2], [0, 0], [1, 1], [2, 1]]


def test_dpt_labels_are_the_oracle_action_of_each_state_and_the_context_is_unchanged(tiny_history):
    """target=oracle (DPT): every step's action target is Darkroom's optimal action in that step's state for the sample's
    goal (toward the goal, row first, then stay), for both modes; the tokens the model reads are AD's, token for token."""
    from env.darkroom import goal_to_pos

    for mode in ("standard", "compressed"):
        ad = HistoryDataset(tiny_history["path"], _cfg(tiny_history, mode), "train", 32, seed=6)
        cfg = load_config(f"config/model/{'ad_dr_compressed' if mode == 'compressed' else 'ad_dr'}.yaml",
                          tiny_history[mode] + ["target=oracle"])
        dpt = HistoryDataset(tiny_history["path"], cfg, "train", 32, seed=6)
        a, b = ad.batch(0), dpt.batch(0)
        for k in ("type_ids", "state_ids", "prev_ids") + (("target_token_type",) if mode == "compressed" else ()):
            assert (a[k] == b[k]).all()
        assert ((a["target_action"] == IGNORE) == (b["target_action"] == IGNORE)).all()
        assert (a["target_action"] != b["target_action"]).any()  # PPO's actions are not the oracle's
        for g in dpt.goals:  # the labels of the loaded histories, state by state, against a hand-written oracle
            gr, gc = goal_to_pos(g)
            st = _history(tiny_history, g)["states"]
            want = np.where(st[..., 0] < gr, 0, np.where(st[..., 0] > gr, 1, np.where(st[..., 1] < gc, 2,
                            np.where(st[..., 1] > gc, 3, 4))))
            assert (dpt.data[g]["target"] == want).all() and (dpt.data[g]["actions"] == ad.data[g]["actions"]).all()
        # and in the batch: each label is the oracle's at the token's own state, for the goal whose history holds it
        sup = (b["target_action"] != IGNORE).numpy()
        rows, cols = np.nonzero(sup)
        st = b["state_ids"].numpy()[rows, cols]
        labels = b["target_action"].numpy()[rows, cols]
        oracle = {g: np.array([dpt.data[g]["target"].ravel()[dpt.data[g]["state_ids"].ravel() == s][:1].tolist() or [-1]
                               for s in range(81)])[:, 0] for g in dpt.goals}
        assert all(any(oracle[g][s] == lab for g in dpt.goals) for s, lab in zip(st, labels, strict=True))


def test_bad_sampling_keys_are_refused_in_one_line(tiny_history):
    from common import UserError

    for over, msg in ((["target=ppo"], "target must be one of action, oracle"),
                      (["region_stride=2"], "region_stride=2 is for compressed mode"),
                      (["first_region_any=true"], "first_region_any=true is for compressed mode"),
                      (["first_region_steps=20"], "first_region_steps=20 is for compressed mode")):
        cfg = load_config("config/model/ad_dr.yaml", tiny_history["standard"] + over)
        with pytest.raises(UserError, match=msg):
            HistoryDataset(tiny_history["path"], cfg, "train", 2, seed=0)
    with pytest.raises(UserError, match="region_stride' must be > 0"):
        load_config("config/model/ad_dr_compressed.yaml", tiny_history["compressed"] + ["region_stride=0"])
    with pytest.raises(UserError, match="first_region_steps=8 trained for a first region of 8 steps: evaluate with "
                                        "eval_first_region=8 or 0 \\(as trained\\), not 4"):
        load_config("config/model/ad_dr_compressed.yaml", tiny_history["compressed"] + ["first_region_steps=8",
                                                                                        "eval_first_region=4"])
    cfg = load_config("config/model/ad_dr_compressed.yaml", tiny_history["compressed"] + ["first_region_steps=20"])
    with pytest.raises(UserError, match="first_region_steps=20 is not shorter than a region \\(compress_interval=20\\)"):
        HistoryDataset(tiny_history["path"], cfg, "train", 2, seed=0)
    with pytest.raises(UserError, match="config key 'first_region_steps' must be >= 0, got -1"):
        load_config("config/model/ad_dr_compressed.yaml", tiny_history["compressed"] + ["first_region_steps=-1"])
