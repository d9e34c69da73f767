"""Algorithm Distillation transformer (pure nn.Module: no I/O, no environment).

One token per decision step t: `embed(s_t) + embed(a_{t-1}, r_{t-1}, episode-start flag)` plus a learned
position (docs/design.md §3). In compressed mode `<compress>` (type 1) and `</compress>` (type 2) are their own
tokens. The action head at a step token predicts a_t; the token-type head predicts whether the step closes
its region (2) or not (0). With `use_summary`, `n_summary` summary tokens (type ids `SUMMARY + j`, learned embeddings,
no targets) follow each `</compress>` and a boolean attention mask (model/summary.py) decides what each token sees.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.summary import FEEDBACK, attention_mask, key_ranges, layout_positions, prefix_mask, segment

N_ACTIONS = 5
STEP, COMPRESS_START, COMPRESS_END = 0, 1, 2  # token types
N_TOKEN_TYPES = 3  # the types of the type embedding and of the token-type head
SUMMARY = N_TOKEN_TYPES  # type id of the j-th summary token of a group: SUMMARY + j (an embedding of its own, no head class)
IGNORE = -100  # target value that is not supervised (markers, padding)
N_REWARDS = 2  # Darkroom rewards are 0 or 1
ATTENTION_CHUNK = 64  # queries per chunk of masked (summary-mode) attention: 1.2-1.4x faster training steps at T=425 (E54)
NO_PREV = N_ACTIONS * N_REWARDS  # "no previous step" (very first step of a stream)


def n_state_ids(grid_size: int) -> int:
    return grid_size * grid_size + 1  # the last id is padding / marker (zero embedding)


N_PREV_IDS = 2 * (NO_PREV + 1) + 1  # (action, reward) or none, times episode-start flag, plus padding
PAD_PREV = N_PREV_IDS - 1


def encode_state(pos, grid_size: int):
    """(..., 2) integer positions -> state ids."""
    return pos[..., 0] * grid_size + pos[..., 1]


def encode_prev(prev_action, prev_reward, episode_start):
    """Previous step's (action, reward) and whether step t starts an episode -> one id.
    `prev_action < 0` means there is no previous step."""
    ar = prev_action * N_REWARDS + prev_reward.clip(0, N_REWARDS - 1)
    ar = ar * (prev_action >= 0) + NO_PREV * (prev_action < 0)
    return ar + (NO_PREV + 1) * episode_start


def closes_region(logits_token_type: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Does the token-type head close the region here? `</compress>` is its argmax (threshold 0), or its probability is at
    least `threshold` (a calibration chosen on validation tasks: the head can rank a boundary first yet hold it below
    the argmax when the boundary is rare in training)."""
    if threshold <= 0:
        return logits_token_type.argmax(-1) == COMPRESS_END
    return torch.softmax(logits_token_type.float(), -1)[..., COMPRESS_END] >= threshold


@dataclass
class ADConfig:
    grid_size: int = 9
    n_transit: int = 240
    d_model: int = 64
    n_layer: int = 4
    n_head: int = 4
    dropout: float = 0.0
    use_compressed_context: bool = False
    token_type_loss_weight: float = 0.1
    state_embedding: str = "rowcol"  # "rowcol": embed(row) + embed(col); "table": one vector per cell
    use_summary: bool = False  # summary tokens after each </compress> (model/summary.py)
    n_summary: int = 0
    summary_mode: str = "accumulate"
    max_summaries: int = 1

    @classmethod
    def from_dict(cls, cfg: dict) -> ADConfig:
        """The model keys of a config; the summary keys may be missing (configs and checkpoints from before them)."""
        fields = cls.__dataclass_fields__
        return cls(**{k: cfg[k] if k not in SUMMARY_FIELDS else cfg.get(k, fields[k].default) for k in fields})


SUMMARY_FIELDS = ("use_summary", "n_summary", "summary_mode", "max_summaries")


