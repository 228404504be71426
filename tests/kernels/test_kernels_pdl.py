"""Programmatic dependent launch (`kernels._pdl`): where it is on, and that a kernel launched
with it reads what the kernel right before it wrote (its `griddepcontrol.wait` comes before any
global access), on the decode plans it is on: `_attn_fwd` (by TMA, split and not, per-thread
loads) and the ring kernel (unsplit, split, through the producer warp, a split last wave); a
decode launched with it right after a (plain) prefill."""
from __future__ import annotations

import pytest
import torch

from kernels import _pdl
from kernels import attention as A
from kernels.attention import (flash_lora_decode, paged_attention_decode, paged_attention_prefill)
from kernels.attention_ref import (flash_lora_decode_ref, paged_attention_decode_ref,
                                   paged_attention_prefill_ref)
from test_kernels_attention import check, cu, make_lowrank, make_paged, poisoned
from test_kernels_attention_launch import gpu_decode_plan, tma_device  # noqa: F401 (a fixture)
from test_kernels_attention_ring import ring_device  # noqa: F401 (a fixture)


# ---------------------------------------------------------------- where it is on (CPU)
@pytest.mark.parametrize("dev, cap, interpreted, env, want", [
    ("cuda:0", (9, 0), False, True, True),     # Hopper, compiled
    ("cuda:0", (10, 0), False, True, True),    # and later
    ("cuda:0", (8, 9), False, True, False),    # Ada: no griddepcontrol
    ("cuda:0", (9, 0), True, True, False),     # the interpreter
    ("cuda:0", (9, 0), False, False, False),   # VMWEAVE_PDL=0
    ("cpu", (9, 0), False, True, False),
])
def test_pdl_enabled_rule(monkeypatch, dev, cap, interpreted, env, want):
    monkeypatch.setattr(A, "_cuda_capability", lambda index: cap)
    monkeypatch.setattr(A, "interpreter_on", lambda: interpreted)
    monkeypatch.setattr(_pdl, "_ENV_ON", env)
    assert A._pdl(torch.device(dev), interpreted) is want


def test_pdl_in_the_plan_as_a_constexpr_and_a_launch_option(monkeypatch):
    """The plan carries PDL both ways: the kernel's constexpr (its wait) and Triton's launch
    option (the launch attribute), on together or off together; off under the interpreter."""
    real = A._pdl
    monkeypatch.setattr(A, "_pdl", lambda device, interpreted: True)
    on = gpu_decode_plan(monkeypatch, 4, 4096, bs=128)
    assert on.meta["PDL"] and on.meta["launch_pdl"] is True
    monkeypatch.setattr(A, "_pdl", lambda device, interpreted: False)
    off = gpu_decode_plan(monkeypatch, 4, 4096, bs=128)
    assert not off.meta["PDL"] and "launch_pdl" not in off.meta
    # (the plan's own rule: a meta device is no CUDA device)
    monkeypatch.setattr(A, "_pdl", real)
    assert not gpu_decode_plan(monkeypatch, 4, 4096, bs=128).meta["PDL"]


@pytest.mark.parametrize("bs, batch, ctx, rank, want", [
    (64, 1, 4096, 64, False),   # Flash-LoRA by `_attn_fwd` over 64-key TMA tiles, 64-column L tiles: lost
    (64, 2, 4096, 64, False),
    (64, 1, 2048, 64, False),
    (64, 1, 4096, 8, True),     # 32-column L tiles: gained
    (128, 1, 4096, 64, True),   # 128-key tiles: gained
    (16, 1, 4096, 64, True),    # the ring kernel
    (64, 1, 32768, 64, True),
    (64, 1, 4096, 0, True),     # paged decode
])
def test_pdl_off_only_where_it_lost(monkeypatch, ring_device, bs, batch, ctx, rank, want):
    monkeypatch.setattr(A, "_pdl", lambda device, interpreted: True)
    plan = gpu_decode_plan(monkeypatch, batch, ctx, bs=bs, lora=rank > 0, rank=max(rank, 8))
    assert plan.meta["PDL"] is want and ("launch_pdl" in plan.meta) is want


