"""A training batch's gradient computed in row shards, on parallel threads where the run has the cores (CPU).

This model's matrices are small (d_model 64), so a second intra-op thread speeds a training step up by only
1.1-1.4x on a 2-core CPU; two half-batch shards, each on a thread of its own with one intra-op thread, were
0.98-1.12x (standard) and 1.01-1.32x (compressed) as fast as that on an AVX2 CPU (docs/experiments.md E71, E72), and
cost nothing on one thread. `train_shards` fixes how a batch is split, not how many threads
run it: each shard's loss is its share of the batch's objective (its targets over the batch's), and the shards'
gradients are summed in a fixed order, so a run's numbers do not depend on how many cores it had or on when a freed
core was handed over (with intra-op threads they do: the thread count changes fp32 rounding). The objective is the
full batch's; only the rounding differs from one unsplit pass.

Used on CPU in a single process only: under DDP the gradients must flow through DDP's backward hooks, and on a GPU
shards would only serialise the work (train.py takes the one-pass step there). With dropout the shards run one after
the other: parallel shards would draw from torch's one generator in an order that depends on timing.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from model.ad import IGNORE


def shards_apply(train_shards: int, device_type: str, num_processes: int = 1, compile: bool = False) -> bool:
    """Whether a step runs as row shards: more than one asked for, on CPU, one process (DDP needs its backward hooks),
    eager (a compiled model stays one pass). train.py and bench.py both ask here."""
    return train_shards > 1 and device_type == "cpu" and num_processes == 1 and not compile


def row_shards(batch: dict, n: int) -> list[dict]:
    """`batch` (every tensor row-major: (B, ...)) split into at most n contiguous row ranges of near-equal size."""
    rows = next(iter(batch.values())).shape[0]
    bounds = torch.linspace(0, rows, min(n, rows) + 1).round().long().tolist()
    return [{k: v[a:b] for k, v in batch.items()} for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def merge_outputs(outs: list[dict], n_action: list[int], n_type: list[int]) -> dict:
    """The shards' outputs as one pass over the whole batch would report them: per-target means weighted by each shard's
    targets, counts summed (the metrics train.py logs)."""
    N, M = sum(n_action), sum(n_type)
    merged = {"n_targets": sum(o["n_targets"] for o in outs)}
    for key, counts, total in (("loss_action", n_action, N), ("acc_action", n_action, N),
                               ("loss_token_type", n_type, M), ("acc_token_type", n_type, M)):
        if key in outs[0]:
            merged[key] = sum(o[key].detach() * (c / total) for o, c in zip(outs, counts, strict=True) if c)
    for key in ("n_true_positive", "n_pred_end", "n_true_end"):
        if key in outs[0]:
            merged[key] = sum(o[key] for o in outs)
    return merged


class ShardedStep:
    """Forward and backward of a batch in `shards` row shards; writes the summed gradient to each parameter's `.grad`
    and returns the merged outputs (`merge_outputs`, plus "loss"). `cores`: threads the run may use; `add_core` gives it
    one more (train.take_free_core). Shards run in parallel on min(shards, cores) threads, each with
    max(1, cores // shards) intra-op threads."""

    def __init__(self, model, shards: int, cores: int, autocast, parallel: bool = True):
        self.model, self.shards, self.autocast = model, shards, autocast
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.parallel = parallel  # False: one after the other whatever the cores (dropout: see the module's docstring)
        self.cores, self.pool, self.pool_size = max(1, cores), None, 0

    def add_core(self, limit: int) -> int:
        self.cores = min(self.cores + 1, limit)
        return self.cores

    def _workers(self) -> int:
        return min(self.shards, self.cores) if self.parallel else 1

    def _intra(self) -> int:
        return max(1, self.cores // self.shards)

    def _shard(self, sub: dict, action_scale: float, type_scale: float):
        torch.set_num_threads(self._intra())  # per calling thread where OpenMP keeps the count per thread
        with self.autocast():
            out = self.model(sub)
        loss = self.model.objective(out, action_scale, type_scale)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return out, loss.detach(), grads

    def __call__(self, batch: dict) -> dict:
        subs = row_shards(batch, self.shards)
        n_action = [int((s["target_action"] != IGNORE).sum()) for s in subs]
        n_type = [int((s["target_token_type"] != IGNORE).sum()) if "target_token_type" in s else 0 for s in subs]
        N, M = max(1, sum(n_action)), max(1, sum(n_type))  # a shard without such targets gets scale 0
        args = [(s, a / N, t / M) for s, a, t in zip(subs, n_action, n_type, strict=True)]
        workers = self._workers()
        if workers > 1:
            if self.pool_size != workers:
                if self.pool is not None:
                    self.pool.shutdown()
                self.pool, self.pool_size = ThreadPoolExecutor(workers, thread_name_prefix="shard"), workers
            results = list(self.pool.map(lambda a: self._shard(*a), args))
        else:
            results = [self._shard(*a) for a in args]
        for i, p in enumerate(self.params):  # summed in shard order: the same numbers however many threads ran them
            parts = [r[2][i] for r in results if r[2][i] is not None]
            p.grad = None if not parts else sum(parts[1:], parts[0])
        out = merge_outputs([r[0] for r in results], n_action, n_type)
        out["loss"] = sum(r[1] for r in results)
        torch.set_num_threads(self.cores)  # the rest of the run (optimiser, validation rollouts) keeps its cores
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool, self.pool_size = None, 0
