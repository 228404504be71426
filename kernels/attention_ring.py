"""Paged decode and Flash-LoRA decode through a ring of TMA copies with explicit mbarriers
(Gluon), for Hopper.

`_attn_fwd` (kernels/attention.py) is the kernel family every attention entry point runs on.
This module holds one more kernel for some cases of it, paged decode on sm_90 (unsplit, and
split in cache blocks of under 128 keys), where Triton's own pipeliner leaves bandwidth behind:
it gives the block-table load that a TMA copy waits on pipeline stages of its own and keeps one
K/V tile in flight (two at one program an SM), and each tile's copy still waits on a block id
loaded right before it. Here the ring is written out: ``STAGES`` K/V tile slots, one mbarrier
each, the copy of tile ``t + STAGES - 1`` issued when tile ``t`` is taken, and that tile's block
id loaded an iteration earlier.

Measured on an H200 (bf16, Hq 32, Hkv 8, D 128, blocks of 128, us, one run; SDPA on contiguous
K/V; bench/RESULTS.md Run S): 16 × 32K 464.6 / 465.1 against `_attn_fwd`'s 469.2 / 468.9 and
SDPA's 466.4 / 465.6; 64 × 32K 1843.3 / 1841.4 vs 1867.5 / 1864.5, SDPA 1848.6 / 1849.4; 12 ×
4K 48.6 / 48.8 vs 49.5 / 49.4, SDPA 50.6 / 50.4. Without the early block-id load: 16 × 32K
467.6 / 467.3, 64 × 32K 1847.0 / 1844.5.

Semantics are `paged_attention_decode`'s (reference: kernels/attention_ref.py): one program
per (sequence, KV head) owns the GQA group's query rows (padded to 16, the MMA's M), reads the
sequence's key tiles through the block table, and writes ``softmax(scale·q·Kᵀ)·V``; an empty
sequence writes zeros. Or one program per (sequence, pack of KV heads) (``PACK``, paged decode
only): its copies bring a block's keys of every head of the pack at once, its tiles hold keys ×
heads in the cache's own order, and each query row is masked to its own head's columns; the
pack's query rows still fit the one 16-row MMA tile (a group of 4 in a pack of 4), so the math
is a single head's, over PACK times fewer, larger copies. A tile comes by one copy where one
cache block holds it, else by one copy a block (blocks smaller than the tile). The copy holding
the sequence's last key is read shifted to end at it: its slots before the block's first are
zero-filled by the copy and the keys it repeats are masked; copies wholly past the sequence
read nothing but zeros. So no slot past the
sequence (which may hold anything, NaN included) is ever read. Split (flash-decoding), a
program takes its share of a sequence's tiles and writes partial (max, sum, P·V) rows in
`_attn_fwd`'s workspace layout; the last of a sequence's splits to finish combines them (an
arrival counter, as `_attn_fwd` does). With Flash-LoRA
(`flash_lora_decode`'s semantics), L tiles ride in the same ring slots (never for a request
without adapter), ``P·L`` accumulates beside ``P·V`` under the one online softmax, and
``(P·L)·B_a`` is added once after the loop: ``L·B_a`` is never formed.

Where a tile takes many copies (cache blocks of 16 or 32 keys: a copy a block, 8 to 24 a tile)
the launch can give them to a producer warp of their own (``producer``, warp specialisation):
Triton 3.6 issues every TMA copy behind a barrier of all the warps that issue it, which the
four math warps then wait through 8 to 24 times a tile; one warp issuing them waits alone, and
the math warps only wait for the slot to land and hand it back (an ``empty`` mbarrier a slot).
There K comes first on a barrier of its own, so that QK^T and the softmax run while V (and L)
land. With a copy or two a tile the hand-back costs more than it saves (see
`kernels.attention._ring_producer`).

Gluon kernels do not run under ``TRITON_INTERPRET``: the launch plan never picks this one off a
CUDA device (`kernels.attention._ring_device`), and CI compiles it for sm_90 instead
(tests/kernels/test_kernels_attention_ring.py).
"""
from __future__ import annotations

import functools
import inspect
import math

import torch

from ._pdl import gdc_launch_dependents, gdc_wait
from ._relaunch import launch
from ._tma import descriptor

try:  # Gluon (Triton's explicit-layout dialect) ships with Triton 3.5 and later
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    # The bulk tensor copy into shared memory: `async_load` in newer Tritons (3.9 has only it),
    # `async_copy_global_to_shared` in 3.6.
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # renamed in Triton 3.9
except ImportError:  # pragma: no cover - an older Triton: the Triton kernel serves every launch
    gluon = None

__all__ = ["available", "producer_available", "ring_decode"]

_ROWS = 16  # query rows a program: mma_v2's M (a GQA group of up to 16 query heads)
_WARPS = 4
# The producer warp's registers (`setmaxnreg`: what the copies' addressing needs). Triton pads
# the one producer warp to a warp group (8 warps a program), and uncapped (255 a thread) such a
# program takes the whole register file: launches with the producer run one program an SM, whose
# math warps keep 255 a thread at any cap up to 416. At 40, Triton 3.6's Flash-LoRA builds
# spilled in the producer warp (up to 112 bytes); at 96 no build spills.
_PRODUCER_WARP_REGS = 96