def test_prefill_plans_have_pdl_off(monkeypatch):
    """Prefill launches stay plain (long kernels; in blocks of 16 they lost with it)."""
    monkeypatch.setattr(A, "interpreter_on", lambda: False)
    monkeypatch.setattr(A, "_num_sms", lambda device: 132)
    monkeypatch.setattr(A, "_pdl", lambda device, interpreted: True)
    meta = dict(dtype=torch.bfloat16, device="meta")
    for bs in (16, 128):
        q = torch.empty(4 * 1024, 32, 128, **meta)
        k = torch.empty(4 * 1024 // bs, bs, 8, 128, **meta)
        bt = torch.empty(4, 1024 // bs, dtype=torch.int32, device="meta")
        key = A._launch_key(q, k, k, q, paged=True, decode=False, batch=4, block_tables=bt, lora=None, s2=None,
                            max_seqlen_q=1024, num_splits=None)
        plan = A._launch_plan(key)
        assert plan.meta["PDL"] is False and "launch_pdl" not in plan.meta
    A._launch_plan.cache_clear()


def test_interpreter_plans_have_pdl_off():
    """Under the CPU interpreter (CI) every launch is a plain one, whatever the device rule says."""
    if not A.interpreter_on():
        pytest.skip("runs under TRITON_INTERPRET=1")
    q = torch.randn(2, 4, 16)
    k, v, bt, sl = make_paged([37, 20], 2, 16, 16, torch.float32, "cpu")
    key = A._launch_key(q, k, v, q, paged=True, decode=True, batch=2, block_tables=bt, lora=None, s2=None,
                        max_seqlen_q=None, num_splits=None)
    assert not A._launch_plan(key).meta["PDL"]


# ---------------------------------------------------------------- a chain of launches (GPU)
def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


CHAIN_CASES = [  # (block size, lens, lora): each plan below is one of those PDL is on for
    (128, [4099], False),                 # _attn_fwd by TMA, split (1 × 4K: 32 splits)
    (128, [4096] * 16, False),            # the ring kernel, unsplit, one an SM
    (128, [4097] * 17, False),            # the ring kernel, one wave and a few split
    (128, [2048] * 70, False),            # _attn_fwd by TMA over several waves, last one split
    (64, [32768], False),                 # the ring kernel split, 128-key tiles
    (16, [4096] * 16, False),             # the ring kernel through the producer warp
    (16, [8191, 3, 4100], False),         # the ring kernel split in blocks of 16
    (32, [4096] * 64, False),             # packs of KV heads
    (128, [4099], True),                  # Flash-LoRA by TMA, split
    (16, [4096] * 17, True),              # Flash-LoRA through the ring
    (16, [301, 7, 0], False),             # short: _attn_fwd's per-thread loads
]


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs a CUDA device of compute capability 9 or later")
@pytest.mark.parametrize("bs, lens, lora", CHAIN_CASES)
@pytest.mark.parametrize("graph", [False, True])
def test_gpu_pdl_chain_reads_the_output_of_the_launch_before(plan_metas, bs, lens, lora, graph):
    """Three decodes back to back on one stream, each reading the one before's output as its
    query (poisoned with NaN before the chain starts): a launch that touched memory before the
    one before it completed would read NaN or a stale query. Eagerly and in a CUDA graph (whose
    capture turns the launches' PDL attribute into programmatic edges), new queries each time."""
    torch.manual_seed(len(lens) * 1000 + bs)
    dtype, hq, hkv, d = torch.bfloat16, 32, 8, 128
    k, v, bt, sl = make_paged(lens, hkv, d, bs, dtype, "cuda")
    q0 = torch.empty(len(lens), hq, d, device="cuda", dtype=dtype)
    outs = [torch.empty_like(q0) for _ in range(3)]
    if lora:
        lr, lbt, lb = make_lowrank(bt, lens, bs, 16, 2, hkv, d, dtype, "cuda")
        aid = torch.tensor([(0, -1, 1)[i % 3] for i in range(len(lens))], dtype=torch.int32, device="cuda")

        def call(q, o):
            flash_lora_decode(q, k, v, lr, lbt, lb, aid, bt, sl, d ** -0.5, out=o, validate=False)

        def ref(q):
            return flash_lora_decode_ref(q, k, v, lr, lbt, lb, aid, bt, sl, d ** -0.5)
    else:
        def call(q, o):
            paged_attention_decode(q, k, v, bt, sl, d ** -0.5, out=o, validate=False)  # (capturable)

        def ref(q):
            return paged_attention_decode_ref(q, k, v, bt, sl, d ** -0.5)

    def chain():
        for o in outs:
            o.fill_(float("nan"))
        call(q0, outs[0])
        call(outs[0], outs[1])
        call(outs[1], outs[2])

    if graph:
        chain()  # compiled and planned outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            chain()
        run = g.replay
    else:
        run = chain
    for _ in range(3):
        q0.copy_(torch.randn_like(q0, dtype=torch.float32).to(dtype))
        run()
        torch.cuda.synchronize()
        prev = q0
        for o in outs:
            # (each step's reference from the kernel's own input: errors do not compound)
            check(o, ref(prev), dtype)
            prev = o
    assert plan_metas and all(m["PDL"] for m in plan_metas), "PDL is off on this device"
    # Outputs of decode are averages of V rows: a query of them is no longer random; the third
    # output still differs from the first wherever the chain ran in order.
    assert not torch.equal(outs[0], outs[2])


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper(), reason="needs a CUDA device of compute capability 9 or later")
def test_gpu_pdl_prefill_then_decode_reads_the_prefill():
    """Prefill (a plain launch) writes its output, and decode launched right after it with PDL
    reads it as its query (poisoned first)."""
    torch.manual_seed(7)
    dtype, hq, hkv, d, bs = torch.float16, 8, 2, 64, 16
    lens = [301, 77, 1030]
    k, v, bt, sl = make_paged(lens, hkv, d, bs, dtype, "cuda")
    qlens = [1, 1, 1]  # the last token of each sequence: its output has decode's shape
    q = torch.randn(3, hq, d, device="cuda").to(dtype)
    cq = cu(qlens, "cuda")
    mid, out = poisoned(q.shape, dtype, "cuda"), poisoned(q.shape, dtype, "cuda")
    paged_attention_prefill(q, k, v, bt, cq, sl, d ** -0.5, out=mid)
    paged_attention_decode(mid, k, v, bt, sl, d ** -0.5, out=out)
    torch.cuda.synchronize()
    check(mid, paged_attention_prefill_ref(q, k, v, bt, cq, sl, d ** -0.5), dtype)
    check(out, paged_attention_decode_ref(mid, k, v, bt, sl, d ** -0.5), dtype)
