"""`attention_ring`'s paged and Flash-LoRA decode kernel (Gluon, Hopper only): which launches the plan
gives it (on CPU, from shapes alone), its sm_90 compile on machines without a GPU (Gluon kernels
do not run under the interpreter), and on a Hopper GPU its outputs against the float64 reference on
caches whose slots past every sequence are NaN, into NaN-poisoned outputs."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import attention as A
from kernels import attention_ring as R
from kernels.attention import flash_lora_decode, paged_attention_decode
from kernels.attention_ref import flash_lora_decode_ref, paged_attention_decode_ref
from test_kernels_attention import check, decode_into, make_lowrank, make_paged, poisoned
from test_kernels_attention_launch import gpu_decode_plan, tma_device  # noqa: F401 (a fixture)


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9 and R.available()


@pytest.fixture
def ring_device(monkeypatch, tma_device):
    """A device that has TMA, the one-program-an-SM variant's shared memory (`tma_device`) and
    the ring kernel."""
    monkeypatch.setattr(A, "_ring_device", lambda device: True)


# ---------------------------------------------------------------- the plan (CPU, meta tensors)
def _launch_name(tile: int, slots: int, splits: int = 1, producer: bool = False, pack: int = 1,
                 full_items: int = 0) -> tuple:
    """A ring launch as the tests name it: (tile, slots[, splits > 1]["producer"][, "pack N"][,
    "tail", whole programs before the split ones])."""
    return ((tile, slots) + ((splits,) if splits > 1 else ()) + (("producer",) if producer else ())
            + ((f"pack {pack}",) if pack > 1 else ()) + (("tail", full_items) if full_items else ()))


@pytest.mark.parametrize("batch, ctx, kw, ring", [
    (16, 4096, {}, (128, 2)),      # 128 programs of 132 SMs: one an SM
    (16, 32768, {}, (128, 2)),
    (12, 2048, {}, (128, 2)),      # the shortest runs it takes
    (17, 4096, {}, (128, 2, 12, "tail", 132)),  # 136 programs: one an SM, the 4 over in 12 splits
    (19, 4096, {}, (128, 2, 5, "tail", 132)),   # 152: the 20 over in 5 splits
    (20, 4096, {}, (64, 2)),       # 160: one wave at 3 an SM (28 over would cost more split)
    (17, 3072, {}, (64, 2)),       # ... and under 4K keys
    (20, 16384, {}, (128, 2, 4, "tail", 132)),  # ... but not over 16K keys
    (49, 4096, {}, (64, 2)),       # 392
    (50, 16384, {}, (128, 2, 17, "tail", 396)),  # 400: more than 3 an SM, over 16K keys or more; the
    # last 4 programs (of the fourth wave) in 17 splits (see _tail_split)
    (66, 16384, {}, (128, 2)),     # 528: four whole waves
    (64, 32768, {}, (128, 2)),
    (50, 16256, {}, None),         # ... and under 16K keys: _attn_fwd's 2-3 an SM
    (64, 4096, {}, None),
    (64, 1920, {}, None),          # runs of under 2K keys keep _attn_fwd
    (8, 4096, {}, None),           # split launches keep it
    (1, 32768, {}, None),
    (16, 4096, dict(lora=True), (128, 2)),               # Flash-LoRA: L slots beside K/V
    (16, 32768, dict(lora=True), (128, 2)),              # (its own plan splits this one)
    (64, 32768, dict(lora=True, rank=64), (128, 2)),
    (16, 4096, dict(lora=True, lr_bs=256), (128, 2)),    # L paged by its own table
    (16, 4096, dict(lora=True, lr_bs=64), None),         # ... in blocks that hold no 128-key tile
    (16, 4096, dict(lora=True, rank=128), None),         # L tiles too wide for the registers
    (17, 4096, dict(lora=True), None),                   # between 1 and 3 an SM: 2 with L slots
    (8, 4096, dict(lora=True), None),                    # split
    (15, 4096, dict(lora=True), (128, 2)),               # 120 programs: 0.9 an SM
    (14, 4096, dict(lora=True), None),                   # 112: one tile in flight bounds each
    (16, 4096, dict(bs=64), (128, 2)),   # a tile of whole blocks: one copy a block
    (17, 4096, dict(bs=64), (128, 2, 12, "tail", 132)),
    (24, 4096, dict(bs=64), (64, 2)),
    (16, 4096, dict(bs=32), (128, 2, "producer")),  # four blocks a tile: 8 copies with V's, by a producer warp
    (16, 4096, dict(bs=16), (128, 2, "producer")),  # 16: only through it
    (12, 4096, dict(bs=16), (128, 2, "producer")),
    (16, 4096, dict(bs=16, lora=True, rank=64), (128, 2, "producer")),  # 24 with L's
    # just over one wave: 128-key tiles through the producer warp, the few programs over split
    (17, 4096, dict(bs=16), (128, 2, 12, "producer", "tail", 132)),
    (18, 4096, dict(bs=16), (128, 2, 7, "producer", "tail", 132)),
    (20, 16384, dict(bs=16), (128, 2, 4, "producer", "tail", 132)),
    (17, 4096, dict(bs=32), (128, 2, 12, "producer", "tail", 132)),
    (19, 4096, dict(bs=16), (128, 2, 5, "producer", "tail", 132)),
    (17, 3072, dict(bs=16), (128, 2, 10, "producer", "tail", 132)),  # through it from 3K keys
    (17, 2048, dict(bs=16), (64, 2)),
    (20, 4096, dict(bs=16), (64, 2)),    # 28 over would cost more split: four blocks of a 64-key tile
    (17, 4096, dict(bs=16, hq=64), (64, 2)),  # GQA group 8: the split items' combine spills so
    # over 3 an SM at any length (_attn_fwd reads them per thread): four whole waves
    (88, 4096, dict(bs=32, hkv=6, hq=48), (128, 2)),
    (100, 4096, dict(bs=32, hkv=4), (128, 2, 13, "tail", 396)),  # ... the last wave split (group 8: no pack)
    (50, 4096, dict(bs=32), (128, 2, 13, "tail", 396)),  # (the ring's own tiles, their last wave split)
    (64, 32768, dict(bs=8), None),
    # several KV heads a program (blocks of 16 and 32, unsplit): a pack of 4 in one wave
    (64, 4096, dict(bs=32), (32, 2, "pack 4")),     # 128 programs: 32 keys x 4 heads a tile, a copy a tile
    (64, 32768, dict(bs=16), (32, 2, "pack 4")),    # 2 copies a tile (each of K and V)
    (64, 2048, dict(bs=16), (32, 2, "pack 4")),
    (64, 4096, dict(bs=16, hq=16), (32, 2, "pack 4")),  # GQA group 2: 8 rows of 16
    # over more waves a pack of 2, its last wave split where that pays (_tail_split), else
    # unsplit where they are 0.86 full, else in the fewest splits of up to 4 that fill them 0.93
    (96, 4096, dict(bs=16), (64, 2, "pack 2")),        # 384 programs: 0.97
    (88, 4096, dict(bs=16), (64, 2, "pack 2")),        # 0.89
    (80, 4096, dict(bs=16), (64, 2, 2, "pack 2", "tail", 264)),   # 0.81: 56 last programs in 2 splits
    (80, 16384, dict(bs=16), (64, 2, 2, "pack 2", "tail", 264)),
    (72, 4096, dict(bs=16), (64, 2, 4, "pack 2", "tail", 264)),   # 0.73: 24 in 4
    (100, 4096, dict(bs=16), (64, 2, 17, "pack 2", "tail", 396)),  # 0.76: 4 in 17
    (112, 4096, dict(bs=16), (64, 2, 2, "pack 2", "tail", 396)),  # 0.85
    (116, 4096, dict(bs=16), (64, 2, 9, "pack 2", "tail", 396)),  # 0.88, but the last wave half full
    (80, 2048, dict(bs=16), None),                      # (no split under 4K keys)
    (50, 4096, dict(bs=16), None),  # 200 programs: one whole wave before 68 split ones lost to _attn_fwd's own
    (49, 4096, dict(bs=16), (64, 2)),                  # 392: the ring's own 64-key tiles, 3 an SM
    (128, 16384, dict(bs=16), (64, 2, "pack 2")),   # (a pack of 4 in two waves lost)
    (256, 4096, dict(bs=32), (64, 2, "pack 2")),
    (64, 4096, dict(bs=16, hkv=4), (64, 2, "producer", "pack 2")),  # group 8: a pack of 2, 8 copies a tile
    (128, 4096, dict(bs=16, hkv=4), None),          # ... in one wave only
    (40, 4096, dict(bs=16), (64, 2)),               # packs would fill 0.61 of their waves
    (48, 16384, dict(bs=16), (64, 2)),
    (64, 1920, dict(bs=16), None),                  # runs of under 2K keys
    (64, 4096, dict(bs=64), (128, 2)),              # blocks of 64 (two copies a 128-key tile) keep one head
    (64, 4096, dict(bs=16, lora=True), None),       # paged decode only
    (64, 4096, dict(bs=16, hq=256), None),          # GQA group 32
    (16, 4096, dict(bs=64, lora=True), (128, 2)),              # Flash-LoRA: 6 copies, L by the K/V table
    (16, 4096, dict(bs=64, lora=True, lr_bs=64), (128, 2)),    # ... or its own, blocks alike
    (16, 4096, dict(bs=64, lora=True, lr_bs=128), None),       # ... or not alike
    (16, 4096, dict(bs=32, lora=True), (128, 2, "producer")),  # 12 copies: by a producer warp
    (16, 4096, dict(bs=8), None),                              # 32: not even by it
    (64, 32768, dict(bs=64, lora=True), None),                 # over 3 an SM: L copies of 64 columns only
    (64, 4096, dict(bs=64, lora=True, rank=64), (128, 2)),
    (64, 32768, dict(bs=128, lora=True), (128, 2)),
    (16, 4096, dict(bs=256), (128, 2)),
    (16, 4096, dict(hq=128), (128, 2)),  # GQA groups of 16: one MMA tile of rows
    (16, 4096, dict(hq=256), None),      # of 32: two
    (16, 4096, dict(dtype=torch.float16), (128, 2)),
    (16, 4096, dict(dtype=torch.float32), None),
    # split launches in blocks of under 128 keys: (tile, slots, splits)
    # one an SM, a producer warp: 128-key tiles where splits of at least 16 of them fill the SMs
    (1, 32768, dict(bs=16), (128, 2, 16, "producer")),  # 16 copies a tile
    (1, 32768, dict(bs=32), (128, 2, 16, "producer")),  # 8
    (8, 4096, dict(bs=16), (128, 2, 2, "producer")),
    (4, 16384, dict(bs=16), (128, 2, 4, "producer")),
    (1, 8192, dict(bs=16), (64, 2, 16, "producer")),   # ... else 64-key ones (4 splits of 16 would fill 32 SMs)
    (1, 4096, dict(bs=16), (64, 2, 16, "producer")),   # ... of at least 4 tiles a split
    (2, 4096, dict(bs=16), (64, 2, 8, "producer")),
    (1, 4096, dict(bs=32), (64, 2, 16, "producer")),   # 4 copies a tile
    (4, 4096, dict(bs=32), (64, 2, 4, "producer")),    # 16 tiles a split: 2 slots
    (1, 32768, dict(bs=8), (64, 3, 16, "producer")),   # 32 copies a 128-key tile: 64-key ones, 32 a split: 3 slots
    (3, 4096, dict(bs=32), (64, 2, 8)),     # one an SM would fill 0.7 of the SMs: two an SM, no producer warp
    (8, 4096, dict(bs=64), (128, 2, 2)),    # one an SM: 128-key tiles, two copies each
    (1, 32768, dict(bs=64), (128, 2, 16)),
    (4, 16384, dict(bs=64), (128, 2, 4)),
    (1, 4096, dict(bs=64), None),           # 128-key tiles: at least 16 a split
    (4, 4096, dict(bs=64), None),           # ... else 2 splits of them fill half the SMs
    (3, 4096, dict(bs=16), (64, 2, 8)),
    (1, 2048, dict(bs=16), None),           # 64-key tiles: 8 splits of 4 fill half the SMs
    (1, 1024, dict(bs=16), None),           # runs of under 2K keys
    # Flash-LoRA at 64-key tiles (12 copies a tile at blocks of 16, 6 at 32): splits for one
    # program an SM, through the producer warp
    (8, 4096, dict(bs=16, lora=True), (64, 3, 2, "producer")),   # 32 tiles a split: 3 slots (40 KB at r = 64)
    (1, 4096, dict(bs=16, lora=True, rank=64), (64, 2, 16, "producer")),
    (2, 4096, dict(bs=16, lora=True), (64, 2, 8, "producer")),
    (1, 32768, dict(bs=32, lora=True), (64, 3, 16, "producer")),
    (1, 32768, dict(bs=16, lora=True, rank=64), (64, 3, 16, "producer")),
    (4, 4096, dict(bs=16, lora=True, rank=64), (64, 2, 4, "producer")),  # 16 tiles a split: 2 slots
    (3, 4096, dict(bs=16, lora=True), None),   # 4 splits of 24 programs fill 0.7 of the SMs
    (1, 4096, dict(bs=16, lora=True, rank=128), None),  # L tiles too wide
    (8, 4096, dict(bs=64, lora=True), (128, 2, 2, "producer")),            # ... at 128-key ones: 6
    (1, 32768, dict(bs=64, lora=True, rank=64), (128, 2, 16, "producer")),  # (never 3 slots of them)
    (1, 32768, dict(bs=64, lora=True, rank=128), None),        # L tiles too wide
    (8, 4096, dict(bs=64, lora=True, lr_bs=128), None),        # L blocks that split no tile as K/V's do
    (8, 4096, dict(bs=16, hq=128), None),      # GQA groups over 8: the combine would spill
    (8, 4096, dict(bs=16, hq=64), (128, 2, 2, "producer")),
])
def test_plan_takes_the_ring_kernel_where_measured(monkeypatch, ring_device, batch, ctx, kw, ring):
    if "producer" in (ring or ()) and not R.producer_available():
        pytest.skip("this Triton's Gluon has no warp specialisation of the producer warp's form")
    plan = gpu_decode_plan(monkeypatch, batch, ctx, **{"bs": 128, **kw})
    assert (plan.ring and _launch_name(*plan.ring)) == ring
    hq, hkv = kw.get("hq", 32), kw.get("hkv", 8)
    if plan.ring and plan.ring.full_items:  # the workspace and counters of its split items only
        items = batch * hkv // plan.ring.pack
        rows = (items - plan.ring.full_items) * (hq // hkv * plan.ring.pack) * plan.ring.splits
        assert plan.ws_sizes[2] == rows * 128 and plan.counters == items - plan.ring.full_items
    elif plan.ring and plan.ring.splits > 1:  # its workspace and counters are the split launch's
        assert plan.ws_sizes[2] == batch * hq * plan.ring.splits * 128 and plan.counters == batch * hkv
        # (a pack's combine: one split a pass, but in a split last wave)
        rows_p2 = A._next_pow2(hq // hkv * plan.ring.pack)
        one_pass = min(A._next_pow2(plan.ring.splits), A._combine_chunk(rows_p2, 128))
        assert plan.ring_reduce == (1 if plan.ring.pack > 1 and not plan.ring.full_items else one_pass)
        assert plan.reduce_grid is None


def test_ring_packed_needs_what_it_was_measured_on(monkeypatch, ring_device):
    """Packs only for paged decode at head dim 128 in half precision, blocks of 16 to 32 keys,
    GQA groups up to 8 whose pack fills a 16-row tile, and not with an explicit split."""
    monkeypatch.setattr(A, "_num_sms", lambda device: 132)
    dev = torch.device("cuda", 0)
    assert A._ring_packed(dev, 64, 8, 128, 4, 16, 4096, 2) == A._Ring(32, 2, pack=4)
    assert A._ring_packed(dev, 64, 8, 64, 4, 16, 4096, 2) is None      # head dim 64
    assert A._ring_packed(dev, 64, 8, 128, 4, 16, 4096, 4) is None     # fp32
    assert A._ring_packed(dev, 64, 6, 128, 4, 16, 4096, 2) is None     # Hkv 6: no pack of 4; 384 programs
    # (at most 3 an SM: the ring's own tiles take those)
    assert A._ring_packed(dev, 64, 2, 128, 8, 16, 4096, 2) is None     # 64 programs in packs of 2
    assert A._ring_packed(dev, 64, 8, 128, 16, 16, 4096, 2) is None    # group 16: one head fills the rows
    assert A._ring_packed(dev, 64, 8, 128, 4, 24, 4096, 2) is None     # blocks of 24: no whole tiles
    assert A._ring_packed(dev, 96, 8, 128, 4, 48, 4096, 2) is None     # (nor of 48 for packs of 2)
    monkeypatch.setattr(A, "_ring_device", lambda device: False)
    assert A._ring_packed(dev, 64, 8, 128, 4, 16, 4096, 2) is None
    monkeypatch.setattr(A, "_ring_device", lambda device: True)
    monkeypatch.setattr(A, "interpreter_on", lambda: False)
    A._launch_plan.cache_clear()
    meta = dict(dtype=torch.bfloat16, device="meta")
    q, k = torch.empty(64, 32, 128, **meta), torch.empty(64 * 256, 16, 8, 128, **meta)
    bt = torch.empty(64, 256, dtype=torch.int32, device="meta")
    for splits, packed in ((None, True), (1, True), (2, False)):
        key = A._launch_key(q, k, k, q, paged=True, decode=True, batch=64, block_tables=bt, lora=None, s2=None,
                            max_seqlen_q=None, num_splits=splits)
        plan = A._launch_plan(key)
        assert (plan.ring is not None and plan.ring.pack == 4) == packed
        if packed:
            assert plan.ws_total == 0 and plan.counters == 0  # unsplit: no workspace
    # a pack of 2, the last wave in two splits (80 sequences), unsplit where the caller asks for one split
    q, k = torch.empty(80, 32, 128, **meta), torch.empty(80 * 256, 16, 8, 128, **meta)
    bt = torch.empty(80, 256, dtype=torch.int32, device="meta")
    for splits, want in ((None, A._Ring(64, 2, 2, False, 2, 264)), (1, A._Ring(64, 2, 1, False, 2))):
        key = A._launch_key(q, k, k, q, paged=True, decode=True, batch=80, block_tables=bt, lora=None, s2=None,
                            max_seqlen_q=None, num_splits=splits)
        plan = A._launch_plan(key)
        assert plan.ring == want and (plan.ws_total > 0) == (want.splits > 1)
    A._launch_plan.cache_clear()


@pytest.mark.skipif(not R.available(), reason="this Triton has no Gluon")
def test_ring_decode_refuses_a_pack_it_cannot_run():
    q = torch.empty(2, 32, 128, dtype=torch.bfloat16)
    k = torch.empty(8, 16, 8, 128, dtype=torch.bfloat16)
    bt, sl = torch.zeros(2, 4, dtype=torch.int32), torch.ones(2, dtype=torch.int32)
    for pack, hq, extra in ((3, 32, {}), (8, 32, {}), (4, 64, {}),
                            (4, 32, dict(lr_cache=torch.empty(8, 16, 16, dtype=torch.bfloat16)))):
        with pytest.raises(ValueError, match="pack="):
            R.ring_decode(q[:, :hq] if hq <= 32 else torch.empty(2, hq, 128, dtype=torch.bfloat16), k, k, bt, sl,
                          1.0, q, block_n=32, stages=2, pack=pack, **extra)


def test_ring_decode_refuses_whole_items_without_splits():
    """`full_items` names the whole programs before the split ones: without splits it means nothing."""
    q = torch.empty(2, 32, 128, dtype=torch.bfloat16)
    k = torch.empty(8, 16, 8, 128, dtype=torch.bfloat16)
    bt, sl = torch.zeros(2, 4, dtype=torch.int32), torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="full_items"):
        R.ring_decode(q, k, k, bt, sl, 1.0, q, block_n=64, stages=2, full_items=8)


def test_ring_tiles_needs_the_device_and_head_dim_128(monkeypatch, ring_device):
    monkeypatch.setattr(A, "_num_sms", lambda device: 132)
    dev = torch.device("cuda", 0)
    assert A._ring_tiles(dev, 128, 128, 4, 128, 4096, 2) == A._Ring(128, 2)
    assert A._ring_tiles(dev, 128, 64, 4, 128, 4096, 2) is None
    assert A._ring_tiles(dev, 128, 256, 4, 128, 4096, 2) is None
    assert A._ring_tiles(dev, 200, 128, 4, 64, 4096, 2) == A._Ring(64, 2)  # 64-key tiles fit blocks of 64
    monkeypatch.setattr(A, "_ring_device", lambda device: False)
    assert A._ring_tiles(dev, 128, 128, 4, 128, 4096, 2) is None
    assert gpu_decode_plan(monkeypatch, 16, 4096, bs=128).ring is None


def test_plan_keeps_the_producer_warp_off_where_triton_lacks_it(monkeypatch, ring_device):
    """Without Gluon's warp specialisation (in the form the kernel uses) the plan keeps what it
    gave before the producer warp: split 64-key tiles at blocks of 16, `_attn_fwd` for
    Flash-LoRA there, 8-copy tiles without it at blocks of 32."""
    assert R.producer_available() == (R.available() and hasattr(R.gl, "warp_specialize"))
    monkeypatch.setattr(R, "producer_available", lambda: False)
    assert _launch_name(*gpu_decode_plan(monkeypatch, 16, 4096, bs=16).ring) == (64, 2, 2)
    assert _launch_name(*gpu_decode_plan(monkeypatch, 1, 4096, bs=16).ring) == (64, 2, 16)
    assert gpu_decode_plan(monkeypatch, 16, 4096, bs=16, lora=True).ring is None
    assert _launch_name(*gpu_decode_plan(monkeypatch, 16, 4096, bs=32).ring) == (128, 2)


def test_ring_device_is_off_without_a_hopper_gpu():
    for dev in ("cpu", "meta"):
        assert A._ring_device(torch.device(dev)) is False


# ---------------------------------------------------------------- sm_90 compile (CPU-only machines)
_COMPILE_SCRIPT = r"""
import json, pathlib, re, subprocess, sys, tempfile
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from kernels import attention as A, attention_ring as R
from kernels._pdl import ptx_order