if gluon is not None:

    @gluon.jit
    def _tile_blocks(BlockTables, b, t, seq_len, stride_btb, BLOCK_N: gl.constexpr, BLOCK_SIZE: gl.constexpr,
                     CHUNKS: gl.constexpr, ids: gl.constexpr):
        """The cache blocks of tile `t` of sequence `b` (0 past its last block: never read): a
        scalar where one block holds the tile, else a [CHUNKS] vector (layout `ids`), a block
        a copy."""
        n_blocks = gl.cdiv(seq_len, BLOCK_SIZE)
        first = (t * BLOCK_N) // BLOCK_SIZE
        if CHUNKS == 1:
            blk = gl.load(BlockTables + b * stride_btb + first, mask=first < n_blocks, other=0)
        else:
            idx = first + gl.arange(0, CHUNKS, layout=ids)
            blk = gl.load(BlockTables + b * stride_btb + idx, mask=idx < n_blocks, other=0)
        return blk.to(gl.int32)

    @gluon.jit
    def _tile_blocks_kv_lr(BlockTables, LrBlockTables, b, t, seq_len, lr_len, stride_btb, stride_lbtb,
                           BLOCK_N: gl.constexpr, BLOCK_SIZE: gl.constexpr, LR_BLOCK_SIZE: gl.constexpr,
                           CHUNKS: gl.constexpr, ids: gl.constexpr, HAS_LORA: gl.constexpr,
                           LR_SHARED_TABLE: gl.constexpr):
        """Tile `t`'s K/V blocks and L blocks (the same ones where L is paged by the K/V table;
        L's table is read only up to `lr_len` keys: none without adapter)."""
        blk = _tile_blocks(BlockTables, b, t, seq_len, stride_btb, BLOCK_N, BLOCK_SIZE, CHUNKS, ids)
        lr_blk = blk
        if HAS_LORA and not LR_SHARED_TABLE:
            lr_blk = _tile_blocks(LrBlockTables, b, t, lr_len, stride_lbtb, BLOCK_N, LR_BLOCK_SIZE, CHUNKS, ids)
        return blk, lr_blk

    @gluon.jit
    def _chunk_shift(t, c, seq_len, BLOCK_N: gl.constexpr, CHUNK: gl.constexpr):
        """How far copy `c` of tile `t` (CHUNK keys) is read back from its place: the copy that
        holds the sequence's last key ends at it (its rows before the block's first come back as
        zeros, TMA's out-of-bounds fill; the keys the copy before already had are masked), copies
        past it by CHUNK or more (all zeros), every other copy not at all."""
        return gl.maximum(t * BLOCK_N + c * CHUNK + CHUNK - seq_len, 0)

    @gluon.jit
    def _box(blk, row, col, PACK: gl.constexpr):
        """A copy's coordinates: [block, row, column] in a cache seen as [blocks, block_size,
        Hkv × D]; with PACK KV heads a copy, [block, row, head, 0] in [blocks, block_size, Hkv, D]
        (`col` then the first head)."""
        if PACK == 1:
            return [blk, row, col]
        else:
            return [blk, row, col, 0]

    @gluon.jit
    def _copy_rows(desc, ring, slot, blocks, b_idx, t, seq_len, col, bar, live,
                   BLOCK_N: gl.constexpr, BLOCK_SIZE: gl.constexpr, CHUNK: gl.constexpr, CHUNKS: gl.constexpr,
                   PACK: gl.constexpr):
        """Start the copy of tile `t`'s rows of one cache (K, V or L) into ring slot `slot`:
        one box where a block holds the tile (`blocks` its id), else one box a block (`blocks`
        their ids, `_tile_blocks`); PACK KV heads a box (`_box`)."""
        if CHUNKS == 1:
            row = (t * BLOCK_N) % BLOCK_SIZE - _chunk_shift(t, 0, seq_len, BLOCK_N, CHUNK)
            _tma_load(desc, _box(blocks, row, col, PACK), bar, ring.index(slot), pred=live)
        else:
            for c in gl.static_range(CHUNKS):  # a block starts every copy: row 0 unless shifted
                blk = gl.sum(gl.where(b_idx == c, blocks, 0), axis=0)
                _tma_load(desc, _box(blk, -_chunk_shift(t, c, seq_len, BLOCK_N, CHUNK), col, PACK), bar,
                          ring.index(slot).slice(c * CHUNK, CHUNK, dim=1), pred=live)

    @gluon.jit
    def _copy_tile(k_desc, v_desc, lr_desc, k_ring, v_ring, lr_ring, ready, block, lr_block, b_idx, kvh, t,
                   t_lo, t_hi, seq_len, adapter, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                   BLOCK_SIZE: gl.constexpr, LR_BLOCK_SIZE: gl.constexpr, CHUNK: gl.constexpr,
                   STAGES: gl.constexpr, HAS_LORA: gl.constexpr, EARLY_K: gl.constexpr, PACK: gl.constexpr):
        """Start the copies of tile `t`'s K and V (and L, for a request with an adapter) into its
        ring slot (the program's tiles `t_lo` up to `t_hi` take the slots in turn); nothing past
        the program's last tile. `kvh` counts packs of PACK KV heads."""
        live = t < t_hi
        kv_col = kvh * HEAD_DIM if PACK == 1 else kvh * PACK  # (see _box)
        slot = (t - t_lo) % STAGES
        bar = ready.index(slot)
        CHUNKS: gl.constexpr = BLOCK_N // CHUNK
        k_bytes: gl.constexpr = CHUNKS * k_desc.block_type.nbytes
        if EARLY_K:  # K first, on a barrier of its own (slots STAGES on): QK^T starts while V lands
            # (the producer warp's ring; see _ring_consumer)
            k_bar = ready.index(STAGES + slot)
            mbarrier.expect(k_bar, k_bytes, pred=live)
            _copy_rows(k_desc, k_ring, slot, block, b_idx, t, seq_len, kv_col, k_bar, live,
                       BLOCK_N, BLOCK_SIZE, CHUNK, CHUNKS, PACK)
        bar_bytes: gl.constexpr = k_bytes if EARLY_K else 2 * k_bytes
        if HAS_LORA:
            # One arrival a tile: the expected bytes are a compile-time count, so one of two
            # expects, by whether L comes too (never for a request without adapter). L goes
            # ahead of V: issued last it was slower (H200, blocks of 16, r = 64, us, the tile on
            # one barrier: 1 × 4K 13.2 vs 12.7, 8 × 4K 42.1 vs 40.9, 1 × 32K 43.1 vs 41.9, 16 ×
            # 4K 68.4 vs 67.3; with K's own barrier level to 1% slower).
            lr_bytes: gl.constexpr = CHUNKS * lr_desc.block_type.nbytes
            mbarrier.expect(bar, bar_bytes + lr_bytes, pred=live & (adapter >= 0))
            mbarrier.expect(bar, bar_bytes, pred=live & (adapter < 0))
            _copy_rows(lr_desc, lr_ring, slot, lr_block, b_idx, t, seq_len, 0, bar, live & (adapter >= 0),
                       BLOCK_N, LR_BLOCK_SIZE, CHUNK, CHUNKS, 1)
        else:
            mbarrier.expect(bar, bar_bytes, pred=live)
        if not EARLY_K:
            _copy_rows(k_desc, k_ring, slot, block, b_idx, t, seq_len, kv_col, bar, live,
                       BLOCK_N, BLOCK_SIZE, CHUNK, CHUNKS, PACK)
        _copy_rows(v_desc, v_ring, slot, block, b_idx, t, seq_len, kv_col, bar, live,
                   BLOCK_N, BLOCK_SIZE, CHUNK, CHUNKS, PACK)

    @gluon.jit
    def _combine_splits(WsM, WsL, WsAcc, Out, ws_item, b, kvh, num_splits, stride_ob, stride_oh,
                        GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, GROUP_P2: gl.constexpr,
                        REDUCE_S: gl.constexpr, WARPS: gl.constexpr):
        """Combine the split partials of workspace item `ws_item`, the GQA group of (sequence
        `b`, KV head `kvh`), into its output rows: `kernels.attention._combine_splits` in Gluon
        (a Gluon kernel cannot call a `triton.jit` function), over the same workspace layout,
        REDUCE_S splits of every head a pass (one [heads, splits, D] load each). Loads bypass
        L1 (.cg): the partials were written by other SMs."""
        l3: gl.constexpr = gl.BlockedLayout([1, 1, 4], [1, 1, 32], [1, WARPS, 1], [2, 1, 0])
        gs: gl.constexpr = gl.SliceLayout(2, l3)  # [heads, splits]
        gd: gl.constexpr = gl.SliceLayout(1, l3)  # [heads, D]
        offs_g = gl.arange(0, GROUP_P2, layout=gl.SliceLayout(1, gs))
        offs_s = gl.arange(0, REDUCE_S, layout=gl.SliceLayout(0, gs))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, gd))
        base = (ws_item.to(gl.int64) * GROUP + offs_g) * num_splits  # [heads] first partial
        m_run = gl.full([GROUP_P2], -1.0e38, gl.float32, gl.SliceLayout(1, gs))
        l_run = gl.zeros([GROUP_P2], gl.float32, gl.SliceLayout(1, gs))
        acc = gl.zeros([GROUP_P2, HEAD_DIM], gl.float32, gd)
        for s0 in range(0, num_splits, REDUCE_S):
            ok = (offs_g < GROUP)[:, None] & (s0 + offs_s < num_splits)[None, :]
            idx = base[:, None] + s0 + offs_s[None, :]
            m = gl.load(WsM + idx, mask=ok, other=-1.0e38, cache_modifier=".cg")
            l = gl.load(WsL + idx, mask=ok, other=0.0, cache_modifier=".cg")
            part = gl.load(WsAcc + idx[:, :, None] * HEAD_DIM + offs_d[None, None, :], mask=ok[:, :, None],
                           other=0.0, cache_modifier=".cg")
            m_new = gl.maximum(m_run, gl.max(m, 1))
            alpha = gl.exp2(m_run - m_new)
            w = gl.exp2(m - m_new[:, None])
            l_run = l_run * alpha + gl.sum(w * l, 1)
            alpha_d = gl.convert_layout(alpha, gl.SliceLayout(1, gd))
            acc = acc * alpha_d[:, None] + gl.sum(w[:, :, None] * part, 1)
            m_run = m_new
        l_d = gl.convert_layout(gl.where(l_run > 0, l_run, 1.0), gl.SliceLayout(1, gd))
        o = (acc / l_d[:, None]).to(Out.dtype.element_ty)
        g = gl.arange(0, GROUP_P2, layout=gl.SliceLayout(1, gd))
        o_mask = (g < GROUP)[:, None] & (offs_d < HEAD_DIM)[None, :]
        gl.store(Out + b.to(gl.int64) * stride_ob + (kvh * GROUP + g)[:, None] * stride_oh + offs_d[None, :], o,
                 mask=o_mask)

    @gluon.jit
    def _ring_loader(k_desc, v_desc, lr_desc, b_desc, k_ring, v_ring, lr_ring, b_smem, ready, empty, b_ready,
                     BlockTables, LrBlockTables, b, kvh, b_row, t_lo, t_hi, seq_len, lr_len, adapter, stride_btb,
                     stride_lbtb, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_SIZE: gl.constexpr,
                     LR_BLOCK_SIZE: gl.constexpr, CHUNK: gl.constexpr, STAGES: gl.constexpr,
                     HAS_LORA: gl.constexpr, LR_SHARED_TABLE: gl.constexpr, B_TMA: gl.constexpr,
                     PACK: gl.constexpr):
        """The producer warp: every copy of the program's tiles, each into a slot the consumer
        warps have released (`empty`), its block ids loaded a tile ahead of the copy; with
        B_TMA first B_a[kvh] (row `b_row` of B seen as [adapters × Hkv, r, D]) into `b_smem`,
        for the (P·L)·B_a after the loop, whose load would otherwise start only then."""
        if B_TMA:
            mbarrier.expect(b_ready.index(0), b_desc.block_type.nbytes, pred=adapter >= 0)
            _tma_load(b_desc, [b_row, 0, 0], b_ready.index(0), b_smem, pred=adapter >= 0)
        CHUNKS: gl.constexpr = BLOCK_N // CHUNK
        ids: gl.constexpr = gl.BlockedLayout([CHUNKS], [32], [1], [0])
        b_idx = gl.arange(0, CHUNKS, layout=ids)
        blk, lr_blk = _tile_blocks_kv_lr(BlockTables, LrBlockTables, b, t_lo, seq_len, lr_len, stride_btb,
                                         stride_lbtb, BLOCK_N, BLOCK_SIZE, LR_BLOCK_SIZE, CHUNKS, ids,
                                         HAS_LORA, LR_SHARED_TABLE)
        for i in range(t_hi - t_lo):
            t = t_lo + i
            nxt, nxt_lr = _tile_blocks_kv_lr(BlockTables, LrBlockTables, b, t + 1, seq_len, lr_len, stride_btb,
                                             stride_lbtb, BLOCK_N, BLOCK_SIZE, LR_BLOCK_SIZE, CHUNKS, ids,
                                             HAS_LORA, LR_SHARED_TABLE)
            # a fresh barrier counts as released in the phase before its first (parity 1)
            mbarrier.wait(empty.index(i % STAGES), ((i // STAGES) & 1) ^ 1)
            _copy_tile(k_desc, v_desc, lr_desc, k_ring, v_ring, lr_ring, ready, blk, lr_blk, b_idx, kvh, t,
                       t_lo, t_hi, seq_len, adapter, HEAD_DIM, BLOCK_N, BLOCK_SIZE, LR_BLOCK_SIZE, CHUNK,
                       STAGES, HAS_LORA, True, PACK)
            blk, lr_blk = nxt, nxt_lr

    @gluon.jit
    def _attend_tile(q, k_ring, v_ring, lr_ring, ready, empty, slot, phase, t, seq_len, qk_scale, acc, acc_lr, m_i,
                     l_i, dtype: gl.constexpr, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                     CHUNK: gl.constexpr, WARPS: gl.constexpr, HAS_LORA: gl.constexpr, R_PAD: gl.constexpr,
                     RELEASE: gl.constexpr, PACK: gl.constexpr, HEAD_GROUP: gl.constexpr):
        """Key tile `t` (landed in ring slot `slot`) into the online softmax: P·V, and P·L beside
        it under the same softmax (L·B_a is never formed). RELEASE (the producer warp's ring):
        the tile's K landed on a barrier of its own; V and L land on `ready` (phase `phase`),
        are read out of the slot once P is formed, and the slot goes back to the producer
        (`empty`) once every warp has them. Else the whole tile landed (one barrier) and V and L
        are read as the math reaches them. With PACK KV heads a program the tile holds BLOCK_N keys
        × PACK heads, key-major (the cache's own order); query row i (of head i // HEAD_GROUP in
        the pack) sees only its own head's columns: the MMAs are as wide as one head's 16-row
        tile of BLOCK_N × PACK keys, and the other heads' entries are masked."""
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, WARPS], instr_shape=[16, 8])
        a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        b_op: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
        TILE_ROWS: gl.constexpr = BLOCK_N * PACK
        k_t = k_ring.index(slot).reshape([TILE_ROWS, HEAD_DIM]).permute((1, 0)).load(b_op)
        s = mma_v2(q, k_t, gl.zeros([ROWS, TILE_ROWS], gl.float32, mma)) * qk_scale
        if PACK == 1:
            key_col = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
        else:
            tile_col = gl.arange(0, TILE_ROWS, layout=gl.SliceLayout(0, mma))
            key_col = tile_col // PACK
        if BLOCK_N == CHUNK:
            visible = key_col >= _chunk_shift(t, 0, seq_len, BLOCK_N, CHUNK)
        else:
            visible = key_col % CHUNK >= _chunk_shift(t, key_col // CHUNK, seq_len, BLOCK_N, CHUNK)
        if PACK == 1:
            s = gl.where(visible[None, :], s, float("-inf"))
        else:
            q_head = gl.arange(0, ROWS, layout=gl.SliceLayout(1, mma)) // HEAD_GROUP
            own = (tile_col % PACK)[None, :] == q_head[:, None]
            s = gl.where(visible[None, :] & own, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        p = gl.convert_layout(p.to(dtype), a_op)
        if RELEASE:  # K came on a barrier of its own: wait for V (and L), then hand the slot back
            mbarrier.wait(ready.index(slot), phase)
            v_t = v_ring.index(slot).reshape([TILE_ROWS, HEAD_DIM]).load(b_op)
            if HAS_LORA:
                lr_t = lr_ring.index(slot).reshape([BLOCK_N, R_PAD]).load(b_op)
            _cta_barrier()
            mbarrier.arrive(empty.index(slot))
        else:
            v_t = v_ring.index(slot).reshape([TILE_ROWS, HEAD_DIM]).load(b_op)
        acc = mma_v2(p, v_t, acc * alpha[:, None])
        if HAS_LORA:
            if not RELEASE:
                lr_t = lr_ring.index(slot).reshape([BLOCK_N, R_PAD]).load(b_op)
            acc_lr = mma_v2(p, lr_t, acc_lr * alpha[:, None])
        return acc, acc_lr, m_new, l_i

    @gluon.jit
    def _ring_consumer(q, k_ring, v_ring, lr_ring, ready, empty, t_lo, t_hi, seq_len, qk_scale, acc, acc_lr,
                       m_i, l_i, dtype: gl.constexpr, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr,
                       BLOCK_N: gl.constexpr, CHUNK: gl.constexpr, STAGES: gl.constexpr, WARPS: gl.constexpr,
                       HAS_LORA: gl.constexpr, R_PAD: gl.constexpr, PACK: gl.constexpr, HEAD_GROUP: gl.constexpr):
        """The consumer warps of the producer warp's ring: every tile as it lands, its QK^T and
        softmax once its K has (K has a barrier of its own there, `ready` slots STAGES on), its
        P·V (and P·L) once V (and L) have. H200, same run (bf16, Hq 32, Hkv 8, D 128, us, two
        passes averaged; against one barrier a tile, and Flash-LoRA r = 8 / 64, blocks of 16
        unless said): Flash-LoRA 1 × 4K 11.9 / 12.0 vs 12.6 / 12.7 (paged 11.3), 8 × 4K 39.8 /
        40.0 vs 41.0 / 41.2, 1 × 32K r = 64 42.0 vs 42.3, 16 × 4K 67.8 / 67.9 vs 68.0 / 68.2,
        16 × 32K r = 8 491.7 vs 492.7, blocks of 32 16 × 4K r = 8 66.5 vs 67.8, 8 × 4K r = 64
        39.9 vs 39.7; paged 16 × 4K 67.0 vs 67.8 (SDPA 64.4), 14 × 4K 58.5 vs 58.9, 16 × 32K
        483.9 vs 485.6, 1 × 4K 11.4 vs 11.3; blocks of 32 12 × 4K 50.9 vs 51.1, 16 × 32K 479.4
        vs 480.9 (bench/RESULTS.md, Run X)."""
        for i in range(t_hi - t_lo):
            slot = i % STAGES
            phase = (i // STAGES) & 1
            mbarrier.wait(ready.index(STAGES + slot), phase)  # K's barrier (see _copy_tile)
            acc, acc_lr, m_i, l_i = _attend_tile(q, k_ring, v_ring, lr_ring, ready, empty, slot, phase, t_lo + i,
                                                 seq_len, qk_scale, acc, acc_lr, m_i, l_i, dtype, ROWS, HEAD_DIM,
                                                 BLOCK_N, CHUNK, WARPS, HAS_LORA, R_PAD, True, PACK, HEAD_GROUP)
        return acc, acc_lr, m_i, l_i

    # The split count changes with batch and context: not specialised on (1 / multiple of 16).
    @gluon.jit(do_not_specialize=["num_splits", "full_items"])
    def _ring_decode_kernel(Q, k_desc, v_desc, lr_desc, b_desc, BlockTables, LrBlockTables, LoraB, AdapterIds,
                            SeqLens, Out, WsM, WsL, WsAcc, SplitCounters, qk_scale, num_splits, full_items,
                            kv_programs, stride_qb, stride_qh, stride_ob, stride_oh, stride_btb, stride_lbtb,
                            stride_lba, stride_lbh, stride_lbr,
                            GROUP: gl.constexpr, HEAD_DIM: gl.constexpr,
                            BLOCK_N: gl.constexpr, BLOCK_SIZE: gl.constexpr, STAGES: gl.constexpr,
                            ROWS: gl.constexpr, WARPS: gl.constexpr, HAS_LORA: gl.constexpr,
                            RANK: gl.constexpr, R_PAD: gl.constexpr, LR_BLOCK_SIZE: gl.constexpr,
                            LR_SHARED_TABLE: gl.constexpr, CHUNK: gl.constexpr, SPLIT: gl.constexpr,
                            GROUP_P2: gl.constexpr, REDUCE_S: gl.constexpr, PRODUCER: gl.constexpr,
                            PRODUCER_REGS: gl.constexpr, B_TMA: gl.constexpr, PACK: gl.constexpr,
                            TAIL: gl.constexpr, PDL: gl.constexpr):
        if PDL:  # launched while the kernel before drains: nothing global before its writes land (_pdl)
            gdc_wait()
        # With PACK > 1 a program reads PACK KV heads at once (`ring_decode(pack=)`): program
        # axis 0 and `kvh` count packs, GROUP is the pack's query heads.
        HEAD_GROUP: gl.constexpr = GROUP // PACK
        if TAIL:
            # A one-dimensional grid over items (sequence × KV head, `kv_programs` a sequence):
            # the first `full_items` programs take one whole, the rest the remaining items in
            # `num_splits` splits each (see `kernels.attention._tail_split`).
            pid = gl.program_id(0)
            tail_pid = gl.maximum(pid - full_items, 0)
            item = pid - tail_pid + tail_pid // num_splits
            split = tail_pid % num_splits
            n_split = gl.where(pid >= full_items, num_splits, 1)
            num_kv_heads = kv_programs
            b = item // num_kv_heads
            kvh = item % num_kv_heads
            ws_item = item - full_items
        else:
            if SPLIT:
                kvh = gl.program_id(0) // num_splits
                split = gl.program_id(0) % num_splits
            else:  # compiled apart: no runtime division
                kvh = gl.program_id(0)
                split = 0
            n_split = num_splits
            num_kv_heads = gl.num_programs(0) // num_splits if SPLIT else gl.num_programs(0)
            b = gl.program_id(1)
            ws_item = b * num_kv_heads + kvh
        # Warps split the N dim of every dot (the 16 rows are one MMA tile high).
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, WARPS], instr_shape=[16, 8])
        a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        b_op: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
        io: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [1, WARPS], [1, 0])
        dtype: gl.constexpr = k_desc.dtype
        # A tile's block ids, where it spans CHUNKS blocks: every thread holds all of them.
        CHUNKS: gl.constexpr = BLOCK_N // CHUNK
        ids: gl.constexpr = gl.BlockedLayout([CHUNKS], [32], [WARPS], [0])
        b_idx = gl.arange(0, CHUNKS, layout=ids)

        if PACK == 1:
            k_ring = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
            v_ring = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
        else:
            k_ring = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, PACK, HEAD_DIM], k_desc.layout)
            v_ring = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, PACK, HEAD_DIM], v_desc.layout)
        if HAS_LORA:
            lr_ring = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, R_PAD], lr_desc.layout)
            adapter = gl.load(AdapterIds + b).to(gl.int32)
        else:
            lr_ring = k_ring  # never read
            adapter = -1
        READY: gl.constexpr = 2 * STAGES if PRODUCER else STAGES  # (with the producer: V's, then K's)
        ready = gl.allocate_shared_memory(gl.int64, [READY, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(READY):
            mbarrier.init(ready.index(i), count=1)

        seq_len = gl.load(SeqLens + b).to(gl.int32)
        n_tiles = gl.cdiv(seq_len, BLOCK_N)
        if SPLIT or TAIL:  # flash-decoding: this program's share of the key tiles (maybe none)
            per = gl.cdiv(n_tiles, n_split)
            t_lo = gl.minimum(split * per, n_tiles)
            t_hi = gl.minimum(t_lo + per, n_tiles)
        else:
            t_lo = 0
            t_hi = n_tiles
        lr_len = gl.where(adapter >= 0, seq_len, 0)  # no L read (no table row) without adapter
        for i in gl.static_range(STAGES if not PRODUCER else 0):
            # The block ids a copy needs are loaded an iteration before the copy: loaded right
            # before it, their round trip would hold up every tile.
            blk, lr_blk = _tile_blocks_kv_lr(BlockTables, LrBlockTables, b, t_lo + i, seq_len, lr_len, stride_btb,
                                             stride_lbtb, BLOCK_N, BLOCK_SIZE, LR_BLOCK_SIZE, CHUNKS, ids,
                                             HAS_LORA, LR_SHARED_TABLE)
            if i < STAGES - 1:
                _copy_tile(k_desc, v_desc, lr_desc, k_ring, v_ring, lr_ring, ready, blk, lr_blk, b_idx, kvh,
                           t_lo + i, t_lo, t_hi, seq_len, adapter, HEAD_DIM, BLOCK_N, BLOCK_SIZE, LR_BLOCK_SIZE,
                           CHUNK, STAGES, HAS_LORA, False, PACK)
            else:
                next_block, next_lr_block = blk, lr_blk

        rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, io))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, io))
        head = kvh * GROUP + rows
        io_mask = (rows < GROUP)[:, None] & (cols < HEAD_DIM)[None, :]
        q = gl.load(Q + b * stride_qb + head[:, None] * stride_qh + cols[None, :], mask=io_mask, other=0.0)
        q = gl.convert_layout(q, a_op)
        if HAS_LORA:
            r_rows = gl.arange(0, R_PAD, layout=gl.SliceLayout(1, io))
            lora_b_head = LoraB + gl.maximum(adapter, 0).to(gl.int64) * stride_lba + kvh * stride_lbh  # B_a[kvh]
            b_ptrs = lora_b_head + r_rows[:, None] * stride_lbr + cols[None, :]
            b_mask = (r_rows < RANK)[:, None] & (cols < HEAD_DIM)[None, :] & (adapter >= 0)

        m_i = gl.full([ROWS], -1.0e38, gl.float32, gl.SliceLayout(1, mma))
        l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, mma))
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, mma)
        acc_lr = gl.zeros([ROWS, R_PAD], gl.float32, mma)  # P·L (Flash-LoRA only)
        if PRODUCER:
            # One warp issues every copy; the copies' own barriers (Triton's, one before each
            # copy) then hold up only that warp, not the math. Its slots come back through
            # `empty`, one arrival a tile.
            empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(STAGES):
                mbarrier.init(empty.index(i), count=1)
            if B_TMA:
                b_smem = gl.allocate_shared_memory(dtype, [1, R_PAD, HEAD_DIM], b_desc.layout)
                b_ready = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
                mbarrier.init(b_ready.index(0), count=1)
                b_row = gl.maximum(adapter, 0) * num_kv_heads + kvh
            else:
                b_smem, b_ready, b_row = k_ring, ready, 0  # never read
            acc, acc_lr, m_i, l_i = gl.warp_specialize(
                [(_ring_consumer, (q, k_ring, v_ring, lr_ring, ready, empty, t_lo, t_hi, seq_len, qk_scale, acc,
                                   acc_lr, m_i, l_i, dtype, ROWS, HEAD_DIM, BLOCK_N, CHUNK, STAGES, WARPS,
                                   HAS_LORA, R_PAD, PACK, HEAD_GROUP)),
                 (_ring_loader, (k_desc, v_desc, lr_desc, b_desc, k_ring, v_ring, lr_ring, b_smem, ready, empty,
                                 b_ready, BlockTables, LrBlockTables, b, kvh, b_row, t_lo, t_hi, seq_len, lr_len,
                                 adapter, stride_btb, stride_lbtb, HEAD_DIM, BLOCK_N, BLOCK_SIZE, LR_BLOCK_SIZE,
                                 CHUNK, STAGES, HAS_LORA, LR_SHARED_TABLE, B_TMA, PACK))],
                [1], [PRODUCER_REGS])
            for i in gl.static_range(STAGES):
                mbarrier.invalidate(empty.index(i))
        else:
            for i in range(t_hi - t_lo):
                t = t_lo + i
                # Every warp is done with the slot of tile t - 1 before its next copy overwrites it.
                _cta_barrier()
                _copy_tile(k_desc, v_desc, lr_desc, k_ring, v_ring, lr_ring, ready, next_block, next_lr_block,
                           b_idx, kvh, t + STAGES - 1, t_lo, t_hi, seq_len, adapter, HEAD_DIM, BLOCK_N, BLOCK_SIZE,
                           LR_BLOCK_SIZE, CHUNK, STAGES, HAS_LORA, False, PACK)
                next_block, next_lr_block = _tile_blocks_kv_lr(
                    BlockTables, LrBlockTables, b, t + STAGES, seq_len, lr_len, stride_btb, stride_lbtb, BLOCK_N,
                    BLOCK_SIZE, LR_BLOCK_SIZE, CHUNKS, ids, HAS_LORA, LR_SHARED_TABLE)
                slot = i % STAGES
                mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
                acc, acc_lr, m_i, l_i = _attend_tile(q, k_ring, v_ring, lr_ring, ready, ready, slot, 0, t, seq_len,
                                                     qk_scale, acc, acc_lr, m_i, l_i, dtype, ROWS, HEAD_DIM, BLOCK_N,
                                                     CHUNK, WARPS, HAS_LORA, R_PAD, False, PACK, HEAD_GROUP)
        for i in gl.static_range(READY):
            mbarrier.invalidate(ready.index(i))
        if PDL:  # only the epilogue left: the next kernel may take this program's place (_pdl)
            gdc_launch_dependents()
        if HAS_LORA:
            # (P·L)·B_a once (linear: a split's partial may hold its share of it). Without
            # adapter the L slots were never written: zero what came of them.
            acc_lr = gl.where(adapter >= 0, acc_lr, 0.0)
            # B_a after the loop, not before it as `_attn_fwd` does: held through the loop it
            # slowed every shape (H200, Run S: 16 × 4K r = 8 69.7 / 70.6 us with it, against
            # 67.3 / 67.7 for r = 64 without it) and spilled at r = 64.
            if B_TMA:  # the producer warp copied it at the start (nothing without adapter)
                mbarrier.wait(b_ready.index(0), 0, pred=adapter >= 0)
                mbarrier.invalidate(b_ready.index(0))
                lora_b = b_smem.reshape([R_PAD, HEAD_DIM]).load(b_op)
                lora_b = gl.where(adapter >= 0, lora_b, gl.zeros_like(lora_b))  # unwritten: maybe NaN
                acc = mma_v2(gl.convert_layout(acc_lr.to(dtype), a_op), lora_b, acc)
            elif R_PAD >= 16:
                lora_b = gl.load(b_ptrs, mask=b_mask, other=0.0)
                acc = mma_v2(gl.convert_layout(acc_lr.to(dtype), a_op), gl.convert_layout(lora_b, b_op), acc)
            else:  # 8 columns, under the MMA's K: 8 rank-1 updates, once
                lr_col = gl.arange(0, R_PAD, layout=gl.SliceLayout(0, mma))
                d_col = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, mma))
                for j in gl.static_range(R_PAD):
                    b_row = gl.load(lora_b_head + j * stride_lbr + d_col, mask=(adapter >= 0) & (j < RANK),
                                    other=0.0)
                    a_col = gl.sum(gl.where(lr_col[None, :] == j, acc_lr, 0.0), axis=1)
                    acc += a_col[:, None] * b_row.to(gl.float32)[None, :]
        if TAIL:
            if n_split > 1:
                _split_partial(WsM, WsL, WsAcc, Out, SplitCounters, m_i, l_i, acc, ws_item, b, kvh, split,
                               num_splits, stride_ob, stride_oh, GROUP, ROWS, HEAD_DIM, GROUP_P2, REDUCE_S, WARPS)
            else:
                _store_out(Out, acc, l_i, b, head, stride_ob, stride_oh, GROUP, ROWS, HEAD_DIM, WARPS)
        elif SPLIT:
            _split_partial(WsM, WsL, WsAcc, Out, SplitCounters, m_i, l_i, acc, ws_item, b, kvh, split, num_splits,
                           stride_ob, stride_oh, GROUP, ROWS, HEAD_DIM, GROUP_P2, REDUCE_S, WARPS)
        else:
            _store_out(Out, acc, l_i, b, head, stride_ob, stride_oh, GROUP, ROWS, HEAD_DIM, WARPS)

    @gluon.jit
    def _store_out(Out, acc, l_i, b, head, stride_ob, stride_oh, GROUP: gl.constexpr, ROWS: gl.constexpr,
                   HEAD_DIM: gl.constexpr, WARPS: gl.constexpr):
        """A whole program's output rows, acc / l (an empty sequence: acc is 0, and so is its output)."""
        io: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [1, WARPS], [1, 0])
        rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, io))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, io))
        io_mask = (rows < GROUP)[:, None] & (cols < HEAD_DIM)[None, :]
        l_i = gl.where(l_i > 0, l_i, 1.0)
        o = gl.convert_layout((acc / l_i[:, None]).to(Out.dtype.element_ty), io)
        gl.store(Out + b * stride_ob + head[:, None] * stride_oh + cols[None, :], o, mask=io_mask)

    @gluon.jit
    def _split_partial(WsM, WsL, WsAcc, Out, SplitCounters, m_i, l_i, acc, ws_item, b, kvh, split, num_splits,
                       stride_ob, stride_oh, GROUP: gl.constexpr, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr,
                       GROUP_P2: gl.constexpr, REDUCE_S: gl.constexpr, WARPS: gl.constexpr):
        """A split's (max, sum, P·V) in `_attn_fwd`'s workspace layout, as partial `split` of item
        `ws_item` (GROUP × num_splits rows an item); the last split of the item to arrive
        combines them all (no second launch), its arrival counter the item's. The barrier orders
        every thread's partial stores before the one release of the arrival atomic."""
        io: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [1, WARPS], [1, 0])
        rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, io))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, io))
        io_mask = (rows < GROUP)[:, None] & (cols < HEAD_DIM)[None, :]
        ws_row = (ws_item.to(gl.int64) * GROUP + rows) * num_splits + split
        gl.store(WsM + ws_row, gl.convert_layout(m_i, gl.SliceLayout(1, io)), mask=rows < GROUP)
        gl.store(WsL + ws_row, gl.convert_layout(l_i, gl.SliceLayout(1, io)), mask=rows < GROUP)
        gl.store(WsAcc + ws_row[:, None] * HEAD_DIM + cols[None, :], gl.convert_layout(acc, io), mask=io_mask)
        _cta_barrier()
        counter = SplitCounters + ws_item
        arrived = gl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == num_splits - 1:
            gl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # ready for the next launch
            _combine_splits(WsM, WsL, WsAcc, Out, ws_item, b, kvh, num_splits, stride_ob, stride_oh,
                            GROUP, HEAD_DIM, GROUP_P2, REDUCE_S, WARPS)


