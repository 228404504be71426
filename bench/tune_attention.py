"""Sweep launch configurations of the attention kernel on the GPU (a developer tool, not a test).

    PYTHONPATH=. python bench/tune_attention.py --out tune.json [--quick]

For the benchmark shapes (bf16, Hq=32, Hkv=8, D=128, block 16 or `--block-size`) it times paged decode, Flash-LoRA
decode and paged prefill under every (BLOCK_N, num_warps, num_stages[, BLOCK_M], splits) of a
small grid, by CUDA-graph replay (GPU time alone: launch overhead excluded) and eagerly, next to
SDPA on contiguous K/V, and writes every timing as JSON. The winners go into
`kernels.attention._config` / `_default_splits` by hand, with the numbers in the commit.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import kernels.attention as attn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import graph_time_ms as graph_ms  # noqa: E402
from common import copy_time_ms, lora_operands, policy_off  # noqa: E402

HQ, HKV, D, BS = 32, 8, 128, 16
DT = torch.bfloat16
SCALE = D ** -0.5
L2_BYTES = 50 << 20


def eager_ms(fns) -> float:
    from triton.testing import do_bench

    cyc = itertools.cycle(fns)
    return float(do_bench(lambda: next(cyc)(), warmup=10, rep=40, return_mode="median"))


def host_us(fn, n: int = 200) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return t


def paged_cache(batch: int, ctx: int):
    nblk = ctx // BS
    need = batch * nblk
    copies = max(1, -(-2 * L2_BYTES // (2 * need * BS * HKV * D * 2)))
    k = torch.randn(copies * need, BS, HKV, D, device="cuda", dtype=DT)
    v = torch.randn_like(k)
    tables = [(torch.randperm(need, device="cuda") + c * need).view(batch, nblk).int() for c in range(copies)]
    return k, v, tables


def decode_inputs(batch: int, ctx: int):
    """A paged decode case: (k, v, tables, q, seq_lens, out, K/V bytes read per call)."""
    k, v, tables = paged_cache(batch, ctx)
    q = torch.randn(batch, HQ, D, device="cuda", dtype=DT)
    sl = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return k, v, tables, q, sl, torch.empty_like(q), 2 * batch * ctx * HKV * D * 2


def sdpa_decode(q, k, v, tables) -> list:
    """The SDPA baseline: one call per table, on contiguous [batch, Hkv, ctx, D] copies of its
    K/V (held by the calls: drop the list to free them)."""
    batch, ctx = tables[0].shape[0], tables[0].shape[1] * BS
    kc = [k[t.flatten().long()].view(batch, ctx, HKV, D).transpose(1, 2).contiguous() for t in tables]
    vc = [v[t.flatten().long()].view(batch, ctx, HKV, D).transpose(1, 2).contiguous() for t in tables]
    q4 = q.view(batch, HQ, 1, D)
    return [lambda i=i: F.scaled_dot_product_attention(q4, kc[i], vc[i], scale=SCALE, enable_gqa=True)
            for i in range(len(tables))]


class Override:
    """Pin the kernel's launch config and split count while in scope (the one-program-an-SM
    variant, which would change the pipeline depth, and the ring kernel, unsplit or split, which
    would take the launch from `_attn_fwd`, off)."""

    def __init__(self, cfg, splits=None):
        self.cfg, self.splits = cfg, splits

    def __enter__(self):
        self.old = (attn._config, attn._default_splits, attn._tma_single, attn._ring_tiles, attn._ring_split,
                    attn._ring_packed)
        cfg, splits = self.cfg, self.splits
        attn._config = lambda *a, **k: cfg
        attn._tma_single = lambda device: False
        attn._ring_tiles = attn._ring_split = attn._ring_packed = lambda *a, **k: None
        if splits is not None:
            attn._default_splits = lambda *a, **k: splits
        return self

    def __exit__(self, *exc):
        (attn._config, attn._default_splits, attn._tma_single, attn._ring_tiles, attn._ring_split,
         attn._ring_packed) = self.old


def decode_sweep(cases, quick: bool, log) -> list[dict]:
    rows = []
    bns = (32, 64, 128)
    warps = (2, 4, 8)
    stages = (2, 3, 4) if not quick else (3,)
    for batch, ctx in cases:
        k, v, tables, q, sl, out, kvb = decode_inputs(batch, ctx)
        sd = sdpa_decode(q, k, v, tables)
        base = dict(kind="sdpa", batch=batch, ctx=ctx, graph_ms=graph_ms(sd), eager_ms=eager_ms(sd), kv_bytes=kvb)
        rows.append(base)
        log(base)
        del sd  # frees the contiguous copies
        heur = attn._default_splits(batch, HKV, ctx, 64, q.device)
        split_opts = sorted({1, max(1, heur // 2), heur, heur * 2}) if batch * HKV < 264 else [1]
        for bn, w, st in itertools.product(bns, warps, stages):
            for sp in split_opts:
                fns = [lambda t=t: attn.paged_attention_decode(q, k, v, t, sl, SCALE, out=out, validate=False)
                       for t in tables]
                try:
                    with Override((16, bn, w, st), sp):
                        r = dict(kind="decode", batch=batch, ctx=ctx, bn=bn, warps=w, stages=st, splits=sp,
                                 graph_ms=graph_ms(fns), kv_bytes=kvb)
                except Exception as e:  # noqa: BLE001 - out of shared memory etc.: record, go on
                    r = dict(kind="decode", batch=batch, ctx=ctx, bn=bn, warps=w, stages=st, splits=sp,
                             error=str(e)[:200])
                rows.append(r)
                log(r)
        best = sorted((r for r in rows if r.get("kind") == "decode" and r["batch"] == batch and r["ctx"] == ctx
                       and "graph_ms" in r), key=lambda r: r["graph_ms"])[:3]
        for b in best:
            fns = [lambda t=t: attn.paged_attention_decode(q, k, v, t, sl, SCALE, out=out, validate=False)
                   for t in tables]
            with Override((16, b["bn"], b["warps"], b["stages"]), b["splits"]):
                b["eager_ms"] = eager_ms(fns)
                b["host_us"] = host_us(fns[0])
        del k, v, tables
        torch.cuda.empty_cache()
    return rows


@functools.lru_cache(maxsize=None)
def copy_bw() -> float:
    """Device copy bandwidth in bytes/s (read + write; 512 MB of bf16), measured once a run as
    bench_attention measures it: the yardstick of the decode rows' copy_frac."""
    t, nbytes = copy_time_ms(256 << 20, DT)
    return nbytes / (t * 1e-3)