def masked_attention(q, k, v, mask, dropout_p: float, ranges=None):
    """SDPA of queries (B, H, T, Dh) over keys/values (B, H, P + T, Dh): causal without `mask` (P = 0), else under the
    boolean `mask` (B, 1, T, P + T), whose first P keys are a prefix (a feedback memory, model/summary.py); with
    `ranges` [(start, stop, lo)], query chunk start..stop-1 attends to keys lo..stop+P-1 only (every key it may see is
    there)."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    if ranges is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    P = k.shape[2] - q.shape[2]
    return torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, lo:b + P], v[:, :, lo:b + P],
                                                     attn_mask=mask[..., a:b, lo:b + P], dropout_p=dropout_p)
                      for a, b, lo in ranges], dim=2)


class Block(nn.Module):
    def __init__(self, c: ADConfig):
        super().__init__()
        self.n_head, self.dropout = c.n_head, c.dropout
        self.ln1, self.ln2 = nn.LayerNorm(c.d_model), nn.LayerNorm(c.d_model)
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.proj = nn.Linear(c.d_model, c.d_model)
        self.mlp = nn.Sequential(nn.Linear(c.d_model, 4 * c.d_model), nn.GELU(), nn.Linear(4 * c.d_model, c.d_model))
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x, kv=None, slots=None, bias=None, mask=None, ranges=None, prefix=None):
        """x: (B, T, D). Without `kv`: causal attention over x, or under the boolean `mask` (B, T, P + T) (True = attend),
        chunk by chunk over the key `ranges` of model/summary.py `key_ranges` when given; `prefix` = (K, V) (B, H, P, Dh)
        are P keys/values in front of x's own (a feedback memory: `memory_kv`). Returns the new hidden states and x's own
        (k, v).
        With `kv` = (K, V) caches (B, H, L, Dh): the new keys/values are written at the flat row indices `slots` (B*H*T,)
        of the caches seen as (B*H*L, Dh), and queries attend to all L slots under the additive mask `bias` (B*H, T, L)
        (0 = visible, -inf = not)."""
        B, T, D = x.shape
        H = self.n_head
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)  # each (B, H, T, Dh)
        drop = self.dropout if self.training else 0.0
        if kv is None:
            m = None if mask is None else mask[:, None]  # (B, 1, T, P + T): the same for every head
            if prefix is not None:
                k, v = torch.cat([prefix[0].to(k.dtype), k], 2), torch.cat([prefix[1].to(v.dtype), v], 2)
            if x.device.type == "cpu" and q.dtype != torch.float32:
                # bf16 autocast on CPU: the linear layers gain ~5x from bf16 matmuls, but the CPU flash-attention kernel
                # at head dim 16 is ~1.5x slower in bf16 than in fp32 (docs/experiments.md E7), so attention runs in fp32
                with torch.autocast("cpu", enabled=False):
                    y = masked_attention(q.float(), k.float(), v.float(), m, drop, ranges)
            else:
                y = masked_attention(q, k, v, m, drop, ranges)
            P = 0 if prefix is None else prefix[0].shape[2]
            new_kv = (k[:, :, P:], v[:, :, P:])
        else:
            # Decoding a few tokens per stream: explicit bmm attention over the whole (contiguous) cache is faster on
            # CPU than SDPA's flash kernel with a mask, and slicing the cache to the used length makes bmm copy it.
            K, V = kv
            L, Dh = K.shape[2], K.shape[3]
            K.view(-1, Dh).index_copy_(0, slots, k.reshape(-1, Dh))
            V.view(-1, Dh).index_copy_(0, slots, v.reshape(-1, Dh))
            att = torch.baddbmm(bias, q.reshape(B * H, T, Dh), K.view(B * H, L, Dh).transpose(1, 2), alpha=Dh**-0.5)
            y = torch.bmm(att.softmax(-1), V.view(B * H, L, Dh)).view(B, H, T, Dh)
            new_kv = (K, V)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, D)))
        x = x + self.drop(self.mlp(self.ln2(x)))
        return x, new_kv


class AD(nn.Module):
    def __init__(self, c: ADConfig):
        super().__init__()
        self.config = c
        G = c.grid_size
        if c.state_embedding == "rowcol":
            # row and column vectors are shared across cells, so "go to the rewarded cell" transfers to goals
            # never seen as goals in training; id G is padding / marker
            self.row_emb = nn.Embedding(G + 1, c.d_model, padding_idx=G)
            self.col_emb = nn.Embedding(G + 1, c.d_model, padding_idx=G)
        elif c.state_embedding == "table":
            self.state_emb = nn.Embedding(n_state_ids(G), c.d_model, padding_idx=n_state_ids(G) - 1)
        else:
            raise ValueError(f"state_embedding must be 'rowcol' or 'table', got {c.state_embedding!r}")
        self.prev_emb = nn.Embedding(N_PREV_IDS, c.d_model, padding_idx=PAD_PREV)
        self.type_emb = nn.Embedding(N_TOKEN_TYPES, c.d_model)
        if c.use_summary and c.n_summary < 1:
            raise ValueError(f"use_summary needs n_summary >= 1, got {c.n_summary}")
        self.summary_emb = nn.Embedding(c.n_summary, c.d_model) if c.use_summary else None
        self.pos_emb = nn.Embedding(c.n_transit, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.d_model)
        self.head_action = nn.Linear(c.d_model, N_ACTIONS)
        self.head_token_type = nn.Linear(c.d_model, N_TOKEN_TYPES) if c.use_compressed_context else None
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "padding_idx", None) is not None:
                m.weight.data[m.padding_idx].zero_()
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def embed_state(self, state_ids):
        if self.config.state_embedding == "table":
            return self.state_emb(state_ids)
        G = self.config.grid_size
        pad = state_ids == G * G
        row = torch.where(pad, G, state_ids // G)
        col = torch.where(pad, G, state_ids % G)
        return self.row_emb(row) + self.col_emb(col)

    def embed_type(self, type_ids):
        if self.summary_emb is None:
            return self.type_emb(type_ids)
        is_summary = (type_ids >= SUMMARY)[..., None]
        summary = self.summary_emb((type_ids - SUMMARY).clamp(min=0))
        return torch.where(is_summary, summary, self.type_emb(type_ids.clamp(max=N_TOKEN_TYPES - 1)))

    def embed(self, type_ids, state_ids, prev_ids, pos_ids):
        x = self.embed_type(type_ids) + self.embed_state(state_ids) + self.prev_emb(prev_ids) + self.pos_emb(pos_ids)
        return self.drop(x)

    def summary_layout(self, type_ids, region_ids, first_raw):
        """Positions (B, T) and attention mask (B, T, T) of a summary-mode sequence (model/summary.py)."""
        c = self.config
        mask = attention_mask(region_ids, type_ids >= SUMMARY, first_raw, c.summary_mode, c.max_summaries)
        return layout_positions(region_ids, first_raw), mask

    def heads(self, h):
        h = self.ln_f(h)
        logits_type = self.head_token_type(h) if self.head_token_type is not None else None
        return self.head_action(h), logits_type

    def trunk(self, type_ids, state_ids, prev_ids, pos_ids=None, attn_mask=None, prefix=None):
        """Full pass over right-padded sequences (B, T): causal at positions 0..T-1, or at `pos_ids` under the boolean
        `attn_mask` (B, T, T), attention then computed by query chunks over the keys they may see (`key_ranges`);
        `prefix` = (per-layer (K, V) of P keys, (B, T, P) boolean of who sees them) puts P keys/values in front of every
        layer's own. Returns hidden states and per-layer (K, V) of the T tokens."""
        pos = torch.arange(type_ids.shape[1], device=type_ids.device).expand_as(type_ids) if pos_ids is None else pos_ids
        h = self.embed(type_ids, state_ids, prev_ids, pos)
        kv_prefix = [None] * len(self.blocks)
        if prefix is not None:
            kv_prefix, seen = prefix
            attn_mask = torch.cat([seen, attn_mask], 2)
        ranges = None if attn_mask is None else key_ranges(attn_mask, ATTENTION_CHUNK)
        kvs = []
        for blk, p in zip(self.blocks, kv_prefix, strict=True):
            h, kv = blk(h, mask=attn_mask, ranges=ranges, prefix=p)
            kvs.append(kv)
        return h, kvs

    def memory_kv(self, h) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Feedback memory (summary_mode=feedback): the keys/values every layer reads for a pruned region's summary are
        its summary tokens' last-layer states `h` (B, n, D) through that layer's own key/value projection (as the
        Feedback Transformer's memory), so a summary written from the previous one's top carries it on however many
        regions back; per layer (K, V), (B, H, n, Dh) each."""
        B, n, D = h.shape
        H = self.config.n_head
        out = []
        for blk in self.blocks:
            _, k, v = blk.qkv(blk.ln1(h)).view(B, n, 3, H, D // H).permute(2, 0, 3, 1, 4)
            out.append((k, v))
        return out

    def summary_hidden(self, type_ids, state_ids, prev_ids, region_ids, first_raw):
        """Last-layer states (B, T, D) of a summary-mode sequence (model/summary.py's layout). Accumulate and recurrent:
        one pass under the mask. Feedback: the pruned regions one after another (each `C r E S^n` at its own positions,
        causal, reading the memory of the summary before it: `memory_kv`), then the raw part in one pass under the mask,
        reading the last pruned summary's memory; a pruned region's own tokens are computed, their states are not
        returned (zeros: they carry no targets)."""
        c = self.config
        pos, mask = self.summary_layout(type_ids, region_ids, first_raw)
        if c.summary_mode != FEEDBACK:
            return self.trunk(type_ids, state_ids, prev_ids, pos, mask)[0]
        B, T = type_ids.shape
        n = c.n_summary
        memory = None  # (B, n, D): the last-layer states of the newest pruned summary of each row
        for j in range(int(first_raw.max())):
            rows = (first_raw > j).nonzero().flatten()
            idx, valid = segment(region_ids[rows], j, j)
            sub = [x[rows].gather(1, idx) for x in (type_ids, state_ids, prev_ids, pos)]
            causal = torch.ones(idx.shape[1], idx.shape[1], dtype=torch.bool, device=idx.device).tril()
            seg_mask = causal & valid[:, None, :] | torch.eye(idx.shape[1], dtype=torch.bool, device=idx.device)
            prefix = None
            if j > 0:
                prefix = (self.memory_kv(memory[rows]), valid[:, :, None].expand(-1, -1, n))
            h, _ = self.trunk(*sub, seg_mask, prefix)
            ends = valid.sum(1)  # C r E S^n: its summaries are its last n tokens
            at = (ends[:, None] - n + torch.arange(n, device=idx.device))[..., None].expand(-1, -1, h.shape[-1])
            new = h.gather(1, at)
            memory = new.new_zeros(B, n, h.shape[-1]).index_copy(0, rows, new) if memory is None else \
                memory.index_copy(0, rows, new)
        lo = first_raw.clone()
        idx, valid = segment(region_ids, lo, None)
        rel = torch.where(valid, region_ids.gather(1, idx) - lo[:, None], -1)
        sub_type = type_ids.gather(1, idx)
        raw_mask = attention_mask(rel, sub_type >= SUMMARY, torch.zeros_like(lo), c.summary_mode, c.max_summaries)
        prefix = None
        if memory is not None:
            seen = prefix_mask(rel, sub_type >= SUMMARY, first_raw > 0, c.summary_mode, c.max_summaries)
            prefix = (self.memory_kv(memory), seen[..., None].expand(-1, -1, n))
        h, _ = self.trunk(sub_type, state_ids.gather(1, idx), prev_ids.gather(1, idx), pos.gather(1, idx), raw_mask, prefix)
        out = h.new_zeros(B, T, h.shape[-1])
        row = torch.arange(B, device=idx.device)[:, None].expand_as(idx)
        out[row[valid], idx[valid]] = h[valid]
        return out

    def forward(self, batch: dict) -> dict:
        """Training / teacher-forced pass. `batch` holds (B, T) `type_ids`, `state_ids`, `prev_ids`,
        `target_action` and, in compressed mode, `target_token_type` (IGNORE where unsupervised). A summary-mode batch
        also holds `region_ids` (B, T) and `first_raw` (B,), which give the positions and the attention mask."""
        if "region_ids" in batch:
            h = self.summary_hidden(batch["type_ids"], batch["state_ids"], batch["prev_ids"], batch["region_ids"],
                                    batch["first_raw"])
        else:
            h, _ = self.trunk(batch["type_ids"], batch["state_ids"], batch["prev_ids"])
        logits_action, logits_type = self.heads(h)  # (B, T, A), (B, T, 3)
        out = {"logits_action": logits_action}
        tgt = batch["target_action"]
        sup = tgt != IGNORE
        out["loss_action"] = F.cross_entropy(logits_action[sup], tgt[sup])
        out["acc_action"] = (logits_action[sup].argmax(-1) == tgt[sup]).float().mean()
        out["n_targets"] = sup.sum()
        if logits_type is not None:
            out["logits_token_type"] = logits_type
        if logits_type is not None and "target_token_type" in batch:
            tt = batch["target_token_type"]
            sup_t = tt != IGNORE
            pred = logits_type[sup_t].argmax(-1)
            true = tt[sup_t]
            out["loss_token_type"] = F.cross_entropy(logits_type[sup_t], true)
            out["acc_token_type"] = (pred == true).float().mean()
            # counts for precision / recall of </compress> (summed over batches and ranks by the caller)
            out["n_true_positive"] = ((pred == COMPRESS_END) & (true == COMPRESS_END)).sum()
            out["n_pred_end"] = (pred == COMPRESS_END).sum()
            out["n_true_end"] = (true == COMPRESS_END).sum()
        out["loss"] = self.objective(out)
        return out

    def objective(self, out: dict, action_scale: float = 1.0, type_scale: float = 1.0) -> torch.Tensor:
        """The training loss of a pass's `out`: loss_action + token_type_loss_weight x loss_token_type (where the batch has
        token-type targets). The scales weight the two means: a row shard's share of its batch's targets (shards.py), so
        the shards' losses sum to the whole batch's; a term whose scale is 0 is left out (a shard without such targets)."""
        loss = action_scale * out["loss_action"] if action_scale else out["logits_action"].sum() * 0.0
        if "loss_token_type" in out and type_scale:
            loss = loss + type_scale * self.config.token_type_loss_weight * out["loss_token_type"]
        return loss

    # ---- inference with a key/value cache -------------------------------------------------------------
    def new_cache(self, batch: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Empty per-layer (K, V) caches of `length` slots, (batch, H, length, Dh) each."""
        c = self.config
        w = self.head_action.weight
        shape = (batch, c.n_head, length, c.d_model // c.n_head)
        return [(w.new_zeros(shape), w.new_zeros(shape)) for _ in range(c.n_layer)]

    @torch.no_grad()
    def prefill(self, type_ids, state_ids, prev_ids, lengths, cache, rows=None):
        """Recompute the cache of streams `rows` (all if None) from their full contexts (R, T) of `lengths` (R,)
        tokens each, writing slots [0, T) in place; returns logits at each stream's last token."""
        R, T = type_ids.shape
        h, kvs = self.trunk(type_ids, state_ids, prev_ids)
        for (K, V), (k, v) in zip(cache, kvs, strict=True):
            if rows is None:
                K[:, :, :T], V[:, :, :T] = k, v
            else:
                K[rows, :, :T], V[rows, :, :T] = k, v
        last = h[torch.arange(R), lengths - 1]  # (R, D)
        return self.heads(last)

    @torch.no_grad()
    def extend(self, type_ids, state_ids, prev_ids, pos, n_new, cache):
        """Append `n_new` (B,) tokens per stream, given left-aligned in (B, N) with positions `pos` (B, N),
        to the cache in place; returns logits at each stream's last new token. Entries past a stream's
        `n_new` are padding: they are written to slots past its end, which no real query can see."""
        L = cache[0][0].shape[2]
        slot = pos.clamp(max=L - 1)
        seen = torch.arange(L, device=pos.device) <= slot[:, :, None]  # (B, N, L): causal over the slots
        return self.extend_at(type_ids, state_ids, prev_ids, pos, slot, seen, n_new, cache)

    @torch.no_grad()
    def extend_at(self, type_ids, state_ids, prev_ids, pos, slot, seen, n_new, cache, return_hidden: bool = False):
        """`extend` with the cache slots `slot` (B, N) the new keys/values go to and the boolean `seen` (B, N, L) of the
        slots each new token attends to (given, not causal by position: summary mode keeps the keys/values of pruned
        regions' summaries in slots of their own); with `return_hidden`, also the new tokens' last-layer states
        (B, N, D)."""
        B, N = type_ids.shape
        H, L = cache[0][0].shape[1], cache[0][0].shape[2]
        h = self.embed(type_ids, state_ids, prev_ids, pos.clamp(max=self.config.n_transit - 1))
        # shared by all layers: where each new key/value goes, and which cached keys each query may see
        slots = ((torch.arange(B * H, device=pos.device).view(B, H, 1) * L) + slot[:, None, :]).flatten()  # (B*H*N,)
        bias = torch.zeros(B, N, L, device=h.device, dtype=h.dtype).masked_fill_(~seen, float("-inf"))
        bias = bias[:, None].expand(B, H, N, L).reshape(B * H, N, L)
        for i, blk in enumerate(self.blocks):
            h, cache[i] = blk(h, kv=cache[i], slots=slots, bias=bias)
        last = h[torch.arange(B), n_new - 1]
        return (self.heads(last), h) if return_hidden else self.heads(last)


MODEL = {"AD": AD}


def weights_digest(state_dict: dict) -> str:
    """SHA-256 of a state dict's names and exact bytes: names one set of weights (equal on all DDP ranks, and between a
    run's train_summary.json and every evaluation of its checkpoint)."""
    h = hashlib.sha256()
    for k, v in state_dict.items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