BIN = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def spilled(ptx):
    # registers spilled by ptxas (the PTX has none: its register allocation is ptxas's); -1: no
    # ptxas here that reads this PTX (Triton 3.9's `ptxas` is older than its PTX; its
    # `ptxas-blackwell` reads it and builds sm_90a too)
    for name in ("ptxas", "ptxas-blackwell"):
        if not (BIN / name).exists():
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(ptx); f.flush()
            res = subprocess.run([str(BIN / name), "-arch=sm_90a", "-v", f.name, "-o", "/dev/null"],
                                 capture_output=True, text=True)
        if res.returncode == 0:
            return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", res.stderr))
    return -1


def compile_case(block_n, stages, group, dt, rank, table, bs):
    shared = "shared" in table
    tail = "tail" in table  # a launch over several waves, its last one split (TAIL)
    split = "split" in table or tail  # a split launch (or its last wave)
    producer = "producer" in table  # its copies by a producer warp
    pack = int(table.split("pack")[1][0]) if "pack" in table else 1  # KV heads a program
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dt]
    r_pad = R.lora_pad(rank) if rank else 32
    fn = R._ring_decode_kernel
    chunk = min(block_n, bs)
    box = f"1,{chunk},128" if pack == 1 else f"1,{chunk},{pack},128"
    desc = f"tensordesc<{dt}[{box}],{R._smem_layout(chunk, 128, dtype, pack)!r}>"
    lr_desc = f"tensordesc<{dt}[1,{chunk},{r_pad}],{R._smem_layout(chunk, r_pad, dtype)!r}>" if rank else desc
    consts = dict(GROUP=group * pack, HEAD_DIM=128, BLOCK_N=block_n, BLOCK_SIZE=bs, STAGES=stages, ROWS=R._ROWS,
                  WARPS=R._WARPS, HAS_LORA=rank > 0, RANK=max(rank, 1), R_PAD=r_pad, LR_BLOCK_SIZE=bs,
                  LR_SHARED_TABLE=shared, CHUNK=min(block_n, bs), SPLIT=split and not tail, TAIL=tail,
                  GROUP_P2=A._next_pow2(group * pack) if split else 1,
                  # the most the plan gives (a pack's combine: one split a pass)
                  REDUCE_S=(1 if pack > 1 and not tail else A._combine_chunk(A._next_pow2(group * pack), 128))
                  if split else 1,
                  PRODUCER=producer, PRODUCER_REGS=R._PRODUCER_WARP_REGS,
                  B_TMA=producer and rank > 0 and r_pad >= 16, PACK=pack,  # (B_TMA as ring_decode for a dense B)
                  PDL=True)
    b_desc = f"tensordesc<{dt}[1,{r_pad},128],{R._smem_layout(r_pad, 128, dtype)!r}>" if rank else desc
    sig = dict(Q="*" + dt, k_desc=desc, v_desc=desc, lr_desc=lr_desc, b_desc=b_desc, BlockTables="*i32",
               LrBlockTables="*i32", LoraB="*" + dt, AdapterIds="*i32", SeqLens="*i32", Out="*" + dt, WsM="*fp32",
               WsL="*fp32", WsAcc="*fp32", SplitCounters="*i32", qk_scale="fp32", num_splits="i32",
               full_items="i32", kv_programs="i32",
               **{n: "i32" for n in fn.arg_names if n.startswith("stride_")}, **{c: "constexpr" for c in consts})
    src = GluonASTSource(fn, sig, constexprs={(fn.arg_names.index(c),): v for c, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": R._WARPS, "launch_pdl": True})
    ptx = k.asm["ptx"]
    return dict(verdict="SPILLS" if "st.local" in ptx else "COMPILED", smem=k.metadata.shared, spill=spilled(ptx),
                pdl=ptx_order(ptx))


for case in json.loads(sys.argv[1]):  # one line of JSON a case, as it ends
    try:
        out = compile_case(*case)
    except Exception as e:  # this case's failure, not the others'
        out = dict(error=f"{type(e).__name__}: {e}"[-3000:])
    print(json.dumps(dict(case=case, **out)), flush=True)
"""

# Every configuration the plan picks: (block_n, stages, group, dtype, rank, what, block size)
_COMPILE_CASES = [
    (128, 2, 4, "bf16", 0, "-", 128), (64, 2, 4, "fp16", 0, "-", 128), (128, 2, 16, "fp16", 0, "-", 256),
    (64, 2, 1, "bf16", 0, "-", 128), (128, 2, 4, "bf16", 8, "shared", 128), (128, 2, 4, "bf16", 64, "own", 128),
    (128, 2, 16, "fp16", 33, "own", 128), (64, 2, 4, "bf16", 0, "-", 16), (64, 2, 4, "fp16", 0, "-", 32),
    (128, 2, 4, "bf16", 0, "-", 32), (128, 2, 16, "fp16", 0, "-", 64), (128, 2, 4, "bf16", 64, "shared", 64),
    (128, 2, 16, "fp16", 8, "own", 64),
    (64, 2, 4, "bf16", 0, "split", 16), (64, 2, 8, "fp16", 0, "split", 32), (128, 2, 4, "bf16", 0, "split", 64),
    (64, 2, 1, "fp16", 0, "split", 16), (128, 2, 4, "bf16", 8, "shared+split", 64),
    (128, 2, 8, "fp16", 64, "own+split", 64),
    (128, 2, 4, "bf16", 0, "producer", 16), (128, 2, 16, "fp16", 0, "producer", 32),
    (128, 2, 8, "fp16", 64, "own+producer", 16), (128, 2, 4, "bf16", 8, "shared+producer", 32),
    (64, 2, 4, "bf16", 0, "split+producer", 16), (64, 2, 1, "fp16", 0, "split+producer", 16),
    (64, 2, 4, "fp16", 64, "shared+split+producer", 16), (64, 2, 8, "bf16", 8, "own+split+producer", 16),
    (64, 2, 4, "bf16", 64, "own+split+producer", 32), (64, 2, 8, "fp16", 16, "shared+split+producer", 32),
    (64, 3, 4, "bf16", 0, "split+producer", 16), (64, 3, 8, "fp16", 0, "split+producer", 32),
    (64, 3, 4, "bf16", 64, "shared+split+producer", 16), (64, 3, 8, "fp16", 8, "own+split+producer", 32),
    (128, 2, 4, "fp16", 64, "own+split+producer", 64), (128, 2, 8, "bf16", 8, "shared+split+producer", 64),
    (128, 2, 4, "bf16", 0, "split+producer", 16), (128, 2, 8, "fp16", 0, "split+producer", 32),
    (32, 2, 4, "bf16", 0, "pack4", 16), (32, 2, 2, "fp16", 0, "pack4", 32),
    (64, 2, 4, "bf16", 0, "pack2", 16), (64, 2, 8, "fp16", 0, "producer+pack2", 16),
    (64, 2, 4, "fp16", 0, "split+pack2", 32),
    (64, 2, 4, "bf16", 0, "tail+pack2", 16), (64, 2, 4, "fp16", 0, "tail+pack2", 32),
    (128, 2, 4, "bf16", 0, "tail+producer", 16), (128, 2, 4, "fp16", 0, "tail+producer", 32),
    (128, 2, 4, "bf16", 0, "tail", 128),
    (128, 2, 8, "fp16", 0, "tail", 32), (128, 2, 4, "bf16", 64, "own+tail", 128)]


@functools.lru_cache(maxsize=None)
def _compiled() -> tuple[dict, int, str]:
    """Every case of `_COMPILE_CASES` compiled for sm_90 in one subprocess (without
    TRITON_INTERPRET, which the CPU tests set; one, since its imports cost more than most of
    its compiles): ({case: result}, its exit code, the end of its stderr)."""
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(_COMPILE_CASES)],
                         capture_output=True, text=True, env=env, cwd=root, timeout=1800)
    results = {}
    for line in res.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[tuple(r.pop("case"))] = r
    return results, res.returncode, res.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernel for real")
@pytest.mark.skipif(not R.available(), reason="this Triton has no Gluon")
@pytest.mark.parametrize("block_n, stages, group, dt, rank, table, bs", _COMPILE_CASES)
def test_ring_kernel_compiles_for_hopper(block_n, stages, group, dt, rank, table, bs):
    """Every configuration the plan picks compiles for sm_90 without spills (but known ones), in the
    shared memory the plan counts on: 64-key tiles three programs an SM (228 KB an SM, 1 KB of it
    reserved a program), 128-key tiles one (Flash-LoRA's L slots beside K/V); tiles in one block
    or a copy a block; split launches ("split") with the combine of their partials; copies by a
    producer warp ("producer"); several KV heads a program ("packN", `block_n` keys of N heads a
    tile); launches over several waves whose last one is split ("tail")."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        pytest.skip("this Triton cannot compile for a target")
    results, code, err = _compiled()
    r = results.get((block_n, stages, group, dt, rank, table, bs))
    assert r is not None, f"the compile subprocess ended (exit {code}) before this case: {err}"
    assert "error" not in r, r["error"]
    verdict, smem, spill = r["verdict"], r["smem"], r["spill"]
    assert verdict == "COMPILED"
    pdl = r["pdl"]  # PDL: the wait before any global access, the signal after it (kernels._pdl)
    assert 0 <= pdl["wait"] < pdl["first_global"] < pdl["signal"], pdl
    # ptxas spills nothing but in known places, where the kernel measured fastest on its shapes
    # nonetheless (bench/RESULTS.md): Flash-LoRA's 64-column L tiles at 128 keys (of 255 registers
    # a thread: Triton 3.6 148 bytes unsplit, 420 split; Triton 3.9 256 and 484, unsplit 264 with
    # PDL's signal after the loop: 16 × 4K r = 64 at blocks of 128 66.8 us vs 67.4 without), and the split
    # combine of 8 query heads (with the producer warp 32-56 bytes, whatever the producer warp's
    # registers; without it 16 under Triton 3.9), and a split last wave's combine (Triton 3.9: up
    # to 112 bytes, on the path of the last split of each split item only); the producer warp
    # itself nothing (it spilled up to 112 bytes at 40 registers; attention_ring._PRODUCER_WARP_REGS)
    combined = "split" in table or "tail" in table
    if rank > 32 and block_n == 128 and "producer" not in table:
        allowed = 484 if combined else 264
    elif "tail" in table:  # (Triton 3.9: its combine of 8 rows, 16 splits a pass, beside the whole store)
        allowed = 128
    elif combined and group == 8:
        allowed = 56 if "producer" in table else 16
    else:
        allowed = 0
    assert int(spill) <= allowed
    # (a program with the producer warp takes every register of an SM: one an SM)
    pack = int(table.split("pack")[1]) if "pack" in table else 1
    limit = 227 * 1024 if block_n * pack == 128 or "producer" in table else (228 // 3 - 1) * 1024
    r_pad = R.lora_pad(rank) if rank else 0
    assert stages * block_n * (2 * 128 * pack + r_pad) * 2 <= int(smem) <= limit


# ---------------------------------------------------------------- Hopper GPU
gpu = pytest.mark.skipif(not _hopper(), reason="needs a Hopper GPU (and a Triton with Gluon)")


@pytest.fixture
def ring_calls(monkeypatch) -> list:
    """The (key tile, ring slots) of every ring kernel launch while the test runs (and its split
    count after them, where it splits)."""
    calls = []
    real = R.ring_decode

    def spying(*args, block_n, stages, **kw):
        calls.append(_launch_name(block_n, stages, kw.get("num_splits", 1), kw.get("producer", False),
                                  kw.get("pack", 1), kw.get("full_items") or 0))
        return real(*args, block_n=block_n, stages=stages, **kw)

    monkeypatch.setattr(R, "ring_decode", spying)
    return calls


@gpu
@pytest.mark.parametrize("dtype, hq, hkv, bs, lens, sms, ring", [
    (torch.bfloat16, 32, 8, 128, [4000, 129, 1, 0, 2048, 3001], None, (128, 2)),  # one an SM
    (torch.float16, 16, 16, 256, [2049, 77, 4096], None, (128, 2)),               # GQA group 1
    (torch.bfloat16, 64, 4, 128, [2500, 128, 127], None, (128, 2)),               # group 16
    (torch.bfloat16, 32, 8, 128, [2100, 5, 3000, 64, 65], 14, (64, 2)),  # 40 programs "on 14 SMs"
    (torch.float16, 32, 8, 128, [16390, 300, 2200, 1], 4, (128, 2)),     # 32 "on 4": over 3 an SM
    (torch.bfloat16, 32, 8, 16, [4000, 129, 1, 0, 2048, 3001, 17, 2063], 30, (64, 2)),  # a copy a block
    (torch.float16, 16, 4, 64, [4000, 129, 1, 0, 2048, 3001, 17, 4032], None, (128, 2)),  # 4032: a copy ends the run
    (torch.float16, 32, 8, 32, [2100, 5, 3000, 64, 65], 14, (64, 2)),
    (torch.bfloat16, 32, 8, 16, [4000, 129, 1, 0, 2048, 3001, 17, 2063], None, (128, 2, "producer")),  # 16 copies
    (torch.float16, 32, 4, 32, [2100, 5, 3000, 64, 65], None, (128, 2, "producer")),  # 8 copies, group 8
    # several KV heads a program: 14 programs "on 14 SMs" (one wave) in packs of 4, 28 in packs of 2
    # "on 10" (0.93 of 3 waves); blocks of 16 (a copy a block) and 32 (a copy a tile)
    (torch.bfloat16, 32, 8, 16, [4000, 129, 1, 0, 2048, 3001, 17], 14, (32, 2, "pack 4")),
    (torch.float16, 32, 8, 32, [2100, 5, 3000, 64, 65, 4097, 33], 14, (32, 2, "pack 4")),
    (torch.bfloat16, 16, 8, 16, [2500, 31, 4001, 0, 1, 2047, 3333], 14, (32, 2, "pack 4")),  # group 2
    (torch.bfloat16, 32, 8, 16, [4000, 129, 1, 0, 2048, 3001, 17], 10, (64, 2, "pack 2")),
    (torch.float16, 32, 8, 32, [2100, 5, 3000, 64, 65, 4097, 33], 10, (64, 2, "pack 2")),
    (torch.float16, 32, 4, 16, [2500, 128, 127, 3000, 1, 2222, 999], 14, (64, 2, "producer", "pack 2")),  # group 8
])
def test_ring_decode_matches_reference(rng_seed, monkeypatch, ring_calls, dtype, hq, hkv, bs, lens, sms, ring):
    """Odd lengths, a sequence of one token and one of none, tiles that end inside a block and
    ones that end on it; q read from every other row of a wider buffer and out written into one."""
    if sms is not None:
        monkeypatch.setattr(A, "_num_sms", lambda device: sms)
    k, v, bt, sl = make_paged(lens, hkv, 128, bs, dtype, "cuda")
    q = torch.randn(len(lens), hq, 2, 128, device="cuda").to(dtype)[:, :, 1]
    wide = poisoned((len(lens), hq, 256), dtype, "cuda")
    out = wide[..., 64:192]
    res = paged_attention_decode(q, k, v, bt, sl, 0.13, out=out, num_splits=1)
    assert res is out and ring_calls == [ring]
    check(out, paged_attention_decode_ref(q, k, v, bt, sl, 0.13), dtype)
    assert wide[..., :64].isnan().all() and wide[..., 192:].isnan().all()  # nothing outside out


@gpu
@pytest.mark.parametrize("dtype, hq, hkv, bs, lens, sms, ring", [
    (torch.bfloat16, 32, 8, 16, [4000, 129, 1, 0, 2048, 3001, 17], 132, (64, 2, 4)),  # splits with no keys
    (torch.float16, 16, 16, 32, [2049, 77, 4096], 132, (64, 2, 4)),                   # GQA group 1
    (torch.bfloat16, 32, 4, 64, [4095, 128, 4001], 24, (128, 2, 2)),   # two copies a tile ("on 24 SMs")
    # one program an SM, the producer warp (4 copies a tile at blocks of 32, 8 at 16)
    (torch.bfloat16, 32, 4, 32, [2500, 128, 127, 3000, 1, 2222, 999, 3001], 132, (64, 2, 4, "producer")),  # group 8
    (torch.bfloat16, 32, 8, 16, [32001], 132, (64, 2, 16, "producer")),     # one long sequence, 31 tiles a split
    (torch.float16, 32, 8, 32, [32767], 132, (128, 2, 16, "producer")),     # 16 tiles of 128 keys a split, 8 copies each
    (torch.bfloat16, 32, 8, 16, [32767], 132, (128, 2, 16, "producer")),    # ... 16 copies each
    (torch.bfloat16, 32, 8, 16, [7001, 3, 8191, 4000], 132, (128, 2, 4, "producer")),  # splits with no keys
    (torch.float16, 32, 8, 32, [8191, 4000, 77, 6000], 132, (128, 2, 4, "producer")),
    (torch.bfloat16, 32, 8, 16, [4063], 132, (64, 2, 16, "producer")),      # 16 splits of 4 tiles
    (torch.float16, 8, 8, 16, [4063], 132, (64, 2, 16, "producer")),        # GQA group 1
    # blocks of 8 (32 copies a 128-key tile): 64-key tiles, three slots from 32 of them a split
    (torch.bfloat16, 32, 8, 8, [32767], 132, (64, 3, 16, "producer")),
    (torch.float16, 32, 8, 8, [32001, 20005], 132, (64, 3, 8, "producer")),
    # a pack of 2 KV heads in 3 splits: 28 programs "on 18 SMs" fill 0.78 of their waves, 84 0.93
    # (a split last wave would leave one whole wave before it: see _ring_packed)
    (torch.bfloat16, 32, 8, 16, [4100, 3, 0, 4097, 2049, 1, 3001], 18, (64, 2, 3, "pack 2")),
    # ... its last wave split: 20 programs "on 8 SMs", the last 4 in 2 splits
    (torch.bfloat16, 32, 8, 16, [4100, 3, 0, 4097, 2049], 8, (64, 2, 2, "pack 2", "tail", 16)),
    (torch.float16, 32, 8, 32, [5000, 1, 4096, 77, 4500], 8, (64, 2, 2, "pack 2", "tail", 16)),
    (torch.bfloat16, 32, 8, 16, [4100, 65, 4097, 1, 3000], 9, (64, 2, 4, "pack 2", "tail", 18)),
])
def test_ring_split_decode_matches_reference(rng_seed, monkeypatch, ring_calls, dtype, hq, hkv, bs, lens, sms,
                                             ring):
    """Split launches (the plan's own split count): odd lengths, sequences shorter than a split
    (their later splits have no keys), one of no keys; partials combined by the last split."""
    monkeypatch.setattr(A, "_num_sms", lambda device: sms)
    k, v, bt, sl = make_paged(lens, hkv, 128, bs, dtype, "cuda")
    q = torch.randn(len(lens), hq, 128, device="cuda").to(dtype)
    out = poisoned(q.shape, dtype, "cuda")
    assert paged_attention_decode(q, k, v, bt, sl, 0.13, out=out) is out
    assert ring_calls == [ring]
    check(out, paged_attention_decode_ref(q, k, v, bt, sl, 0.13), dtype)


@gpu
@pytest.mark.parametrize("dtype, hq, hkv, bs, lens, sms, lora, ring", [
    # packs of 2 over several waves "on 8 SMs": 28 programs, the last 4 in 2 splits each
    (torch.bfloat16, 32, 8, 16, [4160, 129, 1, 3001, 2063, 4097, 0], 8, False, (64, 2, 2, "pack 2", "tail", 24)),
    (torch.float16, 32, 8, 32, [4100, 5, 3000, 77, 4160, 1, 2222], 8, False, (64, 2, 2, "pack 2", "tail", 24)),
    (torch.bfloat16, 16, 8, 16, [4160, 31, 4001, 0, 1, 2047, 3333, 999, 4159], 10, False,  # GQA group 2
     (64, 2, 3, "pack 2", "tail", 30)),
    # one KV head a program over 16K keys "on 5 SMs": 16 programs, the last in 4 splits
    (torch.bfloat16, 32, 8, 128, [9001, 16512], 5, False, (128, 2, 4, "tail", 15)),
    # GQA group 8, 8 copies a tile
    (torch.float16, 32, 4, 32, [16512, 77, 9000, 16001], 5, False, (128, 2, 4, "tail", 15)),
    (torch.bfloat16, 32, 8, 128, [16500, 16512], 5, True, (128, 2, 4, "tail", 15)),  # Flash-LoRA
    # just over one wave "on 7 SMs" (8 programs): one an SM, the one over in 5 splits
    (torch.float16, 32, 4, 128, [16512, 9001], 7, False, (128, 2, 5, "tail", 7)),
    # ... in blocks of 16 and 32 through the producer warp (GQA group 4)
    (torch.bfloat16, 16, 4, 16, [16512, 9001], 7, False, (128, 2, 5, "producer", "tail", 7)),
    (torch.float16, 16, 4, 32, [9001, 16512], 7, False, (128, 2, 5, "producer", "tail", 7)),
])
def test_ring_decode_with_its_last_wave_split(rng_seed, monkeypatch, ring_calls, dtype, hq, hkv, bs, lens, sms, lora,
                                              ring):
    """Ring launches over several waves whose last is split (`ring_decode(full_items=)`, the
    plan's own `_tail_split`): whole and split items against the reference; odd lengths, and
    empty and one-token sequences among the split items, Flash-LoRA's among them."""
    monkeypatch.setattr(A, "_num_sms", lambda device: sms)
    k, v, bt, sl = make_paged(lens, hkv, 128, bs, dtype, "cuda", table_slack=0)
    q = torch.randn(len(lens), hq, 128, device="cuda").to(dtype)
    out = poisoned(q.shape, dtype, "cuda")
    ref, again = decode_into(q, k, v, bt, sl, 0.12, out, lora=lora)
    assert ring_calls == [ring]
    check(out, ref, dtype)
    # again: the split items' arrival counters are back at zero for the next launch
    out2 = poisoned(q.shape, dtype, "cuda")
    again(out2)
    check(out2, ref, dtype)


@gpu
@pytest.mark.parametrize("bs, num_splits, sms, ring", [
    (128, 1, None, (128, 2)),      # unsplit
    (16, None, 132, (64, 2, 8)),   # split: the arrival counters the last split resets serve every replay
    (16, 1, None, (128, 2, "producer")),  # the producer warp's barriers start afresh every replay
    (16, None, 100, (64, 2, 4, "producer")),  # both: split through the producer warp ("on 100 SMs")
    (16, None, 5, (64, 2, 2, "pack 2", "tail", 10)),  # packs of 2 "on 5 SMs", the last wave split
])
def test_ring_decode_replays_in_a_cuda_graph(rng_seed, monkeypatch, ring_calls, bs, num_splits, sms, ring):
    """Captured once, replayed over new queries and longer sequences (a decode step's inputs
    change in place): each replay matches the reference."""
    if sms is not None:
        monkeypatch.setattr(A, "_num_sms", lambda device: sms)
    lens = [2300, 4100, 17]
    k, v, bt, sl = make_paged([n + 40 for n in lens], 8, 128, bs, torch.bfloat16, "cuda")
    sl.copy_(torch.tensor(lens, dtype=torch.int32))
    q = torch.randn(3, 32, 128, device="cuda").to(torch.bfloat16)
    out = poisoned(q.shape, q.dtype, "cuda")
    paged_attention_decode(q, k, v, bt, sl, 0.09, out=out, num_splits=num_splits)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention_decode(q, k, v, bt, sl, 0.09, out=out, num_splits=num_splits, validate=False)
    for step in range(3):
        q.copy_(torch.randn_like(q, dtype=torch.float32).to(q.dtype))
        sl.add_(13 * step)
        out.fill_(float("nan"))
        graph.replay()
        check(out, paged_attention_decode_ref(q, k, v, bt, sl, 0.09), torch.bfloat16)
    assert ring_calls and set(ring_calls) == {ring}


_SPLIT_LENS = [4000, 129, 1, 0, 2063, 3001, 4095, 77]


@gpu
@pytest.mark.parametrize("dtype, hq, hkv, r, table, lens, bs, ring", [
    (torch.bfloat16, 32, 8, 8, "kv", [4000, 129, 1, 0, 2048, 3001], 128, (128, 2)),   # L paged by the K/V table
    (torch.float16, 32, 8, 64, "own", [2049, 77, 4096, 1], 128, (128, 2)),
    (torch.bfloat16, 64, 4, 16, "own", [2500, 128, 127, 300], 128, (128, 2)),         # GQA group 16
    (torch.bfloat16, 32, 8, 16, "kv", [4000, 129, 1, 0, 2063, 3001], 64, (128, 2)),   # a copy a block
    (torch.float16, 32, 8, 64, "own", [2049, 77, 4096, 1, 31, 4032], 64, (128, 2)),
    (torch.bfloat16, 32, 8, 8, "kv", _SPLIT_LENS, 64, (128, 2, 2, "producer")),  # split (132 SMs), splits with no keys
    (torch.float16, 32, 8, 64, "own", _SPLIT_LENS, 64, (128, 2, 2, "producer")),
    (torch.bfloat16, 32, 8, 64, "kv", [4000, 129, 1, 0, 2063, 3001, 4095, 77, 31], 16, (128, 2, "producer")),  # 24 copies
    (torch.float16, 32, 8, 8, "own", [2049, 77, 4096, 1, 31, 4032], 32, (128, 2, "producer")),                # 12
    (torch.bfloat16, 32, 8, 64, "own", [4063], 16, (64, 2, 16, "producer")),   # split, one an SM
    (torch.float16, 32, 8, 16, "kv", [4063], 16, (64, 2, 16, "producer")),
    (torch.bfloat16, 32, 8, 8, "kv", _SPLIT_LENS, 16, (64, 3, 2, "producer")),   # splits sized for one an SM
    (torch.float16, 32, 8, 64, "own", [32001], 32, (64, 2, 16, "producer")),     # 6 copies a tile, 31 tiles a split
    (torch.bfloat16, 32, 8, 64, "kv", [32767], 16, (64, 3, 16, "producer")),     # 32 tiles a split: 3 slots
])
def test_ring_flash_lora_matches_reference(rng_seed, monkeypatch, ring_calls, dtype, hq, hkv, r, table, lens, bs,
                                           ring):
    """Flash-LoRA through the ring: adapters mixed with requests without one (whose L rows are
    NaN: never to be read), L slots past every sequence NaN too. (Unsplit: a GPU of as many SMs
    as the launch has programs, as the plan's unsplit Flash-LoRA launches fill at least 0.9 of
    them; split: 132.)"""
    split = len(ring) > 2 and isinstance(ring[2], int)  # (tile, slots, splits[, "producer"])
    monkeypatch.setattr(A, "_num_sms", lambda device: 132 if split else len(lens) * hkv)
    k, v, bt, sl = make_paged(lens, hkv, 128, bs, dtype, "cuda")
    aid = torch.tensor([(0, -1, 1)[i % 3] for i in range(len(lens))], dtype=torch.int32, device="cuda")
    if table == "kv":
        lr, lbt = torch.randn(k.shape[0], bs, r, device="cuda").to(dtype), bt
        for b, n in enumerate(lens):
            blocks = bt[b, :-(-n // bs)].long()
            if aid[b] < 0:
                lr[blocks] = float("nan")
            elif n % bs:
                lr[blocks[-1], n % bs:] = float("nan")
        lb = (torch.randn(2, hkv, r, 128, device="cuda") / r ** 0.5).to(dtype)
    else:
        lr, lbt, lb = make_lowrank(bt, lens, bs, r, 2, hkv, 128, dtype, "cuda")
    q = torch.randn(len(lens), hq, 128, device="cuda").to(dtype)
    out = poisoned(q.shape, dtype, "cuda")
    flash_lora_decode(q, k, v, lr, lbt, lb, aid, bt, sl, 0.11, out=out, num_splits=None if split else 1)
    assert ring_calls == [ring]
    check(out, flash_lora_decode_ref(q, k, v, lr, lbt, lb, aid, bt, sl, 0.11), dtype)
