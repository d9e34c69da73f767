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


def test_test_split_uses_held_out_goals_only(tiny_history):
    cfg = _cfg(tiny_history, "standard")
    assert HistoryDataset(tiny_history["path"], cfg, "test", 2, seed=0).goals == [38, 51]
    assert HistoryDataset(tiny_history["path"], cfg, "train", 2, seed=0).goals == [0, 1]


def test_first_step_of_a_stream_has_no_previous_step(tiny_history):
    h = _history(tiny_history, 0)
    from dataset import stream_tokens

    _, prev = stream_tokens(h["states"], h["actions"], h["rewards"], h["dones"], 9)
    assert (prev[0] == NO_PREV + NO_PREV + 1).all()  # "none" with the episode-start flag
    assert (prev[20] >= NO_PREV + 1).all() and (prev[1] < NO_PREV).all()  # episode start flag at t=20 only


@pytest.mark.parametrize("k_expected", ["pair", "single"])
def test_compressed_samples_are_consecutive_regions(tiny_history, k_expected):
    cfg = _cfg(tiny_history, "compressed")
    ds = HistoryDataset(tiny_history["path"], cfg, "train", batch_size=32, seed=1)
    b = {k: v.numpy() for k, v in ds.batch(0).items()}
    want_pair = k_expected == "pair"
    rows = np.flatnonzero((b["prev_region_len"] > 0) == want_pair)
    assert len(rows) > 0
    for i in rows:
        types, n_prev, n_curr = b["type_ids"][i], b["prev_region_len"][i], b["curr_region_len"][i]
        assert n_curr == 20 and n_prev == (20 if want_pair else 0)
        if want_pair:
            layout = [COMPRESS_START] + [STEP] * 20 + [COMPRESS_END, COMPRESS_START] + [STEP] * 20
        else:
            layout = [COMPRESS_START] + [STEP] * 20
        assert types[: len(layout)].tolist() == layout
        L = len(types)  # 43: the batch is trimmed to its longest sample, a pair (n_transit is 48)
        assert L == 43
        steps = np.flatnonzero((np.arange(L) < len(layout)) & (types == STEP))
        assert (b["target_action"][i, steps] != IGNORE).all()
        assert (b["target_action"][i][np.setdiff1d(np.arange(L), steps)] == IGNORE).all()
        tt = b["target_token_type"][i, steps]
        closing = [19, 39] if want_pair else [19]
        assert (np.flatnonzero(tt == COMPRESS_END) == closing).all() and (np.delete(tt, closing) == STEP).all()
        if want_pair:  # the two regions are consecutive in one stream: prev tokens chain across the boundary
            st = b["state_ids"][i]
            acts = b["target_action"][i]
            found = False
            for goal in (0, 1):
                h = _history(tiny_history, goal)
                for s in range(4):
                    for k in range(1, 4):
                        t0 = (k - 1) * 20
                        if (encode_state(h["states"][t0 : t0 + 40, s], 9) == st[steps]).all() and (
                            h["actions"][t0 : t0 + 40, s] == acts[steps]
                        ).all():
                            found = True
            assert found


def test_batch_is_trimmed_to_its_longest_sample_without_changing_outputs(tiny_history):
    import torch

    from model import AD, ADConfig

    cfg = _cfg(tiny_history, "compressed")  # n_transit=48, regions of 20: pairs are 43 long, first regions 21
    ds = HistoryDataset(tiny_history["path"], cfg, "train", batch_size=8, seed=0)
    for step in range(6):
        b = ds.batch(step)
        used = (b["type_ids"] != STEP) | (b["target_action"] != IGNORE)
        L = b["type_ids"].shape[1]
        assert L == int(used.nonzero()[:, 1].max()) + 1 == (43 if (b["prev_region_len"] > 0).any() else 21)
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
