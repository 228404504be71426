"""Paged attention and Flash-LoRA-Attention, decode and prefill, on one Triton kernel family.

One kernel (`_attn_fwd`) serves every attention entry point of `kernels`; constexpr flags pick
the variant instead of copies of the kernel:

- ``PAGED``: K/V come from a paged cache ``[num_blocks, block_size, Hkv, D]`` through a block
  table, else from contiguous ``[total_k, Hkv, D]`` tensors with ``cu_seqlens_k``.
- ``VARLEN_Q``: many query tokens per sequence (prefill, ``cu_seqlens_q``), else one (decode).
- ``HAS_LORA``: Flash-LoRA: a second accumulator ``P·L`` (``[rows, r]``) next to ``P·V`` under the
  same online softmax; ``(P·L)·B_a`` is added once at the end (or tile by tile, ``B_IN_LOOP``),
  so ``L·B_a`` never exists.
- ``S2``: S2-attention block skipping: the key tiles a KV head reads (its strided shard plus the
  local window) are enumerated arithmetically, absent blocks are never loaded.
- ``SPLIT``: flash-decoding: the key tiles of one (query, KV head) are split over programs that
  write partial (max, sum, acc) rows, combined by the last of them to finish (``FUSE_REDUCE``,
  decode) or by a second launch, `_split_reduce`.
- ``TMA``: paged decode over cache blocks that hold whole key tiles reads each K and V tile (and
  Flash-LoRA's L tile) by one bulk tensor-memory copy (Hopper's TMA, through host tensor
  descriptors) instead of per-thread loads (see `_tma_loads`); unsplit launches of up to one
  program an SM keep a second tile in flight, every tile in one loop (``ONE_LOOP``; see
  `_launch_plan`), as split Flash-LoRA launches do, whose programs of one tile take B_a by TMA
  with it (``B_IN_LOOP``).

One launch family runs elsewhere: unsplit paged decode (and Flash-LoRA decode) on Hopper at
head dim 128 goes to `attention_ring`'s kernel, a ring of TMA copies written out in Gluon with
its own mbarriers, where Triton's pipeliner leaves bandwidth behind (`_ring_tiles` says where),
and so does split paged decode in cache blocks of under 128 keys (`_ring_split`). Where a tile
takes many copies (small cache blocks) one warp of its own issues them (`_ring_producer`), and
in blocks of 16 or 32 keys large unsplit launches read several KV heads a program, a copy
bringing a block's keys of all of them (`_ring_packed`).

GQA: a program owns one KV head and packs ``tokens × group`` query rows into its M dimension,
so every K/V tile is loaded once for the whole group. Rows are token-major because q is
``[tokens, Hq, D]`` with the heads of a token adjacent.

Semantics shared by every entry point: query token ``i`` of sequence ``b`` sits at position
``seq_len(b) - len_q(b) + i`` and attends causally to keys ``0 .. position``. A query row that
sees no key at all (an empty sequence in decode) gets an output of zeros.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import attention_ring
from ._counters import split_counters as _split_counters
from ._dispatch import choose_impl, interpreter_on
from ._pdl import gdc_launch_dependents, gdc_wait, pdl_available
from ._relaunch import SMEM_ATTR_MIN, relaunch
from ._tma import descriptor

__all__ = [
    "paged_attention_decode",
    "paged_attention_prefill",
    "flash_lora_decode",
    "flash_lora_prefill",
]

_LOG2E = 1.4426950408889634
_NEG_BIG = -1.0e38  # running-max start: finite, so a row with no key yet gives exp2(0)=1, not NaN
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
_LONG = 8192  # contexts (decode) or query runs (prefill) from here on take wide tiles (_config)
_LORA_WIDE_KEYS = 4096  # Flash-LoRA prefill in blocks of under 64 keys takes wide tiles from here on
# Split decode takes narrow tiles over wide ones only when they keep this many times more of the
# GPU's resident program slots busy (see _launch_plan).
_NARROW_GAIN = 1.2
# Flash-LoRA decode reads K/V/L by TMA only when each program's key run is at most
# _TMA_LORA_KEYS long at 2 programs an SM (_TMA_LORA_SINGLE_KEYS at one), and at full-width
# tiles only up to _TMA_LORA_WIDE_RPAD P·L columns (see _launch_plan).
_TMA_LORA_KEYS = 4096
_TMA_LORA_SINGLE_KEYS = 16384
_TMA_LORA_WIDE_RPAD = 64
_PDL_OFF_LORA_RPAD = 64  # Flash-LoRA's L tiles from this wide, at half-width TMA tiles, launch without PDL (_pdl)
_TMA_SHIFTED_PER_SM = 3  # paged decode programs an SM with the shifted TMA tail (see _launch_plan)
# Decode's one-program-an-SM TMA variant (see _launch_plan): Triton 3.6 gives the loop's TMA
# loads a second buffer only from num_stages 5 on (the block-table load they wait on takes
# stages of its own; 2-4 compile to one buffer: paged decode 74 KB of shared memory with the
# shifted tail); at 5 paged decode takes 139 KB, Flash-LoRA 164 KB (r <= 32) or 188 KB (r = 64):
# one program an SM, which then has its next tiles in flight while it computes.
_SINGLE_STAGES = 5
# What that variant takes at most: Flash-LoRA at r = 64 with 32 query rows a program (sm_90; 201
# KB at D 256, 197 KB at D 128), half-precision caches. 64 rows (GQA groups over 32) would take
# 280 KB, and so would fp32 caches (279 KB for paged decode): those keep 2 an SM.
_SINGLE_SMEM = 202 * 1024
_SINGLE_MAX_ROWS = 32
_SINGLE_MIN_TILES = 16  # key tiles a program at least (short runs gain nothing from a second buffer)
_RING_MIN_KEYS = 2048  # attention_ring's decode: runs of at least this many keys (_ring_tiles),
_RING_MIN_KEYS_MULTIWAVE = 16384  # ... and of this many over more than 3 programs an SM
_RING_LORA_MAX_RPAD = 64  # Flash-LoRA by the ring kernel: L tiles up to this wide (registers)
_RING_LORA_MIN_FILL = 0.9  # ... and launches of at least this many programs an SM
_RING_LORA_TILE = 128  # ... at this tile only
_RING_MAX_TILE_COPIES = 8  # ... and at most this many copies a tile (K, V and L; _ring_blocks_ok),
_RING_PRODUCER_MAX_COPIES = 24  # ... or this many through a producer warp (_ring_producer),
_RING_PRODUCER_MIN_COPIES = 8  # which tiles of at least this many copies take (one wave, one an SM),
_RING_PRODUCER_MIN_COPIES_SPLIT = 4  # ... or this many in split launches of 64-key tiles,
_RING_PRODUCER_MIN_COPIES_SPLIT_WIDE = 6  # ... or this many in those of 128-key tiles
_RING_SPLIT_MIN_TILES = 4  # split ring launches: at least this many 64-key tiles a split (_ring_split),
_RING_SPLIT_MIN_TILES_WIDE = 16  # ... or this many 128-key ones (one program an SM),
_RING_SPLIT_MIN_FILL = 0.9  # ... over at least this many programs an SM
_RING_SPLIT_DEEP_TILES = 32  # ... and 3 ring slots through the producer warp from this many a split
_RING_PACK_ROWS = 16  # packed ring launches (_ring_packed): a GQA group times the pack at most this,
_RING_PACK_MIN_FILL = 0.8  # ... in one wave of one program an SM at least this full; over several,
_RING_PACK_UNSPLIT_FILL = 0.86  # ... unsplit where they are this full,
_RING_PACK_SPLIT_FILL = 0.93  # ... else in the fewest splits (up to 4) that fill them this full
_MAX_GRID_Z = 65535  # sequences ride on the launch grid's third axis
_TAIL_MIN_TILES = 2  # decode's split last wave (_tail_split): key tiles a split at least,
_TAIL_MAX_SPLITS = 32  # ... splits an item at most,
_TAIL_MIN_GAIN = 0.08  # ... and the least modelled gain, in waves (_wave_cost)
_TAIL_FLOOR = {1: 0.48, 2: 0.40}  # a short last wave's cost, programs an SM -> a (see _wave_cost),
_TAIL_SLOPE = 0.35  # ... and b; just over one wave (_ring_tiles), one an SM with the rest split
_TAIL_ONE_WAVE = 1.16  # where that costs at most this many waves (modelled: 19 sequences 1.15),
_TAIL_ONE_WAVE_LONG = 1.25  # ... or this many over 16K keys or more,
_TAIL_ONE_WAVE_MIN_KEYS = 4096  # ... over runs of at least this many keys,
_TAIL_ONE_WAVE_MIN_KEYS_PRODUCER = 3072  # ... or this many through the producer warp
_TAIL_PRODUCER_MAX_GROUP = 4  # (tiles of 8 copies or more, blocks of 16 and 32) in GQA groups up to this


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _mm(a, b, UPCAST: tl.constexpr):
    """tl.dot; UPCAST (interpreter only) multiplies in fp32 because the Triton interpreter's
    bf16 dot is wrong (inputs are already rounded to their storage dtype, so results match).
    On a GPU fp32 operands use TF32 tensor cores (as torch does with allow_tf32): true-fp32
    dots compile to FMA loops that take minutes to build for a few digits nobody needs here."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _tile_start(t, n_strided, lo_tok, c0, s2_stride,
                S2: tl.constexpr, SPARSE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    """First key position of tile number `t` in the program's tile list: the strided shard
    blocks first (S2 only), then every tile from `lo_tok` on."""
    if S2:
        SUB: tl.constexpr = SPARSE_BLOCK // BLOCK_N
        strided = (c0 + (t // SUB) * s2_stride) * SPARSE_BLOCK + (t % SUB) * BLOCK_N
        start = tl.where(t < n_strided, strided, lo_tok + (t - n_strided) * BLOCK_N)
    else:
        start = t * BLOCK_N
    return start


@triton.jit
def _block_ids(table_row, start, kpos, kmask, hi, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
               MASK: tl.constexpr):
    """Physical block of every key of a tile (int64). Tiles start at multiples of BLOCK_N, so
    when a cache block holds whole tiles one table entry serves the tile: a scalar load instead
    of BLOCK_N gathers on the path every K/V address waits for."""
    if BLOCK_SIZE % BLOCK_N == 0:
        if MASK:
            phys = tl.load(table_row + start // BLOCK_SIZE, mask=start < hi, other=0).to(tl.int64)
        else:
            phys = tl.load(table_row + start // BLOCK_SIZE).to(tl.int64)
        return tl.zeros_like(kpos).to(tl.int64) + phys
    else:
        if MASK:
            return tl.load(table_row + kpos // BLOCK_SIZE, mask=kmask, other=0).to(tl.int64)
        else:
            return tl.load(table_row + kpos // BLOCK_SIZE).to(tl.int64)


@triton.jit
def _attn_tile(acc, acc_lr, m_i, l_i, q, start, hi, qpos,
               K, V, Lr, LoraB, b_row, bt_row, lbt_row, k_head_off, v_head_off, k_start,
               stride_kb, stride_ks, stride_vb, stride_vs, stride_lrb, stride_lrs,
               has_adapter, qk_scale,
               s2_local, s2_stride, s2_shift, is_dense,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
               RANK: tl.constexpr, LR_ALIGN: tl.constexpr,
               BLOCK_SIZE: tl.constexpr, LR_BLOCK_SIZE: tl.constexpr,
               SPARSE_BLOCK: tl.constexpr, PAGED: tl.constexpr, HAS_LORA: tl.constexpr,
               S2: tl.constexpr, MASK: tl.constexpr, UPCAST: tl.constexpr,
               LR_SHARED_TABLE: tl.constexpr, TMA: tl.constexpr, SHIFT_TAIL: tl.constexpr,
               B_IN_LOOP: tl.constexpr):
    """One key tile of the online softmax. MASK=False is the interior fast path: the caller
    guarantees every key of the tile is in range and visible to every query row. TMA: K and V
    are tensor descriptors over the caches seen as ``[blocks, block_size, Hkv × D]`` and one
    cache block holds the whole tile, which arrives by one bulk copy each for K and V (and L).
    SHIFT_TAIL (TMA only): the masked tail tile is read shifted back to end at the last key
    rather than masked in registers (required with Flash-LoRA; see `_launch_plan`).
    B_IN_LOOP (Flash-LoRA by TMA): B_a, a descriptor over ``[adapters × Hkv, r, D]``, comes with
    the tile's copies (row `b_row`) and the tile's (P·L)·B_a goes straight into acc."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kpos = start + offs_n
    kmask = kpos < hi
    if TMA:  # paged, one cache block holds the tile: its block id and first slot in it
        blk = tl.load(bt_row + start // BLOCK_SIZE, mask=start < hi, other=0).to(tl.int32)
        shift = 0
        if MASK and SHIFT_TAIL:
            # The tail tile (decode: the only masked one) is read shifted back to end at the last
            # key, so that it reads no slot past the sequence (never written: NaN for all we
            # know, and 0 × NaN is not 0). Its first `shift` rows were read by the tile before
            # (masked out below) or, before slot 0, are zero-filled by the copy. Masking V (and
            # L) in registers instead, below, costs a second shared-memory copy of each.
            shift = tl.maximum(start + BLOCK_N - hi, 0)
            kpos = kpos - shift
        slot0 = (start % BLOCK_SIZE - shift).to(tl.int32)
    elif PAGED:
        phys = _block_ids(bt_row, start, kpos, kmask, hi, BLOCK_SIZE, BLOCK_N, MASK)
        slot = (kpos % BLOCK_SIZE).to(tl.int64)
        k_off = phys * stride_kb + slot * stride_ks
        v_off = phys * stride_vb + slot * stride_vs
    else:
        row = (k_start + kpos).to(tl.int64)
        k_off = row * stride_ks
        v_off = row * stride_vs
    if TMA:
        kt = tl.trans(K.load([blk, slot0, k_head_off.to(tl.int32)]).reshape(BLOCK_N, HEAD_DIM))
    else:
        k_ptrs = K + k_head_off + k_off[None, :] + offs_d[:, None]
        v_ptrs = V + v_head_off + v_off[:, None] + offs_d[None, :]
        if MASK:
            kt = tl.load(k_ptrs, mask=kmask[None, :], other=0.0)
        else:
            kt = tl.load(k_ptrs)
    s = _mm(q, kt, UPCAST) * qk_scale
    if MASK:
        visible = kpos[None, :] <= qpos[:, None]
        if SHIFT_TAIL:
            visible = visible & (kpos[None, :] >= start)
        if S2:
            kblk = kpos // SPARSE_BLOCK
            qblk = qpos // SPARSE_BLOCK
            in_shard = ((kblk + s2_shift) % s2_stride) == 0
            local = (qblk[:, None] - kblk[None, :]) < s2_local
            visible = visible & (local | in_shard[None, :] | is_dense)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if TMA:
        v = V.load([blk, slot0, v_head_off.to(tl.int32)]).reshape(BLOCK_N, HEAD_DIM)
        if MASK and not SHIFT_TAIL:  # p is 0 there, but 0 × an unwritten slot's NaN is not
            v = tl.where(kmask[:, None], v, 0.0)
    elif MASK:
        v = tl.load(v_ptrs, mask=kmask[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, UPCAST)
    if HAS_LORA and TMA:
        # L by TMA too (a [1, BLOCK_N, R_PAD] box over rows of r: the columns past r arrive as
        # zeros), shifted as K/V are. A request without adapter reads garbage here, zeroed once
        # after the loop (with B_IN_LOOP, its product tile by tile).
        if LR_SHARED_TABLE:
            lblk = blk
            lslot0 = slot0
        else:
            lblk = tl.load(lbt_row + start // LR_BLOCK_SIZE, mask=(start < hi) & has_adapter, other=0).to(tl.int32)
            lslot0 = (start % LR_BLOCK_SIZE - shift).to(tl.int32)
        tl.static_assert(SHIFT_TAIL, "Flash-LoRA reads its TMA tail tile shifted (see _launch_plan)")
        lt = Lr.load([lblk, lslot0, 0]).reshape(BLOCK_N, R_PAD)
        if B_IN_LOOP:
            # Its row offset min(start, 0) is 0, but the compiler cannot know it: a load that
            # varies with the loop, which the pipeliner issues with the tile's own copies (a
            # load before the loop is waited for before the first tile's copies are even issued).
            # Rows past r arrive as zeros; a request without adapter adds nothing (0 × garbage L,
            # or × a B it does not own, is not 0).
            lb = LoraB.load([b_row + tl.minimum(start, 0), 0, 0]).reshape(R_PAD, HEAD_DIM)
            pl = _mm(p.to(lt.dtype), lt, UPCAST)
            acc += tl.where(has_adapter, _mm(pl.to(lb.dtype), lb, UPCAST), 0.0)
        else:
            acc_lr = acc_lr * alpha[:, None] + _mm(p.to(lt.dtype), lt, UPCAST)
    elif HAS_LORA:
        offs_r = tl.arange(0, R_PAD)
        lmask = (offs_r[None, :] < RANK) & has_adapter
        if MASK:
            lmask = lmask & kmask[:, None]
        if LR_SHARED_TABLE:
            # the low-rank cache is paged by the K/V table itself (same ids, same block size):
            # no second table walk on the path every L address waits for
            lphys = phys
            lslot = slot
        else:
            # A request without adapter reads block 0 (masked out below), never its table.
            lphys = _block_ids(lbt_row, start, kpos, kmask & has_adapter, tl.where(has_adapter, hi, 0),
                               LR_BLOCK_SIZE, BLOCK_N, True)
            lslot = (kpos % LR_BLOCK_SIZE).to(tl.int64)
        # Row starts aligned to LR_ALIGN elements and a compile-time rank let the compiler load
        # whole rows as vectors: r = 8 rows are 16 bytes, never divisible-by-16 *elements*.
        l_off = tl.multiple_of(lphys * stride_lrb + lslot * stride_lrs, LR_ALIGN)
        lt = tl.load(Lr + l_off[:, None] + offs_r[None, :], mask=lmask, other=0.0)
        acc_lr = acc_lr * alpha[:, None] + _mm(p.to(lt.dtype), lt, UPCAST)
    return acc, acc_lr, m_new, l_i


# The split count changes with batch and context: not specialised on (1 / multiple of 16 /
# other), or the first request to cross a threshold pays a compile mid-serving. Table strides
# stay specialised (30% faster decode at batch 64 × 4K on an H200 when known multiples of 16):
# callers keep them stable by padding table widths to 16 (as the engine does).
@triton.jit(do_not_specialize=["num_splits", "full_items"])
def _attn_fwd(
    Q, K, V, Lr, LoraB, Out, WsM, WsL, WsAcc, SplitCounters,
    BlockTables, LrBlockTables, SeqLens, CuQ, CuK, AdapterIds,
    qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_btb, stride_bth, stride_lrb, stride_lrs, stride_lbtb,
    stride_lba, stride_lbh, stride_lbr,
    num_kv_heads, num_splits, group, full_items,
    s2_local, s2_stride, s2_step, s2_offset, s2_dense_from, s2_homo,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    R_PAD: tl.constexpr, SPARSE_BLOCK: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, LR_BLOCK_SIZE: tl.constexpr, RANK: tl.constexpr, LR_ALIGN: tl.constexpr,
    PAGED: tl.constexpr, VARLEN_Q: tl.constexpr, HAS_LORA: tl.constexpr, S2: tl.constexpr,
    SPLIT: tl.constexpr, UPCAST: tl.constexpr,
    FUSE_REDUCE: tl.constexpr, GROUP_P2: tl.constexpr, REDUCE_S: tl.constexpr,
    LR_SHARED_TABLE: tl.constexpr, PREFETCH_B: tl.constexpr, TMA: tl.constexpr,
    SHIFT_TAIL: tl.constexpr, ONE_LOOP: tl.constexpr, TAIL: tl.constexpr, PDL: tl.constexpr,
    B_IN_LOOP: tl.constexpr,
):
    if PDL:  # launched while the kernel before drains: nothing global before its writes land (_pdl)
        gdc_wait()
    # TAIL (decode over several waves, see _tail_split): a one-dimensional grid whose first
    # `full_items` programs take a (sequence, KV head) each, whole, and the rest the remaining
    # ones in `num_splits` splits each, so that the last wave is as full as the others but
    # shorter; only those partials go to the workspace, indexed from `full_items` on.
    # Last query tiles first: under causality they have the most keys, so the tail is short.
    if TAIL:  # decode only: one query tile
        pid = tl.program_id(0)
        pid_m = 0
        in_tail = pid >= full_items
        tail_pid = tl.maximum(pid - full_items, 0)
        item = tl.where(in_tail, full_items + tail_pid // num_splits, pid)
        b = item // num_kv_heads
        kvh = item % num_kv_heads
        split = tl.where(in_tail, tail_pid % num_splits, 0)
        n_split = tl.where(in_tail, num_splits, 1)
    else:
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
        pid_hs = tl.program_id(1)
        b = tl.program_id(2)
        n_split = num_splits
        if SPLIT:
            kvh = pid_hs // num_splits
            split = pid_hs % num_splits
        else:  # compiled apart from the split path: no runtime division on its addressing
            kvh = pid_hs
            split = 0

    if VARLEN_Q:
        q_start = tl.load(CuQ + b)
        len_q = tl.load(CuQ + b + 1) - q_start
    else:
        q_start = b
        len_q = 1
    if PAGED:
        seq_len = tl.load(SeqLens + b)
        k_start = 0
    else:
        k_start = tl.load(CuK + b)
        seq_len = tl.load(CuK + b + 1) - k_start

    # The GQA group size is a runtime value (one compiled kernel serves every Hq/Hkv ratio).
    TOK = BLOCK_M // group
    t0 = pid_m * TOK
    if t0 < len_q:
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        tok = t0 + offs_m // group
        qh = kvh * group + offs_m % group
        row_ok = (tok < len_q) & (offs_m < TOK * group)
        q_rows = (q_start + tok).to(tl.int64)
        q = tl.load(Q + q_rows[:, None] * stride_qt + qh[:, None] * stride_qh + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        qpos = seq_len - len_q + tok
        p_min = seq_len - len_q + t0
        p_max = seq_len - len_q + tl.minimum(t0 + TOK, len_q) - 1
        hi = p_max + 1  # keys [0, hi) can be visible to some row of this tile

        # The tile list: [strided shard tiles below the window] + [every tile from lo_tok to hi).
        # n_full leading tiles need no mask (all keys in range and visible to all rows).
        n_strided = 0
        lo_tok = 0
        c0 = 0
        s2_shift = 0
        is_dense = False
        if S2:
            shard_head = tl.where(s2_homo != 0, 0, kvh)
            s2_shift = shard_head * s2_step + s2_offset
            c0 = (s2_stride - s2_shift % s2_stride) % s2_stride
            is_dense = kvh >= s2_dense_from
            i0 = tl.maximum(p_min, 0) // SPARSE_BLOCK
            i1 = tl.maximum(p_max, 0) // SPARSE_BLOCK
            lo_blk = tl.maximum(i0 - s2_local + 1, 0)
            lo_blk = tl.where(is_dense, 0, lo_blk)
            n_sblk = tl.where(lo_blk > c0, (lo_blk - c0 + s2_stride - 1) // s2_stride, 0)
            n_strided = n_sblk * (SPARSE_BLOCK // BLOCK_N)
            lo_tok = lo_blk * SPARSE_BLOCK
            window_all_local = is_dense | (lo_blk >= i1 - s2_local + 1)
            n_full = n_strided + tl.where(window_all_local,
                                          tl.maximum(p_min + 1 - lo_tok, 0) // BLOCK_N, 0)
        else:
            n_full = tl.maximum(p_min + 1, 0) // BLOCK_N
        n_tiles = n_strided + tl.cdiv(tl.maximum(hi - lo_tok, 0), BLOCK_N)
        if SPLIT or TAIL:
            per = tl.cdiv(n_tiles, n_split)
            t_lo = split * per
            t_hi = tl.minimum(n_tiles, t_lo + per)
        else:
            t_lo = 0
            t_hi = n_tiles

        bt_row = BlockTables + b.to(tl.int64) * stride_btb + kvh * stride_bth
        lbt_row = LrBlockTables + b.to(tl.int64) * stride_lbtb
        k_head_off = kvh.to(tl.int64) * stride_kh
        v_head_off = kvh.to(tl.int64) * stride_vh
        has_adapter = False
        adapter = 0
        if HAS_LORA:
            adapter = tl.load(AdapterIds + b)
            has_adapter = adapter >= 0

        m_i = tl.full([BLOCK_M], -1.0e38, tl.float32)  # see _NEG_BIG
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        acc_lr = tl.zeros([BLOCK_M, R_PAD], tl.float32)
        b_row = 0
        if HAS_LORA and B_IN_LOOP:
            b_row = (tl.maximum(adapter, 0) * num_kv_heads + kvh).to(tl.int32)
        elif HAS_LORA:
            offs_r = tl.arange(0, R_PAD)
            b_ptrs = (LoraB + tl.maximum(adapter, 0).to(tl.int64) * stride_lba + kvh * stride_lbh
                      + offs_r[:, None] * stride_lbr + offs_d[None, :])
            b_mask = (offs_r[:, None] < RANK) & has_adapter
            if PREFETCH_B:  # issued before the key loop: its latency hides behind the loop's
                lb = tl.load(b_ptrs, mask=b_mask, other=0.0)

        # Two loops: the n_full leading tiles without masks, then the rest with them. ONE_LOOP:
        # every tile through the masked one (masks cost little in a memory-bound loop), the other
        # not compiled at all: two loops drain the first's pipeline before the tail tile's copy
        # is even issued, a whole memory round trip a program at the one-an-SM variant's depth
        # (see _launch_plan), and an empty loop's pipeline prologue would still be code to run
        # (split Flash-LoRA's short runs too: its tail tile's program is the last to finish).
        if ONE_LOOP:
            n_full = t_lo
        for masked in tl.static_range(2):
            if masked == 1 or not ONE_LOOP:
                if masked == 1:
                    t_from, t_to = tl.maximum(t_lo, n_full), t_hi
                else:
                    t_from, t_to = t_lo, tl.minimum(t_hi, n_full)
                for t in range(t_from, t_to):
                    start = _tile_start(t, n_strided, lo_tok, c0, s2_stride, S2, SPARSE_BLOCK, BLOCK_N)
                    acc, acc_lr, m_i, l_i = _attn_tile(
                        acc, acc_lr, m_i, l_i, q, start, hi, qpos, K, V, Lr, LoraB, b_row, bt_row, lbt_row,
                        k_head_off, v_head_off, k_start, stride_kb, stride_ks, stride_vb, stride_vs,
                        stride_lrb, stride_lrs, has_adapter, qk_scale,
                        s2_local, s2_stride, s2_shift, is_dense,
                        HEAD_DIM, BLOCK_N, R_PAD, RANK, LR_ALIGN, BLOCK_SIZE, LR_BLOCK_SIZE, SPARSE_BLOCK, PAGED, HAS_LORA, S2, masked == 1, UPCAST, LR_SHARED_TABLE, TMA, SHIFT_TAIL,
                        B_IN_LOOP)

        if PDL:  # only the epilogue left: the next kernel may take this program's place (_pdl)
            gdc_launch_dependents()
        if HAS_LORA and not B_IN_LOOP:
            # (P·L)·B_a once per program; linear, so split partials may fold it in too.
            if not PREFETCH_B:
                lb = tl.load(b_ptrs, mask=b_mask, other=0.0)
            if TMA:  # B is zero without adapter, but 0 × the garbage read for L is not
                acc_lr = tl.where(has_adapter, acc_lr, 0.0)
            # In the cache dtype: an fp32 [R_PAD, D] operand of B spills registers at r = 128,
            # and P was rounded to that dtype for P·V anyway.
            acc += _mm(acc_lr.to(lb.dtype), lb, UPCAST)

        if TAIL:
            if n_split > 1:
                _split_partial(WsM, WsL, WsAcc, Out, SplitCounters, m_i, l_i, acc, item - full_items, q_start,
                               kvh, offs_m % group, row_ok, group, num_splits, split, stride_ot, stride_oh,
                               HEAD_DIM, True, GROUP_P2, REDUCE_S)
            else:
                _store_out(Out, acc, l_i, q_rows, qh, row_ok, stride_ot, stride_oh, HEAD_DIM)
        elif SPLIT:
            # Items: (sequence, KV head) b·Hkv + kvh, fused (decode); else each query token's
            # (token, KV head), which _split_reduce combines (a row each).
            if FUSE_REDUCE:
                ws_item = b * num_kv_heads + kvh
            else:
                ws_item = q_rows * num_kv_heads + kvh
            _split_partial(WsM, WsL, WsAcc, Out, SplitCounters, m_i, l_i, acc, ws_item, q_start, kvh,
                           offs_m % group, row_ok, group, num_splits, split, stride_ot, stride_oh,
                           HEAD_DIM, FUSE_REDUCE, GROUP_P2, REDUCE_S)
        else:
            _store_out(Out, acc, l_i, q_rows, qh, row_ok, stride_ot, stride_oh, HEAD_DIM)


@triton.jit
def _store_out(Out, acc, l_i, q_rows, qh, row_ok, stride_ot, stride_oh, HEAD_DIM: tl.constexpr):
    """A whole (unsplit) program's output rows: acc / l (an empty sequence: acc is 0, so is its output)."""
    offs_d = tl.arange(0, HEAD_DIM)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = Out + q_rows[:, None] * stride_ot + qh[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _split_partial(WsM, WsL, WsAcc, Out, SplitCounters, m_i, l_i, acc, ws_item, tok, kvh, g, row_ok, group,
                   num_splits, split, stride_ot, stride_oh, HEAD_DIM: tl.constexpr, FUSE_REDUCE: tl.constexpr,
                   GROUP_P2: tl.constexpr, REDUCE_S: tl.constexpr):
    """A split program's (max, sum, P·V) rows into the workspace, as partial `split` of item
    `ws_item` (rows `g` of its `group`: each item holds group × num_splits rows). With FUSE_REDUCE
    (decode only: one token, `tok`, per item) the last of the item's splits to finish combines
    them all, in place of a second launch whose gap and tail cost more than the combine (see
    _fuse_reduce); its arrival counter is the item's. The barrier orders every thread's partial
    stores before the release of the one arrival atomic."""
    offs_d = tl.arange(0, HEAD_DIM)
    ws_row = (ws_item.to(tl.int64) * group + g) * num_splits + split
    tl.store(WsM + ws_row, m_i, mask=row_ok)
    tl.store(WsL + ws_row, l_i, mask=row_ok)
    tl.store(WsAcc + ws_row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None])
    if FUSE_REDUCE:
        tl.debug_barrier()
        counter = SplitCounters + ws_item
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == num_splits - 1:
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # ready for the next launch
            _combine_splits(WsM, WsL, WsAcc, Out, ws_item, tok, kvh, group, num_splits, stride_ot, stride_oh,
                            HEAD_DIM, GROUP_P2, REDUCE_S)


@triton.jit
def _combine_splits(WsM, WsL, WsAcc, Out, ws_item, tok, kvh, group, num_splits,
                    stride_ot, stride_oh,
                    HEAD_DIM: tl.constexpr, GROUP_P2: tl.constexpr, REDUCE_S: tl.constexpr):
    """Combine the split partials of workspace item `ws_item` (see `_split_partial`), the `group`
    query heads of one (token, KV head), into their output rows, REDUCE_S
    splits of every head per pass: one [heads, splits, D] load a pass, so the usual split
    counts cost one round trip to L2, not one per split. Loads bypass L1 (.cg): the partials
    were written by other SMs."""
    offs_g = tl.arange(0, GROUP_P2)
    offs_s = tl.arange(0, REDUCE_S)
    offs_d = tl.arange(0, HEAD_DIM)
    g_ok = offs_g < group
    qh = kvh * group + offs_g
    base = (ws_item.to(tl.int64) * group + offs_g) * num_splits  # [G] first partial
    m_run = tl.full([GROUP_P2], -1.0e38, tl.float32)  # _NEG_BIG: padded heads never give NaN
    l_run = tl.zeros([GROUP_P2], tl.float32)
    acc = tl.zeros([GROUP_P2, HEAD_DIM], tl.float32)
    for s0 in range(0, num_splits, REDUCE_S):
        ok = g_ok[:, None] & (s0 + offs_s < num_splits)[None, :]
        idx = base[:, None] + s0 + offs_s[None, :]
        m = tl.load(WsM + idx, mask=ok, other=-1.0e38, cache_modifier=".cg")
        l = tl.load(WsL + idx, mask=ok, other=0.0, cache_modifier=".cg")
        part = tl.load(WsAcc + idx[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                       mask=ok[:, :, None], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m_run, tl.max(m, 1))
        alpha = tl.exp2(m_run - m_new)
        w = tl.exp2(m - m_new[:, None])
        l_run = l_run * alpha + tl.sum(w * l, 1)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * part, 1)
        m_run = m_new
    out = acc / tl.where(l_run > 0, l_run, 1.0)[:, None]
    o_ptrs = Out + tok.to(tl.int64) * stride_ot + qh[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=g_ok[:, None])


@triton.jit(do_not_specialize=["num_splits"])
def _split_reduce(WsM, WsL, WsAcc, Out, stride_ot, stride_oh, group, num_kv_heads, num_splits,
                  HEAD_DIM: tl.constexpr, GROUP_P2: tl.constexpr, REDUCE_S: tl.constexpr):
    """The split partials combined by a second launch instead (`_fuse_reduce` off): one program
    per (query token, KV head), the same combine the fused path runs."""
    row = tl.program_id(0)
    _combine_splits(WsM, WsL, WsAcc, Out, row, row // num_kv_heads, row % num_kv_heads, group,
                    num_splits, stride_ot, stride_oh, HEAD_DIM, GROUP_P2, REDUCE_S)


# --------------------------------------------------------------------------------------------
# Launch plumbing shared with kernels.s2
# --------------------------------------------------------------------------------------------
class _S2Args(NamedTuple):
    """The runtime integers of an S2 pattern as the kernel reads them (see kernels.s2). A tuple:
    it is part of every S2 launch key, hashed on each call."""
    sparse_block: int
    local_blocks: int
    vert_stride: int
    head_sliding_step: int
    offset: int
    dense_from: int  # first KV head that is dense
    homo_head: bool


@dataclass
class _Lora:
    lr_cache: torch.Tensor
    lr_block_tables: torch.Tensor
    lora_b: torch.Tensor
    adapter_ids: torch.Tensor


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(_cuda_index(device))
    return 8


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _config(head_dim: int, group: int, decode: bool, r_pad: int, sparse_block: int | None,
            long: bool = True, block_size: int = 1, keys: int = 0):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a launch. `r_pad`: the P·L accumulator's
    columns (0: no LoRA); `long`: keys per sequence (decode) or query run (prefill) of 8K and more;
    `block_size`: the paged cache's (1: contiguous K/V); `keys`: the most keys a sequence may
    hold (paged: the block table's reach; contiguous: every key of the batch), which prefill's
    Flash-LoRA tiles follow.

    GPU values from `bench/tune_attention.py` on an H200 (bf16, Hq 32, Hkv 8, D 128, block 16):
    decode is memory-bound and wants K/V tiles of 32 KB (128 keys at D 128; "wide") or 16 KB
    ("narrow", 3 programs an SM instead of 2): `long` picks for unsplit launches, and split ones
    take whichever fills more of the GPU (`_launch_plan`); within 1.7% of the best tile and
    split count at 23 shapes, batch 1-64 × 1K-32K (Run N of bench/RESULTS.md). Prefill wants
    128×128 tiles over long query runs (368 TFLOP/s at 16K) and narrow key tiles over short ones,
    where the diagonal's masked tiles weigh more (1K: 266 vs 217 TFLOP/s; 4K: 335 vs 331)."""
    if interpreter_on():
        # Small tiles so that CPU tests with short sequences still cross many tiles.
        bm, bn, warps, stages = (16 if decode else 32), 16, 4, 1
    elif decode:
        # Flash-LoRA keeps the wide tiles at every length: its second accumulator makes narrow
        # ones slower (H200, r = 8: 4 × 4K 29.6 vs 26.2 us, 8 × 4K 48.6 vs 42.4; 1 × 4K the
        # exception, 13.2 vs 13.8).
        wide = long or r_pad > 0
        bm, bn = 16, max(16, min(128, (128 if wide else 64) * 128 // head_dim))
        warps, stages = 4, 2
    else:
        if head_dim <= 128:
            bm, bn, warps, stages = (128, 128, 8, 3) if long else (128, 32, 4, 2)
            if r_pad and (long or block_size % 64 == 0 or keys >= _LORA_WIDE_KEYS):
                # Flash-LoRA takes the wide tiles over shorter runs too, where its P·L dot pays
                # for them: in blocks of 64 keys and more at every length, over runs of 4K keys
                # in smaller blocks (whose narrow tiles gather fewer of them). Two stages at r >
                # 32 in small blocks, whose per-thread addresses need the registers. H200, us a
                # call against paged prefill's (same call; bench/RESULTS.md Run AD): blocks of
                # 128, 4 × 4K r = 16 1540 vs 1732 on 128 × 64 tiles (paged 1607), r = 64 1654 vs
                # 1829 on 64 × 32, 8 × 2K 880 vs 959 (paged 879); blocks of 16, 4 × 4K r = 16
                # 1768 vs 1834 (paged 1637), r = 64 (two stages) 1747 vs 2703; 16 × 1K, 8 × 2K
                # keep the narrow ones (584 vs 669, 1010 vs 1053).
                bm, bn, warps = 128, 128, 8
                stages = 2 if r_pad > 32 and block_size % 64 else 3
        else:
            bm, bn, warps, stages = 64, 32, 8, 2
        if r_pad > 32 and warps == 4:
            bm = min(bm, 64)  # the P·L accumulator needs registers too
    bm = max(bm, _next_pow2(group))
    if sparse_block is not None:
        bn = min(bn, sparse_block)
    return bm, bn, warps, stages


def _lora_pad(rank: int, decode: bool) -> int:
    """Columns of the P·L accumulator: a power of two >= 16 (tl.dot's minimum); decode pads
    small ranks to 32, measured 1.2-1.3× faster than 16 at r = 8 (the tile layouts of the two
    dots line up)."""
    return max(32 if decode else 16, _next_pow2(rank))


def _tma_loads(device: torch.device, block_size: int, block_n: int) -> bool:
    """Whether paged decode loads K/V tiles through TMA tensor descriptors (when the cache layout
    allows it, see `_launch_plan`): Hopper and later, tiles of at least 64 keys, each inside one
    cache block. One bulk copy a tile needs no per-thread addresses (196 registers a thread
    instead of 226 at 128-key tiles) and Triton's pipeliner keeps the next K tile in flight.
    Measured on an H200 (bf16, Hq 32, Hkv 8, D 128, blocks of 128, same run; bench/RESULTS.md
    Run O): 1 × 4K 9.7 us vs 11.9 for per-thread loads (SDPA on contiguous K/V 11.6), 1 × 32K
    36.7 (88% of copy bandwidth) vs 41.1 (SDPA 38.2), 8 × 4K 36.2 vs 41.0, 16 × 4K 65.6 vs 70.4,
    64 × 4K 239 vs 246. Blocks of 64 are a little slower; blocks of 16 (a TMA copy of 16 keys a
    tile) 1.2-2x slower than per-thread loads, so those keep them."""
    return _has_tma(device) and block_n >= 64 and block_size % block_n == 0


def _has_tma(device: torch.device) -> bool:
    """A GPU with TMA (compute capability 9.0 and later), kernels compiled, not interpreted."""
    return (not interpreter_on() and device.type == "cuda"
            and _cuda_capability(_cuda_index(device)) >= (9, 0))


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _tma_single(device: torch.device) -> bool:
    """Whether decode may run its double-buffered TMA variant at one program an SM (see
    `_launch_plan`): a device with TMA whose programs may take its shared memory (`_SINGLE_SMEM`)."""
    return _has_tma(device) and _smem_optin(_cuda_index(device)) >= _SINGLE_SMEM


def _ring_device(device: torch.device) -> bool:
    """Whether decode may run `attention_ring`'s kernel here: a Hopper GPU (compute capability
    9, where it was measured; its copies and mbarriers are Hopper's) and a Triton with Gluon."""
    return (device.type == "cuda" and _has_tma(device) and _cuda_capability(_cuda_index(device))[0] == 9
            and attention_ring.available())


class _Ring(NamedTuple):
    """A launch of `attention_ring`'s kernel (`ring_decode`)."""
    tile: int  # keys a tile
    slots: int  # ring slots
    splits: int = 1  # > 1: split-KV
    producer: bool = False  # a warp of its own issues the copies
    pack: int = 1  # KV heads a program (`ring_decode(pack=)`; see _ring_packed)
    # > 0: a launch over several waves whose first `full_items` programs (sequence × KV head or
    # pack) run whole and the rest in `splits` each (`ring_decode(full_items=)`, see _tail_split)
    full_items: int = 0


def _ring_tiles(device: torch.device, programs: int, head_dim: int, group: int, block_size: int,
                max_ctx: int, itemsize: int, lora: int = 0) -> _Ring | None:
    """The key tile and ring slots of `attention_ring`'s kernel for an unsplit paged decode launch
    of `programs` (sequences × KV heads) over caches a TMA descriptor can address, or None to
    keep `_attn_fwd`. Two slots of 128-key tiles (128 KB of shared memory: one program an SM) where
    the launch is one program an SM, or over 3 an SM on runs of 16K keys or more (shorter runs
    over many waves keep `_attn_fwd`'s 2-3 programs an SM); two of 64-key tiles (64 KB: 3 an SM)
    in between, where one wave at 3 an SM beats two at one. Only where measured: head dim 128,
    half-precision caches, GQA groups of up to 16 query heads (one MMA tile of rows), runs of
    at least 2K keys; cache blocks that hold the tile, or few enough of them a tile
    (`_ring_blocks_ok`). Flash-LoRA (`lora`: the L tile's columns, 0 without; at most 64, the
    registers of its P·L accumulator) only at 128-key tiles (its L slots would leave 64-key ones
    2 an SM) over at least 0.9 programs an SM: below that, each program's one tile in
    flight bounds it (H200, Run S, r = 64, us: 12 × 4K 56.2 / 56.1 vs `_attn_fwd`'s 53.0 / 52.9,
    12 × 16K 204.7 / 205.5 vs 190.9 / 191.5, 14 × 4K 60.5 / 60.4 vs 60.2 / 60.1; r = 8 at 16-wide
    L tiles 14 × 4K 61.3 / 61.3 vs 61.7 / 61.5, 16 × 4K 68.1 / 68.1 vs 70.4 / 70.2, 16 × 32K
    494.5 / 493.6 vs 497.5 / 498.4, 64 × 32K 1920.1 / 1921.6 vs 1931.4 / 1934.3; r = 64 16 × 4K
    67.8 / 68.2 vs 69.2 / 69.2, 16 × 32K 493.4 / 493.0 vs 519.3 / 517.5, 64 × 32K 1959.9 / 1958.7
    vs 2020.6 / 2019.5).
    H200, one run (bf16, Hq 32, Hkv 8, D 128, blocks of 128, us, two passes; `_attn_fwd` as
    planned without it; bench/RESULTS.md Run S): 128-key tiles 16 × 4K 62.1 / 62.4 vs 63.1 /
    63.2, 16 × 4001 61.7 / 61.7 vs 62.5 / 62.7, 12 × 4K 48.5 / 48.7 vs 49.0 / 49.4, 16 × 32K
    465.2 / 465.3 vs 469.6 / 469.7, 64 × 32K 1841.7 / 1841.0 vs 1865.1 / 1866.9, but 64 × 4K
    238.2 / 237.6 vs 237.3 / 237.3, 128 × 4K 468.1 / 469.0 vs 467.6 / 467.7, 64 × 2K 125.5 /
    125.1 vs 123.1 / 122.9, 256 × 2K 473.6 / 473.8 vs 469.1 / 469.0; 64-key tiles 20 × 2K 42.7
    / 42.6 vs 44.3 / 44.4, 33 × 4K 124.1 / 124.1 vs 124.3 / 124.6, 24 × 16K 355.6 / 355.5 vs
    359.5 / 359.7, 48 × 8K 355.8 / 355.0 vs 357.0 / 356.7, 40 × 4K 159.3 / 159.0 vs 158.9 / 158.2.
    """
    if not _ring_device(device) or head_dim != 128 or group > 16 or itemsize != 2 or lora > _RING_LORA_MAX_RPAD:
        return None
    sms = _num_sms(device)
    block_n = 64 if sms < programs <= _TMA_SHIFTED_PER_SM * sms else 128
    # (a tile of 8 copies or more by the producer warp, as in one wave: its whole programs are one)
    one_wave_producer = _ring_producer(block_size, 128, 0, sms, sms) and group <= _TAIL_PRODUCER_MAX_GROUP
    least_keys = _TAIL_ONE_WAVE_MIN_KEYS_PRODUCER if one_wave_producer else _TAIL_ONE_WAVE_MIN_KEYS
    if (block_n == 64 and not lora and max_ctx >= least_keys
            and _ring_blocks_ok(block_size, 128, 0, one_wave_producer)):
        # Just over one wave: 128-key tiles one an SM, the few programs over split, where that
        # costs little over the wave (`_wave_cost`), rather than 64-key ones 3 an SM. H200, us,
        # against the 64-key tiles, SDPA on contiguous K/V (bench/RESULTS.md Run AF): blocks
        # of 128, 17 × 4K 71.2 vs 73.6 (70.3), 18 × 4K 75.7 vs 77.2 (74.5), 17 × 16K 259.3 vs
        # 284.7 (265.9), 20 × 16K 302.2 vs 313.5 (316.0); blocks of 32, 17 × 16K 263 vs 296;
        # lost from 20 × 4K (82.7 vs 82.0) and 22 × 16K on. Since Run AG in blocks of 16 and 32
        # through the producer warp (16 and 8 copies a tile; its split items' combine spills
        # 144 bytes in GQA groups of 8, unmeasured, which keep the plan before): blocks of 16,
        # 17 × 4K 75.5 vs 83.7 (71.0), 18 × 4K 78.8 vs 83.8 (75.0), 17 × 8K 136.7 vs 161.6
        # (135.3), 17 × 16K 264.3 vs 319.0 (265.5), 20 × 16K 307.7 vs 335.4 (315.9); blocks of
        # 32, against the same launch without the producer: 17 × 4K 73.8 vs 74.3, 17 × 16K 261.2
        # vs 265.3, 20 × 16K 304.5 vs 308.2, 17 × 8K 135.8 vs 136.7. 19 sequences (Run AG,
        # against the 64-key tiles): 4K blocks of 16 82.1 vs 85.4, 32 82.0 vs 82.0, 128 78.8
        # vs 79.5; 8K 152.2 vs 166.9, 150.3 vs 158.4, 148.1 vs 153.9. Over 2K keys it lost
        # (blocks of 128, 17 × 2K 41.4 vs 39.0, 18 × 2K 42.4 vs 40.6; 32, 43.4 vs 40.8; 16, 18 ×
        # 2K 45.3 vs 44.5; 19 × 2K 4-9%), over 3K through the producer warp only not (blocks of
        # 16, 17 × 3K 59.7 vs 63.5, 18 × 3K 61.8 vs 64.5; 32, 58.9 vs 60.1, 61.8 vs 61.7;
        # without it, blocks of 128, 57.4 vs 56.6).
        tail = _tail_split(programs, 1, max_ctx // 128, device)
        most = _TAIL_ONE_WAVE_LONG if max_ctx >= _RING_MIN_KEYS_MULTIWAVE else _TAIL_ONE_WAVE
        if tail is not None and _tail_cost(programs, sms, 1, *tail) <= most:
            return _Ring(128, 2, tail[1], one_wave_producer, full_items=tail[0])
    producer = _ring_producer(block_size, block_n, lora, programs, sms)
    if not _ring_blocks_ok(block_size, block_n, lora, producer) or max_ctx < _RING_MIN_KEYS:
        return None
    # (a tile of small blocks runs here over more than 3 an SM at any length: `_attn_fwd` reads
    # those blocks by per-thread loads, slower; see _ring_blocks_ok. Flash-LoRA's with L tiles
    # of 64 columns: narrower ones are small copies. H200, blocks of 64, bench/RESULTS.md Run
    # T, ring vs `_attn_fwd`: 64 × 4K r = 64 0.259 vs 0.325 ms, 64 × 32K r = 64 2.02 vs 2.02,
    # r = 8 2.10 vs 1.94, r = 16 1.99 vs 1.95)
    if programs > _TMA_SHIFTED_PER_SM * sms and (
            (max_ctx < _RING_MIN_KEYS_MULTIWAVE and block_size >= block_n)
            or (lora and block_size < block_n and lora < _RING_LORA_MAX_RPAD)):
        return None
    if lora and (block_n != _RING_LORA_TILE or programs < _RING_LORA_MIN_FILL * sms):
        return None
    tail = _tail_split(programs, 1, max_ctx // block_n, device) if block_n == 128 and programs > sms else None
    if tail is not None:  # one an SM over several waves: the last split (see _tail_split)
        return _Ring(block_n, 2, tail[1], False, full_items=tail[0])
    return _Ring(block_n, 2, producer=producer)


def _ring_split(device: torch.device, batch: int, num_kv_heads: int, head_dim: int, group: int,
                block_size: int, max_ctx: int, itemsize: int, lora: int = 0) -> _Ring | None:
    """The key tile, ring slots and splits of `attention_ring`'s kernel for a split paged decode
    launch (flash-decoding: each sequence's key tiles over several programs, their partials
    combined by the last to finish), or None to keep `_attn_fwd`. Only for cache blocks of under
    128 keys, where `_attn_fwd` reads 64-key tiles (blocks of 64, by TMA) or reads per thread
    (smaller blocks): at blocks of 128 it was as fast or faster (H200, same run, us, ring vs
    `_attn_fwd`, SDPA on contiguous K/V: 1 × 32K 37.1 vs 37.0, SDPA 37.7; 8 × 4K 36.9 vs 36.6,
    SDPA 37.3; 1 × 4K 10.9 vs 9.5; Flash-LoRA r = 8 / 64, 8 × 4K 39.2 / 39.2 vs 38.3 / 38.9).

    - Blocks of 64 and more: 128-key tiles, one program an SM (130 KB of shared memory), at
      least `_RING_SPLIT_MIN_TILES_WIDE` tiles a split (1 × 32K 37.2 vs 38.4, SDPA 37.5; 8 × 4K
      37.5 vs 38.5, SDPA 37.1; 8 tiles a split lost: 4 × 4K 22.9 vs 22.4, 2 × 8K 23.1 vs 22.5).
      Flash-LoRA too (6 copies a tile with L's; r = 8 / 64: 1 × 32K 39.2 / 40.2 vs 40.3 / 41.2,
      8 × 4K 39.7 / 38.9 vs 40.3 / 40.6), through the producer warp since Run Y
      (`_RING_PRODUCER_MIN_COPIES_SPLIT_WIDE`; us, against the same launch without it, same
      runs): 1 × 32K r = 64 40.07 / 39.62 / 40.22 vs 40.47 / 40.29 / 40.68 (three runs), r = 16
      38.87 vs 39.45, r = 8 39.10 vs 39.20; 8 × 4K r = 64 38.92 vs 39.20; 2 × 16K r = 64 39.76 vs
      40.15, r = 8 38.83 vs 40.56; 8 × 8K r = 64 69.64 vs 69.98, r = 8 68.92 vs 71.39; 4 × 8K
      r = 64 39.66 vs 39.72; 2 × 32K r = 64 70.52 vs 70.67; 4 × 16K r = 64 71.14 vs 71.54 in one
      run, 70.27 vs 69.64 in another. Paged decode's 4 copies a tile keep their own warps: with
      the producer 1 × 32K 37.80 vs 36.86, 4 × 16K 66.22 vs 65.19 (8 × 4K 36.90 vs 37.23).
    - Smaller blocks: 64-key tiles (8 copies a tile at blocks of 16, 4 at 32), at least
      `_RING_SPLIT_MIN_TILES` tiles a split, splits for one program an SM through the producer warp
      (`_ring_producer`), three ring slots from `_RING_SPLIT_DEEP_TILES` tiles a split (Flash-LoRA
      too since Run Y, see below); where those fill too few SMs, paged decode takes splits for two
      an SM without it (the combine's registers allow no more), as it did everywhere before (Run U:
      blocks of 16, 1 × 32K 39.4 vs 41.3, SDPA 37.5; 8 × 4K 38.4 vs 40.5, SDPA 36.9; 12 × 4K 52.9 vs
      57.5; blocks of 32, 1 × 32K 39.2 vs 41.3). One an SM with the producer warp (K on a barrier of
      its own, see `attention_ring._ring_consumer`) against two without it (us, same run, two passes
      averaged, two / three slots): blocks of 16, 1 × 8K 15.9 / 16.2 vs 17.1 (SDPA 15.5), 2 × 4K
      15.7 / 16.0 vs 16.5 (SDPA 15.0), 4 × 4K 23.7 / 23.6 vs 24.1, 2 × 8K 24.0 / 24.1 vs 24.6, 8 ×
      4K 39.4 / 38.7 vs 39.6 (SDPA 38.3), 1 × 32K 40.5 / 40.1 vs 40.2 (SDPA 38.4), 4 × 16K 71.9 /
      69.7 vs 69.3 (the one it lost); blocks of 32, 8 × 4K 38.8 / 38.1 vs 38.8, 1 × 32K 39.8 / 39.3
      vs 39.4 (bench/RESULTS.md, Run X). Flash-LoRA only this way: with L's, 12 copies a tile at
      blocks of 16, its launches at two an SM came within 3% either way of `_attn_fwd`. Its three
      slots (40 KB each at r = 64) against two (us, same run, two passes averaged; paged decode in
      brackets): blocks of 16, 1 × 32K r = 64 41.59 vs 41.84 [39.5], r = 8 39.96 vs 40.71 [39.2], 8
      × 4K r = 64 39.98 vs 40.57 [38.4], 4 × 16K r = 64 71.88 vs 74.18 [69.6], 2 × 16K r = 64 40.41
      vs 40.86 [38.8]; blocks of 32, 1 × 32K r = 64 40.47 vs 41.02 [38.9], 8 × 4K r = 64 39.32 vs
      39.41 [37.5] (bench/RESULTS.md, Run Y). At 4 tiles a split it lost (1 × 4K r = 64 12.52 vs
      12.32), which the rule keeps at two.
    - Paged decode in blocks of 16 and 32 takes 128-key tiles first (16 or 8 copies a tile, through
      the producer warp), by the rule of blocks of 64, since Run Y2; against the 64-key tiles it
      took before (us, same run, two passes averaged; SDPA in brackets): blocks of 16, 1 × 32K 38.49
      vs 39.02 [37.54], 8 × 4K 37.55 vs 37.72 [37.63], 4 × 16K 68.15 vs 68.13 [66.61]; blocks of 32,
      1 × 32K 37.77 vs 38.63 [37.50]. Where that would leave splits of under 16 tiles it lost (1 ×
      8K, 16 splits of 4, 15.82 vs 15.65 [15.17]); the rule keeps 64-key ones there. Any split of 32
      64-key tiles would fill as many SMs with 128-key ones, so paged decode's three 64-key slots
      are left to blocks of under 16 keys (over 24 copies a 128-key tile). Three 128-key slots lost
      (1 × 32K 40.55). Flash-LoRA keeps 64-key tiles (24 copies a 128-key tile with L's at blocks of
      16: 1 × 32K r = 64 41.33 vs 41.02; bench/RESULTS.md, Run Y2).
    - Over at least `_RING_SPLIT_MIN_FILL` programs an SM: half as many lost (blocks of 16, 1 ×
      2K in 8 splits 10.6 vs 9.2).
    - GQA groups of up to 8: the combine of 16 query heads spills registers.

    (bf16, Hq 32, Hkv 8, D 128; bench/RESULTS.md, Runs U and X.)"""
    if (not _ring_device(device) or head_dim != 128 or group > 8 or itemsize != 2
            or block_size >= 128 or max_ctx < _RING_MIN_KEYS or lora > _RING_LORA_MAX_RPAD):
        return None
    sms = _num_sms(device)
    wide = (128, 1, _RING_SPLIT_MIN_TILES_WIDE)  # (key tile, programs an SM, least tiles a split)
    if block_size >= 64:
        choices = (wide,)
    elif lora:  # 64-key tiles only: 24 copies a 128-key one (blocks of 16) lost
        choices = ((64, 1, _RING_SPLIT_MIN_TILES),)
    else:
        choices = (wide, (64, 1, _RING_SPLIT_MIN_TILES), (64, 2, _RING_SPLIT_MIN_TILES))
    for block_n, per_sm, min_tiles in choices:
        most = max_ctx // block_n // min_tiles  # splits of at least min_tiles tiles
        splits = _default_splits(batch, num_kv_heads, max_ctx, block_n, device, per_sm)
        splits = min(splits, 1 << (most.bit_length() - 1)) if most >= 1 else 1
        programs = batch * num_kv_heads * splits
        producer = _ring_producer(block_size, block_n, lora, programs, sms, split=True)
        if block_size < 64 and per_sm == 1 and not producer:
            continue
        if (splits == 1 or programs < _RING_SPLIT_MIN_FILL * sms
                or not _ring_blocks_ok(block_size, block_n, lora, producer)):
            continue
        # (never three 128-key slots: they lost, and with Flash-LoRA's L would not fit an SM)
        deep = producer and block_n == 64 and max_ctx // block_n // splits >= _RING_SPLIT_DEEP_TILES
        return _Ring(block_n, 3 if deep else 2, splits, producer)
    return None


def _ring_packed(device: torch.device, batch: int, num_kv_heads: int, head_dim: int, group: int,
                 block_size: int, max_ctx: int, itemsize: int) -> _Ring | None:
    """A paged decode launch of `attention_ring`'s kernel in which each program reads several KV
    heads of its sequence (`ring_decode(pack=)`), or None. In cache blocks of 16 or 32 keys a
    128-key tile of one head takes 8 or 4 copies each of K and V, and those copies, not the
    bytes, are what small blocks cost (bench/RESULTS.md, Run AA); a copy of a block's keys of 4
    heads at once is 4 times larger, and a 128-row tile of 32 keys × 4 heads takes 2 copies each
    (masked to each query row's own head: the MMAs are as large as a head's alone, since one
    head's 4 query rows already fill a 16-row tile). Where it pays, measured, at one program an
    SM (128 KB of shared memory):

    - a pack of 4 (GQA group × pack up to `_RING_PACK_ROWS`), else of 2, where its launch is one
      wave at least `_RING_PACK_MIN_FILL` full, unsplit;
    - over several waves, a pack of 2 (GQA groups of up to 4) where the plan would otherwise
      leave more than 3 programs an SM to `_attn_fwd`'s per-thread loads (the ring's own tiles
      take fewer): unsplit where its waves are `_RING_PACK_UNSPLIT_FILL` full, else in the
      fewest splits of up to 4 that fill them `_RING_PACK_SPLIT_FILL` full (at 4K keys and
      more), else not at all;
    - the producer warp where a tile still takes 8 copies (`_ring_producer`). A split pack's
      combine takes one split a pass: as fast or faster than more a pass at every shape
      measured (16 × 4K in 4 splits 71.1 vs 74.0 us).

    Packs of 4 over several waves, split packs in one wave, and packs below these fills lost.
    H200 (bf16, Hq 32, Hkv 8, D 128, CUDA graph, us; the plan before against the pack, SDPA on
    contiguous K/V; bench/RESULTS.md, Run AE): blocks of 16, 64 × 4K 248.6 vs 244.7 (SDPA
    243.3), 64 × 16K 979.1 vs 953.8 (953.7), 96 × 4K 403.9 vs 366.9 (360.7), 96 × 16K 1461.5 vs
    1439.6 (1424.7), 128 × 4K 487.4 vs 486.6, 128 × 16K 1948.1 vs 1916.4 (1923.9), 256 × 4K
    965.7 vs 963.0, 88 × 4K 344.1 vs 343.9 (334.1); in splits, 72 × 4K 371.4 vs 294.9 (3 splits;
    SDPA 282.8), 72 × 16K 1306.7 vs 1114.3 (3; 1094.7), 76 × 4K 376.5 vs 310.5 (3; 308.3), 80 ×
    4K 339.9 vs 319.6 (2; 314.3), 80 × 16K 1342.1 vs 1209.9 (2; 1240.8), 104 × 16K 1799.5 vs
    1605.5 (3; 1530.5), 112 × 4K 442.6 vs 442.5 (2), 100 × 4K 408.1 vs 409.0 (4), 104 × 4K 416.8
    vs 420.0 (3); blocks of 32, 64 × 4K 247.2 vs 242.5 (244.3), 64 × 32K 1920.6 vs 1898.1
    (1898.3), 128 × 4K 493.0 vs 480.8 (479.3). Hkv 4 (group 8, a pack of 2 by the producer warp):
    64 × 4K 125.2 vs 125.0, 64 × 16K 488.2 vs 483.3. Lost, and so left to the plan: 40 × 4K 163.9
    vs 167.4 (a pack of 4, 0.61 of a wave), 48 × 4K 186.9 vs 189.9, 128 × 16K in a pack of 4 (two
    waves) 2032.4, Hkv 4 128 × 4K 247.3 vs 250.2; in split packs 16 × 4K 67.1 vs 68.6 at best,
    1 × 32K 39.3 vs 45.1, 8 × 4K 38.4 vs 39.8, 40 × 4K 164.5 vs 168.7, 48 × 4K 186.0 vs 195.3;
    unsplit 88 × 4K (0.89 full) in 3 splits 360.3, 112 × 4K (0.85) unsplit 460.6."""
    if (not _ring_device(device) or head_dim != 128 or itemsize != 2 or group > 8
            or not 16 <= block_size < 64 or max_ctx < _RING_MIN_KEYS):
        return None
    sms = _num_sms(device)
    for pack in (4, 2):
        keys = 128 // pack
        if group * pack > _RING_PACK_ROWS or num_kv_heads % pack or not _ring_copies(block_size, keys, 0):
            continue  # (blocks that neither hold nor make up a tile: none)
        programs = batch * num_kv_heads // pack
        if programs <= sms:
            if _slot_fill(programs, 1, device) < _RING_PACK_MIN_FILL:
                continue
            splits = 1
        else:
            if pack == 4 or group > 4 or batch * num_kv_heads <= _TMA_SHIFTED_PER_SM * sms:
                continue
            tail = _tail_split(programs, 1, max_ctx // keys, device) if max_ctx >= 2 * _RING_MIN_KEYS else None
            if tail is not None and tail[0] >= 2 * sms:  # (over one whole wave a pack lost to the heads alone)
                return _Ring(keys, 2, tail[1], False, pack, tail[0])
            splits = _ring_pack_splits(programs, max_ctx, device)
            if splits is None:
                continue
        return _Ring(keys, 2, splits, _ring_producer(block_size, keys, 0, programs * splits, sms), pack)
    return None


def _ring_pack_splits(programs: int, max_ctx: int, device: torch.device) -> int | None:
    """The split count of a packed launch of `programs` over several waves (see `_ring_packed`),
    or None where no count up to 4 fills its waves well enough."""
    if _slot_fill(programs, 1, device) >= _RING_PACK_UNSPLIT_FILL:
        return 1
    if max_ctx < 2 * _RING_MIN_KEYS:
        return None
    for splits in (2, 3, 4):
        if _slot_fill(programs * splits, 1, device) >= _RING_PACK_SPLIT_FILL:
            return splits
    return None


def _ring_copies(block_size: int, block_n: int, lora: int) -> int:
    """TMA copies a `block_n`-key tile takes out of cache blocks of `block_size` (K, V, and L
    with `lora`): one each where a block holds the tile, one a block where whole blocks make it
    up; 0 where blocks do neither."""
    if block_size % block_n == 0:
        per_cache = 1
    elif block_n % block_size == 0:
        per_cache = block_n // block_size
    else:
        return 0
    return per_cache * (3 if lora else 2)


def _ring_producer(block_size: int, block_n: int, lora: int, programs: int, sms: int,
                   split: bool = False) -> bool:
    """Whether `attention_ring`'s launch of `programs` gives its copies to a producer warp of
    their own (`ring_decode(producer=True)`): Triton issues every copy behind a barrier of the
    warps that issue it, so from `_RING_PRODUCER_MIN_COPIES` copies a tile on the four math
    warps wait less on one warp's copies than on their own; only for launches of one wave at one
    program an SM: at two it lost, likely because the other program's math already fills those
    waits (such a program then ran capped at 128 registers a thread, but at one an SM capped or
    not came out even, so the cap is not why). Split launches at 64-key tiles (blocks of 16 or
    32: 8 or 4 copies a tile, Flash-LoRA 12 or 6), sized for one an SM, take it from
    `_RING_PRODUCER_MIN_COPIES_SPLIT` copies, those at 128-key tiles (blocks of 64: 4 copies,
    Flash-LoRA 6) from `_RING_PRODUCER_MIN_COPIES_SPLIT_WIDE` (see `_ring_split`).

    H200, same run (bf16, Hq 32, Hkv 8, D 128, us, two passes; the plan against the plan with
    this off, SDPA on contiguous K/V; bench/RESULTS.md Run V): blocks of 16, 128-key tiles (16
    copies, unsplit) 16 × 4K 66.8 / 67.4 vs 67.6 / 67.7 (SDPA 64.3 / 64.5), 14 × 4K 58.8 / 58.8
    vs 60.5 / 61.0, 16 × 16K 245.1 / 244.8 vs 248.3 / 247.9, 16 × 32K 484.9 / 485.1 vs 490.9 /
    491.1 (SDPA 475.0 / 475.3); Flash-LoRA (24 copies) 16 × 4K r = 8 68.1 / 68.2 vs 72.5 / 72.3,
    r = 64 71.1 / 71.2 vs 74.5 / 74.3, 16 × 32K r = 8 492.1 / 492.0 vs 503.9 / 504.2; blocks of
    32 (8 copies) 12 × 4K 51.5 / 50.9 vs 58.6 / 58.9 (SDPA 51.8 / 51.0), 16 × 4K 64.9 / 65.6 vs
    65.6 / 66.5, Flash-LoRA (12) 16 × 4K r = 8 68.3 / 68.6 vs 77.2 / 77.1, r = 64 70.4 / 71.1 vs
    81.3 / 81.3; blocks of 16, 1 × 4K in 16 splits of 64-key tiles (8 copies; 128 programs)
    11.3 / 11.3 vs 12.1 / 12.0 (SDPA 11.7 / 11.8), Flash-LoRA r = 8 12.7 / 12.7 vs 13.7 / 13.7,
    r = 64 13.3 / 13.4 vs 14.0 / 13.9. At two programs an SM it lost: 2 × 4K (256 programs)
    16.6 / 16.6 vs 16.2 / 16.2, Flash-LoRA r = 64 19.4 / 19.4 vs 18.6 / 18.6; 1 × 32K (blocks of
    16, 32 splits) 39.9 / 39.8 vs 39.1 / 39.3, 4 × 16K 68.3 / 68.3 vs 67.2 / 67.6. Under 8 copies
    a tile it lost too (blocks of 64, Flash-LoRA 16 × 4K r = 64 70.1 / 70.0 vs 67.1 / 67.0; blocks
    of 128, 16 × 4K 63.2 / 63.3 vs 62.0 / 62.1, 64 × 32K 1853 / 1852 vs 1844 / 1844).
    Flash-LoRA split, the ring with the producer at one an SM against its plan then (`_attn_fwd`;
    r = 8 / 64): blocks of 32 (6 copies) 8 × 4K 38.6 / 40.3 vs 45.0 / 47.2 (paged 38.3), 1 × 32K
    39.1 / 41.2 vs 45.1 / 46.7; blocks of 16 (12) 8 × 4K 41.1 / 41.4 vs 41.9 / 43.1 (paged 38.1),
    1 × 32K 41.5 / 42.8 vs 42.6 / 43.4, 2 × 4K 17.0 / 17.6 vs 18.1 / 18.7, 4 × 16K 72.8 / 73.7 vs
    71.8 / 73.6 (the one shape it did not gain)."""
    if split:
        least = _RING_PRODUCER_MIN_COPIES_SPLIT if block_n == 64 else _RING_PRODUCER_MIN_COPIES_SPLIT_WIDE
    else:
        least = _RING_PRODUCER_MIN_COPIES
    copies = _ring_copies(block_size, block_n, lora)
    return programs <= sms and least <= copies <= _RING_PRODUCER_MAX_COPIES and attention_ring.producer_available()


def _ring_blocks_ok(block_size: int, block_n: int, lora: int, producer: bool = False) -> bool:
    """Whether `attention_ring` copies `block_n`-key tiles out of cache blocks of `block_size`:
    a tile inside one block (one copy each of K and V, and L), or a tile of whole blocks, a copy
    a block, at most `_RING_MAX_TILE_COPIES` copies a tile (K, V and L together), or
    `_RING_PRODUCER_MAX_COPIES` through a producer warp (`_ring_producer`). Small copies
    cost: H200, us, vs `_attn_fwd` (per-thread loads at these blocks), same run: blocks of 16,
    16 copies a 128-key tile, 16 × 4K 81.6 / 81.1 vs 71.4 / 71.4, 16 × 32K 598.3 / 598.0 vs
    498.7 / 498.7; Flash-LoRA at blocks of 32, 12 copies, 16 × 32K r = 8 602.3 / 604.7 vs 512.1
    / 512.3. Within it: blocks of 16, 8 copies a 64-key tile, 40 × 4K 159.4 / 160.3 vs 171.0 /
    171.6, 24 × 16K 376.0 / 376.6 vs 391.4 / 392.0, 20 × 2K 46.9 / 46.8 vs 53.8 / 53.7; blocks of
    32, 16 × 4K 66.9 / 66.9 vs 71.6 / 71.4, 64 × 4K 249.1 / 249.2 vs 305.2 / 303.6; blocks of 64,
    16 × 4K 64.4 / 64.5 vs 73.9 / 73.9, 16 × 32K 486.5 / 486.5 vs 501.9 / 501.8, 64 × 32K 1905.2
    / 1902.0 vs 1922.2 / 1921.3, Flash-LoRA (6 copies) 16 × 4K r = 64 69.2 / 68.9 vs 79.8 / 80.2,
    16 × 32K r = 8 508.3 / 508.4 vs 512.5 / 511.1 (bench/RESULTS.md, Run T)."""
    most = _RING_PRODUCER_MAX_COPIES if producer else _RING_MAX_TILE_COPIES
    return 0 < _ring_copies(block_size, block_n, lora) <= most


def _ring_lr_ok(lora_key: tuple, block_size: int) -> bool:
    """Whether `attention_ring` can copy Flash-LoRA's low-rank cache beside K/V: dense rows of
    r elements at a 16-byte pitch, and blocks that split a tile the way the K/V blocks do (the
    K/V table itself, blocks of the same size, or blocks that hold whole K/V tiles)."""
    (nb, lbs, r), strides, _, _, shared, itemsize, _ = lora_key
    return (tuple(strides) == (lbs * r, r, 1) and r * itemsize % 16 == 0 and 0 < nb <= _MAX_DESCRIPTOR_DIM
            and (shared or lbs == block_size or (block_size % _RING_LORA_TILE == 0 and lbs % _RING_LORA_TILE == 0)))


@functools.lru_cache(maxsize=None)
def _smem_optin(index: int) -> int:
    return int(getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", 0))


_RESERVED_SMEM = 1024  # shared memory the GPU reserves for each resident program (sm_80 and later)


def _residency_cap_smem(device: torch.device, per_sm: int) -> int:
    """Shared memory a launch asks for so that at most `per_sm` of its programs fit on an SM:
    one more than the kernel needs where a kernel needs little (paged decode with the shifted
    tail, 74 KB: 3 an SM on an H200, where its launches are sized for 2). 0 where the device
    cannot say or the cap would not leave room for `per_sm`."""
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(_cuda_index(device))
    per_sm_bytes = int(getattr(props, "shared_memory_per_multiprocessor", 0))
    cap = per_sm_bytes // (per_sm + 1) - _RESERVED_SMEM + 128
    if per_sm_bytes <= 0 or cap > min(_smem_optin(_cuda_index(device)), per_sm_bytes // per_sm - _RESERVED_SMEM):
        return 0
    return cap


def _resident_per_sm(block_n: int, head_dim: int, tma_lora_pad: int = 0) -> int:
    """Decode programs an SM runs at once, bounded by registers (4 warps): on an H200 at D 128
    the kernel takes 226 registers a thread with 128-key tiles (2 programs an SM) and 168 with
    64-key tiles (3); through TMA 196 (and 106 KB of shared memory), Flash-LoRA 162 (and 90-106
    KB at r <= 64). Tiles hold block_n × head_dim elements at every head dim (`_config`).
    `tma_lora_pad`: Flash-LoRA by TMA unsplit, its P·L accumulator padded to that many columns,
    which at 64-key tiles and a pad of up to 32 takes 104 registers and 51 KB (4 an SM; at
    128-key tiles 128 registers and 90-107 KB, 2; the compiled kernels of bench/RESULTS.md, Run
    AG). With the split path it runs as paged decode's (see _tail_split)."""
    if 0 < tma_lora_pad <= 32 and block_n * head_dim <= 64 * 128:
        return 4
    return 2 if block_n * head_dim >= 128 * 128 else 3


def _default_splits(batch: int, num_kv_heads: int, max_ctx: int, block_n: int, device,
                    per_sm: int = 2, pow2: bool = True) -> int:
    """Split-KV factor for decode: none once batch × heads fills every SM's `per_sm` resident
    programs; else as many splits as fill them, rounded down to a power of two (splits then
    divide a power-of-two tile count evenly; `pow2=False`, S2's sparse key runs, which are no
    power of two: not rounded), never under one tile each. Measured on an H200
    (bf16, Hq 32, Hkv 8, D 128, block 16; `bench/tune_attention.py --what splits` and Run N of
    bench/RESULTS.md): a second wave costs more than idle SMs (16 × 4K 2 splits 73.9 us vs 6
    splits 77.7; 1 × 32K 32 splits 44.0 vs 33 45.2), one tile a program is fine while the
    programs fit (1 × 1K 16 splits of one 64-key tile 7.3 us vs 8 of two 8.9)."""
    if interpreter_on():
        return 1
    programs = max(batch * num_kv_heads, 1)
    slots = per_sm * _num_sms(device)
    if programs >= slots:
        return 1
    want = max(1, slots // programs)
    if pow2:
        want = 1 << (want.bit_length() - 1)
    most = max(1, max_ctx // block_n)
    return int(min(want, most, 128))


def _wave_cost(programs: int, slots: int, per_sm: int) -> float:
    """The time of a launch of `programs` equal programs in waves of `slots`, in full waves: a
    short last wave of fill f costs more than f, since its programs run alone on their SMs at
    a fraction of the bandwidth, about max(f, a + b·f) (H200, bf16, D 128, 4K keys, fitted to
    the batch sweeps of bench/RESULTS.md Run AF: one program an SM a ≈ 0.48, two a ≈ 0.40;
    b ≈ 0.35)."""
    waves, rest = divmod(programs, slots)
    f = rest / slots
    return waves + (max(f, _TAIL_FLOOR.get(per_sm, _TAIL_FLOOR[2]) + _TAIL_SLOPE * f) if rest else 0.0)


def _tail_cost(programs: int, slots: int, per_sm: int, full: int, splits: int) -> float:
    """`_wave_cost` of a launch whose first `full` programs (whole waves) run whole and the rest
    in `splits` each, each split a `splits`-th as long."""
    return full // slots + _wave_cost((programs - full) * splits, slots, per_sm) / splits


def _tail_split(programs: int, per_sm: int, tiles: int, device,
                whole_per_sm: int | None = None) -> tuple[int, int] | None:
    """A decode launch of `programs` (sequences × KV heads, or packs) over several waves of
    `per_sm` programs an SM, each of `tiles` key tiles: ``(full, splits)`` where its last,
    partly filled wave is better split (the launch's first `full` programs whole, the rest in
    `splits` each: `_attn_fwd`'s TAIL, `ring_decode(full_items=)`), or None. A short last wave
    of whole programs costs nearly as much as a full one (`_wave_cost`); split, its items run
    as `splits` times as many programs a `splits`-th as long, and no other program pays a
    split. The whole waves kept are all but the last, or all but the last two where the last
    is over half full (then the two are split together); the split count is the one of least
    modelled cost (the fewest within 0.01 of it), taken where it saves at least
    `_TAIL_MIN_GAIN` of a wave. At least `_TAIL_MIN_TILES` tiles a split and at most
    `_TAIL_MAX_SPLITS` splits. Never interpreted (no SMs to fill). Paged decode and Flash-LoRA
    alike (H200, Flash-LoRA r = 8-64 against its launch with the last wave whole, blocks of
    128 and 64, 4K and 16K keys: 0.73-0.95× the time at every launch it splits;
    bench/RESULTS.md, Run AG).

    `whole_per_sm`: where the kernel kept whole runs more programs an SM than with the split
    path (Flash-LoRA by TMA at 64-key tiles: 4, against 3), the launch kept whole is costed at
    its own residency, in time (waves × slots) rather than waves. At 3 an SM a Flash-LoRA
    launch of 64 × 8 programs would split (the only launch that then lost: 272 vs 259 us),
    though at 4 it is one wave; at 68 × 8, 528 programs kept whole ran at 3 an SM (320 us)
    where 396 did better (275; whole 355): the split path takes 161 registers, 3 an SM."""
    if interpreter_on():
        return None
    sms = _num_sms(device)
    slots = per_sm * sms
    waves, rest = divmod(programs, slots)
    most = min(tiles // _TAIL_MIN_TILES, _TAIL_MAX_SPLITS)
    if waves == 0 or rest == 0 or most < 2:
        return None
    own = whole_per_sm or per_sm
    whole = _wave_cost(programs, own * sms, own) * own / per_sm
    for kept in (waves, waves - 1):
        if kept < 1:
            break
        costs = {s: _tail_cost(programs, slots, per_sm, kept * slots, s) for s in range(2, most + 1)}
        best = min(costs.values())
        if best <= whole - _TAIL_MIN_GAIN:
            return kept * slots, min(s for s, c in costs.items() if c <= best + 0.01)
    return None


def _slot_fill(programs: int, per_sm: int, device) -> float:
    """The share of the GPU's resident program slots a launch of `programs` keeps busy, over
    its waves."""
    slots = per_sm * _num_sms(device)
    return programs / (slots * -(-programs // slots))


def _prefetch_lora_b(decode: bool, split: bool) -> bool:
    """Whether Flash-LoRA loads B before the key loop (its latency hidden behind the loop, its
    registers held through it) rather than after it. Before, everywhere measured: on an H200
    (bf16, Hq 32, Hkv 8, D 128, block 16, low-rank table = K/V table), Flash-LoRA / paged decode
    at r = 64 went 1.27 -> 1.05x at 1 x 32K, 1.28 -> 1.15x at 1 x 4K, 1.19 -> 1.05x at 16 x 4K,
    1.08 -> 1.04x at 64 x 4K; at r = 8 1.00-1.01x of the time after it."""
    return True


def _fuse_reduce(device: torch.device) -> bool:
    """Whether decode's split partials are combined by the last split program to finish (one
    launch) rather than by `_split_reduce` (two). Fused on every device: the second launch's
    gap and tail were most of what kept split decode under its bandwidth goals."""
    return True


def _pdl(device: torch.device, interpreted: bool) -> bool:
    """Whether `_attn_fwd` and the ring kernel launch with programmatic dependent launch
    (`kernels._pdl`): their launch overlaps the kernel before them as it drains. On wherever the
    device has it (compiled kernels on compute capability 9.0 and later, as for TMA): paged
    decode 0.5-7% faster at batch 1-16 and level from 64 sequences on (H200, the numbers in
    `kernels._pdl`); Flash-LoRA decode 3-7% faster at 1-8 × 4K but for one
    launch, which `_launch_plan` keeps plain: `_attn_fwd` over 64-key TMA tiles (blocks of 64)
    with L tiles of `_PDL_OFF_LORA_RPAD` columns (H200, same call, us, PDL on / off, r = 64: 1 ×
    4K 11.22 / 10.95, 1 × 2K 9.04 / 8.49, 2 × 4K 14.87 / 14.55; r = 8, 32-column L tiles, gained:
    10.40 / 10.98, 8.04 / 8.16, 14.31 / 14.47; the same launch at 128-key tiles, blocks of 128,
    r = 64 9.95 / 10.53; bench/RESULTS.md Run AH). S2 decode 1-2% faster. Prefill launches stay
    plain: kernels of 0.5-6 ms, whose launch gap is noise, and in blocks of 16 it lost (16 × 1K
    537.9 / 515.1 us, 4 × 4K 1703.6 / 1644.9; blocks of 128 within 1% either way)."""
    return not interpreted and _has_tma(device) and pdl_available()


def _combine_chunk(group_p2: int, head_dim: int) -> int:
    """Splits per pass of the split combine: its [heads, splits, D] fp32 load is bounded to 16K
    elements (128 registers a thread at 4 warps) so that it does not spill; 32 splits of 4
    heads at D 128 (the default split count at batch 1) take one pass. One pass waits on memory
    once: on an H200 a two-pass combine cost 5.6 us after a 1 x 32K decode of 40 us."""
    return max(1, min(64, 16384 // (group_p2 * head_dim)))


class _LaunchKey(NamedTuple):
    """Everything a launch plan is computed from: tensor shapes and strides, the variant, the
    device (its SM count sets the split factor), whether the kernels run interpreted and the
    tuning functions. The plan is a function of the key alone (`_launch_plan` reads nothing
    else), so equal keys may share one."""
    paged: bool
    decode: bool
    batch: int
    q_shape: tuple[int, ...]
    q_strides: tuple[int, ...]
    out_strides: tuple[int, ...]
    kv_shape: tuple[int, ...]
    k_strides: tuple[int, ...]
    v_strides: tuple[int, ...]
    table: tuple | None  # (shape, strides) of the block table; None when not paged
    # (lr_cache shape, lr_cache strides, lr table row stride, lora_b strides, whether the lr
    # table is the K/V table itself, lr_cache element size, whether a descriptor can address lora_b)
    lora: tuple | None
    s2: _S2Args | None
    max_seqlen_q: int | None  # prefill only (known by then)
    aligned: bool  # K, V (and L) start on 16 bytes (a TMA descriptor's base must)
    kv_itemsize: int  # bytes a K/V element (the shared memory of a tile)
    num_splits: int | None  # as the caller forced it
    device: torch.device
    interpret: bool
    # The tuning functions the plan is computed with: bench/tune_attention.py swaps them to sweep
    # configurations, and a swapped one must not be answered with a plan made by the old one.
    policy: tuple


@dataclass(frozen=True)
class _LaunchPlan:
    """How to launch `_attn_fwd` (and the split reduce) for one `_LaunchKey`."""
    grid: tuple[int, int, int]
    int_args: tuple[int, ...]  # the kernel's integer arguments after qk_scale, in order
    meta: dict  # constexprs and launch options; read-only
    # Split-KV only (ws_total 0 without): the (max, sum, acc) partials' sizes in one fp32
    # workspace, and `_split_reduce`'s grid, integer arguments and constexprs.
    ws_sizes: tuple[int, int, int]
    ws_total: int
    counters: int  # fused combine: arrival counters needed (one per sequence × KV head), else 0
    reduce_grid: tuple[int] | None  # None: no `_split_reduce` launch
    reduce_args: tuple[int, ...]
    reduce_meta: dict
    # The launch runs `attention_ring.ring_decode` instead of `_attn_fwd` (whose fields above then
    # go unused but for the workspace and counters of a split launch); None: `_attn_fwd`.
    ring: _Ring | None = None
    ring_reduce: int = 1  # splits a pass of its combine (split ring launches)
    # `_attn_fwd` launched with at least this much shared memory (0: its own), which caps the
    # programs an SM runs at once (see _residency_cap_smem)
    min_shared: int = 0
    # The kernels compiled for this plan, launched again without Triton's argument binding
    # (`_relaunch`): `_attn_fwd`'s and `_split_reduce`'s.
    compiled: dict = field(default_factory=dict, compare=False, repr=False)
    reduce_compiled: dict = field(default_factory=dict, compare=False, repr=False)


# Each partial of the one workspace starts on 128 B (32 fp32), as its own allocation did: Triton
# specialises pointer arguments on 16 B alignment, so a misaligned partial would compile another
# kernel variant mid-serving.
_WS_ALIGN = 32
_PLAN_CACHE_SIZE = 512  # distinct (batch, table width, ...) combinations kept


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _aligned16(*ts) -> bool:
    return all(t is None or t.data_ptr() % 16 == 0 for t in ts)


def _launch_key(q, k, v, out, *, paged: bool, decode: bool, batch: int, block_tables,
                lora: _Lora | None, s2: _S2Args | None, max_seqlen_q: int | None,
                num_splits: int | None) -> _LaunchKey:
    """The key of a launch: read off the (validated) tensors' metadata, never their values."""
    bt = block_tables
    lora_key = None
    if lora is not None:
        lr, lbt = lora.lr_cache, lora.lr_block_tables
        # The engine's base_lr_shared passes its K/V table as the low-rank one (same block ids).
        shared = bool(paged and bt.dim() == 2 and lbt.data_ptr() == bt.data_ptr() and lbt.shape == bt.shape
                      and lbt.stride() == bt.stride() and lbt.dtype == bt.dtype and lr.shape[1] == k.shape[1])
        lora_key = (lr.shape, lr.stride(), lbt.stride()[0], lora.lora_b.stride(), shared, lr.element_size(),
                    _lb_descriptor_ok(lora.lora_b))
    return _LaunchKey(paged, decode, batch, q.shape, q.stride(), out.stride(), k.shape, k.stride(),
                      v.stride(), (bt.shape, bt.stride()) if paged else None, lora_key, s2,
                      max_seqlen_q, _aligned16(k, v, lora.lr_cache if lora is not None else None),
                      k.element_size(), num_splits, q.device, interpreter_on(),
                      (_config, _lora_pad, _default_splits, _num_sms, _fuse_reduce, _prefetch_lora_b,
                       _tma_loads, _tma_single, _ring_tiles, _ring_device, _ring_split, _ring_packed,
                       _tail_split, _pdl))


@functools.lru_cache(maxsize=_PLAN_CACHE_SIZE)
def _launch_plan(key: _LaunchKey) -> _LaunchPlan:
    """The launch configuration (tiles, splits, grid, strides, constexprs) of a key: computed
    once per distinct key, so a repeated call with the same shapes only validates and launches."""
    paged, decode, batch = key.paged, key.decode, key.batch
    # (_num_sms: called by _default_splits, _ring_tiles, _ring_split and _ring_packed, as is _ring_device)
    (config, lora_pad, default_splits, _, fuse_reduce, prefetch_b, tma_loads, tma_single, ring_tiles,
     ring_device, ring_split, ring_packed, tail_split, pdl) = key.policy
    total_q, hq, d = key.q_shape
    per_head_table = paged and len(key.table[0]) == 3
    hkv = key.table[0][1] if per_head_table else key.kv_shape[-2]
    group = hq // hkv
    s2 = key.s2
    r = key.lora[0][-1] if key.lora is not None else 0
    r_pad = lora_pad(r, decode) if key.lora is not None else 0
    max_ctx = key.table[0][-1] * key.kv_shape[1] if paged else key.kv_shape[0]
    long = (max_ctx if decode else key.max_seqlen_q) >= _LONG
    sparse = s2.sparse_block if s2 else None
    block_size = key.kv_shape[1] if paged else 1
    bm, bn, warps, stages = config(d, group, decode, r_pad, sparse, long=long, block_size=block_size,
                                   keys=max_ctx)

    if s2 is not None and s2.dense_from >= hkv:
        # Splits follow the keys a head reads (shard + window), not the dense width.
        max_ctx = min(max_ctx, (s2.local_blocks + 1) * s2.sparse_block + max_ctx // s2.vert_stride)
    wide = config(d, group, decode, r_pad, sparse, long=True)
    # Flash-LoRA by TMA reads its tail tile shifted (SHIFT_TAIL, see _attn_tile), which keeps its
    # full-width tiles at 2 programs an SM (162 registers, 90 KB of shared memory at r <= 32, 106
    # at r = 64; masking V and L in registers took 123 KB at r = 8: one an SM). Against the
    # half-width tiles that this left it before (H200, same run, Flash-LoRA / paged decode time,
    # r = 8 and 64): 1 x 4K 1.06 / 1.09 vs 1.16 / 1.13, 8 x 4K 1.05 / 1.06 vs 1.09 / 1.11,
    # 16 x 4K 1.04 / 1.05 vs 1.10 / 1.11, 1 x 32K 1.04 / 1.05 vs 1.10 / 1.11. Wider L tiles
    # (r > 64) keep half-width tiles (full ones would leave one program an SM again), and so do
    # K/V or low-rank cache blocks that hold half a wide tile but not a whole one.
    # Paged decode in blocks that hold half a wide tile (64 keys at D 128) takes the half-width
    # tiles by TMA too, over per-thread loads of wide ones (H200, blocks of 64, split launches,
    # bench/RESULTS.md Run T: 1 × 4K 13.4 us against Flash-LoRA's 10.7 on such tiles).
    tile = wide
    if block_size % wide[1] or (key.lora is not None and (r_pad > _TMA_LORA_WIDE_RPAD
                                                          or not _lr_descriptor_ok(key.lora, block_size, wide[1]))):
        tile = (wide[0], max(16, wide[1] // 2), *wide[2:])
    # K/V a descriptor can address (the ring kernel's condition too, whatever the block size).
    # S2 decode over a shared cache too, without Flash-LoRA (its tiles start on sparse blocks:
    # a cache block that holds a tile holds it whole): by TMA where blocks hold the tiles, in
    # `_attn_fwd` only (never the ring kernel, nor the one-an-SM variant). H200, b = 8, blocks
    # and sparse blocks of 64, CUDA graph, us, against per-thread loads (other calls, same
    # code otherwise): stride 16 32K 32.8 vs 34.9-36.1, 64K 48.7 vs 52.8-54.8, 128K 83.0 vs
    # 90.6; stride 8 32K 48.8 vs 51.9-52.1, 64K 81.8 vs 87.1-87.7 (bench/RESULTS.md, Run Z).
    # Per-head tables (S2's head-sharded pool: blocks of one KV head, `[blocks, block_size, 1,
    # D]`) too, in blocks inside one sparse block, as the pool lays them out: a shifted tail
    # then re-reads only keys of the query's own sparse block, which every head reads, so the
    # table holds them. H200, b = 8, Hq 32, Hkv 8, D 128, sparse blocks and blocks of 64, CUDA
    # graph, us, against per-thread loads (same call; bench/RESULTS.md, Run AA): stride 16 32K
    # 33.4 vs 35.9, 64K 51.1 vs 54.3, 128K 85.6 vs 92.1; stride 8 32K 48.8 vs 52.6, 64K 82.9 vs
    # 89.0, 128K 150.0 vs 159.2.
    kv_descriptors = (decode and paged and (s2 is None or key.lora is None) and key.aligned
                      and (not per_head_table or (s2 is not None and block_size <= s2.sparse_block))
                      and _descriptor_layout(key.kv_shape, key.k_strides)
                      and _descriptor_layout(key.kv_shape, key.v_strides))
    tma = (kv_descriptors and (key.lora is None or _lr_descriptor_ok(key.lora, block_size, tile[1]))
           and tma_loads(key.device, block_size, tile[1]))
    single = False
    if tma:
        # S2's runs as many splits as fill the slots (H200, b = 8, Hq 32, Hkv 8, D 128, stride
        # 16 32K, head-sharded pool, CUDA graph, us: 6 splits 30.4, the power of two below, 4,
        # 33.0, 8 35.2; stride 8 32K 45.1 vs 48.9; 64K 47.0 vs 51.0 and 76.6 vs 83.0; the
        # shared cache alike; bench/RESULTS.md, Run AG)
        tma_splits = key.num_splits or default_splits(batch, hkv, max_ctx, tile[1], key.device,
                                                       _resident_per_sm(tile[1], d), s2 is None)
        # Unsplit at one program an SM, double-buffered (_SINGLE_STAGES), where 2 an SM would
        # split in two only to fill the second slot: then no split combine either. Over 16 tiles
        # a program or more (the second buffer needs a run to pay). H200, three runs (bf16, Hq 32,
        # Hkv 8, D 128, blocks of 128; us, vs 2 an SM with 2 splits; SDPA on contiguous K/V):
        # 16 x 4K 64.3 / 66.4 / 65.2 vs 65.9 / 67.7 / 67.1, SDPA 63.3 / 64.0 / 64.2; 12 x 4K
        # 49.6 / 50.7 vs 52.0 / 52.9, SDPA 50.0 / 51.2; 16 x 32K 469.7 / 487.7 / 481.5 vs 472.3 /
        # 484.7 / 486.9. Split launches at one an SM (the combine stays) came out within 1.6%
        # either way (8 x 4K, 1 x 32K, 2 x 32K) and keep 2 an SM. Flash-LoRA (r = 8 / 64, vs its
        # policy before: TMA at 2 an SM up to 4K keys a program, else per-thread tiles): 12 x 4K
        # 53.9 / 54.7 vs 55.2 / 55.8, 12 x 8K 101.6 / 102.1 vs 102.5 / 103.5, 12 x 16K 193.5 /
        # 197.1 vs 221.9 / 267.2; over 32K keys mixed (16 x 32K 506.4 / 513.5 vs 497.8 / 521.6).
        if tma_single(key.device):
            s1 = key.num_splits or default_splits(batch, hkv, max_ctx, tile[1], key.device, 1)
            single = (s1 == 1 and s2 is None and batch * hkv <= _num_sms(key.device) and tile[0] <= _SINGLE_MAX_ROWS
                      and key.kv_itemsize <= 2 and max_ctx >= _SINGLE_MIN_TILES * tile[1]
                      and (key.lora is None or max_ctx <= _TMA_LORA_SINGLE_KEYS))
        # The variant runs every tile through one loop (ONE_LOOP): H200, same run, us, vs the
        # interior loop + the masked tail's: 16 x 4001 63.1 / 63.6 vs 63.7 / 64.6, 12 x 4063
        # 49.7 / 49.8 vs 50.3 / 50.4, 16 x 32691 470.5 / 470.3 vs 471.2 / 471.3, Flash-LoRA
        # r = 64 16 x 4001 67.5 / 67.0 vs 68.0 / 67.7; whole tiles within 0.6% either way. Not
        # at 2-3 an SM (40 x 4035 157.6 / 157.5 vs 157.1 / 156.9). Split Flash-LoRA lost with it
        # then (1 x 4K r = 64 10.80 / 10.80 vs 10.43 / 10.54), before PDL; it takes it now (below).
        if single:
            tile, tma_splits = (*tile[:3], _SINGLE_STAGES), 1
        else:
            # ... and Flash-LoRA at 2 an SM only over key runs of up to 4K a program: over longer
            # ones per-thread tiles stream as well or better (H200, same run, r = 8 / 64, TMA vs
            # per-thread 128-key tiles: 64 x 4K unsplit 247 / 254 vs 251 / 260 us; 16K keys a
            # program: 64 x 16K 972 / 997 vs 955 / 993, 16 x 32K 496 / 509 vs 489 / 513)
            tma = key.lora is None or max_ctx <= _TMA_LORA_KEYS * tma_splits
    if tma:
        bm, bn, warps, stages = tile
    num_splits = key.num_splits
    if num_splits is None and not decode:
        num_splits = 1
    elif num_splits is None and tma:
        num_splits = tma_splits
    elif num_splits is None:
        programs = batch * hkv
        narrow = config(d, group, decode, r_pad, sparse, long=False)
        if wide != narrow and programs < _resident_per_sm(wide[1], d) * _num_sms(key.device):
            # Splitting: wide tiles stream better (H200, Run N: 8 × 4K 40.9 vs 47.3 us, 32 × 2K
            # 68.4 vs 77.7, 16 × 2K 41.4 vs 47.5) unless the narrow tiles' third resident
            # program an SM fills slots the wide ones leave idle (12 × 2K: 4 splits of 64-key
            # tiles 33.7 us, 2 of 128-key tiles 35.8; 12 × 16K 201.0 vs 215.3; 1 × 1K 16 of 64
            # 7.2, 8 of 128 8.3). Unsplit launches keep the tiles of their context length
            # (64 × 1K: 67.9 vs 70.5 us for wide ones).
            fills, splits = [], []
            for cfg in (wide, narrow):
                per_sm = _resident_per_sm(cfg[1], d)
                splits.append(default_splits(batch, hkv, max_ctx, cfg[1], key.device, per_sm))
                fills.append(_slot_fill(programs * splits[-1], per_sm, key.device))
            pick = 1 if fills[0] * _NARROW_GAIN < fills[1] else 0
            (bm, bn, warps, stages), num_splits = (wide, narrow)[pick], splits[pick]
        else:
            num_splits = default_splits(batch, hkv, max_ctx, bn, key.device, _resident_per_sm(bn, d))
    split = num_splits > 1
    # Paged decode's shifted-tail kernel (74 KB of shared memory, against 106 with the masked
    # tail) runs 3 programs an SM instead of 2: an unsplit launch that fits in one wave at 3
    # takes it so (H200, same run: 40 x 4K 158 vs 187 us, SDPA on contiguous K/V 173; 48 x 4K 181
    # vs 193, SDPA 188; 40 x 1K 43 vs 51; 40 x 16K 621 vs 736; 33 x 4K, one wave at 2 as well,
    # 125.2 vs 124.6). Split and multi-wave launches, sized for 2 an SM, take it too at
    # full-width tiles, but launched with the shared memory of `_residency_cap_smem` so that they
    # keep 2: uncapped, the third program an SM lost (whole tiles, 1 x 4K 9.29 vs 8.84 us, 8 x 4K
    # 37.18 vs 36.20, 64 x 4K 261 vs 238: the next launch's programs crowd into SMs this one still
    # runs on). Capped, against the masked tail in the same run (H200, CUDA graphs, us; lengths
    # that end inside a tile, as nearly all do): 1 x 1K 5.72 vs 6.41, 1 x 4K 8.95 vs 9.68, 4 x 4K
    # 20.71 vs 21.40, 8 x 4K 36.46 vs 37.24, 64 x 4K 240.7 vs 244.3, 100 x 4K 372.0 vs 376.6;
    # whole tiles level (within 0.1 us at batch 1-8 but 2 x 4K 12.89 vs 12.76; bench/RESULTS.md
    # Run AM). The masked tail stays where tiles are narrow (their kernel fits Triton's default
    # 48 KB, past which alone it may be launched with more) and on the ring kernel's launches.
    shifted_wave = not split and batch * hkv <= _TMA_SHIFTED_PER_SM * _num_sms(key.device)
    full_width = bn * d * key.kv_itemsize > SMEM_ATTR_MIN // 2  # K and V tiles alone past 48 KB: cap-able
    shift_tail = tma and (key.lora is not None or single or shifted_wave or full_width)
    cap_smem = 0
    if shift_tail and key.lora is None and not single and not shifted_wave:
        cap_smem = _residency_cap_smem(key.device, _resident_per_sm(bn, d))
    fused = split and decode and fuse_reduce(key.device)
    ring = None
    ring_reduce = 1
    ring_ok = (kv_descriptors and s2 is None and ring_device(key.device)
               and (key.lora is None or _ring_lr_ok(key.lora, block_size)))
    ring_lora = attention_ring.lora_pad(r) if key.lora is not None else 0  # its L tile's columns
    if ring_ok and key.lora is None and (key.num_splits or 1) == 1:
        # Several KV heads a program in small cache blocks (see _ring_packed)
        ring = ring_packed(key.device, batch, hkv, d, group, block_size, max_ctx, key.kv_itemsize)
        if ring is not None:  # its own splits, whatever `_attn_fwd` would have had
            if key.num_splits == 1:
                ring = ring._replace(splits=1, full_items=0)
            num_splits = ring.splits
            split = fused = num_splits > 1
    if ring_ok and ring is None:
        # Unsplit launches only: where 2 programs an SM (1 up to one an SM) would not split
        # (Flash-LoRA's own plan splits some of those: it reads long runs per-thread).
        programs = batch * hkv
        per_sm = 1 if programs <= _num_sms(key.device) else 2
        ring = ring_tiles(key.device, programs, d, group, block_size, max_ctx, key.kv_itemsize, ring_lora)
        if ring is not None and (key.num_splits or default_splits(batch, hkv, max_ctx, wide[1], key.device,
                                                                  per_sm)) != 1:
            ring = None
        if ring is not None and ring.full_items:  # its last wave split (see _tail_split) ...
            if key.num_splits == 1:  # ... but where the caller asked for no split
                ring = ring._replace(splits=1, full_items=0)
            else:
                num_splits, split, fused = ring.splits, True, True
    if ring_ok and ring is None and key.num_splits is None:
        # Split launches in small cache blocks (see _ring_split)
        split_ring = ring_split(key.device, batch, hkv, d, group, block_size, max_ctx, key.kv_itemsize, ring_lora)
        if split_ring is not None:
            ring, num_splits = split_ring, split_ring.splits
            split, fused = True, True
    # Over several waves, a short last one split (see _tail_split): `_attn_fwd` by TMA only,
    # decode, where nothing else split it and paged decode's shifted tail would not make it one
    # wave (Flash-LoRA's tail is always shifted, split or not). Not per-thread loads: there the
    # split path's registers cost a program an SM (H200, blocks of 16, 64-key tiles: 110
    # registers unsplit, 4 an SM; 168 with the split path, 3), and at 1K keys it lost (64 ×
    # 1K 76.1 vs 67.8 us; bench/RESULTS.md Run AF).
    tail = None
    if ring is None and decode and tma and not split and not single \
            and (key.lora is not None or not shifted_wave) and key.num_splits is None and fuse_reduce(key.device):
        tail = tail_split(batch * hkv, _resident_per_sm(bn, d), -(-max_ctx // bn), key.device,
                          _resident_per_sm(bn, d, r_pad))
        if tail is not None:
            num_splits, fused = tail[1], True
    # Split Flash-LoRA by TMA (`_attn_fwd`) runs every tile through one loop (ONE_LOOP), and where
    # no program has more than one tile (by the table's reach, so at most one by any length),
    # takes B_a with its tile's copies (B_IN_LOOP; see _attn_tile) rather than before the key
    # loop: each program's first copies no longer wait for B_a's. (A rule for speed only: the
    # tile-by-tile fold is the same sum at any number of tiles.) H200, Flash-LoRA r = 64 against the code before, in turn, CUDA graphs, us
    # (paged decode's time in brackets; "-37": every third sequence 37 keys short): blocks of
    # 128, 1 x 1K 6.17 vs 6.41 (5.69), 1 x 2K 7.78 vs 8.24 (7.24), 1 x 4K 9.75 vs 9.98 (8.87),
    # 1 x 4K-37 9.75 vs 10.05 (9.02) (both), 2 x 4K 13.85 vs 14.04, 8 x 4K 38.61 vs 38.87, 1 x 32K
    # 38.70 vs 38.87 (one loop); blocks of 64 (64-key tiles, two a program: one loop) 1 x 4K
    # 10.46 vs 10.83 (9.58), 2 x 4K 14.44 vs 14.68; r = 8 and 16 level to 2.3% faster; nothing
    # slower (bench/RESULTS.md Run AN). B_a by TMA before the loop instead lost (1 x 4K 10.07
    # vs 9.80), and with the tile over programs of two or more tiles (blocks of 64, 1 x 4K
    # 10.93 vs 10.37 in one loop: its bytes again with every tile). B_a's buffer keeps a
    # launch at the programs an SM it was sized for only up to K/V rows of 256 bytes and L rows
    # of 128 (D 128 and r <= 64 in 16 bits; compiled for sm_90, shared memory without / with it:
    # 128-key tiles 70-86 / 82-107 KB, 2 an SM either way; 64-key tiles 43 / 64 KB, 3 as planned;
    # but D 256 76 / 117 KB, 2 an SM / 1; fp32 D 64 r = 64 111 / 127 KB, the same; fp32 D 256
    # r = 128 131 / 238 KB, over the device's limit).
    lora_split_tma = key.lora is not None and tma and ring is None and split
    one_loop = single or lora_split_tma
    b_in_loop = (lora_split_tma and key.lora[6] and -(-max_ctx // bn) <= num_splits
                 and d * key.kv_itemsize <= 256 and r_pad * key.kv_itemsize <= 128)
    # the combine's constexprs (one set for either path; the main kernel takes them only fused)
    g_p2 = _next_pow2(group)
    combine = dict(GROUP_P2=g_p2, REDUCE_S=_combine_chunk(g_p2, d))
    if ring is not None and ring.splits > 1:
        # one pass of the combine where it fits (a second cost 2.3 us at 1 x 32K, H200); a
        # pack's, one split a pass (see _ring_packed), but in a split last wave
        rows_p2 = _next_pow2(group * ring.pack)
        one_pass = min(_combine_chunk(rows_p2, d), _next_pow2(ring.splits))
        ring_reduce = 1 if ring.pack > 1 and not ring.full_items else one_pass
    n_qtiles = 1 if decode else max(1, -(-key.max_seqlen_q // (bm // group)))

    ks, vs = key.k_strides, key.v_strides
    if paged:
        bt_strides = key.table[1]
        stride_btb = bt_strides[0]
        stride_bth = bt_strides[1] if per_head_table else 0
        # A per-head table points each KV head at blocks holding only that head (Hkv dim = 1).
        stride_kh = 0 if per_head_table else ks[2]
        stride_vh = 0 if per_head_table else vs[2]
        stride_kb, stride_ks, stride_vb, stride_vs = ks[0], ks[1], vs[0], vs[1]
    else:
        stride_btb, stride_bth = 0, 0
        stride_kb, stride_ks, stride_kh = 0, ks[0], ks[1]
        stride_vb, stride_vs, stride_vh = 0, vs[0], vs[1]
    if key.lora is not None:
        lr_shape, lr_strides, lbt_row_stride, lb_strides, lr_shared, _, _ = key.lora
        lr_args = (lr_strides[0], lr_strides[1], lbt_row_stride)
        lb_args = lb_strides[:3]
        lr_block_size = lr_shape[1]
        lr_align = math.gcd(16, lr_strides[0], lr_strides[1])
    else:
        lr_args, lb_args, lr_block_size, lr_align, lr_shared = (0, 0, 0), (0, 0, 0), 1, 1, False
    if s2 is not None:
        s2_vals = (s2.local_blocks, s2.vert_stride, s2.head_sliding_step, s2.offset % s2.vert_stride,
                   s2.dense_from, int(s2.homo_head))
        sparse_block = s2.sparse_block
    else:
        s2_vals = (1, 1, 0, 0, 0, 0)
        sparse_block = bn

    int_args = (key.q_strides[0], key.q_strides[1], key.out_strides[0], key.out_strides[1],
                stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                stride_btb, stride_bth, *lr_args, *lb_args,
                hkv, num_splits, group, tail[0] if tail else 0, *s2_vals)
    meta = dict(HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, R_PAD=max(r_pad, 16), SPARSE_BLOCK=sparse_block,
                BLOCK_SIZE=block_size, LR_BLOCK_SIZE=lr_block_size, RANK=max(r, 1), LR_ALIGN=lr_align,
                PAGED=paged, VARLEN_Q=not decode, HAS_LORA=key.lora is not None, S2=s2 is not None,
                SPLIT=split, UPCAST=key.interpret, FUSE_REDUCE=fused,
                LR_SHARED_TABLE=lr_shared, TMA=tma, SHIFT_TAIL=shift_tail,
                ONE_LOOP=one_loop, TAIL=tail is not None, B_IN_LOOP=b_in_loop,
                PREFETCH_B=key.lora is not None and prefetch_b(decode, split),
                **(combine if fused else dict(GROUP_P2=1, REDUCE_S=1)),
                num_warps=warps, num_stages=stages)
    # (a launch option only where it is on: the interpreter has none; decode only, and not
    # Flash-LoRA by `_attn_fwd` over half-width TMA tiles with L tiles of `_PDL_OFF_LORA_RPAD`
    # columns: both lost with it, see _pdl)
    if decode and pdl(key.device, key.interpret) and not (
            key.lora is not None and ring is None and tma and bn < wide[1] and r_pad >= _PDL_OFF_LORA_RPAD):
        meta.update(PDL=True, launch_pdl=True)
    else:
        meta["PDL"] = False
    grid = (n_qtiles, hkv * num_splits, batch)
    if ring is not None and ring.full_items or tail is not None:
        # a split last wave: the partials and counters of its split items only
        full, pack = (ring.full_items, ring.pack) if ring is not None else (tail[0], 1)
        left = batch * hkv // pack - full
        ws_rows, counters = left * group * pack * num_splits, left
        if ring is None:  # (ring_decode makes its own grid)
            grid = (full + left * num_splits, 1, 1)
    else:
        ws_rows = total_q * hq * num_splits if split else 0
        counters = batch * hkv if fused else 0
    ws_sizes = (_round_up(ws_rows, _WS_ALIGN), _round_up(ws_rows, _WS_ALIGN), ws_rows * d)
    return _LaunchPlan(
        grid=grid, int_args=int_args, meta=meta,
        ws_sizes=ws_sizes, ws_total=sum(ws_sizes) if ws_rows else 0,
        counters=counters, reduce_grid=(total_q * hkv,) if split and not fused else None,
        reduce_args=(key.out_strides[0], key.out_strides[1], group, hkv, num_splits),
        reduce_meta=dict(HEAD_DIM=d, **combine, num_warps=4), ring=ring, ring_reduce=ring_reduce,
        min_shared=cap_smem if ring is None else 0)


# A descriptor's dims reach the kernel as int32 (and its block coordinates are int32).
_MAX_DESCRIPTOR_DIM = (1 << 31) - 1


def _descriptor_layout(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether a ``[blocks, block_size, Hkv, D]`` cache is a dense row-major tensor (rows of
    ``Hkv × D``), so that a TMA descriptor can address it as ``[blocks, block_size, Hkv × D]``,
    with a block count that fits int32 (and is not 0: a descriptor has no empty dims)."""
    nb, bs, hkv, d = shape
    return tuple(strides) == (bs * hkv * d, hkv * d, d, 1) and 0 < nb <= _MAX_DESCRIPTOR_DIM


def _lr_descriptor_ok(lora_key: tuple, block_size: int, block_n: int) -> bool:
    """Whether Flash-LoRA's low-rank cache can come by TMA beside K/V (else neither does: TMA
    K/V with per-thread L loads measured 1.2-1.5x slower than per-thread loads of all three):
    dense rows of r elements, 16-byte row pitch, and tiles inside its blocks."""
    (nb, lbs, r), strides, _, _, shared, itemsize, _ = lora_key
    return (tuple(strides) == (lbs * r, r, 1) and r * itemsize % 16 == 0 and (shared or lbs % block_n == 0)
            and 0 < nb <= _MAX_DESCRIPTOR_DIM)


def _lr_descriptor(lr: torch.Tensor, block_n: int, r_pad: int) -> TensorDescriptor:
    """A TMA descriptor over a low-rank cache ``[blocks, block_size, r]``, copying ``[1, block_n,
    r_pad]`` boxes (columns past r, and slots before 0, are zero-filled by the copy)."""
    nb, bs, r = lr.shape
    return descriptor(TensorDescriptor, lr, (nb, bs, r), (bs * r, r, 1), (1, block_n, r_pad))


def _lb_descriptor_ok(lora_b: torch.Tensor) -> bool:
    """Whether a TMA descriptor can address ``lora_b [adapters, Hkv, r, D]`` as ``[adapters ×
    Hkv, r, D]`` (`_lb_descriptor`): dense, on 16 bytes, not empty (a descriptor has no empty
    dims), rows at a 16-byte pitch, and adapters × Hkv within int32."""
    a, h, r, d = lora_b.shape
    return (lora_b.stride() == (h * r * d, r * d, d, 1) and _aligned16(lora_b) and lora_b.numel() > 0
            and d * lora_b.element_size() % 16 == 0 and a * h <= _MAX_DESCRIPTOR_DIM)


def _lb_descriptor(lora_b: torch.Tensor, r_pad: int) -> TensorDescriptor:
    """A TMA descriptor over ``lora_b`` seen as ``[adapters × Hkv, r, D]``, copying one (adapter,
    KV head)'s ``[1, r_pad, D]`` box (rows past r zero-filled by the copy)."""
    a, h, r, d = lora_b.shape
    return descriptor(TensorDescriptor, lora_b, (a * h, r, d), (r * d, d, 1), (1, r_pad, d))


def _kv_descriptor(cache: torch.Tensor, block_n: int) -> TensorDescriptor:
    """A TMA descriptor over a paged cache seen as ``[blocks, block_size, Hkv × D]``, copying
    ``[1, block_n, D]`` boxes: one KV head's keys of one tile (slots before 0 zero-filled: see the
    tail tile in `_attn_tile`)."""
    nb, bs, hkv, d = cache.shape
    return descriptor(TensorDescriptor, cache, (nb, bs, hkv * d), (bs * hkv * d, hkv * d, 1), (1, block_n, d))


def _launch(q, k, v, *, scale: float, paged: bool, seq_lens=None, block_tables=None,
            cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q: int | None = None,
            lora: _Lora | None = None, s2: _S2Args | None = None,
            out: torch.Tensor | None = None, num_splits: int | None = None) -> torch.Tensor:
    """Run `_attn_fwd` (and the split reduce). Inputs are already validated."""
    decode = cu_seqlens_q is None
    batch = q.shape[0] if decode else cu_seqlens_q.shape[0] - 1
    if batch > _MAX_GRID_Z:
        raise ValueError(f"at most {_MAX_GRID_Z} sequences per call, got {batch}")
    if out is None:
        out = torch.empty_like(q)
    if q.shape[0] == 0 or batch == 0:
        return out
    if not decode and max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item())
    plan = _launch_plan(_launch_key(q, k, v, out, paged=paged, decode=decode, batch=batch,
                                    block_tables=block_tables, lora=lora, s2=s2,
                                    max_seqlen_q=max_seqlen_q, num_splits=num_splits))
    dummy = q  # pointer arguments a variant does not read
    if plan.ws_total:
        # One allocation for the three partials (views into it), not three.
        ws_m, ws_l, ws_acc = torch.empty(plan.ws_total, device=q.device,
                                         dtype=torch.float32).split_with_sizes(plan.ws_sizes)
    else:
        ws_m = ws_l = ws_acc = dummy
    counters = _split_counters(q.device, plan.counters) if plan.counters else dummy
    if plan.ring is not None:
        lr_kw = {} if lora is None else dict(
            lr_cache=lora.lr_cache, lr_block_tables=lora.lr_block_tables, lora_b=lora.lora_b,
            adapter_ids=lora.adapter_ids, lr_shared_table=plan.meta["LR_SHARED_TABLE"])
        if plan.ring.splits > 1:
            lr_kw.update(num_splits=plan.ring.splits, workspace=(ws_m, ws_l, ws_acc), counters=counters,
                         reduce_splits=plan.ring_reduce, full_items=plan.ring.full_items or None)
        return attention_ring.ring_decode(q, k, v, block_tables, seq_lens, float(scale) * _LOG2E, out,
                                          block_n=plan.ring.tile, stages=plan.ring.slots,
                                          producer=plan.ring.producer, pack=plan.ring.pack,
                                          pdl=plan.meta["PDL"], **lr_kw)
    if lora is not None:
        lr, lbt, lb, aid = lora.lr_cache, lora.lr_block_tables, lora.lora_b, lora.adapter_ids
    else:
        lr = lbt = lb = aid = dummy
    if plan.meta["TMA"]:
        k, v = _kv_descriptor(k, plan.meta["BLOCK_N"]), _kv_descriptor(v, plan.meta["BLOCK_N"])
        if lora is not None:
            lr = _lr_descriptor(lr, plan.meta["BLOCK_N"], plan.meta["R_PAD"])
            if plan.meta["B_IN_LOOP"]:
                lb = _lb_descriptor(lb, plan.meta["R_PAD"])
    relaunch(_attn_fwd, plan.grid,
             (q, k, v, lr, lb, out, ws_m, ws_l, ws_acc, counters,
              block_tables if paged else dummy, lbt, seq_lens if seq_lens is not None else dummy,
              cu_seqlens_q if cu_seqlens_q is not None else dummy,
              cu_seqlens_k if cu_seqlens_k is not None else dummy, aid, float(scale) * _LOG2E),
             plan.int_args, plan.meta, plan.compiled, min_shared=plan.min_shared)
    if plan.reduce_grid is not None:
        relaunch(_split_reduce, plan.reduce_grid, (ws_m, ws_l, ws_acc, out), plan.reduce_args,
                 plan.reduce_meta, plan.reduce_compiled)
    return out


# --------------------------------------------------------------------------------------------
# Torch fallback: vectorised over heads, fp32 math, same algorithm (P·V + (P·L)·B)
# --------------------------------------------------------------------------------------------
def _gather_paged(cache: torch.Tensor, table_row: torch.Tensor, n: int) -> torch.Tensor:
    """Tokens 0..n-1 of one sequence from a paged cache: [n, *cache.shape[2:]]."""
    bs = cache.shape[1]
    nblk = -(-n // bs)
    idx = table_row[:nblk].long()
    blocks = cache[idx.clamp_min(0)]
    # -1 marks a block a head of a head-sharded pool does not store: read it as zeros.
    blocks = blocks.masked_fill((idx < 0).view(-1, *([1] * (blocks.dim() - 1))), 0)
    return blocks.reshape(nblk * bs, *cache.shape[2:])[:n]


def _torch_attention(q, k, v, *, scale, paged, seq_lens=None, block_tables=None,
                     cu_seqlens_q=None, cu_seqlens_k=None, lora=None, s2=None, out=None,
                     **_unused) -> torch.Tensor:
    decode = cu_seqlens_q is None
    hq, d = q.shape[1], q.shape[2]
    if out is None:
        out = torch.empty_like(q)
    if q.shape[0] == 0:
        return out
    batch = q.shape[0] if decode else cu_seqlens_q.shape[0] - 1
    cq = None if decode else cu_seqlens_q.tolist()
    ck = None if paged else cu_seqlens_k.tolist()
    sl = seq_lens.tolist() if paged else None
    per_head_table = paged and block_tables.dim() == 3
    hkv = block_tables.shape[1] if per_head_table else k.shape[-2]
    group = hq // hkv
    aids = lora.adapter_ids.tolist() if lora is not None else None
    for b in range(batch):
        q0, nq = (b, 1) if decode else (cq[b], cq[b + 1] - cq[b])
        if nq == 0:
            continue
        n = sl[b] if paged else ck[b + 1] - ck[b]
        if n == 0:
            out[q0:q0 + nq] = 0
            continue
        if paged and per_head_table:
            kb = torch.stack([_gather_paged(k, block_tables[b, h], n)[:, 0] for h in range(hkv)], 1)
            vb = torch.stack([_gather_paged(v, block_tables[b, h], n)[:, 0] for h in range(hkv)], 1)
        elif paged:
            kb, vb = _gather_paged(k, block_tables[b], n), _gather_paged(v, block_tables[b], n)
        else:
            kb, vb = k[ck[b]:ck[b] + n], v[ck[b]:ck[b] + n]
        qb = q[q0:q0 + nq].float().view(nq, hkv, group, d)
        scores = torch.einsum("tkgd,nkd->kgtn", qb, kb.float()) * scale
        qpos = torch.arange(n - nq, n, device=q.device)
        kpos = torch.arange(n, device=q.device)
        visible = (kpos[None, :] <= qpos[:, None]).expand(hkv, nq, n)
        if s2 is not None:
            visible = visible & _s2_visible(s2, hkv, qpos, kpos)
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        mx = scores.amax(-1, keepdim=True).clamp_min(_NEG_BIG)
        p = torch.exp(scores - mx)
        denom = p.sum(-1, keepdim=True)
        acc = torch.einsum("kgtn,nkd->kgtd", p, vb.float())
        if lora is not None and aids[b] >= 0:
            lrb = _gather_paged(lora.lr_cache, lora.lr_block_tables[b], n).float()
            pl = torch.einsum("kgtn,nr->kgtr", p, lrb)
            acc = acc + torch.einsum("kgtr,krd->kgtd", pl, lora.lora_b[aids[b]].float())
        res = acc / torch.where(denom > 0, denom, torch.ones_like(denom))
        out[q0:q0 + nq] = res.permute(2, 0, 1, 3).reshape(nq, hq, d).to(out.dtype)
    return out


def _s2_visible(s2: _S2Args, hkv: int, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
    """[hkv, nq, nk] S2 block visibility (causality is applied separately)."""
    heads = torch.arange(hkv, device=qpos.device)
    shard = torch.zeros_like(heads) if s2.homo_head else heads
    shift = shard * s2.head_sliding_step + s2.offset
    qb, kb = qpos // s2.sparse_block, kpos // s2.sparse_block
    local = (qb[:, None] - kb[None, :]) < s2.local_blocks
    in_shard = ((kb[None, :] + shift[:, None]) % s2.vert_stride) == 0
    dense = (heads >= s2.dense_from)[:, None, None]
    return local[None] | in_shard[:, None, :] | dense


_MIN_DOT = 16  # tl.dot needs K >= 16


def _launch_padded(q, *, k, v, out=None, lora=None, **kw) -> torch.Tensor:
    """Head dims below 16 (toy models only): zero-pad D, which changes neither q·k nor P·V,
    run the kernel, and keep the first D columns. Copies the caches, so never a hot path."""
    pad = (0, _MIN_DOT - q.shape[-1])
    if lora is not None:
        lora = _Lora(lora.lr_cache, lora.lr_block_tables, F.pad(lora.lora_b, pad), lora.adapter_ids)
    res = _launch(F.pad(q, pad), k=F.pad(k, pad), v=F.pad(v, pad), lora=lora, **kw)[..., :q.shape[-1]]
    if out is None:
        return res.contiguous()
    return out.copy_(res)


def _unit_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t` itself when None or contiguous (no copy, no new tensor object), else a contiguous copy."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def _run(impl, q, *, k, v, scale: float, paged: bool, seq_lens=None, block_tables=None,
         cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q: int | None = None,
         lora: _Lora | None = None, s2: _S2Args | None = None, out: torch.Tensor | None = None,
         num_splits: int | None = None) -> torch.Tensor:
    # The kernel indexes the head dim and every 1-D index vector with unit stride.
    if q.stride()[-1] != 1:
        q = q.contiguous()
    seq_lens, cu_seqlens_q, cu_seqlens_k = (_unit_stride(seq_lens), _unit_stride(cu_seqlens_q),
                                            _unit_stride(cu_seqlens_k))
    if lora is not None:
        lora.adapter_ids = _unit_stride(lora.adapter_ids)
    if choose_impl(q, impl) == "torch":
        return _torch_attention(q, k, v, scale=scale, paged=paged, seq_lens=seq_lens,
                                block_tables=block_tables, cu_seqlens_q=cu_seqlens_q,
                                cu_seqlens_k=cu_seqlens_k, lora=lora, s2=s2, out=out)
    launch = _launch_padded if q.shape[-1] < _MIN_DOT else _launch
    return launch(q, k=k, v=v, scale=scale, paged=paged, seq_lens=seq_lens, block_tables=block_tables,
                  cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                  lora=lora, s2=s2, out=out, num_splits=num_splits)


# --------------------------------------------------------------------------------------------
# Input validation (shapes, dtypes, devices on the host; value checks sync once, optional)
# --------------------------------------------------------------------------------------------
def _need(cond: bool, msg, exc=ValueError) -> None:
    """Raise `exc` when `cond` is false; `msg` may be a callable, formatted only then. The host
    checks run on every call use plain `if`s instead: a call plus a lambda cost more than the
    check itself."""
    if not cond:
        raise exc(msg() if callable(msg) else msg)


def _check_tensor(name: str, t, ndim: int, dtypes=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {dtypes}, got {t.dtype}")


def _check_q_kv(q, k, v, *, paged: bool, per_head_ok: bool = False) -> None:
    kv_dims = 4 if paged else 3
    _check_tensor("q", q, 3, _DTYPES)
    _check_tensor("k_cache" if paged else "k", k, kv_dims, _DTYPES)
    _check_tensor("v_cache" if paged else "v", v, kv_dims, _DTYPES)
    dtype, device, q_shape, k_shape = q.dtype, q.device, q.shape, k.shape
    if k.dtype != dtype or v.dtype != dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if v.shape != k_shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if k.device != device or v.device != device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    d = q_shape[2]
    if k_shape[-1] != d:
        raise ValueError(f"head_dim of q ({d}) and k/v ({k_shape[-1]}) differ")
    if not (1 <= d <= 256 and d & (d - 1) == 0):
        raise ValueError(f"head_dim must be a power of two <= 256, got {d}")
    if k.stride()[-1] != 1 or v.stride()[-1] != 1:
        raise ValueError("k/v must be contiguous in the head dim")
    if paged and k_shape[1] < 1:
        raise ValueError("block_size must be >= 1")
    hkv = k_shape[-2]
    if not per_head_ok and (hkv < 1 or q_shape[1] % hkv != 0):
        raise ValueError(f"num q heads ({q_shape[1]}) must be a multiple of num kv heads ({hkv})")


def _check_int_vec(name: str, t, length: int | None, device) -> None:
    _check_tensor(name, t, 1, _INDEX_DTYPES)
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name} must have length {length}, got {t.shape[0]}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def _check_table(name: str, bt, batch: int, device, ndim: int = 2) -> None:
    _check_tensor(name, bt, ndim, _INDEX_DTYPES)
    if bt.shape[0] != batch:
        raise ValueError(f"{name} must have {batch} rows, got {bt.shape[0]}")
    if bt.device != device:
        raise ValueError(f"{name} must be on {device}, got {bt.device}")
    if bt.stride()[-1] != 1:
        raise ValueError(f"{name} must be contiguous in its last dim")


class _ValueChecks:
    """The checks of one call that read device values (lengths, tables, adapter ids): the index
    tensors they read come to the host in one copy, and the checks run there on numpy arrays.
    Each read of a device value is a sync, and each small torch op some microseconds of host
    time: checked on the device a check at a time (four syncs and a dozen ops for paged decode)
    an eager call at 1 × 4K took 341-404 us of host time against 100-119 without checks; this
    way 203-213 against 101-117 (H200 host, blocks of 128 and 16; Flash-LoRA at r = 16, blocks
    of 128: 250 against 107, where its checks on the device, one sync for all, took 753).
    `fetch` queues a tensor and returns its handle (a tensor queued already keeps its first:
    seq_lens, cu_seqlens_q, adapter_ids and a table shared by K/V and L are each checked by
    more than one part of a call, and copied once); `add` queues a check, a callable of the
    fetched arrays (indexed by handle) that returns an error message or None; `run` copies,
    then raises the first failing check's ValueError, in the order they were added. Nothing is
    launched before it returns. The copy is the whole of each tensor (tables included)."""

    __slots__ = ("_tensors", "_checks")

    def __init__(self) -> None:
        self._tensors: list[torch.Tensor] = []
        self._checks: list[Callable[[list[np.ndarray]], str | None]] = []

    def fetch(self, t: torch.Tensor) -> int:
        for i, queued in enumerate(self._tensors):
            if queued is t:
                return i
        self._tensors.append(t)
        return len(self._tensors) - 1

    def add(self, check: Callable[[list[np.ndarray]], str | None]) -> None:
        self._checks.append(check)

    def run(self) -> None:
        tensors, checks = self._tensors, self._checks
        self._tensors, self._checks = [], []
        if not checks:
            return
        dtype = torch.int32 if all(t.dtype == torch.int32 for t in tensors) else torch.int64
        flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors]).cpu().numpy().astype(np.int64)  # the one sync
        arrays, i = [], 0
        for t in tensors:
            arrays.append(flat[i:i + t.numel()].reshape(t.shape))
            i += t.numel()
        for check in checks:
            msg = check(arrays)
            if msg is not None:
                raise ValueError(msg)


def _check_values(checks: _ValueChecks, seq_lens, block_size: int, max_blocks: int, num_blocks: int, bt,
                  cu_seqlens_q=None, name="block_tables", allow_unused_neg: bool = False,
                  adapter_ids=None) -> None:
    """Queue the checks of lengths and table entries on `checks` (a batch of at least one).
    Table entries are checked where a sequence uses them: blocks before ``ceil(seq_lens / block_size)``;
    with `adapter_ids`, only the rows of requests with an adapter (L's table)."""
    h_len = checks.fetch(seq_lens)
    h_cq = checks.fetch(cu_seqlens_q) if cu_seqlens_q is not None else None
    h_bt = checks.fetch(bt) if bt is not None else None
    h_aid = checks.fetch(adapter_ids) if adapter_ids is not None else None
    cap = max_blocks * block_size
    lo = -1 if allow_unused_neg else 0

    def check(a: list[np.ndarray]) -> str | None:
        lens = a[h_len]
        if h_aid is not None:
            lens = np.where(a[h_aid] >= 0, lens, 0)
        if (lens < 0).any():
            return "seq_lens must be >= 0"
        most = int(lens.max())
        if most > cap:
            return (f"{name} too short: a sequence of {most} tokens needs {-(-most // block_size)} blocks "
                    f"of {block_size}, the table has {max_blocks}")
        if h_cq is not None:
            len_q = np.diff(a[h_cq])
            if (len_q < 0).any():
                return "cu_seqlens_q must be non-decreasing"
            if (len_q > lens).any():
                return "every sequence needs seq_lens[b] >= its number of new query tokens"
        if h_bt is not None:
            table = a[h_bt]
            used = np.arange(max_blocks)[None, :] < ((lens + block_size - 1) // block_size)[:, None]
            if table.ndim == 3:
                used = used[:, None, :]
            if (((table < lo) | (table >= num_blocks)) & used).any():
                return f"{name} holds block ids outside [{lo}, {num_blocks}) for blocks in use"
        return None

    checks.add(check)


def _check_out(out, q) -> None:
    if out is None:
        return
    _check_tensor("out", out, 3)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must match q ({tuple(q.shape)}, {q.dtype}, {q.device}), "
                         f"got {tuple(out.shape)}, {out.dtype}, {out.device}")
    if out.stride()[-1] != 1:
        raise ValueError("out must be contiguous in the head dim")


def _check_splits(num_splits) -> None:
    if num_splits is not None and (type(num_splits) is bool or not isinstance(num_splits, int)
                                   or num_splits < 1):
        raise ValueError(f"num_splits must be an int >= 1, got {num_splits!r}")


def _check_scale(scale) -> None:
    if type(scale) is bool or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite number, got {scale!r}")


def _check_lora(q, k, lr_cache, lr_block_tables, lora_b, adapter_ids, batch: int, validate: bool,
                seq_lens=None, num_kv_heads: int | None = None, *, checks: _ValueChecks) -> _Lora:
    """`num_kv_heads`: where k's head dim is not the model's (per-head S2 tables, one head per
    block). The value checks go on `checks`, which the caller runs (with its paged checks)."""
    _check_tensor("lr_cache", lr_cache, 3, _DTYPES)
    _check_tensor("lora_b", lora_b, 4, _DTYPES)
    if lr_cache.dtype != q.dtype or lora_b.dtype != q.dtype:
        raise TypeError(f"lr_cache and lora_b must have q's dtype {q.dtype}, got {lr_cache.dtype}, "
                        f"{lora_b.dtype}")
    device = q.device
    if lr_cache.device != device or lora_b.device != device:
        raise ValueError("lr_cache/lora_b on another device")
    r = lr_cache.shape[2]
    if not 1 <= r <= 256:
        raise ValueError(f"rank must be in [1, 256], got {r}")
    if lr_cache.stride()[-1] != 1:
        raise ValueError("lr_cache must be contiguous in its last dim")
    hkv, d = (k.shape[2] if num_kv_heads is None else num_kv_heads), k.shape[3]
    if lora_b.shape[1:] != (hkv, r, d):
        raise ValueError(f"lora_b must be [num_adapters, {hkv}, {r}, {d}], got {tuple(lora_b.shape)}")
    if lora_b.stride()[-1] != 1:
        raise ValueError("lora_b must be contiguous in its last dim")
    _check_table("lr_block_tables", lr_block_tables, batch, device)
    _check_int_vec("adapter_ids", adapter_ids, batch, device)
    if validate and batch:
        n = lora_b.shape[0]
        h_aid = checks.fetch(adapter_ids)

        def ids_in_range(a: list[np.ndarray]) -> str | None:
            lo, hi = int(a[h_aid].min()), int(a[h_aid].max())
            if lo < -1 or hi >= n:
                return f"adapter_ids must be in [-1, {n}), got values in [{lo}, {hi}]"
            return None

        checks.add(ids_in_range)
        if seq_lens is not None:  # L's table, for the requests with an adapter only
            _check_values(checks, seq_lens, lr_cache.shape[1], lr_block_tables.shape[1], lr_cache.shape[0],
                          lr_block_tables, name="lr_block_tables", adapter_ids=adapter_ids)
    return _Lora(lr_cache, lr_block_tables, lora_b, adapter_ids)


def _check_paged(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, out,
                 num_splits, validate, *, per_head: bool = False, max_seqlen_q: int | None = None,
                 checks: _ValueChecks | None = None):
    """Common checks of the paged entry points; returns the batch size. `per_head`: a per-KV-head
    table ``[B, Hkv, W]`` over caches holding one KV head per block (kernels.s2). With
    `validate`, the checks of device values go on `checks` (the caller runs them, with its own:
    one sync for all), or are run here."""
    _check_q_kv(q, k_cache, v_cache, paged=True, per_head_ok=per_head)
    if per_head and k_cache.shape[2] != 1:
        raise ValueError("per-head block tables need caches with one KV head per block, got "
                         f"{tuple(k_cache.shape)}")
    _check_scale(scale)
    _check_out(out, q)
    _check_splits(num_splits)
    decode = cu_seqlens_q is None
    device = q.device
    if decode:
        batch = q.shape[0]
    else:
        _check_int_vec("cu_seqlens_q", cu_seqlens_q, None, device)
        _need(cu_seqlens_q.shape[0] >= 1, "cu_seqlens_q needs batch + 1 entries")
        batch = cu_seqlens_q.shape[0] - 1
    _check_int_vec("seq_lens", seq_lens, batch, device)
    _check_table("block_tables", block_tables, batch, device, ndim=3 if per_head else 2)
    if per_head:
        hkv = block_tables.shape[1]
        if hkv < 1 or q.shape[1] % hkv != 0:
            raise ValueError(f"num q heads ({q.shape[1]}) must be a multiple of num kv heads ({hkv})")
    if validate and batch:
        own = checks is None
        checks = _ValueChecks() if own else checks
        if not decode:
            h_cq, total = checks.fetch(cu_seqlens_q), q.shape[0]

            def spans_q(a: list[np.ndarray]) -> str | None:
                cq = a[h_cq]
                if cq[0] != 0 or cq[-1] != total:
                    return f"cu_seqlens_q must start at 0 and end at total_q={total}"
                longest = int(np.diff(cq).max())
                if max_seqlen_q is not None and longest > max_seqlen_q:
                    return f"max_seqlen_q={max_seqlen_q} is below the longest query run ({longest})"
                return None

            checks.add(spans_q)
        _check_values(checks, seq_lens, k_cache.shape[1], block_tables.shape[-1], k_cache.shape[0],
                      block_tables, cu_seqlens_q=cu_seqlens_q, allow_unused_neg=per_head)
        if own:
            checks.run()
    return batch


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, *,
                           impl: str | None = None, out: torch.Tensor | None = None,
                           num_splits: int | None = None, validate: bool = True) -> torch.Tensor:
    """One new token per sequence attending to its paged K/V.

    q ``[batch, Hq, D]``; k_cache/v_cache ``[num_blocks, block_size, Hkv, D]`` (Hq a multiple of
    Hkv); block_tables ``[batch, max_blocks]`` int32; seq_lens ``[batch]`` int32 counts every
    cached token including the new one (already written). Returns ``[batch, Hq, D]`` in q's
    dtype; a sequence of length 0 gets zeros. ``num_splits`` forces the split-KV factor (default:
    enough programs to fill the GPU); ``validate=False`` skips the checks that read device values.
    """
    _check_paged(q, k_cache, v_cache, block_tables, seq_lens, None, scale, out, num_splits, validate)
    return _run(impl, q, k=k_cache, v=v_cache, scale=scale, paged=True, seq_lens=seq_lens,
                block_tables=block_tables, out=out, num_splits=num_splits)


def paged_attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            seq_lens: torch.Tensor, scale: float, *, impl: str | None = None,
                            out: torch.Tensor | None = None, max_seqlen_q: int | None = None,
                            validate: bool = True) -> torch.Tensor:
    """Variable-length causal prefill over paged K/V, on top of any cached prefix.

    q ``[total_q, Hq, D]`` holds each sequence's new tokens (their K/V already in the cache);
    ``cu_seqlens_q [batch+1]``; new token i of sequence b sits at position
    ``seq_lens[b] - len_q(b) + i``. ``max_seqlen_q`` avoids a device sync when given.
    """
    _check_paged(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, out, None, validate,
                 max_seqlen_q=max_seqlen_q)
    return _run(impl, q, k=k_cache, v=v_cache, scale=scale, paged=True, seq_lens=seq_lens,
                block_tables=block_tables, cu_seqlens_q=cu_seqlens_q, out=out,
                max_seqlen_q=max_seqlen_q)


def flash_lora_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      lr_cache: torch.Tensor, lr_block_tables: torch.Tensor, lora_b: torch.Tensor,
                      adapter_ids: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                      scale: float, *, impl: str | None = None, out: torch.Tensor | None = None,
                      num_splits: int | None = None, validate: bool = True) -> torch.Tensor:
    """Flash-LoRA-Attention decode: ``softmax(scale·q·Kᵀ)·(V_base + L·B_a)`` per request.

    lr_cache ``[num_lr_blocks, lr_block_size, r]`` read through ``lr_block_tables
    [batch, max_lr_blocks]``; lora_b ``[num_adapters, Hkv, r, D]``; adapter_ids ``[batch]``,
    -1 = no adapter. Computed as ``P·V + (P·L)·B_a`` under one online softmax.
    ``validate=True`` checks adapter ids (one device sync); the hot path may turn it off.
    """
    checks = _ValueChecks()
    batch = _check_paged(q, k_cache, v_cache, block_tables, seq_lens, None, scale, out, num_splits,
                         validate, checks=checks)
    lora = _check_lora(q, k_cache, lr_cache, lr_block_tables, lora_b, adapter_ids, batch, validate,
                       seq_lens, checks=checks)
    checks.run()
    return _run(impl, q, k=k_cache, v=v_cache, scale=scale, paged=True, seq_lens=seq_lens,
                block_tables=block_tables, lora=lora, out=out, num_splits=num_splits)


def flash_lora_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       lr_cache: torch.Tensor, lr_block_tables: torch.Tensor, lora_b: torch.Tensor,
                       adapter_ids: torch.Tensor, block_tables: torch.Tensor,
                       cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float, *,
                       impl: str | None = None, out: torch.Tensor | None = None,
                       max_seqlen_q: int | None = None, validate: bool = True) -> torch.Tensor:
    """Flash-LoRA-Attention prefill; positions as in `paged_attention_prefill`, adapters as in
    `flash_lora_decode`."""
    checks = _ValueChecks()
    batch = _check_paged(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, scale, out,
                         None, validate, max_seqlen_q=max_seqlen_q, checks=checks)
    lora = _check_lora(q, k_cache, lr_cache, lr_block_tables, lora_b, adapter_ids, batch, validate,
                       seq_lens, checks=checks)
    checks.run()
    return _run(impl, q, k=k_cache, v=v_cache, scale=scale, paged=True, seq_lens=seq_lens,
                block_tables=block_tables, cu_seqlens_q=cu_seqlens_q, lora=lora, out=out,
                max_seqlen_q=max_seqlen_q)
