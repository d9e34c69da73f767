"""Summary tokens for closed regions: who sees what, and at which position (pure torch).

After each `</compress>` the model writes `n_summary` summary tokens (type ids `SUMMARY + j`, one learned embedding per
j). When a region is pruned its step and marker tokens leave the context, its summary tokens' keys/values stay. A
sequence is described by one region index per token (`region_ids`, oldest region first, -1 = padding) and by
`first_raw`, the index of the oldest region the context still holds raw; regions before it are *pruned*.

Layout (training and the uncached evaluation reference): the pruned regions come first, each `C r E S^n`, then the raw
regions `C r E S^n ... C r_k` (no `E` after the open region k). At evaluation the pruned regions are not in the cache,
only the summaries the rule below lets a raw token see.

Visibility (`visible`), on top of causality (a token sees only tokens before it and itself):
- a token's *view* starts at `base = min(its region, first_raw)`: a token of a pruned region p was last computed when p
  was the oldest raw region (evaluation rebuilds every raw token after each prune), so it sees raw tokens of its own
  region only; a raw token sees the raw tokens of the regions `first_raw..its own`;
- a summary token of region j sees the raw tokens of region j only, the earlier summary tokens of its own group, and
  older summaries as any token does;
- older summaries: `accumulate` (Memo-like) - the summaries of the regions `base - max_summaries .. own - 1` (the
  context keeps the summaries of the last `max_summaries` pruned regions, and those of its closed raw regions);
  `recurrent` (RSM-like) - the summary of the previous region only (each summary attends to the one before it and
  replaces it; the cache keeps one pruned summary); `feedback` - who sees whom as in recurrent, but a *pruned*
  summary shows every layer the keys/values of its last-layer states (through that layer's projection: `AD.memory_kv`,
  as the Feedback Transformer's memory), not its own per-layer keys/values.
So every token after a pruned region sees it only through summary tokens. A summary reads older summaries' keys and
values at the same layer, so information moves one summary hop per layer: through the recurrent chain a region reaches
a token at most `n_layer - 1` regions after it (accumulate reads the kept summaries directly), and a recurrent
training sample with `n_layer + 1 - max_regions` pruned regions computes its open region exactly as evaluation does,
however long the evaluation (summary.py). A feedback summary is written from the previous one's top, so the chain
carries a region on without that bound; the price is order: a pruned region's memory exists only once it has been
computed, so training computes the pruned regions of a sample one after another (`AD.summary_hidden`), and a sample
equals an evaluation context only while it reaches back to the stream's start (its chain is truncated there).

Positions (`layout_positions`): the raw part restarts at 0 at the oldest raw region's `<compress>`, as without
summaries, and summary tokens take positions in it like any token (`... E S_1 .. S_n C ...`); each pruned region is
positioned as it was when it was the oldest raw region: its `<compress>` at 0, its summaries at `len + 2 ..`. A summary's
frozen keys/values were computed at exactly those positions, so an evaluation cache equals a teacher-forced pass over
this layout, and positions never exceed the raw part's length (`n_transit`) however long the evaluation runs.
"""

from __future__ import annotations

import torch

ACCUMULATE, RECURRENT, FEEDBACK = "accumulate", "recurrent", "feedback"
SUMMARY_MODES = (ACCUMULATE, RECURRENT, FEEDBACK)


def visible(q_region, q_summary, k_region, k_summary, first_raw, mode: str, max_summaries: int) -> torch.Tensor:
    """May a query token see a key token (causality aside)? All arguments broadcast: regions are integer tensors,
    `*_summary` boolean tensors (the token is a summary token), `first_raw` the oldest raw region."""
    base = torch.minimum(q_region, first_raw)  # the oldest raw region when the query was (last) computed
    own = k_region == q_region
    raw_key = ~k_summary & (k_region >= base) & (k_region <= q_region) & (own | ~q_summary)
    if mode == ACCUMULATE:
        kept = k_region >= base - max_summaries
    elif mode in (RECURRENT, FEEDBACK):  # feedback: who sees whom as recurrent; what a pruned summary shows differs
        kept = k_region == q_region - 1
    else:
        raise ValueError(f"summary_mode must be one of {SUMMARY_MODES}, got {mode!r}")
    summary_key = k_summary & (((k_region < q_region) & kept) | (own & q_summary))
    return raw_key | summary_key


