"""S2-attention: every KV head attends to its own strided shard of the context plus a local window.

The pattern (as DKernel and vLLM's block-sparse backend define it): tokens form sparse blocks of
``sparse_block`` tokens. Query block ``i`` of a head reads key block ``j <= i`` when it is local,
``i - j < local_blocks``, or in the head's shard, ``(j + s·head_sliding_step + offset) %
vert_stride == 0``; inside the diagonal block attention is causal.

GQA: the q heads of one KV group share their KV head's pattern, so a KV head stores and reads
one shard. The shard index ``s`` is therefore the **KV head index** (``q_head // group``); without
GQA this is exactly the per-head formula above. The default step is the published one,
``head_sliding_step = max(1, vert_stride // num_heads)`` over the q heads (DKernel, vLLM). Under
GQA with ``vert_stride > num_kv_heads`` that puts the KV heads' shards side by side; pass
``head_sliding_step=max(1, vert_stride // num_kv_heads)`` to spread them over the stride evenly.
``homo_head=True`` gives every head shard 0;
the last ``num_dense_heads`` q heads (a whole number of KV groups) are dense causal.

The kernels reuse kernels.attention's single Triton kernel with its ``S2`` flag: the key blocks a
head reads are enumerated arithmetically (shard blocks below the window, then the window), so
absent blocks are never loaded.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .attention import (_Lora, _S2Args, _ValueChecks, _check_int_vec, _check_lora, _check_out, _check_paged,
                        _check_q_kv, _check_scale, _need, _run)

__all__ = ["S2Pattern", "s2_attention_prefill", "s2_attention_prefill_paged", "s2_attention_decode"]


def _int(name: str, x, lo: int | None = None) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    x = int(x)
    if lo is not None and x < lo:
        raise ValueError(f"{name} must be >= {lo}, got {x}")
    return x


class S2Pattern:
    """An S2-attention pattern over ``num_heads`` query heads (``num_kv_heads`` KV heads).

    Immutable; equal patterns compare and hash equal. Block questions are asked per KV head
    (``kv_head_reads``, ``key_blocks``, ``kv_head_keeps``) because that is the unit that stores
    and reads a shard; ``reads`` answers for a q head.
    """

    _FIELDS = ("num_heads", "num_kv_heads", "group", "sparse_block", "local_blocks",
               "vert_stride", "homo_head", "num_dense_heads", "head_sliding_step", "offset")
    # _kernel: the pattern as the kernel reads it, built once (it keys every launch).
    __slots__ = _FIELDS + ("_kernel",)

    def __init__(self, num_heads: int, sparse_block: int, local_blocks: int, vert_stride: int, *,
                 num_kv_heads: int | None = None, homo_head: bool = False,
                 num_dense_heads: int = 0, head_sliding_step: int | None = None,
                 offset: int = 0) -> None:
        num_heads = _int("num_heads", num_heads, 1)
        sparse_block = _int("sparse_block", sparse_block, 16)
        if sparse_block & (sparse_block - 1):
            raise ValueError(f"sparse_block must be a power of two >= 16, got {sparse_block}")
        local_blocks = _int("local_blocks", local_blocks, 1)
        vert_stride = _int("vert_stride", vert_stride, 1)
        num_kv_heads = num_heads if num_kv_heads is None else _int("num_kv_heads", num_kv_heads, 1)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        group = num_heads // num_kv_heads
        num_dense_heads = _int("num_dense_heads", num_dense_heads, 0)
        if num_dense_heads > num_heads or num_dense_heads % group:
            raise ValueError(f"num_dense_heads ({num_dense_heads}) must be a multiple of the GQA group "
                             f"size ({group}) and at most num_heads ({num_heads})")
        if head_sliding_step is None:
            head_sliding_step = max(1, vert_stride // num_heads)
        head_sliding_step = _int("head_sliding_step", head_sliding_step, 0)
        offset = _int("offset", offset, 0)
        if not isinstance(homo_head, (bool, np.bool_)):
            raise TypeError(f"homo_head must be a bool, got {type(homo_head).__name__}")
        for name, val in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("group", group),
                          ("sparse_block", sparse_block), ("local_blocks", local_blocks),
                          ("vert_stride", vert_stride), ("homo_head", bool(homo_head)),
                          ("num_dense_heads", num_dense_heads),
                          ("head_sliding_step", head_sliding_step), ("offset", offset)):
            object.__setattr__(self, name, val)
        object.__setattr__(self, "_kernel", _S2Args(
            self.sparse_block, self.local_blocks, self.vert_stride, self.head_sliding_step,
            self.offset, self.dense_from, self.homo_head))

    def __setattr__(self, name, value):
        raise AttributeError("S2Pattern is immutable")

    def _key(self):
        return tuple(getattr(self, n) for n in self._FIELDS)

    def __eq__(self, other):
        return isinstance(other, S2Pattern) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return ("S2Pattern(num_heads={}, sparse_block={}, local_blocks={}, vert_stride={}, num_kv_heads={}, "
                "homo_head={}, num_dense_heads={}, head_sliding_step={}, offset={})").format(
            self.num_heads, self.sparse_block, self.local_blocks, self.vert_stride, self.num_kv_heads,
            self.homo_head, self.num_dense_heads, self.head_sliding_step, self.offset)

    # ---- per-head questions ---------------------------------------------------------------
    @property
    def dense_from(self) -> int:
        """The first dense KV head (num_kv_heads when none is dense)."""
        return self.num_kv_heads - self.num_dense_heads // self.group

    def kv_head_of(self, head: int) -> int:
        return head // self.group

    def is_dense(self, kv_head: int) -> bool:
        return kv_head >= self.dense_from

    def _check_kv_head(self, kv_head: int) -> None:
        if not 0 <= kv_head < self.num_kv_heads:
            raise ValueError(f"kv_head must be in [0, {self.num_kv_heads}), got {kv_head}")

    def in_shard(self, kv_head: int, j: int) -> bool:
        """Whether key block j is in the KV head's strided shard (dense heads: every block)."""
        self._check_kv_head(kv_head)
        if self.is_dense(kv_head):
            return True
        s = 0 if self.homo_head else kv_head
        return (j + s * self.head_sliding_step + self.offset) % self.vert_stride == 0

    def kv_head_reads(self, kv_head: int, i: int, j: int) -> bool:
        """Whether query block i of KV head `kv_head` reads key block j."""
        return 0 <= j <= i and (i - j < self.local_blocks or self.in_shard(kv_head, j))

    def reads(self, head: int, i: int, j: int) -> bool:
        """Whether query block i of q head `head` reads key block j."""
        if not 0 <= head < self.num_heads:
            raise ValueError(f"head must be in [0, {self.num_heads}), got {head}")
        return self.kv_head_reads(self.kv_head_of(head), i, j)

    def key_blocks(self, kv_head: int, i: int) -> list[int]:
        """The key blocks query block i of a KV head reads, ascending (the kernels' tile list)."""
        self._check_kv_head(kv_head)
        return [j for j in range(i + 1) if self.kv_head_reads(kv_head, i, j)]

    def kv_head_keeps(self, kv_head: int, j: int, query_block: int) -> bool:
        """Whether a KV head must keep key block j once queries have reached `query_block`: some
        query block >= query_block still reads it (in its shard, or still in the local window)."""
        return self.in_shard(kv_head, j) or query_block - j < self.local_blocks

    def kept_blocks(self, kv_head: int, num_tokens: int) -> list[int]:
        """The key blocks a KV head must still hold once a sequence has `num_tokens` tokens
        (queries from position num_tokens - 1 on): its shard plus the local window."""
        num_tokens = _int("num_tokens", num_tokens, 0)
        if num_tokens == 0:
            return []
        i = (num_tokens - 1) // self.sparse_block
        return [j for j in range(i + 1) if self.kv_head_keeps(kv_head, j, i)]

    # ---- whole-context views ---------------------------------------------------------------
    def block_mask(self, num_blocks: int) -> torch.Tensor:
        """bool [num_kv_heads, num_blocks, num_blocks]: [h, i, j] = KV head h, query block i
        reads key block j."""
        num_blocks = _int("num_blocks", num_blocks, 0)
        i = torch.arange(num_blocks)
        causal = i[None, :] <= i[:, None]
        local = (i[:, None] - i[None, :]) < self.local_blocks
        return causal[None] & (local[None] | self._shard_mask(num_blocks)[:, None, :])

    def _shard_mask(self, num_blocks: int, device: torch.device | str | None = None) -> torch.Tensor:
        """bool [num_kv_heads, num_blocks]: key block j is in KV head h's shard (dense heads:
        every block), vectorised `in_shard`."""
        j = torch.arange(num_blocks, device=device)
        heads = torch.arange(self.num_kv_heads, device=device)
        s = torch.zeros_like(heads) if self.homo_head else heads
        shard = ((j[None, :] + s[:, None] * self.head_sliding_step + self.offset) % self.vert_stride) == 0
        return shard | (heads >= self.dense_from)[:, None]

    def mask(self, num_tokens: int, *, device: torch.device | str | None = None) -> torch.Tensor:
        """The dense reference mask: bool [num_heads, num_tokens, num_tokens], [h, q, k] = q head h
        at position q attends to position k (causal inside the diagonal block)."""
        num_tokens = _int("num_tokens", num_tokens, 0)
        nb = -(-num_tokens // self.sparse_block)
        blk = torch.arange(num_tokens, device=device) // self.sparse_block
        bm = self.block_mask(nb).to(device)[:, blk][:, :, blk]
        pos = torch.arange(num_tokens, device=device)
        m = bm & (pos[None, :] <= pos[:, None])[None]
        return m.repeat_interleave(self.group, dim=0)

    def density(self, num_tokens: int) -> float:
        """Fraction of all num_tokens² (query, key) pairs attended, averaged over heads (dense
        causal is (T+1)/(2T)). Computed per block, without the T×T mask."""
        num_tokens = _int("num_tokens", num_tokens, 1)
        sb = self.sparse_block
        nb = -(-num_tokens // sb)
        sizes = np.full(nb, sb, dtype=np.float64)
        sizes[-1] = num_tokens - (nb - 1) * sb
        diagonal = float((sizes * (sizes + 1) / 2).sum())
        total = 0.0
        for bm in self.block_mask(nb).numpy():
            total += sizes @ np.tril(bm, -1).astype(np.float64) @ sizes + diagonal
        return total / (self.num_kv_heads * float(num_tokens) ** 2)

    def _kernel_args(self) -> _S2Args:
        return self._kernel


def _check_pattern(pattern, hq: int, hkv: int) -> None:
    if not isinstance(pattern, S2Pattern):
        raise TypeError(f"pattern must be an S2Pattern, got {type(pattern).__name__}")
    if pattern.num_heads != hq or pattern.num_kv_heads != hkv:
        raise ValueError(f"pattern is for {pattern.num_heads} q / {pattern.num_kv_heads} kv heads, "
                         f"the tensors have {hq} / {hkv}")


def s2_attention_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                         pattern: S2Pattern, scale: float, *, impl: str | None = None,
                         out: torch.Tensor | None = None, max_seqlen_q: int | None = None,
                         validate: bool = True) -> torch.Tensor:
    """Variable-length causal S2-attention on contiguous K/V.

    q ``[total_q, Hq, D]``; k/v ``[total_k, Hkv, D]``; query i of sequence b sits at position
    ``len_k(b) - len_q(b) + i`` (a prefill on top of a cached prefix is one call). Key blocks
    a head does not read are never loaded. Returns ``[total_q, Hq, D]`` in q's dtype.
    """
    _check_q_kv(q, k, v, paged=False)
    _check_scale(scale)
    _check_out(out, q)
    _check_pattern(pattern, q.shape[1], k.shape[1])
    _check_int_vec("cu_seqlens_q", cu_seqlens_q, None, q.device)
    _need(cu_seqlens_q.shape[0] >= 1, "cu_seqlens_q needs batch + 1 entries")
    batch = cu_seqlens_q.shape[0] - 1
    _check_int_vec("cu_seqlens_k", cu_seqlens_k, batch + 1, q.device)
    if validate and batch:  # one copy to the host for all (kernels.attention._ValueChecks)
        checks = _ValueChecks()
        h_q, h_k = checks.fetch(cu_seqlens_q), checks.fetch(cu_seqlens_k)
        total_q, total_k = q.shape[0], k.shape[0]

        def check(a: list[np.ndarray]) -> str | None:
            cq, ck = a[h_q], a[h_k]
            if cq[0] != 0 or cq[-1] != total_q:
                return f"cu_seqlens_q must start at 0 and end at total_q={total_q}"
            if ck[0] != 0 or ck[-1] > total_k:
                return f"cu_seqlens_k must start at 0 and end at most at total_k={total_k}"
            lq, lk = np.diff(cq), np.diff(ck)
            if (lq < 0).any() or (lk < 0).any():
                return "cu_seqlens must be non-decreasing"
            if (lq > lk).any():
                return "every sequence needs len_k >= len_q"
            if max_seqlen_q is not None and int(lq.max()) > max_seqlen_q:
                return f"max_seqlen_q={max_seqlen_q} is below the longest query run ({int(lq.max())})"
            return None

        checks.add(check)
        checks.run()
    return _run(impl, q, k=k, v=v, scale=scale, paged=False, cu_seqlens_q=cu_seqlens_q,
                cu_seqlens_k=cu_seqlens_k, s2=pattern._kernel_args(), out=out,
                max_seqlen_q=max_seqlen_q)


def _check_reads_stored(checks: _ValueChecks, pattern: S2Pattern, block_tables: torch.Tensor,
                        seq_lens: torch.Tensor, len_q: torch.Tensor, block_size: int) -> None:
    """A per-head table may hold -1 only where the pattern reads nothing for the batch's queries.

    Query token i of sequence b sits in query block ``(seq_lens[b] - len_q[b] + i) // sparse_block``,
    so the queries span blocks ``i0 .. i1``; they read key block j <= i1 when j is in the head's
    shard or ``j > i0 - local_blocks``. Checked on units of ``gcd(block_size, sparse_block)``
    tokens, each inside exactly one table entry and one sparse block. Computed on the device and
    queued on `checks` (read back with the call's other checks, in one copy).
    """
    batch, hkv, width = block_tables.shape
    sb = pattern.sparse_block
    unit = math.gcd(block_size, sb)
    per_block = block_size // unit
    dev = block_tables.device
    n = seq_lens.long().to(dev)
    nq = len_q.long().to(dev)
    pos = torch.arange(width * per_block, device=dev) * unit  # first token of each unit
    j = pos // sb
    i0 = (n - nq).clamp_min(0) // sb
    in_use = (pos[None, :] < n[:, None]) & (nq > 0)[:, None]  # [B, units]
    window = j[None, :] > i0[:, None] - pattern.local_blocks  # [B, units]
    last_j = (width * per_block - 1) * unit // sb  # j[-1], known on the host
    shard = pattern._shard_mask(last_j + 1 if width * per_block else 0, dev)[:, j]  # [Hkv, units]
    reads = in_use[:, None, :] & (window[:, None, :] | shard[None])  # [B, Hkv, units]
    reads = reads.view(batch, hkv, width, per_block).any(-1)
    missing = reads & (block_tables < 0)

    def message(_) -> str:  # the failure path: where, read back only then
        b, h, blk = (int(x) for x in missing.nonzero()[0])
        return (f"block_tables[{b}, {h}, {blk}] is -1 but the S2 pattern reads that block: "
                f"KV head {h} of sequence {b} attends to tokens {blk * block_size}.."
                f"{(blk + 1) * block_size - 1} (only blocks the pattern never reads may be -1)")

    h = checks.fetch(missing.any())
    checks.add(lambda a: message(None) if a[h] else None)


def _check_paged_s2(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, pattern, scale, out,
                    num_splits, validate, max_seqlen_q=None, lora_args=(None, None, None, None)
                    ) -> _Lora | None:
    """Every check of the paged S2 entry points (decode: cu_seqlens_q None); returns the
    Flash-LoRA operands when `lora_args` (lr_cache, lr_block_tables, lora_b, adapter_ids) are given."""
    # A per-KV-head table ``[B, Hkv, W]`` reads caches holding one KV head per block
    # ``[num_blocks, bs, 1, D]`` (cachepool.HeadShardedKVPool's layout); _check_paged checks it.
    per_head = isinstance(block_tables, torch.Tensor) and block_tables.dim() == 3
    checks = _ValueChecks()  # the value checks of every part below, one sync for all
    batch = _check_paged(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, out,
                         num_splits, validate, per_head=per_head, max_seqlen_q=max_seqlen_q, checks=checks)
    _check_pattern(pattern, q.shape[1], block_tables.shape[1] if per_head else k_cache.shape[2])
    if validate and per_head and batch:
        if cu_seqlens_q is None:
            len_q = torch.ones(batch, dtype=torch.long, device=q.device)
        else:
            len_q = cu_seqlens_q[1:].long() - cu_seqlens_q[:-1].long()
        _check_reads_stored(checks, pattern, block_tables, seq_lens, len_q, k_cache.shape[1])
    given = [x is not None for x in lora_args]
    if not any(given):
        checks.run()
        return None
    if not all(given):
        raise ValueError("LoRA inside S2 attention needs lr_cache, lr_block_tables, lora_b and "
                         "adapter_ids together")
    hkv = block_tables.shape[1] if per_head else k_cache.shape[2]
    lora = _check_lora(q, k_cache, *lora_args, batch, validate, seq_lens, num_kv_heads=hkv, checks=checks)
    checks.run()
    return lora


def s2_attention_prefill_paged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                               seq_lens: torch.Tensor, pattern: S2Pattern, scale: float, *,
                               impl: str | None = None, out: torch.Tensor | None = None,
                               max_seqlen_q: int | None = None, validate: bool = True,
                               lr_cache: torch.Tensor | None = None,
                               lr_block_tables: torch.Tensor | None = None,
                               lora_b: torch.Tensor | None = None,
                               adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Variable-length causal S2-attention prefill over paged K/V, on top of any cached prefix.

    q ``[total_q, Hq, D]`` holds each sequence's new tokens (their K/V already in the cache);
    ``cu_seqlens_q [batch+1]``; new token i of sequence b sits at position
    ``seq_lens[b] - len_q(b) + i`` (as in `kernels.paged_attention_prefill`). The cache layouts
    are `s2_attention_decode`'s: a shared table ``[batch, max_blocks]`` over
    ``[num_blocks, block_size, Hkv, D]``, or a per-KV-head table ``[batch, Hkv, max_blocks]``
    over ``[num_blocks, block_size, 1, D]`` with -1 where a head stores nothing (allowed only
    for blocks the pattern never reads for these queries; ``validate=True`` checks it).
    ``max_seqlen_q`` avoids a device sync when given. Returns ``[total_q, Hq, D]`` in q's dtype.
    With ``lr_cache, lr_block_tables, lora_b, adapter_ids`` (as in `kernels.flash_lora_prefill`)
    V is ``V_base + L·B_a`` inside the same loop (Flash-LoRA over the S2 pattern's keys).
    """
    lora = _check_paged_s2(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, pattern, scale,
                           out, None, validate, max_seqlen_q,
                           (lr_cache, lr_block_tables, lora_b, adapter_ids))
    return _run(impl, q, k=k_cache, v=v_cache, scale=scale, paged=True, seq_lens=seq_lens,
                block_tables=block_tables, cu_seqlens_q=cu_seqlens_q, s2=pattern._kernel_args(),
                lora=lora, out=out, max_seqlen_q=max_seqlen_q)


def s2_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, seq_lens: torch.Tensor, pattern: S2Pattern,
                        scale: float, *, impl: str | None = None, out: torch.Tensor | None = None,
                        num_splits: int | None = None, validate: bool = True,
                        lr_cache: torch.Tensor | None = None, lr_block_tables: torch.Tensor | None = None,
                        lora_b: torch.Tensor | None = None,
                        adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Paged S2-attention decode, q ``[batch, Hq, D]``.

    Two cache layouts, one kernel:
    - shared: caches ``[num_blocks, block_size, Hkv, D]``, block_tables ``[batch, max_blocks]``;
    - head-sharded pool: caches ``[num_blocks, block_size, 1, D]`` (one KV head per physical
      block), block_tables ``[batch, Hkv, max_logical_blocks]`` mapping (head, logical block) to a
      physical block, -1 where the head stores nothing; only blocks the pattern reads are read,
      and ``validate=True`` rejects a -1 where the pattern reads.

    Flash-LoRA inside S2: with ``lr_cache [num_lr_blocks, lr_block_size, r]``, ``lr_block_tables
    [batch, max_lr_blocks]`` (per sequence, not per head), ``lora_b [num_adapters, Hkv, r, D]``
    and ``adapter_ids [batch]`` (-1: none), V is ``V_base + L·B_a`` as in
    `kernels.flash_lora_decode`, computed ``P·V + (P·L)·B_a`` over the keys the pattern reads.
    """
    lora = _check_paged_s2(q, k_cache, v_cache, block_tables, seq_lens, None, pattern, scale, out,
                           num_splits, validate, None, (lr_cache, lr_block_tables, lora_b, adapter_ids))
    return _run(impl, q, k=k_cache, v=v_cache, scale=scale, paged=True, seq_lens=seq_lens,
                block_tables=block_tables, s2=pattern._kernel_args(), lora=lora, out=out,
                num_splits=num_splits)
