"""Row shards of a training batch (shards.py): the gradient and metrics of one pass over the whole batch, the same
numbers on one core as on several, and where train.py uses them."""

import contextlib
import os

import pytest
import torch

from model import MODEL, ADConfig
from model.ad import IGNORE
from shards import ShardedStep, merge_outputs, row_shards


def _model(compressed: bool, dropout: float = 0.0):
    torch.manual_seed(0)
    return MODEL["AD"](ADConfig(n_transit=40, d_model=16, n_layer=2, n_head=2, use_compressed_context=compressed,
                                dropout=dropout))


def _batch(compressed: bool, rows: int = 7, T: int = 40):
    g = torch.Generator().manual_seed(1)
    b = {"type_ids": torch.zeros(rows, T, dtype=torch.long), "state_ids": torch.randint(0, 81, (rows, T), generator=g),
         "prev_ids": torch.randint(0, 22, (rows, T), generator=g),
         "target_action": torch.randint(0, 5, (rows, T), generator=g)}
    b["target_action"][:3, 25:] = IGNORE  # rows with fewer targets: the shards' shares differ
    if compressed:
        b["target_token_type"] = torch.randint(0, 2, (rows, T), generator=g) * 2
        b["target_token_type"][4:, :30] = IGNORE
    return b


def _grads(model):
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def test_row_shards_cover_the_rows_once_in_order():
    b = {"a": torch.arange(7)[:, None].expand(7, 3), "n": torch.arange(7)}
    parts = row_shards(b, 3)
    assert sorted(len(p["n"]) for p in parts) == [2, 2, 3]
    assert torch.equal(torch.cat([p["n"] for p in parts]), b["n"])
    assert len(row_shards(b, 20)) == 7  # never an empty shard


@pytest.mark.parametrize("compressed", [False, True])
def test_sharded_step_is_the_whole_batch_objective(compressed):
    model, batch = _model(compressed), _batch(compressed)
    out = model(batch)
    out["loss"].backward()
    ref = _grads(model)
    model.zero_grad(set_to_none=True)
    runner = ShardedStep(model, 3, 1, contextlib.nullcontext)
    got = runner(batch)
    runner.close()
    for a, b in zip(_grads(model), ref, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for k in ("loss", "loss_action", "acc_action", "loss_token_type", "acc_token_type"):
        if k in out:
            assert float(got[k]) == pytest.approx(float(out[k].detach()), rel=1e-5), k
    for k in ("n_targets", "n_true_positive", "n_pred_end", "n_true_end"):
        if k in out:
            assert int(got[k]) == int(out[k]), k


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores to run shards in parallel")
@pytest.mark.parametrize("compressed", [False, True])
def test_the_same_numbers_on_one_core_and_on_two(compressed):
    """The point of fixing the shards rather than the threads: a core handed over mid-run changes no number."""
    model, batch = _model(compressed), _batch(compressed)
    before = torch.get_num_threads()
    try:
        results = []
        for cores in (1, 2):
            runner = ShardedStep(model, 2, cores, contextlib.nullcontext)
            assert runner._workers() == cores
            out = runner(batch)
            runner.close()
            results.append((_grads(model), float(out["loss"])))
            model.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(before)
    (g1, l1), (g2, l2) = results
    assert l1 == l2
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True) if a is not None)


def test_add_core_stops_at_the_limit_and_dropout_runs_shards_in_turn():
    runner = ShardedStep(_model(False, dropout=0.1), 2, 1, contextlib.nullcontext, parallel=False)
    assert runner.add_core(2) == 2 and runner.add_core(2) == 2
    assert runner._workers() == 1  # dropout: one after the other, whatever the cores


def test_merge_outputs_weights_means_by_targets():
    outs = [{"n_targets": torch.tensor(1), "loss_action": torch.tensor(1.0), "acc_action": torch.tensor(0.0)},
            {"n_targets": torch.tensor(3), "loss_action": torch.tensor(2.0), "acc_action": torch.tensor(1.0)}]
    m = merge_outputs(outs, [1, 3], [0, 0])
    assert float(m["loss_action"]) == pytest.approx(1.75) and float(m["acc_action"]) == pytest.approx(0.75)
    assert int(m["n_targets"]) == 4


def test_train_uses_shards_only_on_one_cpu_process_without_compile():
    from types import SimpleNamespace

    from train import SHARDS, shard_runner

    model = _model(False)
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=1, autocast=contextlib.nullcontext)
    cfg = {"train_shards": 2, "compile": False, "dropout": 0.0}
    try:
        assert isinstance(shard_runner(cfg, model, acc), ShardedStep)
        assert shard_runner({**cfg, "train_shards": 1}, model, acc) is None
        assert shard_runner({**cfg, "compile": True}, model, acc) is None
        assert shard_runner(cfg, model, SimpleNamespace(**{**vars(acc), "num_processes": 2})) is None  # DDP
        assert shard_runner(cfg, model, SimpleNamespace(**{**vars(acc), "device": torch.device("meta")})) is None
        assert shard_runner({**cfg, "dropout": 0.1}, model, acc).parallel is False
    finally:
        SHARDS.clear()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores to take a second one")
def test_a_freed_core_goes_to_the_shards_not_to_intra_op_threads():
    from train import SHARDS, take_free_core

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        SHARDS[:] = [ShardedStep(_model(False), 2, 1, contextlib.nullcontext)]
        take_free_core()
        assert SHARDS[0].cores == 2 and SHARDS[0]._workers() == 2 and SHARDS[0]._intra() == 1
        SHARDS[0](_batch(False))
        assert torch.get_num_threads() == 2  # after a step the rest of the run (validation rollouts) has both cores
    finally:
        for runner in SHARDS:
            runner.close()
        SHARDS.clear()
        torch.set_num_threads(before)