def available() -> bool:
    """Whether this Triton has Gluon (the kernel's dialect)."""
    return gluon is not None


@functools.lru_cache(maxsize=None)
def producer_available() -> bool:
    """Whether this Triton's Gluon has warp specialisation in the form the producer warp is
    written for, ``warp_specialize(functions_and_args, worker_num_warps, worker_num_regs)``
    (Triton 3.6 to 3.9; older ones spelled it otherwise)."""
    ws = getattr(gl, "warp_specialize", None) if gluon is not None else None
    if ws is None:
        return False
    try:
        return list(inspect.signature(ws).parameters)[:3] == ["functions_and_args", "worker_num_warps",
                                                             "worker_num_regs"]
    except (TypeError, ValueError):  # pragma: no cover - a builtin without a signature
        return False


def lora_pad(rank: int) -> int:
    """Columns of the kernel's L tiles and P·L accumulator: a power of two >= 16 (the MMA's K
    for (P·L)·B), but 8 at r = 8, whose (P·L)·B then goes by 8 rank-1 updates: L's 16-byte rows
    copied 16 columns wide (half of them the copy's zero fill) cost more than the updates
    (H200, same run, us, Flash-LoRA r = 8, 8 vs 16 columns: blocks of 128, 16 × 4K 66.4 / 66.5
    vs 67.0 / 66.7, 16 × 32K 481.4 / 482.7 vs 485.9 / 485.3, 64 × 32K 1868.5 / 1868.7 vs
    1887.3 / 1887.2; blocks of 64, 16 × 4K 67.9 / 68.0 vs 69.2 / 69.3, split 8 × 4K 39.8 / 39.8
    vs 41.0 / 41.2, 1 × 32K 39.0 / 39.4 vs 39.9 / 40.5; bench/RESULTS.md Run U). 16, not
    `_attn_fwd`'s 32, at r = 9-16: Run S, r = 8 then, 16 × 4K 68.1 / 68.1 us against 70.1 / 70.2
    at 32, 16 × 32K 494.5 / 493.6 vs 502.6 / 502.3."""
    return 8 if rank == 8 else max(16, 1 << (rank - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _smem_layout(block_n: int, head_dim: int, dtype: torch.dtype, pack: int = 1):
    box = [1, block_n, head_dim] if pack == 1 else [1, block_n, pack, head_dim]
    return gl.NVMMASharedLayout.get_default_for(box, _GL_DTYPES[dtype])


_GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16} if gluon is not None else {}


def _descriptor(cache: torch.Tensor, rows: int, width: int):
    """A descriptor over a paged cache seen as ``[blocks, block_size, rest]`` (K/V: rest = Hkv × D;
    L: rest = r), copying ``[1, rows, width]`` boxes (columns past r, and rows outside the block,
    arrive as zeros)."""
    nb, bs = cache.shape[:2]
    rest = math.prod(cache.shape[2:])
    return descriptor(GluonDescriptor, cache, (nb, bs, rest), (bs * rest, rest, 1), (1, rows, width),
                      _smem_layout(rows, width, cache.dtype))


def _head_descriptor(cache: torch.Tensor, rows: int, pack: int):
    """A descriptor over a paged K/V cache ``[blocks, block_size, Hkv, D]`` copying ``[1, rows,
    pack, D]`` boxes: `rows` keys of `pack` KV heads each, key-major as the cache holds them."""
    nb, bs, hkv, d = cache.shape
    return descriptor(GluonDescriptor, cache, (nb, bs, hkv, d), (bs * hkv * d, hkv * d, d, 1), (1, rows, pack, d),
                      _smem_layout(rows, d, cache.dtype, pack))


def ring_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                seq_lens: torch.Tensor, qk_scale_log2: float, out: torch.Tensor, *, block_n: int,
                stages: int, lr_cache: torch.Tensor | None = None, lr_block_tables: torch.Tensor | None = None,
                lora_b: torch.Tensor | None = None, adapter_ids: torch.Tensor | None = None,
                lr_shared_table: bool = False, num_splits: int = 1,
                workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                counters: torch.Tensor | None = None, reduce_splits: int = 1,
                producer: bool = False, pack: int = 1, full_items: int | None = None,
                pdl: bool = False) -> torch.Tensor:
    """Paged decode into `out` (``[batch, Hq, D]``), one program per sequence × KV head (× split);
    with `lr_cache` (and its table, `lora_b`, `adapter_ids`), Flash-LoRA decode.

    Inputs are `paged_attention_decode`'s (`flash_lora_decode`'s), already validated, and what
    `_launch_plan` checked before choosing this kernel: a CUDA device of compute capability 9,
    dense row-major fp16 or bf16 caches (descriptor-addressable, 16-byte aligned) whose blocks
    hold whole `block_n`-key tiles or divide them (the low-rank cache's blocks split tiles as
    the K/V blocks do, or it is paged by the K/V table: `lr_shared_table`), a GQA group of at
    most 16, q, out and B with a unit-stride last dim, tables with unit-stride rows, rows of r
    that a descriptor can copy (16-byte pitch).
    `qk_scale_log2` is the softmax scale times log2(e). With `num_splits` > 1 the key tiles of a
    sequence are split over that many programs (flash-decoding), whose partials go to
    `workspace` (fp32 ``(max [batch·Hq·splits], sum [same], P·V [same × D])``, `_attn_fwd`'s
    layout) and are combined, `reduce_splits` a pass, by the last of them to finish, counted in
    `counters` (int32, at least batch × Hkv, zero, and left zero). With `producer`, one warp
    of its own issues the copies (warp specialisation) and the four math warps only wait for
    them: for tiles of many copies (blocks of 16 or 32 keys), each of which Triton issues behind
    a barrier of the warps that issue it. Such a program takes every register of an SM.
    With `pack` > 1 (paged decode only, a GQA group times `pack` of at most 16, `pack` dividing
    Hkv) one program reads `pack` KV heads: a copy brings a cache block's keys of all of them
    (`pack` times fewer, larger copies), each query row masked to its own head's keys; tiles
    are `block_n` keys of every head of the pack, and the grid has Hkv / `pack` programs a
    sequence (× split).
    With `full_items` (a split launch over several waves, see `kernels.attention._tail_split`),
    the grid is one-dimensional over items (sequence × KV head, or pack): the first
    `full_items` programs take one item each, whole, and the remaining items are split in
    `num_splits` each, their partials in `workspace` and `counters` counted from item
    `full_items` on (fp32 rows: remaining items × query heads an item × splits).
    With `pdl` the launch is a programmatic dependent one (`kernels._pdl`: a device of compute
    capability 9 and a Triton with grid dependency control)."""
    batch, hq, d = q.shape
    hkv = k_cache.shape[2]
    chunk = min(block_n, k_cache.shape[1])  # keys a copy: a tile, or a block of it
    if pack > 1:
        if lr_cache is not None or hkv % pack or hq // hkv * pack > _ROWS:
            raise ValueError(f"pack={pack} needs paged decode without Flash-LoRA, Hkv ({hkv}) a multiple of "
                             f"it and a GQA group ({hq // hkv}) times it of at most {_ROWS}")
        k_desc, v_desc = _head_descriptor(k_cache, chunk, pack), _head_descriptor(v_cache, chunk, pack)
    else:
        k_desc, v_desc = _descriptor(k_cache, chunk, d), _descriptor(v_cache, chunk, d)
    lora = lr_cache is not None
    if lora:
        rank, lr_bs = lr_cache.shape[2], lr_cache.shape[1]
        r_pad = lora_pad(rank)
        lr_desc, lbt, lb, aid = _descriptor(lr_cache, chunk, r_pad), lr_block_tables, lora_b, adapter_ids
        lb_strides = lora_b.stride()[:3]
    else:
        lr_desc, lbt, lb, aid = k_desc, block_tables, q, seq_lens  # never read
        lb_strides, rank, lr_bs, r_pad = (0, 0, 0), 1, k_cache.shape[1], 32
    # B_a[kvh] by a TMA copy the producer warp issues first: B dense [adapters, Hkv, r, D]
    b_tma = (producer and lora and r_pad >= 16 and lora_b.is_contiguous() and lora_b.data_ptr() % 16 == 0
             and rank * d * lora_b.element_size() % 16 == 0)
    b_desc = _descriptor(lora_b.view(-1, rank, d), r_pad, d) if b_tma else k_desc  # (else never read)
    split = num_splits > 1
    tail = full_items is not None
    if tail and not split:
        raise ValueError("full_items needs num_splits > 1")
    if split:
        ws_m, ws_l, ws_acc = workspace
    else:
        ws_m = ws_l = ws_acc = counters = out  # never read
    group = hq // hkv * pack  # query heads a program
    hkv //= pack  # programs a sequence (× split)
    meta = dict(
        GROUP=group, HEAD_DIM=d, BLOCK_N=block_n, BLOCK_SIZE=k_cache.shape[1], STAGES=stages,
        ROWS=_ROWS, WARPS=_WARPS, HAS_LORA=lora, RANK=rank, R_PAD=r_pad, LR_BLOCK_SIZE=lr_bs,
        # (SPLIT off in a split last wave: its partials are TAIL's code, for its split items only)
        LR_SHARED_TABLE=lora and lr_shared_table, CHUNK=chunk, SPLIT=split and not tail,
        GROUP_P2=1 << (group - 1).bit_length() if split else 1, REDUCE_S=reduce_splits if split else 1,
        PRODUCER=producer, PRODUCER_REGS=_PRODUCER_WARP_REGS, B_TMA=b_tma, PACK=pack, TAIL=tail,
        PDL=pdl, num_warps=_WARPS)
    if pdl:
        meta["launch_pdl"] = True
    if tail:
        grid = (full_items + (batch * hkv - full_items) * num_splits, 1)
    else:
        grid = (hkv * num_splits, batch)
    launch(_ring_decode_kernel, grid,
           (q, k_desc, v_desc, lr_desc, b_desc, block_tables, lbt, lb, aid, seq_lens,
            out, ws_m, ws_l, ws_acc, counters, qk_scale_log2, num_splits, full_items or 0, hkv,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
            lbt.stride(0), *lb_strides), meta)
    return out
