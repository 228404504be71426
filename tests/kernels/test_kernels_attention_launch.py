"""The attention kernels' launch path: cached launch plans, the one split-KV workspace, and the
host checks that must still reject bad input before anything is launched or written.

A launch plan (grid, splits, strides, constexprs) is cached per `_LaunchKey`; these tests change
one key component at a time on fresh random inputs, NaN-poisoned outputs, against the float64
references, so a component missing from the key would serve a stale plan (wrong strides, grid
or constexprs) and show up as a wrong or unwritten output.
"""
from __future__ import annotations

import math

import pytest
import torch

from kernels import attention as A
from kernels.attention import flash_lora_decode, paged_attention_decode, paged_attention_prefill
from kernels.attention_ref import (flash_lora_decode_ref, paged_attention_decode_ref,
                                   paged_attention_prefill_ref, s2_attention_decode_ref,
                                   s2_attention_prefill_ref)
from kernels.s2 import S2Pattern, s2_attention_decode, s2_attention_prefill

TOL = {torch.bfloat16: 1.5e-2, torch.float16: 5e-3, torch.float32: 1e-4}
if torch.cuda.is_available():  # fp32 dots run on TF32 tensor cores on the GPU
    TOL[torch.float32] = 5e-3


def check(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert not out.isnan().any(), "some output element was never written"
    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err < TOL[out.dtype], err


def poisoned_like(q: torch.Tensor) -> torch.Tensor:
    return torch.full_like(q, float("nan"))


def make_paged(lens, hkv, d, bs, dtype, device, *, width=None):
    """Random paged K/V, blocks scattered at random, NaN in every slot no sequence owns; the
    table is `width` wide (default: just enough) with far-out-of-range ids past each sequence."""
    need = [-(-n // bs) for n in lens]
    width = max(need + [1]) if width is None else width
    num_blocks = sum(need) + 2
    k = torch.full((num_blocks, bs, hkv, d), float("nan"), dtype=dtype, device=device)
    v = torch.full_like(k, float("nan"))
    perm = torch.randperm(num_blocks, device=device).int()
    table = torch.full((len(lens), width), 10**6, dtype=torch.int32, device=device)
    used = 0
    for b, n in enumerate(lens):
        table[b, :need[b]] = perm[used:used + need[b]]
        used += need[b]
        for i, blk in enumerate(table[b, :need[b]].tolist()):
            m = min(bs, n - i * bs)
            k[blk, :m] = torch.randn(m, hkv, d, device=device).to(dtype)
            v[blk, :m] = torch.randn(m, hkv, d, device=device).to(dtype)
    return k, v, table, torch.tensor(lens, dtype=torch.int32, device=device)


def decode_case(device, *, lens=(37, 5, 50), hq=4, hkv=2, d=32, bs=16, dtype=torch.float32,
                width=None, q_stride_pad=0):
    k, v, table, seq_lens = make_paged(list(lens), hkv, d, bs, dtype, device, width=width)
    q = torch.randn(len(lens), hq, d + q_stride_pad, device=device).to(dtype)[..., :d]
    return q, k, v, table, seq_lens


def run_decode(q, k, v, table, seq_lens, *, out=None, num_splits=None):
    out = poisoned_like(q) if out is None else out
    res = paged_attention_decode(q, k, v, table, seq_lens, 0.3, out=out, num_splits=num_splits)
    assert res is out
    check(out, paged_attention_decode_ref(q, k, v, table, seq_lens, 0.3))
    return out


@pytest.fixture
def plan_misses():
    """The number of launch plans computed since the test began (from an empty cache), as a
    function."""
    A._launch_plan.cache_clear()
    return lambda: A._launch_plan.cache_info().misses


# ---------------------------------------------------------------- the plan cache
def test_repeated_call_reuses_its_plan(device, rng_seed, plan_misses):
    """A second call with the same shapes computes no configuration: it validates and launches.
    New values in tensors of the same shapes (fresh data, other lengths) are the same key."""
    run_decode(*decode_case(device, lens=(29, 41)))
    q, k, v, table, seq_lens = decode_case(device, lens=(29, 41))
    run_decode(q, k, v, table, seq_lens)
    run_decode(q, k, v, table, torch.tensor([3, 17], dtype=torch.int32, device=device))
    assert plan_misses() == 1
    assert A._launch_plan.cache_info().hits == 2


def test_swapped_tuning_function_is_not_served_a_stale_plan(device, rng_seed, plan_misses,
                                                            monkeypatch):
    """bench/tune_attention.py swaps `_config` / `_default_splits` to sweep configurations: a
    plan cached before the swap must not answer for the swapped function."""
    case = decode_case(device, lens=(70, 33))
    run_decode(*case)
    asked = []

    def three_splits(*args):
        asked.append(args)
        return 3

    monkeypatch.setattr(A, "_default_splits", three_splits)
    run_decode(*case)
    assert len(asked) == 1 and plan_misses() == 2
    monkeypatch.undo()
    run_decode(*case)  # the original function's plan again, still cached
    assert plan_misses() == 2


@pytest.mark.parametrize("batch, hkv, ctx, block_n, per_sm, want", [
    (16, 8, 4096, 64, 2, 2),      # 128 programs on 132 SMs: ~2 per SM
    (1, 8, 32768, 128, 2, 32),    # 264 // 8 = 33, rounded down to a power of two
    (4, 8, 8192, 128, 2, 8),
    (1, 8, 4096, 128, 2, 32),     # one tile a split
    (1, 8, 1024, 128, 2, 8),      # capped: at least one tile a split
    (12, 8, 2048, 64, 3, 4),      # three resident programs an SM: 396 // 96
    (64, 8, 4096, 64, 2, 1),      # the batch fills the GPU twice over: no split
    (1, 1, 100, 64, 2, 1),        # too few tiles to split
])
def test_default_splits_fill_the_resident_programs(monkeypatch, batch, hkv, ctx, block_n, per_sm, want):
    monkeypatch.setattr(A, "interpreter_on", lambda: False)
    monkeypatch.setattr(A, "_num_sms", lambda device: 132)
    got = A._default_splits(batch, hkv, ctx, block_n, torch.device("cpu"), per_sm)
    assert got == want and got & (got - 1) == 0


@pytest.mark.parametrize("batch, hkv, ctx, block_n, per_sm, want", [
    (8, 8, 32768, 64, 3, 6),      # 396 // 64: S2's decode at b = 8
    (12, 8, 2048, 64, 3, 4),      # 396 // 96 = 4 either way
    (1, 8, 1024, 128, 2, 8),      # still at least one tile a split
    (64, 8, 4096, 64, 2, 1),
])
def test_default_splits_unrounded(monkeypatch, batch, hkv, ctx, block_n, per_sm, want):
    """`pow2=False` (S2's sparse runs) fills the slots with any split count."""
    monkeypatch.setattr(A, "interpreter_on", lambda: False)
    monkeypatch.setattr(A, "_num_sms", lambda device: 132)
    assert A._default_splits(batch, hkv, ctx, block_n, torch.device("cpu"), per_sm, False) == want


def gpu_decode_plan(monkeypatch, batch: int, ctx: int, *, bs: int = 16, lora: bool = False,
                    num_blocks: int | None = None, lr_blocks: int | None = None, rank: int = 16,
                    hkv: int = 8, lr_bs: int | None = None, hq: int = 32, dtype=torch.bfloat16):
    """The plan of a GPU decode launch read off shapes alone (meta tensors: a plan never reads
    values): interpreter off, the H200's 132 SMs; Hq `hq`, Hkv `hkv`, D 128, `dtype`; Flash-LoRA at
    r `rank` with the low-rank cache paged by the K/V table (or by its own, in blocks of `lr_bs`).
    Caches of `num_blocks` / `lr_blocks` blocks (default: just enough)."""
    monkeypatch.setattr(A, "interpreter_on", lambda: False)
    monkeypatch.setattr(A, "_num_sms", lambda device: 132)
    A._launch_plan.cache_clear()
    d = 128
    nblk = ctx // bs
    meta = dict(dtype=dtype, device="meta")
    q = torch.empty(batch, hq, d, **meta)
    k = torch.empty(num_blocks or batch * nblk, bs, hkv, d, **meta)
    bt = torch.empty(batch, nblk, dtype=torch.int32, device="meta")
    lbs = lr_bs or bs
    lbt = bt if lr_bs is None else torch.empty(batch, ctx // lbs, dtype=torch.int32, device="meta")
    lr = A._Lora(torch.empty(lr_blocks or batch * (ctx // lbs), lbs, rank, **meta), lbt, torch.empty(2, hkv, rank, d, **meta),
                 torch.empty(batch, dtype=torch.int32, device="meta")) if lora else None
    key = A._launch_key(q, k, k, q, paged=True, decode=True, batch=batch, block_tables=bt,
                        lora=lr, s2=None, max_seqlen_q=None, num_splits=None)
    plan = A._launch_plan(key)
    A._launch_plan.cache_clear()
    return plan


@pytest.mark.parametrize("batch, ctx, lora, block_n, splits", [
    (16, 4096, False, 128, 2),    # splitting: wide tiles, 256 programs of 264 slots
    (8, 4096, False, 128, 4),
    (1, 4096, False, 128, 32),    # one 128-key tile a split (narrow: 256 of 396 slots)
    (48, 4096, False, 64, 1),     # 384 programs: no split, short tiles
    (16, 2048, False, 128, 2),
    (1, 32768, False, 128, 32),
    (12, 2048, False, 64, 4),     # wide: 2 splits fill 192 of 264; narrow: 4 fill 384 of 396
    (1, 1024, False, 64, 16),     # wide: 8 one-tile splits fill 64 of 264; narrow 128 of 396
    (99, 1024, False, 64, 1),     # unsplit: the short-context tiles (two whole waves at 3 an SM)
    (64, 16384, False, 128, 1),   # unsplit, long context
    (12, 16384, False, 64, 4),    # long context, but 2 wide splits leave a quarter idle
    (4, 8192, False, 128, 8),
    (12, 2048, True, 128, 2),     # Flash-LoRA keeps wide tiles (see _config)
])
def test_split_decode_picks_tile_width_by_slot_fill(monkeypatch, batch, ctx, lora, block_n, splits):
    """Which tile width and split count a GPU decode launch gets at blocks of 16 (see
    gpu_decode_plan)."""
    plan = gpu_decode_plan(monkeypatch, batch, ctx, lora=lora)
    assert plan.meta["BLOCK_N"] == block_n and plan.meta["TMA"] is False
    assert plan.grid == (1, 8 * splits, batch) and plan.meta["SPLIT"] == (splits > 1)


@pytest.fixture
def tma_device(monkeypatch):
    """A device that has TMA (`_tma_loads` keeps its own tile rule, without asking a GPU) and the
    shared memory of the one-program-an-SM variant (`_tma_single`)."""
    monkeypatch.setattr(A, "_has_tma", lambda device: True)
    monkeypatch.setattr(A, "_tma_single", lambda device: True)


@pytest.mark.parametrize("batch, ctx, bs, lora, tma, block_n, splits, rank, single", [
    (1, 4096, 128, False, True, 128, 32, 16, False),     # paged: full-width TMA tiles whatever the batch
    (64, 4096, 128, False, True, 128, 1, 16, False),     # 512 programs: two waves either way, capped at 2
    (48, 4096, 128, False, True, 128, 1, 16, False),     # 384: one wave at 3 an SM, shifted tail
    (16, 32768, 128, False, True, 128, 1, 16, True),     # 128 programs: one an SM, unsplit
    (16, 4096, 128, False, True, 128, 1, 16, True),
    (8, 4096, 128, False, True, 128, 4, 16, False),      # split at one an SM too: 2 an SM
    (1, 32768, 128, False, True, 128, 32, 16, False),
    (9, 4096, 128, False, True, 128, 1, 16, True),       # 72 programs: 2 splits at 2 an SM
    (8, 2048, 128, False, True, 128, 4, 16, False),
    (17, 4096, 128, False, True, 128, 1, 16, False),     # 136 programs: more than one an SM fits
    (1, 4096, 16, False, False, 128, 32, 16, False),     # blocks of 16 hold no 128-key tile: per-thread loads
    (1, 4096, 128, True, True, 128, 32, 16, False),      # Flash-LoRA: full-width TMA tiles over short runs
    (16, 4096, 128, True, True, 128, 1, 16, True),       # one an SM: unsplit, 4096 keys a program
    (12, 4096, 128, True, True, 128, 1, 64, True),
    (12, 16384, 128, True, True, 128, 1, 16, True),      # 16K keys a program: TMA at one an SM only
    (8, 4096, 128, True, True, 128, 4, 16, False),       # Flash-LoRA splits at 2 an SM
    (1, 32768, 128, True, True, 128, 32, 16, False),
    (64, 4096, 128, True, True, 128, 1, 16, False),      # 4096 keys a program: still short
    (16, 32768, 128, True, False, 128, 2, 16, False),    # 16K keys a program: wide per-thread tiles
    (1, 4096, 64, True, True, 64, 32, 16, False),        # blocks of 64 hold a half-width tile
    (1, 4096, 64, False, True, 64, 32, 16, False),       # ... paged decode's too
    (8, 4096, 64, False, True, 64, 4, 16, False),        # half-width tiles (16 KB): the masked tail
    (1, 4096, 128, True, True, 128, 32, 64, False),      # r 64: the widest L tiles of full-width ones
    (1, 4096, 128, True, True, 64, 32, 128, False),      # r 128: L tiles too wide for full-width ones
])
def test_decode_takes_tma_where_tiles_fit_blocks(monkeypatch, tma_device, batch, ctx, bs, lora, tma, block_n, splits, rank,
                                                 single):
    """Which decode launches read K/V (and L) through TMA descriptors, with which tiles and splits,
    at one program an SM double-buffered or not, on a device that has TMA (see gpu_decode_plan)."""
    monkeypatch.setattr(A, "_residency_cap_smem", lambda device, per_sm: 1000 * per_sm + 7)
    plan = gpu_decode_plan(monkeypatch, batch, ctx, bs=bs, lora=lora, rank=rank)
    assert plan.meta["TMA"] is tma
    # The shifted tail wherever it is chosen on its own (Flash-LoRA, one an SM, an unsplit wave
    # at 3 an SM) and at full-width tiles everywhere else, capped at the residency the launch
    # was sized for (2 an SM at 128-key tiles).
    chosen = lora or single or (splits == 1 and batch * 8 <= 3 * 132)
    assert plan.meta["SHIFT_TAIL"] is (tma and (chosen or block_n == 128))
    assert plan.min_shared == (2007 if tma and not chosen and block_n == 128 else 0)
    assert plan.meta["BLOCK_N"] == block_n
    assert plan.grid == (1, 8 * splits, batch)
    assert (plan.meta["num_stages"] == A._SINGLE_STAGES) is single
    if tma:
        # Caches of more than 2^31 rows (an engine reserves its whole budget) keep TMA: the
        # descriptors are [blocks, block_size, ...], and only a dim reaches the kernel as int32.
        # 2^31 blocks would not fit one.
        rows = (1 << 31) // bs + 1
        assert gpu_decode_plan(monkeypatch, batch, ctx, bs=bs, lora=lora, rank=rank, num_blocks=rows).meta["TMA"] is True
        huge = 1 << 31
        assert gpu_decode_plan(monkeypatch, batch, ctx, bs=bs, lora=lora, rank=rank, num_blocks=huge).meta["TMA"] is False
        if lora:
            assert gpu_decode_plan(monkeypatch, batch, ctx, bs=bs, lora=lora, rank=rank, lr_blocks=rows).meta["TMA"] is True
            assert gpu_decode_plan(monkeypatch, batch, ctx, bs=bs, lora=lora, rank=rank, lr_blocks=huge).meta["TMA"] is False


@pytest.mark.parametrize("programs, per_sm, tiles, want", [
    # two an SM (`_attn_fwd`, 264 slots): sequences × 8 KV heads
    (544, 2, 32, (528, 9)),    # 68 × 8: two waves and 16 over, those in 9 splits (144 programs)
    (576, 2, 32, (528, 4)),    # 72
    (640, 2, 32, (528, 2)),    # 80: 112 over, 224 programs
    (672, 2, 32, None),        # 84: 144 over, more than half a wave: nothing it would gain
    (800, 2, 32, (792, 12)),   # 100
    (1064, 2, 32, (1056, 12)), # 133
    (528, 2, 32, None),        # whole waves
    (200, 2, 32, None),        # one wave
    (544, 2, 3, None),         # under two tiles a split
    (544, 2, 4, (528, 2)),     # ... at most 2 of them
    # one an SM (the ring kernel, 132 slots): packs of 2 KV heads, 4 a sequence
    (400, 1, 64, (396, 17)),   # 100 × 4: 4 over
    (336, 1, 64, (264, 5)),    # 84: 72 over, their splits over more than a wave
    (464, 1, 64, (396, 9)),    # 116: 68 over, over half a wave, but alone still slow
    (352, 1, 64, None),        # 88: 88 over, near a full wave's time already
])
def test_tail_split_rule(monkeypatch, programs, per_sm, tiles, want):
    """Which launches over several waves split their last (`_tail_split`, its `_wave_cost`
    model) on 132 SMs, and how; never interpreted."""
    monkeypatch.setattr(A, "interpreter_on", lambda: False)
    monkeypatch.setattr(A, "_num_sms", lambda device: 132)
    assert A._tail_split(programs, per_sm, tiles, None) == want
    if want is not None:  # it saves at least _TAIL_MIN_GAIN of a wave in the model
        slots = per_sm * 132
        full, splits = want
        cost = A._tail_cost(programs, slots, per_sm, full, splits)
        assert cost <= A._wave_cost(programs, slots, per_sm) - A._TAIL_MIN_GAIN
    monkeypatch.setattr(A, "interpreter_on", lambda: True)
    assert A._tail_split(programs, per_sm, tiles, None) is None


@pytest.mark.parametrize("bs, batch, rank, want", [
    (128, 68, 16, (528, 9)),   # 128-key tiles, 2 an SM: two waves and 16 programs over
    (128, 64, 16, None),       # whole waves
    (64, 64, 8, None),         # 64-key tiles at r <= 32: 4 an SM whole, 512 programs one wave
    (64, 56, 8, None),         # (at 3 an SM, its residency with the split path, 448 of 396)
    (64, 68, 8, (396, 2)),     # 544: one wave at 4 and 16 over; split, one wave at 3 kept
    (64, 100, 16, (792, 18)),  # 800: a wave and a half at 4
])
def test_flash_lora_decode_plan_splits_its_last_wave(monkeypatch, tma_device, bs, batch, rank, want):
    """Flash-LoRA decode by TMA over several waves splits its last as paged decode does, its
    launch kept whole costed at its own kernel's residency (4 an SM at 64-key tiles and r
    padded to at most 32), its split one at the split path's (3)."""
    monkeypatch.setattr(A, "_ring_device", lambda device: False)
    plan = gpu_decode_plan(monkeypatch, batch, 4096, bs=bs, lora=True, rank=rank)
    assert plan.ring is None and plan.meta["TMA"] and plan.meta["BLOCK_N"] == min(bs, 128)
    if want is None:
        assert not plan.meta["TAIL"] and plan.grid == (1, 8, batch)
    else:
        full, splits = want
        assert plan.meta["TAIL"] and plan.meta["FUSE_REDUCE"]
        assert plan.grid == (full + (batch * 8 - full) * splits, 1, 1) and plan.counters == batch * 8 - full
        assert plan.int_args[-10:-6] == (8, splits, 4, full)


@pytest.mark.parametrize("programs, want", [
    (512, None),        # one wave whole at 4 an SM
    (448, None),
    (544, (396, 2)),    # one wave at 4 and 16 over
    (800, (792, 18)),
    (1064, (792, 4)),
])
def test_tail_split_rule_with_its_own_residency_whole(monkeypatch, programs, want):
    """`whole_per_sm`: the launch kept whole costed at 4 programs an SM, the split one at 3
    (Flash-LoRA by TMA at 64-key tiles), on 132 SMs, 64 tiles a program."""
    monkeypatch.setattr(A, "interpreter_on", lambda: False)
    monkeypatch.setattr(A, "_num_sms", lambda device: 132)
    assert A._tail_split(programs, 3, 64, None, 4) == want
    if want is not None:  # in time (waves × slots), the split launch saves its margin (the
        full, splits = want  # fewest splits within 0.01 of the best taken)
        whole = A._wave_cost(programs, 4 * 132, 4) * 4 / 3
        assert A._tail_cost(programs, 3 * 132, 3, full, splits) <= whole - A._TAIL_MIN_GAIN + 0.01
    assert A._tail_split(programs, 3, 64, None, 3) == A._tail_split(programs, 3, 64, None)


def test_resident_programs_of_flash_lora_by_tma():
    assert A._resident_per_sm(64, 128, 32) == 4 and A._resident_per_sm(64, 128, 16) == 4
    assert A._resident_per_sm(64, 128, 64) == 3 == A._resident_per_sm(64, 128)  # wider P·L, paged
    assert A._resident_per_sm(128, 128, 32) == 2 == A._resident_per_sm(128, 128)


def test_wave_cost_model():
    """A full wave costs 1; a short last one more than its fill, less than a whole wave."""
    assert A._wave_cost(264, 264, 2) == 1 and A._wave_cost(528, 264, 2) == 2
    assert A._wave_cost(0, 132, 1) == 0
    for per_sm in (1, 2):
        slots = per_sm * 132
        for rest in (1, slots // 4, slots // 2):
            c = A._wave_cost(slots + rest, slots, per_sm) - 1
            assert rest / slots < c < 1


def test_decode_plan_splits_its_last_wave(monkeypatch, tma_device):
    """68 × 4K in blocks of 128 on 132 SMs (two an SM by TMA: 2 waves and 16 programs over):
    `_attn_fwd`'s TAIL over a one-dimensional grid, the workspace and counters of the 16
    split items only; not where the caller fixes the split count."""
    monkeypatch.setattr(A, "_residency_cap_smem", lambda device, per_sm: 1000 * per_sm + 7)
    plan = gpu_decode_plan(monkeypatch, 68, 4096, bs=128)
    assert plan.ring is None and plan.meta["TMA"] and plan.meta["TAIL"] and not plan.meta["SPLIT"]
    # the shifted tail, at the 2 an SM the tail split is sized for (see _residency_cap_smem)
    assert plan.meta["FUSE_REDUCE"] and plan.meta["SHIFT_TAIL"] and plan.min_shared == 2007
    full, splits = 528, 9
    assert plan.grid == (full + 16 * splits, 1, 1) and plan.counters == 16
    assert plan.ws_sizes[2] == 16 * 4 * splits * 128  # (items × query heads an item × splits) rows of D
    assert plan.int_args[-10:-6] == (8, splits, 4, full)  # (hkv, num_splits, group, full_items; then S2's 6)
    monkeypatch.setattr(A, "_num_sms", lambda device: 132)
    A._launch_plan.cache_clear()
    meta = dict(dtype=torch.bfloat16, device="meta")
    q, k = torch.empty(68, 32, 128, **meta), torch.empty(68 * 32, 128, 8, 128, **meta)
    bt = torch.empty(68, 32, dtype=torch.int32, device="meta")
    key = A._launch_key(q, k, k, q, paged=True, decode=True, batch=68, block_tables=bt, lora=None, s2=None,
                        max_seqlen_q=None, num_splits=1)
    plan = A._launch_plan(key)
    assert not plan.meta["TAIL"] and plan.grid == (1, 8, 68) and plan.ws_total == 0
    A._launch_plan.cache_clear()


def test_single_program_boundaries(monkeypatch, tma_device):
    """Where decode switches to one program an SM, double-buffered: unsplit launches of more than
    half and at most one program an SM (Hkv 4: 33 sequences make 132 programs, 16 make 64), over
    at least 16 tiles a program, of at most 32 query rows a program, over half-precision caches,
    on a device whose programs may take its shared memory; Flash-LoRA over runs of up to 16K keys."""
    def single(batch, ctx, **kw):
        plan = gpu_decode_plan(monkeypatch, batch, ctx, bs=128, hkv=4, **kw)
        assert plan.meta["TMA"]
        return plan.meta["num_stages"] == A._SINGLE_STAGES and plan.meta["SHIFT_TAIL"]
    assert single(33, 4096) and not single(34, 4096)
    assert single(17, 4096) and not single(16, 4096)
    assert single(33, 2048) and not single(33, 1920)  # 16 and 15 tiles
    assert single(33, 4096, lora=True) and not single(16, 4096, lora=True)
    assert single(33, 16384, lora=True)  # Flash-LoRA over up to 16K keys; past them per-thread tiles:
    assert not gpu_decode_plan(monkeypatch, 33, 16384 + 128, bs=128, hkv=4, lora=True).meta["TMA"]
    # GQA groups of 32 query heads (32 rows a program) and no wider: 64 rows would not fit the
    # shared memory with Flash-LoRA's buffers
    for lora in (False, True):
        assert single(33, 4096, hq=128, lora=lora) and not single(33, 4096, hq=256, lora=lora)
        # and half-precision caches: fp32 tiles are twice the bytes
        assert single(33, 4096, lora=lora, dtype=torch.float16) and not single(33, 4096, lora=lora, dtype=torch.float32)
    monkeypatch.setattr(A, "_tma_single", lambda device: False)
    assert not single(33, 4096) and not single(33, 4096, lora=True)


def test_tma_tail_and_tile_boundaries(monkeypatch, tma_device):
    """Where the plan's TMA choices switch: paged decode's shifted tail at 3 programs an SM up to
    exactly one wave of them (unsplit; Hkv 4 so that 396 programs are reachable), capped at 2
    past it, and Flash-LoRA's half-width tiles when its own low-rank table's blocks hold half a
    wide tile but not a whole one."""
    monkeypatch.setattr(A, "_residency_cap_smem", lambda device, per_sm: 1000 * per_sm + 7)
    for batch, cap in ((99, 0), (100, 2007)):  # 396 and 400 programs, 132 SMs
        plan = gpu_decode_plan(monkeypatch, batch, 4096, bs=128, hkv=4)
        assert plan.meta["TMA"] and not plan.meta["SPLIT"] and plan.meta["SHIFT_TAIL"]
        assert plan.min_shared == cap
    for lr_bs, block_n, tma in ((64, 64, True), (256, 128, True), (32, 128, False)):  # (per-thread: wide)
        plan = gpu_decode_plan(monkeypatch, 1, 4096, bs=128, lora=True, lr_bs=lr_bs)
        assert plan.meta["BLOCK_N"] == block_n and plan.meta["TMA"] is tma, lr_bs
        assert plan.meta["LR_SHARED_TABLE"] is False


# Each variation changes one thing the plan is computed from, relative to decode_case()'s defaults.
DECODE_VARIATIONS = {
    "base": {},
    "table width": dict(width=9),
    "table width again": dict(width=12),
    "head dim": dict(d=64),
    "block size": dict(bs=32),
    "batch": dict(lens=(37, 5, 50, 1, 23)),
    "gqa group": dict(hq=8),
    "kv heads": dict(hq=6, hkv=3),
    "dtype": dict(dtype=torch.bfloat16),
    "q strides": dict(q_stride_pad=16),
}


def test_changing_any_key_component_gives_a_fresh_plan(device, rng_seed, plan_misses):
    """Alternating configurations (each one's plan cached by then) stay right: a stale plan would
    carry the wrong table stride, head dim, block size, grid or strides."""
    names = list(DECODE_VARIATIONS)
    for name in names + names[::-1]:
        run_decode(*decode_case(device, **DECODE_VARIATIONS[name]))
    # A fresh plan per configuration, the dtype's too (its element size bounds which tiles fit
    # a GPU's shared memory); the second pass is all cache hits.
    assert plan_misses() == len(names)


def test_out_strides_and_split_counts_key_the_plan(device, rng_seed, plan_misses):
    q, k, v, table, seq_lens = decode_case(device, lens=(70, 9, 33))
    wide = torch.full((q.shape[0], q.shape[1] + 3, q.shape[2] + 8), float("nan"), device=device,
                      dtype=q.dtype)
    for splits in (None, 3, 5, 3, None):
        run_decode(q, k, v, table, seq_lens, num_splits=splits)
        out = run_decode(q, k, v, table, seq_lens, out=wide[:, 1:1 + q.shape[1], :q.shape[2]],
                         num_splits=splits)
        assert out.stride() != q.stride()
        outside = torch.ones_like(wide, dtype=torch.bool)
        outside[:, 1:1 + q.shape[1], :q.shape[2]] = False
        assert wide[outside].isnan().all(), "wrote outside the out view"
        wide.fill_(float("nan"))
    assert plan_misses() == 6  # 3 split settings × 2 out layouts


def test_prefill_keys_on_max_seqlen_q(device, rng_seed, plan_misses):
    """The query-tile count comes from max_seqlen_q: the same shapes with a longer run need more
    tiles (a stale plan would leave its last rows unwritten)."""
    hq, hkv, d, bs = 4, 2, 32, 16
    k, v, table, seq_lens = make_paged([40, 70], hkv, d, bs, torch.float32, device)
    # (11, 11) then (1, 21): same total_q, one query tile more (16 rows a tile in the interpreter).
    for runs in ((11, 11), (1, 21), (21, 1), (3, 30), (11, 11)):
        cq = torch.tensor([0, runs[0], sum(runs)], dtype=torch.int32, device=device)
        q = torch.randn(sum(runs), hq, d, device=device)
        for max_q in (max(runs), None):
            out = poisoned_like(q)
            paged_attention_prefill(q, k, v, table, cq, seq_lens, 0.3, out=out, max_seqlen_q=max_q)
            check(out, paged_attention_prefill_ref(q, k, v, table, cq, seq_lens, 0.3))
    assert plan_misses() == 3  # one per (total_q, longest run): given or synced, the same key


def test_flash_lora_keys_on_rank_and_tables(device, rng_seed, plan_misses):
    hq, hkv, d, bs, lens = 4, 2, 32, 16, [37, 20]
    k, v, table, seq_lens = make_paged(lens, hkv, d, bs, torch.float32, device)
    aid = torch.tensor([1, -1], dtype=torch.int32, device=device)
    q = torch.randn(len(lens), hq, d, device=device)
    for rank, lr_bs, lr_width in ((8, 16, 3), (24, 16, 3), (8, 8, 6), (8, 16, 7), (8, 16, 3)):
        need = [-(-n // lr_bs) for n in lens]
        lr = torch.randn(sum(need) + 1, lr_bs, rank, device=device)
        lbt = torch.full((len(lens), lr_width), 10**6, dtype=torch.int32, device=device)
        lbt[0, :need[0]] = torch.arange(need[0], dtype=torch.int32)
        lbt[1, :need[1]] = torch.arange(need[0], sum(need), dtype=torch.int32)
        lora_b = torch.randn(2, hkv, rank, d, device=device) / math.sqrt(rank)
        out = poisoned_like(q)
        flash_lora_decode(q, k, v, lr, lbt, lora_b, aid, table, seq_lens, 0.3, out=out)
        check(out, flash_lora_decode_ref(q, k, v, lr, lbt, lora_b, aid, table, seq_lens, 0.3))
    assert plan_misses() == 4


def test_s2_shared_and_per_head_tables_get_their_own_plans(device, rng_seed, plan_misses):
    """The same q and pattern over a shared and a per-KV-head table (the per-head one zeroes the
    cache's head stride); equal patterns share plans, a different pattern does not."""
    p = S2Pattern(4, 16, 1, 3, num_kv_heads=2)
    d, bs, lens = 16, 16, [90, 41]
    k, v, table, seq_lens = make_paged(lens, 2, d, bs, torch.float32, device)
    # The head-sharded layout of the same data, every block stored (no -1 needed here).
    kh = k.permute(0, 2, 1, 3).reshape(-1, bs, 1, d).contiguous()
    vh = v.permute(0, 2, 1, 3).reshape(-1, bs, 1, d).contiguous()
    heads = torch.arange(2, dtype=torch.int32, device=device)
    per_head = torch.where(table[:, None, :] < k.shape[0], table[:, None, :] * 2 + heads[:, None],
                           table[:, None, :])
    q = torch.randn(len(lens), 4, d, device=device)
    ref = s2_attention_decode_ref(q, k, v, table, seq_lens, p, 0.3)
    same = S2Pattern(4, 16, 1, 3, num_kv_heads=2)
    for pattern, kc, vc, bt in ((p, k, v, table), (p, kh, vh, per_head), (same, k, v, table),
                                (same, kh, vh, per_head)):
        out = poisoned_like(q)
        s2_attention_decode(q, kc, vc, bt, seq_lens, pattern, 0.3, out=out)
        check(out, ref)
    other = S2Pattern(4, 16, 2, 2, num_kv_heads=2)
    out = poisoned_like(q)
    s2_attention_decode(q, k, v, table, seq_lens, other, 0.3, out=out)
    check(out, s2_attention_decode_ref(q, k, v, table, seq_lens, other, 0.3))
    assert plan_misses() == 3


def test_contiguous_prefill_keys_on_the_batch(device, rng_seed, plan_misses):
    """Contiguous K/V: the batch shows in no tensor shape the kernel reads (only in cu_seqlens),
    so it keys the plan by itself: the same total_q, longest run and total_k over 2 then 3
    sequences (a stale grid would leave the third sequence unwritten)."""
    p = S2Pattern(4, 16, 1, 2, num_kv_heads=2)
    d = 16
    k = torch.randn(40, 2, d, device=device)
    v = torch.randn_like(k)

    def cu(lengths):
        return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                            device=device)

    for len_q, len_k in (((6, 6), (20, 20)), ((6, 3, 3), (20, 10, 10)), ((6, 6), (20, 20))):
        q = torch.randn(12, 4, d, device=device)
        cq, ck = cu(len_q), cu(len_k)
        out = poisoned_like(q)
        s2_attention_prefill(q, k, v, cq, ck, p, 0.3, out=out, max_seqlen_q=6)
        check(out, s2_attention_prefill_ref(q, k, v, cq, ck, p, 0.3))
    assert plan_misses() == 2


# ---------------------------------------------------------------- the split-KV workspace
class _RecordingLauncher:
    """Stands in for a @triton.jit kernel: records each launch's arguments, then runs it."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(args)
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_split_partials_share_one_aligned_workspace(device, rng_seed, monkeypatch):
    """An odd number of partial rows (3 heads × 1 token × 5 splits): each partial still starts
    16-byte aligned, as its own allocation would (Triton specialises pointers on it: a misaligned
    one would compile another kernel mid-serving), and they do not overlap."""
    rec = _RecordingLauncher(A._attn_fwd)
    monkeypatch.setattr(A, "_attn_fwd", rec)
    q, k, v, table, seq_lens = decode_case(device, lens=(75,), hq=3, hkv=1, d=16)
    run_decode(q, k, v, table, seq_lens, num_splits=5)
    ws_m, ws_l, ws_acc = rec.calls[-1][6:9]
    rows = 3 * 5
    assert all(t.data_ptr() % 16 == 0 for t in (ws_m, ws_l, ws_acc))
    assert ws_m.numel() >= rows and ws_l.numel() >= rows and ws_acc.numel() == rows * 16
    assert ws_m.data_ptr() + rows * 4 <= ws_l.data_ptr()
    assert ws_l.data_ptr() + rows * 4 <= ws_acc.data_ptr()


# ---------------------------------------------------------------- combining split partials
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "second-launch"])
@pytest.mark.parametrize("hq, hkv, d, splits, lens", [
    (4, 2, 32, 3, (37, 5, 50)),  # a short sequence: some splits hold no tile at all
    (6, 2, 16, 5, (75, 0, 1)),  # group 3 (padded to 4 in the combine); empty and length-1
    (8, 1, 128, 19, (301,)),  # group 8 at D 128: 16 splits a pass, so the combine takes two
])
def test_split_partials_combine_fused_or_in_a_second_launch(device, rng_seed, monkeypatch, fused,
                                                            hq, hkv, d, splits, lens):
    """Both ways of combining the split-KV partials give the reference; the fused one launches
    nothing after the main kernel and leaves its arrival counters at zero for the next launch,
    which a repeat on fresh data (the same counters) checks."""
    monkeypatch.setattr(A, "_fuse_reduce", lambda device: fused)
    reduce = _RecordingLauncher(A._split_reduce)
    monkeypatch.setattr(A, "_split_reduce", reduce)
    for _ in range(2):
        q, k, v, table, seq_lens = decode_case(device, lens=lens, hq=hq, hkv=hkv, d=d)
        run_decode(q, k, v, table, seq_lens, num_splits=splits)
    assert len(reduce.calls) == (0 if fused else 2)
    if fused:
        counters = A._split_counters(torch.device(device), len(lens) * hkv)
        assert int(counters.abs().sum()) == 0


# ---------------------------------------------------------------- bad input, warm cache
def _no_launch(*args, **kwargs):
    raise AssertionError("a rejected call reached a kernel launch")


class _NoLaunch:
    def __getitem__(self, grid):
        return _no_launch


BAD_DECODE = [  # (what, change to the valid arguments, exception, message)
    ("k dtype", lambda a: a.update(k_cache=a["k_cache"].double()), TypeError, "dtype"),
    ("q dtype", lambda a: a.update(q=a["q"].int()), TypeError, "q must have dtype"),
    ("v shape", lambda a: a.update(v_cache=a["v_cache"][:, :8]), ValueError, "shapes differ"),
    ("k not contiguous in D", lambda a: a.update(k_cache=a["k_cache"].transpose(1, 3).contiguous()
                                                 .transpose(1, 3)), ValueError, "head dim"),
    ("seq_lens dims", lambda a: a.update(seq_lens=a["seq_lens"].view(-1, 1)), ValueError, "seq_lens"),
    ("seq_lens length", lambda a: a.update(seq_lens=a["seq_lens"][:1]), ValueError, "length"),
    ("table dtype", lambda a: a.update(block_tables=a["block_tables"].float()), TypeError,
     "block_tables"),
    ("table rows", lambda a: a.update(block_tables=a["block_tables"][:1]), ValueError, "rows"),
    ("table strided", lambda a: a.update(block_tables=a["block_tables"].repeat(1, 2)[:, ::2]),
     ValueError, "contiguous"),
    ("q heads", lambda a: a.update(q=a["q"][:, :3], out=None), ValueError, "multiple"),
    ("out shape", lambda a: a.update(out=a["out"][:, :2]), ValueError, "out must match"),
    ("out strided", lambda a: a.update(out=torch.full_like(a["out"].transpose(0, 2).contiguous(),
                                                           float("nan")).transpose(0, 2)),
     ValueError, "out must be contiguous"),
    ("scale", lambda a: a.update(scale=float("nan")), TypeError, "scale"),
    ("scale bool", lambda a: a.update(scale=True), TypeError, "scale"),
    ("splits", lambda a: a.update(num_splits=0), ValueError, "num_splits"),
    ("splits bool", lambda a: a.update(num_splits=True), ValueError, "num_splits"),
    ("not a tensor", lambda a: a.update(seq_lens=[20, 9]), TypeError, "torch.Tensor"),
]


@pytest.mark.parametrize("what,change,exc,msg", BAD_DECODE, ids=[c[0] for c in BAD_DECODE])
def test_bad_decode_input_raises_before_any_launch(device, rng_seed, monkeypatch, what, change, exc, msg):
    """With the valid call's plan cached (and validate=False, the hot path), a bad input still
    raises its clear error, launches nothing and writes nothing."""
    q, k, v, table, seq_lens = decode_case(device, lens=(20, 9))
    args = dict(q=q, k_cache=k, v_cache=v, block_tables=table, seq_lens=seq_lens, scale=0.3,
                out=poisoned_like(q), validate=False)
    _assert_rejected_after_warm_plan(paged_attention_decode, args, change, exc, msg, monkeypatch)


def test_out_on_another_device_is_named(device, rng_seed, monkeypatch):
    """An `out` of the right shape and dtype on another device is rejected before any launch, and
    the message names both devices (it once read as if the shapes differed)."""
    q, k, v, table, seq_lens = decode_case(device, lens=(20, 9))
    out = torch.empty(q.shape, dtype=q.dtype, device="meta")
    monkeypatch.setattr(A, "_attn_fwd", _NoLaunch())
    with pytest.raises(ValueError, match="out must match q") as info:
        paged_attention_decode(q, k, v, table, seq_lens, 0.3, out=out)
    assert "meta" in str(info.value) and str(q.device) in str(info.value)


def _assert_rejected_after_warm_plan(fn, args, change, exc, msg, monkeypatch) -> None:
    """Warm `fn`'s launch plan with the valid `args`, apply `change`, and check the call raises
    `exc` (matching `msg`) without launching or writing `out`."""
    fn(**args)
    args["out"] = poisoned_like(args["q"])
    change(args)
    monkeypatch.setattr(A, "_attn_fwd", _NoLaunch())
    monkeypatch.setattr(A, "_split_reduce", _NoLaunch())
    with pytest.raises(exc, match=msg):
        fn(**args)
    if args.get("out") is not None:
        assert args["out"].isnan().all(), "a rejected call must not write"


BAD_LORA = [
    ("rank", lambda a: a.update(lr_cache=a["lr_cache"][..., :4]), ValueError, "lora_b must be"),
    ("lr dtype", lambda a: a.update(lr_cache=a["lr_cache"].half()), TypeError, "lr_cache"),
    ("lora_b heads", lambda a: a.update(lora_b=a["lora_b"][:, :1]), ValueError, "lora_b must be"),
    ("lr table rows", lambda a: a.update(lr_block_tables=a["lr_block_tables"][:1]), ValueError,
     "lr_block_tables"),
    ("adapter ids dtype", lambda a: a.update(adapter_ids=a["adapter_ids"].float()), TypeError,
     "adapter_ids"),
    ("lr not contiguous", lambda a: a.update(lr_cache=a["lr_cache"].transpose(1, 2).contiguous()
                                             .transpose(1, 2)), ValueError, "lr_cache"),
]


@pytest.mark.parametrize("what,change,exc,msg", BAD_LORA, ids=[c[0] for c in BAD_LORA])
def test_bad_lora_input_raises_before_any_launch(device, rng_seed, monkeypatch, what, change, exc, msg):
    q, k, v, table, seq_lens = decode_case(device, lens=(20, 9))
    args = dict(q=q, k_cache=k, v_cache=v, lr_cache=torch.randn(4, 16, 8, device=device),
                lr_block_tables=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=device),
                lora_b=torch.randn(2, 2, 8, 32, device=device),
                adapter_ids=torch.tensor([1, -1], dtype=torch.int32, device=device),
                block_tables=table, seq_lens=seq_lens, scale=0.3, out=poisoned_like(q),
                validate=False)
    _assert_rejected_after_warm_plan(flash_lora_decode, args, change, exc, msg, monkeypatch)


# ---------------------------------------------------------------- GPU: fused combine under load
@pytest.mark.gpu
def test_gpu_fused_combine_in_a_cuda_graph_and_back_to_back(rng_seed):
    """The fused combine's arrival counters on a real GPU: a split decode captured in a CUDA
    graph (its own counters, zeroed by the graph) replays right on fresh data each time, eager
    launches on the same stream before and after it stay right, and 50 back-to-back launches at
    128 splits (where a missing memory fence would let a combine read a stale partial) all
    match the reference."""
    device = "cuda"
    q, k, v, table, seq_lens = decode_case(device, lens=(4099, 1, 2500), hq=32, hkv=8, d=128,
                                           dtype=torch.bfloat16)
    ref = paged_attention_decode_ref(q, k, v, table, seq_lens, 0.3)
    out = poisoned_like(q)
    paged_attention_decode(q, k, v, table, seq_lens, 0.3, out=out, num_splits=16)  # warm-up
    check(out, ref)
    graph = torch.cuda.CUDAGraph()
    out.fill_(float("nan"))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(graph, stream=s):
            paged_attention_decode(q, k, v, table, seq_lens, 0.3, out=out, num_splits=16,
                                   validate=False)  # value checks sync: not under capture
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        graph.replay()
        check(out, paged_attention_decode_ref(q, k, v, table, seq_lens, 0.3))
        run_decode(q, k, v, table, seq_lens, num_splits=16)
    outs = [poisoned_like(q) for _ in range(50)]
    for o in outs:
        paged_attention_decode(q, k, v, table, seq_lens, 0.3, out=o, num_splits=128)
    ref = paged_attention_decode_ref(q, k, v, table, seq_lens, 0.3)
    for o in outs:
        check(o, ref)


def test_split_counters_are_zeroed_grown_and_bounded(monkeypatch):
    """The counter table: a buffer per (device, stream) zeroed when made, regrown (zeroed) when a
    launch needs more, and at most _MAX_COUNTER_STREAMS streams remembered (oldest dropped)."""
    from kernels import _counters as C

    monkeypatch.setattr(C, "_COUNTERS", {})
    dev = torch.device("cpu")
    buf = C.split_counters(dev, 10)
    assert buf.numel() >= 10 and int(buf.abs().sum()) == 0
    buf.fill_(0)
    assert C.split_counters(dev, 10) is buf  # reused while big enough
    big = C.split_counters(dev, C._MIN_COUNTERS + 5)
    assert big is not buf and big.numel() >= C._MIN_COUNTERS + 5 and int(big.abs().sum()) == 0
    for i in range(1, C._MAX_COUNTER_STREAMS + 4):  # as many more streams, each used once
        monkeypatch.setattr(C, "_current_stream", lambda device, i=i: i)
        C.split_counters(dev, 1)
    assert len(C._COUNTERS) == C._MAX_COUNTER_STREAMS
    assert (dev, 0) not in C._COUNTERS and (dev, C._MAX_COUNTER_STREAMS + 3) in C._COUNTERS