def attention_mask(region_ids, is_summary, first_raw, mode: str, max_summaries: int) -> torch.Tensor:
    """(B, T, T) boolean mask (True = attend) for right-padded sequences (B, T) laid out as in the module docstring;
    `first_raw` (B,). Every token sees itself, so no row is empty (padding rows included)."""
    T = region_ids.shape[1]
    q_r, k_r = region_ids[:, :, None], region_ids[:, None, :]
    rule = visible(q_r, is_summary[:, :, None], k_r, is_summary[:, None, :], first_raw[:, None, None], mode, max_summaries)
    causal = torch.ones(T, T, dtype=torch.bool, device=region_ids.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=region_ids.device)
    return (rule & causal & (k_r >= 0)) | eye


def key_ranges(mask: torch.Tensor, chunk: int) -> list[tuple[int, int, int]]:
    """Query chunks `(start, stop, lo)` of a (B, T, P + T) mask (P >= 0 prefix keys in front of the T tokens' own: a
    feedback memory) such that every key a query in `start..stop-1` may see lies in `lo..stop+P-1` (for every row of the
    batch): attention computed chunk by chunk over those keys only equals the full masked attention. A pruned region's
    tokens see only their region and the summaries just before it, so most of the (T, T) square is masked out and the
    chunks skip it (the CPU flash kernel skips masked blocks only when causal)."""
    T, S = mask.shape[1], mask.shape[2]
    first = torch.where(mask.any(0), torch.arange(S, device=mask.device), S).amin(1).tolist()  # first visible key per query
    return [(a, min(T, a + chunk), min(first[a:a + chunk])) for a in range(0, T, chunk)]


def prefix_mask(region_ids, is_summary, has_prefix, mode: str, max_summaries: int) -> torch.Tensor:
    """(B, T) boolean: may each token of a sequence whose regions start at 0 (all raw) see the summary of region -1 (a
    feedback memory in front of it), where a row `has_prefix` (B,)? `visible`'s rule: region 0 sees it."""
    minus_one = torch.full_like(region_ids, -1)
    rule = visible(region_ids, is_summary, minus_one, torch.ones_like(is_summary), torch.zeros_like(region_ids), mode,
                   max_summaries)
    return rule & (region_ids >= 0) & has_prefix[:, None]


def segment(region_ids, lo, hi=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens of regions lo..hi (hi None: to the end) of each row of a layout (contiguous, as regions are), as
    (B, W) indices into the row (past a row's own tokens: clamped, not valid) and the (B, W) boolean of the valid ones;
    `lo`, `hi` ints or (B,) tensors."""
    B, T = region_ids.shape
    lo = torch.as_tensor(lo, device=region_ids.device).expand(B)
    hi = region_ids.max(1).values if hi is None else torch.as_tensor(hi, device=region_ids.device).expand(B)
    sel = (region_ids >= lo[:, None]) & (region_ids <= hi[:, None])
    start, length = sel.int().argmax(1), sel.sum(1)
    W = max(int(length.max()), 1)
    idx = start[:, None] + torch.arange(W, device=region_ids.device)
    return idx.clamp(max=T - 1), torch.arange(W, device=region_ids.device) < length[:, None]


def layout_positions(region_ids, first_raw) -> torch.Tensor:
    """(B, T) positions: each pruned region restarts at 0, and so does the raw part (at its oldest region); padding
    (region -1) is at 0."""
    block = torch.minimum(region_ids, first_raw[:, None])  # one block per pruned region, one for the whole raw part
    idx = torch.arange(region_ids.shape[1], device=region_ids.device).expand_as(block)
    starts = torch.ones_like(block, dtype=torch.bool)
    starts[:, 1:] = block[:, 1:] != block[:, :-1]
    return torch.where(region_ids >= 0, idx - torch.where(starts, idx, 0).cummax(1).values, 0)
