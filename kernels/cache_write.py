"""Writing new tokens into paged caches, and reading a sequence back out.

    write_kv(k, v, k_cache, v_cache, slot_mapping)   # k/v [T, Hkv, D] -> caches [NB, BS, Hkv, D]
    write_lowrank(x_lr, lr_cache, slot_mapping)      # x_lr [T, r]     -> cache  [NB, BS, r]

Token t goes to flat slot `slot_mapping[t]` = block * BS + offset; slot -1 skips the token (it
is stored already, e.g. a shared prefix, or this cache does not keep it: head-sharded pools).
Both wrappers run one Triton kernel, `_scatter_rows_kernel`: a token's [H, D] tile, for one
tensor or (PAIR) for K and V in the same program, so the slot is loaded once. A low-rank row is
the case H = 1, D = r. Values are cast to the cache's dtype on store. Caches may have any
strides (they are views over virtual memory), and only the written slots are touched, so a
cache whose unused blocks are unmapped is fine.

`gather_cache` reads a sequence's tokens back through its block table (tests and debugging),
and the `*_reference` functions are the float64 references the tests compare against.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import choose_impl

__all__ = ["write_kv", "write_lowrank", "gather_cache", "write_kv_reference", "write_lowrank_reference"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _scatter_rows_kernel(
    src0, dst0, src1, dst1, slots_ptr,
    H, D, block_size,
    s0_t, s0_h, s0_d, d0_b, d0_s, d0_h, d0_d,
    s1_t, s1_h, s1_d, d1_b, d1_s, d1_h, d1_d,
    PAIR: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dst[slot // BS, slot % BS, h, d] = src[t, h, d] for token t = program 0, heads of chunk
    program 1; nothing when slot < 0. PAIR: the same for (src1, dst1)."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    blk = slot // block_size
    off = slot % block_size
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ds = tl.arange(0, BLOCK_D)
    mask = (hs[:, None] < H) & (ds[None, :] < D) & (slot >= 0)
    hs64 = hs.to(tl.int64)[:, None]
    ds64 = ds.to(tl.int64)[None, :]
    x = tl.load(src0 + t * s0_t + hs64 * s0_h + ds64 * s0_d, mask=mask)
    tl.store(dst0 + blk * d0_b + off * d0_s + hs64 * d0_h + ds64 * d0_d,
             x.to(dst0.dtype.element_ty), mask=mask)
    if PAIR:
        y = tl.load(src1 + t * s1_t + hs64 * s1_h + ds64 * s1_d, mask=mask)
        tl.store(dst1 + blk * d1_b + off * d1_s + hs64 * d1_h + ds64 * d1_d,
                 y.to(dst1.dtype.element_ty), mask=mask)


def _check_slots(slot_mapping: torch.Tensor, num_tokens: int, num_slots: int, device: torch.device) -> None:
    if not isinstance(slot_mapping, torch.Tensor):
        raise TypeError("slot_mapping must be a torch.Tensor")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must have shape ({num_tokens},), got {tuple(slot_mapping.shape)}")
    if slot_mapping.device != device:
        raise ValueError(f"slot_mapping is on {slot_mapping.device}, caches on {device}")
    if num_tokens:
        # One host sync: an out-of-range slot would write into someone else's memory.
        lo, hi = (int(v) for v in torch.aminmax(slot_mapping))
        if lo < -1 or hi >= num_slots:
            raise ValueError(f"slot_mapping values must lie in [-1, {num_slots}), got [{lo}, {hi}]")


def _check_pair(x: torch.Tensor, cache: torch.Tensor, name: str, cache_name: str, ndim: int) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(cache, torch.Tensor):
        raise TypeError(f"{name} and {cache_name} must be torch.Tensors")
    if x.dim() != ndim or cache.dim() != ndim + 1:
        raise ValueError(f"{name} must be {ndim}-D and {cache_name} {ndim + 1}-D, "
                         f"got {tuple(x.shape)} and {tuple(cache.shape)}")
    if x.shape[1:] != cache.shape[2:]:
        raise ValueError(f"{name} {tuple(x.shape)} does not fit {cache_name} {tuple(cache.shape)}")
    if x.dtype not in _FLOATS or cache.dtype not in _FLOATS:
        raise TypeError(f"{name} and {cache_name} must be floating point, got {x.dtype}, {cache.dtype}")
    if x.device != cache.device:
        raise ValueError(f"{name} is on {x.device}, {cache_name} on {cache.device}")


def _as3(t: torch.Tensor) -> torch.Tensor:
    """[T, r] -> [T, 1, r] and [NB, BS, r] -> [NB, BS, 1, r] as views (no copy)."""
    return t.unsqueeze(-2)


def _launch(srcs: list[torch.Tensor], dsts: list[torch.Tensor], slots: torch.Tensor) -> None:
    T, H, D = srcs[0].shape
    if T == 0:
        return
    block_size = dsts[0].shape[1]
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_H = max(1, min(triton.next_power_of_2(H), 4096 // BLOCK_D))
    s0, d0 = srcs[0], dsts[0]
    s1, d1 = (srcs[1], dsts[1]) if len(srcs) == 2 else (s0, d0)
    grid = (T, triton.cdiv(H, BLOCK_H))
    _scatter_rows_kernel[grid](
        s0, d0, s1, d1, slots, H, D, block_size,
        *s0.stride(), *d0.stride(), *s1.stride(), *d1.stride(),
        PAIR=len(srcs) == 2, BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D,
    )


def _torch_write(x: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
    keep = slots >= 0
    idx = slots[keep].long()
    bs = cache.shape[1]
    cache[idx // bs, idx % bs] = x[keep].to(cache.dtype)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, impl: str | None = None) -> None:
    """Store k[t], v[t] ([T, Hkv, D]) at flat slot `slot_mapping[t]` of k_cache / v_cache
    ([num_blocks, block_size, Hkv, D]); slot -1 skips token t. In place; returns nothing."""
    _check_pair(k, k_cache, "k", "k_cache", 3)
    _check_pair(v, v_cache, "v", "v_cache", 3)
    if k.shape != v.shape or k_cache.shape != v_cache.shape:
        raise ValueError(f"k/v shapes {tuple(k.shape)}/{tuple(v.shape)} and cache shapes "
                         f"{tuple(k_cache.shape)}/{tuple(v_cache.shape)} must match")
    if not (k.device == v.device == v_cache.device):
        raise ValueError("k, v and both caches must be on one device")
    _check_slots(slot_mapping, k.shape[0], k_cache.shape[0] * k_cache.shape[1], k.device)
    if choose_impl(k_cache, impl) == "triton":
        _launch([k, v], [k_cache, v_cache], slot_mapping)
    else:
        _torch_write(k, k_cache, slot_mapping)
        _torch_write(v, v_cache, slot_mapping)


def write_lowrank(x_lr: torch.Tensor, lr_cache: torch.Tensor, slot_mapping: torch.Tensor,
                  impl: str | None = None) -> None:
    """Store x_lr[t] ([T, r]: a token's x·A_v) at flat slot `slot_mapping[t]` of lr_cache
    ([num_blocks, block_size, r]); slot -1 skips token t. In place; returns nothing."""
    _check_pair(x_lr, lr_cache, "x_lr", "lr_cache", 2)
    _check_slots(slot_mapping, x_lr.shape[0], lr_cache.shape[0] * lr_cache.shape[1], x_lr.device)
    if choose_impl(lr_cache, impl) == "triton":
        _launch([_as3(x_lr)], [_as3(lr_cache)], slot_mapping)
    else:
        _torch_write(x_lr, lr_cache, slot_mapping)


def gather_cache(cache: torch.Tensor, block_table, num_tokens: int) -> torch.Tensor:
    """The first `num_tokens` tokens of a sequence, in order, from a paged cache
    ([num_blocks, block_size, ...]) through its block table (list or 1-D int tensor):
    [num_tokens, ...]. Only the blocks named are read."""
    bs = cache.shape[1]
    table = torch.as_tensor(block_table, dtype=torch.long, device=cache.device).reshape(-1)
    need = -(-num_tokens // bs)
    if table.numel() < need:
        raise ValueError(f"block table has {table.numel()} blocks, {num_tokens} tokens need {need}")
    pos = torch.arange(num_tokens, device=cache.device)
    return cache[table[pos // bs], pos % bs]


def _reference(x: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    out = cache.detach().to(torch.float64).clone()
    bs = cache.shape[1]
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            out[s // bs, s % bs] = x[t].to(torch.float64)
    return out


def write_kv_reference(k, v, k_cache, v_cache, slot_mapping) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 copies of the caches as `write_kv` should leave them (before the final cast
    to the cache dtype)."""
    return _reference(k, k_cache, slot_mapping), _reference(v, v_cache, slot_mapping)


def write_lowrank_reference(x_lr, lr_cache, slot_mapping) -> torch.Tensor:
    """Float64 copy of the cache as `write_lowrank` should leave it."""
    return _reference(x_lr, lr_cache, slot_mapping)