class _NoLaunch:
    """Stands in for `_split_reduce`: a launch that does nothing (to time the main kernel alone)."""

    def __getitem__(self, grid):
        return lambda *a, **k: None


def split_sweep(cases, log, sweep: bool = True) -> list[dict]:
    """Split-KV decode: the default (partials combined by the last split program) against SDPA,
    against combining in a second launch (`_split_reduce`) and against the main kernel alone
    (the second launch made a no-op: what any combine costs); then, when `sweep`, every split
    count (1 .. 96) under tiles × warps × stages (1 included)."""
    rows = []
    for batch, ctx in cases:
        k, v, tables, q, sl, out, kvb = decode_inputs(batch, ctx)
        sd = sdpa_decode(q, k, v, tables)
        t_sdpa = graph_ms(sd)
        del sd
        fns = [lambda t=t: attn.paged_attention_decode(q, k, v, t, sl, SCALE, out=out, validate=False)
               for t in tables]
        t_def = graph_ms(fns)
        fused, attn._fuse_reduce = attn._fuse_reduce, lambda device: False
        try:
            t_two = graph_ms(fns)
            real, attn._split_reduce = attn._split_reduce, _NoLaunch()
            try:
                t_main = graph_ms(fns)
            finally:
                attn._split_reduce = real
        finally:
            attn._fuse_reduce = fused
        r = dict(kind="split_default", batch=batch, ctx=ctx, sdpa_ms=t_sdpa, graph_ms=t_def,
                 two_launch_ms=t_two, main_only_ms=t_main, kv_bytes=kvb,
                 copy_frac=kvb / (t_def * 1e-3) / copy_bw(), two_launch_copy_frac=kvb / (t_two * 1e-3) / copy_bw())
        rows.append(r)
        log(r)
        if not sweep:
            del k, v, tables
            torch.cuda.empty_cache()
            continue
        counts = [c for c in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96) if c <= max(1, ctx // 64)]
        for bn, w, st, sp in itertools.product((32, 64, 128), (4, 8), (1, 2, 3), counts):
            try:
                with Override((16, bn, w, st), sp):
                    r = dict(kind="split", batch=batch, ctx=ctx, bn=bn, warps=w, stages=st, splits=sp,
                             graph_ms=graph_ms(fns, reps=10), vs_sdpa=None)
                r["vs_sdpa"] = r["graph_ms"] / t_sdpa
            except Exception as e:  # noqa: BLE001 - out of shared memory etc.: record, go on
                r = dict(kind="split", batch=batch, ctx=ctx, bn=bn, warps=w, stages=st, splits=sp,
                         error=str(e)[:200])
            rows.append(r)
            log(r)
        del k, v, tables
        torch.cuda.empty_cache()
    return rows


def lora_sweep(cases, log) -> list[dict]:
    """Flash-LoRA decode against paged decode (both at the default config) and under other
    accumulator paddings / tiles, r = 8 and 64."""
    rows = []
    for batch, ctx in cases:
        k, v, tables = paged_cache(batch, ctx)
        q = torch.randn(batch, HQ, D, device="cuda", dtype=DT)
        sl = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        out = torch.empty_like(q)
        fns = [lambda t=t: attn.paged_attention_decode(q, k, v, t, sl, SCALE, out=out, validate=False)
               for t in tables]
        r0 = dict(kind="paged_default", batch=batch, ctx=ctx, graph_ms=graph_ms(fns), eager_ms=eager_ms(fns))
        rows.append(r0)
        log(r0)
        long = ctx >= attn._LONG
        for rank in (8, 64):
            ids, lr, lb = lora_operands(k, batch, rank)
            lfns = [lambda t=t: attn.flash_lora_decode(q, k, v, lr, t, lb, ids, t, sl, SCALE, out=out,
                                                       validate=False) for t in tables]
            rd = dict(kind="lora_default", r=rank, batch=batch, ctx=ctx, graph_ms=graph_ms(lfns))
            rows.append(rd)
            log(rd)
            pads = (16, 32, 64) if rank < 64 else (64,)
            for pad, bn, w in itertools.product(pads, (64, 128), (2, 4)):
                old_pad, old_cfg = attn._lora_pad, attn._config
                attn._lora_pad = lambda r_, d_, pad=pad: pad
                attn._config = lambda *a, bn=bn, w=w, **kw: (16, bn, w, 2)
                try:
                    r = dict(kind="lora", r=rank, pad=pad, batch=batch, ctx=ctx, bn=bn, warps=w,
                             graph_ms=graph_ms(lfns), ratio=None)
                    r["ratio"] = r["graph_ms"] / r0["graph_ms"]
                except Exception as e:  # noqa: BLE001
                    r = dict(kind="lora", r=rank, pad=pad, batch=batch, ctx=ctx, bn=bn, warps=w, error=str(e)[:200])
                finally:
                    attn._lora_pad, attn._config = old_pad, old_cfg
                rows.append(r)
                log(r)
            del lr
        del k, v, tables
        torch.cuda.empty_cache()
    return rows


TILE_CASES = ("1x1024,1x2048,1x4096,2x4096,3x4096,4x4096,6x4096,8x4096,12x4096,12x1024,12x2048,"
              "24x2048,48x1024,8x2048,32x2048,16x2048,64x1024,12x8192,12x16384,6x16384,16x4096,"
              "64x4096,1x32768")


def plan_of(fn):
    """The launch plan `kernels.attention` computes (or finds cached) for one call of `fn`."""
    plans = []
    real = attn._launch_plan

    def spy(key):
        plans.append(real(key))
        return plans[-1]

    attn._launch_plan = spy
    try:
        fn()
    finally:
        attn._launch_plan = real
    return plans[-1]


def planned_decode(batch: int, ctx: int):
    """A paged decode case (`decode_inputs`), its calls as planned (one per rotated table) and
    its launch plan: (k, v, tables, q, sl, out, kv bytes, calls, plan)."""
    k, v, tables, q, sl, out, kvb = decode_inputs(batch, ctx)
    fns = [lambda t=t: attn.paged_attention_decode(q, k, v, t, sl, SCALE, out=out, validate=False)
           for t in tables]
    return k, v, tables, q, sl, out, kvb, fns, plan_of(fns[0])


def tile_sweep(cases, log) -> list[dict]:
    """Split decode's tile width and split count (`kernels.attention._launch_plan`): the
    policy's pick against 64- and 128-key tiles at the split count the policy would give each
    (`_default_splits` with `_resident_per_sm`), half and double it, and SDPA on contiguous K/V."""
    rows = []
    for batch, ctx in cases:
        k, v, tables, q, sl, out, kvb, fns, plan = planned_decode(batch, ctx)
        r = dict(kind="tiles_policy", batch=batch, ctx=ctx, bn=plan.meta["BLOCK_N"],
                 splits=plan.grid[1] // HKV, graph_ms=graph_ms(fns), kv_bytes=kvb)
        sd = sdpa_decode(q, k, v, tables)
        r["sdpa_ms"] = graph_ms(sd)
        del sd
        rows.append(r)
        log(r)
        for bn in (64, 128):
            pol = attn._default_splits(batch, HKV, ctx, bn, q.device, attn._resident_per_sm(bn, D))
            for sp in sorted({max(1, pol // 2), pol, pol * 2}):
                with Override((16, bn, 4, 2), sp):
                    r = dict(kind="tiles", batch=batch, ctx=ctx, bn=bn, warps=4, stages=2, splits=sp,
                             policy_splits=sp == pol, graph_ms=graph_ms(fns))
                rows.append(r)
                log(r)
        del k, v, tables
        torch.cuda.empty_cache()
    return rows


PACK_CASES = "40x4096,48x4096,64x4096,80x4096,96x4096,128x4096,64x16384,80x16384,96x16384,128x16384,256x4096"


def pack_sweep(cases, log) -> list[dict]:
    """Packed ring launches (`kernels.attention._ring_packed`, several KV heads a program): the
    plan against the plan without packs, each pack of 2 and 4 heads unsplit at two ring slots
    with and without the producer warp (`attention_ring.ring_decode(pack=)` directly), and SDPA
    on contiguous K/V (Hopper with Gluon only)."""
    from kernels import attention_ring

    rows = []
    for batch, ctx in cases:
        k, v, tables, q, sl, out, kvb, fns, plan = planned_decode(batch, ctx)
        ring = plan.ring
        r = dict(kind="pack", batch=batch, ctx=ctx, variant="plan", ring=ring and list(ring), graph_ms=graph_ms(fns),
                 kv_bytes=kvb)
        sd = sdpa_decode(q, k, v, tables)
        r["sdpa_ms"] = graph_ms(sd)
        del sd
        rows.append(r)
        log(r)
        with policy_off("_ring_packed"):
            r = dict(kind="pack", batch=batch, ctx=ctx, variant="plan without packs", graph_ms=graph_ms(fns))
        rows.append(r)
        log(r)
        for pack in (2, 4):
            programs = batch * HKV // pack
            for producer in (False, True):
                if producer and programs > attn._num_sms(q.device):
                    continue
                launch = [lambda t=t: attention_ring.ring_decode(q, k, v, t, sl, SCALE * attn._LOG2E, out,
                                                                 block_n=128 // pack, stages=2, producer=producer,
                                                                 pack=pack) for t in tables]
                r = dict(kind="pack", batch=batch, ctx=ctx, variant=f"pack {pack}" + (" producer" if producer else ""),
                         graph_ms=graph_ms(launch))
                rows.append(r)
                log(r)
        del k, v, tables
        torch.cuda.empty_cache()
    return rows


BATCH_CASES = ("1,2,3,4,6,8,10,12,14,16,17,20,24,28,32,33,36,40,44,48,50,56,60,64,66,68,72,76,80,84,88,92,96,"
               "100,104,108,112,116,120,124,128,132,133,140,150,160,176,192,224,256")


def splits_last_wave(plan) -> bool:
    return bool(plan.meta.get("TAIL") or (plan.ring and plan.ring.full_items))


def batch_sweep(batches, ctx: int, log, lora_rank: int = 0) -> list[dict]:
    """Paged decode as planned against SDPA on contiguous K/V over many batch sizes at one
    context length (`--block-size` blocks): where across batch sizes the plan falls behind; a
    plan that splits its last wave (`_tail_split`: `_attn_fwd`'s TAIL or the ring kernel's
    `full_items`) also without it. With `lora_rank`, Flash-LoRA decode (4 adapters and no
    adapter mixed) as planned, and also without its split last wave where it has one."""
    rows = []
    for batch in batches:
        k, v, tables, q, sl, out, kvb, fns, plan = planned_decode(batch, ctx)
        r = dict(kind="batches", batch=batch, ctx=ctx, bs=BS, ring=plan.ring and list(plan.ring),
                 grid=list(plan.grid), bn=plan.meta["BLOCK_N"], graph_ms=graph_ms(fns), kv_bytes=kvb)
        if splits_last_wave(plan):  # against its last wave whole
            with policy_off("_tail_split"):
                r["no_tail_ms"] = graph_ms(fns)
        sd = sdpa_decode(q, k, v, tables)
        r["sdpa_ms"] = graph_ms(sd)
        r["ratio"] = r["graph_ms"] / r["sdpa_ms"]
        del sd
        if lora_rank:
            ids, lr, lb = lora_operands(k, batch, lora_rank)
            lfns = [lambda t=t: attn.flash_lora_decode(q, k, v, lr, t, lb, ids, t, sl, SCALE, out=out,
                                                       validate=False) for t in tables]
            lplan = plan_of(lfns[0])
            r.update(r=lora_rank, lora_ring=lplan.ring and list(lplan.ring), lora_grid=list(lplan.grid),
                     lora_ms=graph_ms(lfns))
            if splits_last_wave(lplan):
                with policy_off("_tail_split"):
                    r["lora_no_tail_ms"] = graph_ms(lfns)
            del lr, lb, lfns
        del k, v, tables, fns
        torch.cuda.empty_cache()
        rows.append(r)
        log(r)
    return rows


PREFILL_CFGS = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                (128, 64, 8, 4), (64, 128, 4, 3), (128, 32, 4, 3), (64, 64, 4, 4), (128, 128, 4, 2),
                (128, 32, 4, 4), (128, 32, 8, 3), (128, 32, 4, 2), (64, 32, 4, 3), (128, 16, 4, 3),
                (128, 64, 4, 4), (256, 32, 8, 3), (128, 128, 8, 4)]


def prefill_sweep(cases, quick: bool, log) -> list[dict]:
    rows = []
    cfgs = PREFILL_CFGS[:3] if quick else PREFILL_CFGS
    for batch, seq in cases:
        n = batch * seq
        k = torch.randn(n // BS, BS, HKV, D, device="cuda", dtype=DT)
        v = torch.randn_like(k)
        bt = torch.randperm(n // BS, device="cuda").view(batch, seq // BS).int()
        q = torch.randn(n, HQ, D, device="cuda", dtype=DT)
        cq = torch.arange(0, n + 1, seq, dtype=torch.int32, device="cuda")
        sl = torch.full((batch,), seq, dtype=torch.int32, device="cuda")
        out = torch.empty_like(q)
        flops = 4 * batch * seq * seq / 2 * HQ * D
        qs = q.view(batch, seq, HQ, D).transpose(1, 2)
        kk = k[bt.flatten().long()].view(batch, seq, HKV, D).transpose(1, 2).repeat_interleave(HQ // HKV, 1)
        vv = v[bt.flatten().long()].view(batch, seq, HKV, D).transpose(1, 2).repeat_interleave(HQ // HKV, 1)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel(be):
                    t = graph_ms([lambda: F.scaled_dot_product_attention(qs, kk, vv, is_causal=True, scale=SCALE)],
                                 reps=3)
                r = dict(kind=name, batch=batch, seq=seq, graph_ms=t, tflops=flops / t / 1e9)
            except Exception as e:  # noqa: BLE001
                r = dict(kind=name, batch=batch, seq=seq, error=str(e)[:200])
            rows.append(r)
            log(r)
        del kk, vv
        fns = [lambda: attn.paged_attention_prefill(q, k, v, bt, cq, sl, SCALE, out=out, max_seqlen_q=seq,
                                                     validate=False)]
        for cfg in cfgs:
            try:
                with Override(cfg, 1):
                    t = graph_ms(fns, reps=3)
                r = dict(kind="prefill", batch=batch, seq=seq, cfg=cfg, graph_ms=t, tflops=flops / t / 1e9)
            except Exception as e:  # noqa: BLE001
                r = dict(kind="prefill", batch=batch, seq=seq, cfg=cfg, error=str(e)[:200])
            rows.append(r)
            log(r)
        del k, v, q
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    global BS
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tune.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--what", default="decode,lora,prefill", help="comma list of decode, splits (combine and the split sweep), combine, lora, "
                         "prefill, tiles (split decode's tile width and split count), "
                         "pack (several KV heads a program), batches (the plan vs SDPA over batch sizes)")
    ap.add_argument("--tile-cases", default=TILE_CASES, help="BATCHxCTX,... for tiles")
    ap.add_argument("--split-cases", default="16x4096,1x32768,1x4096,16x8192,4x8192,1x16384",
                    help="BATCHxCTX,... for splits / combine")
    ap.add_argument("--pack-cases", default=PACK_CASES, help="BATCHxCTX,... for pack")
    ap.add_argument("--batches", default=BATCH_CASES, help="batch sizes for batches")
    ap.add_argument("--batch-ctx", type=int, default=4096, help="keys a sequence for batches")
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="batches: also Flash-LoRA decode at this rank, with and without its last wave split")
    ap.add_argument("--prefill-cases", default="16x1024,4x4096,1x16384", help="BATCHxSEQ,...")
    ap.add_argument("--block-size", type=int, default=16,
                    help="cache block size (128: the TMA decode path, the engine's default on Hopper)")
    args = ap.parse_args()
    BS = args.block_size
    rows: list[dict] = []

    def log(r):
        print(json.dumps(r), flush=True)
        with open(args.out, "w") as f:
            json.dump(rows, f)

    what = args.what.split(",")
    if "decode" in what:
        rows += decode_sweep([(1, 4096), (1, 32768), (16, 4096), (16, 32768), (64, 4096), (64, 32768)],
                             args.quick, log)
    if "splits" in what or "combine" in what:
        cases = [tuple(int(x) for x in c.split("x")) for c in args.split_cases.split(",")]
        rows += split_sweep(cases, log, sweep="splits" in what)
    if "tiles" in what:
        rows += tile_sweep([tuple(int(x) for x in c.split("x")) for c in args.tile_cases.split(",")], log)
    if "pack" in what:
        rows += pack_sweep([tuple(int(x) for x in c.split("x")) for c in args.pack_cases.split(",")], log)
    if "batches" in what:
        rows += batch_sweep([int(x) for x in args.batches.split(",")], args.batch_ctx, log, args.lora_rank)
    if "lora" in what:
        rows += lora_sweep([(1, 4096), (1, 32768), (16, 4096), (16, 32768), (64, 4096)], log)
    if "prefill" in what:
        cases = [tuple(int(x) for x in c.split("x")) for c in args.prefill_cases.split(",")]
        rows += prefill_sweep(cases, args.quick, log)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=0)
    summarize(rows)


def summarize(rows) -> None:
    """The best configuration per case next to its baseline."""
    by = {}
    for r in rows:
        if "graph_ms" not in r:
            continue
        kind = r["kind"] if "r" not in r else f"{r['kind']}{r['r']}"
        kind = "tiles" if kind == "tiles_policy" else kind  # the policy competes with the sweep
        key = (kind, r.get("batch"), r.get("ctx", r.get("seq")))
        if kind == "pack" and r["variant"] == "plan":
            print(f"PLAN {key}: {r['graph_ms']:.4f} ms (SDPA {r['sdpa_ms']:.4f}) {r['ring']}")
        if key not in by or r["graph_ms"] < by[key]["graph_ms"]:
            by[key] = r
    for key in sorted(by, key=str):
        r = by[key]
        extra = {k: r[k] for k in ("bn", "warps", "stages", "splits", "pad", "cfg", "tflops", "eager_ms", "ratio",
                                   "variant")
                 if k in r}
        print(f"BEST {key}: {r['graph_ms']:.4f} ms {extra}")


if __name__ == "__main__":
    main()
