"""Float64 references for the attention kernels (kernels.attention, kernels.s2).

Written from the definitions, not from the kernels' algorithm: each sequence's K/V are gathered
position by position through its block table, ``V_base + L·B_a`` is materialised, the S2 pattern
is applied as the dense mask from ``S2Pattern.mask``, and softmax is taken row by row. A query
row that sees no key gets zeros (the kernels' documented convention).
"""
from __future__ import annotations

import torch

__all__ = [
    "paged_attention_decode_ref",
    "paged_attention_prefill_ref",
    "flash_lora_decode_ref",
    "flash_lora_prefill_ref",
    "s2_attention_prefill_ref",
    "s2_attention_decode_ref",
    "s2_attention_prefill_paged_ref",
]


def _gather(cache: torch.Tensor, table_row: torch.Tensor, n: int) -> torch.Tensor:
    """cache[table_row[p // bs], p % bs] for p in 0..n-1; a block id of -1 (a head of a
    head-sharded pool stores nothing there) reads as zeros."""
    bs = cache.shape[1]
    pos = torch.arange(n, device=cache.device)
    ids = table_row.long()[pos // bs]
    rows = cache[ids.clamp_min(0), pos % bs].double()
    return rows.masked_fill((ids < 0).view(-1, *([1] * (rows.dim() - 1))), 0.0)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            head_mask: torch.Tensor | None) -> torch.Tensor:
    """q [nq, Hq, D] at the last nq positions of n keys; k/v [n, Hq, D] (already per q head);
    head_mask [Hq, n, n] over positions or None. Returns float64 [nq, Hq, D]."""
    nq, hq, _ = q.shape
    n = k.shape[0]
    out = torch.zeros(nq, hq, v.shape[-1], dtype=torch.float64, device=q.device)
    qpos = torch.arange(n - nq, n, device=q.device)
    causal = torch.arange(n, device=q.device)[None, :] <= qpos[:, None]
    for h in range(hq):
        s = scale * q[:, h].double() @ k[:, h].T
        allowed = causal if head_mask is None else causal & head_mask[h][qpos]
        s = s.masked_fill(~allowed, float("-inf"))
        seen = allowed.any(1)
        p = torch.softmax(s[seen], dim=1)
        out[seen, h] = p @ v[:, h]
    return out


def _expand_heads(x: torch.Tensor, hq: int) -> torch.Tensor:
    return x.repeat_interleave(hq // x.shape[1], dim=1)


def _paged(q, k_cache, v_cache, block_tables, seq_lens, scale, cu_seqlens_q, lora=None,
           mask_fn=None) -> torch.Tensor:
    hq = q.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    batch = seq_lens.shape[0]
    for b in range(batch):
        if cu_seqlens_q is None:
            q0, nq = b, 1
        else:
            q0 = int(cu_seqlens_q[b])
            nq = int(cu_seqlens_q[b + 1]) - q0
        n = int(seq_lens[b])
        if nq == 0 or n == 0:
            continue
        if block_tables.dim() == 3:  # per-KV-head tables over single-head blocks
            k = torch.stack([_gather(k_cache, block_tables[b, h], n)[:, 0]
                             for h in range(block_tables.shape[1])], 1)
            v = torch.stack([_gather(v_cache, block_tables[b, h], n)[:, 0]
                             for h in range(block_tables.shape[1])], 1)
        else:
            k = _gather(k_cache, block_tables[b], n)
            v = _gather(v_cache, block_tables[b], n)
        if lora is not None:
            lr_cache, lr_block_tables, lora_b, adapter_ids = lora
            a = int(adapter_ids[b])
            if a >= 0:
                low = _gather(lr_cache, lr_block_tables[b], n)  # [n, r]
                v = v + torch.einsum("nr,hrd->nhd", low, lora_b[a].double())
        mask = mask_fn(n, device=q.device) if mask_fn is not None else None
        out[q0:q0 + nq] = _attend(q[q0:q0 + nq], _expand_heads(k, hq), _expand_heads(v, hq),
                                  scale, mask)
    return out


def paged_attention_decode_ref(q, k_cache, v_cache, block_tables, seq_lens, scale):
    return _paged(q, k_cache, v_cache, block_tables, seq_lens, scale, None)


def paged_attention_prefill_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale):
    return _paged(q, k_cache, v_cache, block_tables, seq_lens, scale, cu_seqlens_q)


def flash_lora_decode_ref(q, k_cache, v_cache, lr_cache, lr_block_tables, lora_b, adapter_ids,
                          block_tables, seq_lens, scale):
    return _paged(q, k_cache, v_cache, block_tables, seq_lens, scale, None,
                  lora=(lr_cache, lr_block_tables, lora_b, adapter_ids))


def flash_lora_prefill_ref(q, k_cache, v_cache, lr_cache, lr_block_tables, lora_b, adapter_ids,
                           block_tables, cu_seqlens_q, seq_lens, scale):
    return _paged(q, k_cache, v_cache, block_tables, seq_lens, scale, cu_seqlens_q,
                  lora=(lr_cache, lr_block_tables, lora_b, adapter_ids))


def s2_attention_prefill_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, pattern, scale):
    hq = q.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    for b in range(cu_seqlens_q.shape[0] - 1):
        q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        k0, k1 = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        if q1 == q0 or k1 == k0:
            continue
        out[q0:q1] = _attend(q[q0:q1], _expand_heads(k[k0:k1].double(), hq),
                             _expand_heads(v[k0:k1].double(), hq), scale,
                             pattern.mask(k1 - k0, device=q.device))
    return out


def s2_attention_decode_ref(q, k_cache, v_cache, block_tables, seq_lens, pattern, scale, lora=None):
    """`lora`: (lr_cache, lr_block_tables, lora_b, adapter_ids), V = V_base + L·B_a as in
    `flash_lora_decode_ref`."""
    return _paged(q, k_cache, v_cache, block_tables, seq_lens, scale, None, lora=lora,
                  mask_fn=pattern.mask)


def s2_attention_prefill_paged_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, pattern,
                                   scale, lora=None):
    """Paged S2 prefill (positions as in `paged_attention_prefill_ref`); `lora` as above."""
    return _paged(q, k_cache, v_cache, block_tables, seq_lens, scale, cu_seqlens_q, lora=lora,
                  mask_fn=pattern.mask)
