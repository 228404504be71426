"""Where does the DeepSeek-V2-Lite MoE layer's time go? (GPU only; one device call.)

    PYTHONPATH=. python3 bench/profile_moe.py [--quick]   # --quick: T=1 and 256 breakdown only

Prints, per batch size: the layer as bench_experts times it (CUDA events, host overhead
included), its device time alone (the layer replayed from a CUDA graph), its host time per call
(back-to-back calls, no sync), each stage's host time, each kernel's device time
(torch.profiler), the fused_moe device time per tile config, and a cProfile of adapter
load / unload. Every section is guarded so one failure does not hide the rest.
"""
from __future__ import annotations

import cProfile
import io
import itertools
import pstats
import sys
import time
import traceback

import torch
import torch.nn.functional as F

H, I, M, K, LAYER = 2048, 1408, 64, 6, 1
SHARED_I = 2 * I
DT = torch.bfloat16
DEV = "cuda"


def bench_ms(fn, warmup=10.0, rep=40.0):
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def graph_ms(fn, reps=10):
    """Device time per call: `reps` calls captured in one CUDA graph, replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return bench_ms(g.replay) / reps


def host_us(fn, n=200):
    """Host time per call when calls are issued back to back (the queue never fills at these
    sizes only if the device is faster; we sync before, and report wall / n without the sync)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def section(name):
    print(f"\n=== {name} ===", flush=True)


def guarded(f):
    def run(*a, **k):
        try:
            return f(*a, **k)
        except Exception:  # noqa: BLE001 - keep profiling the other sections
            traceback.print_exc()
    return run


def setup():
    from experts import ExpertStore, MoELayer

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(4, 11, (10,), generator=gen).tolist()
    store = ExpertStore([LAYER], M, H, I, sum(counts) + 7, dtype=DT, device=DEV, max_adapters=21)
    w13 = (torch.randn(M, 2 * I, H, device=DEV) / H ** 0.5).to(DT)
    w2 = (torch.randn(M, H, I, device=DEV) / I ** 0.5).to(DT)
    store.load_base(LAYER, w13, w2)
    gate = torch.randn(M, H, device=DEV)
    sh13 = (torch.randn(2 * SHARED_I, H, device=DEV) / H ** 0.5).to(DT)
    sh2 = (torch.randn(H, SHARED_I, device=DEV) / SHARED_I ** 0.5).to(DT)
    kw = dict(router_fp32=True, shared_w13=sh13, shared_w2=sh2)
    ours = MoELayer.from_store(store, LAYER, gate, K, **kw)
    base = MoELayer(gate, w13, w2, K, **kw)
    for a, n in enumerate(counts):
        ids = torch.randperm(M, generator=gen)[:n].tolist()
        store.load_adapter(f"esft{a}", {LAYER: {e: ((w13[e] * 1.01).contiguous(), (w2[e] * 1.01).contiguous())
                                                for e in ids}})
    return store, ours, base, w13, w2, gen


@guarded
def layer_breakdown(ours, base, T, n_adapters=10):
    from kernels.moe import fused_moe, moe_align_block_size, router_topk, _moe_config

    xs = [torch.randn(T, H, device=DEV).to(DT) for _ in range(8)]
    aids = [torch.randint(0, n_adapters, (T,), device=DEV, dtype=torch.int32) for _ in range(8)]
    cyc = itertools.cycle(range(8))
    run_ours = lambda: ours(xs[next(cyc)], aids[next(cyc) % 8], validate=False)  # noqa: E731
    run_base = lambda: base(xs[next(cyc)], validate=False)  # noqa: E731
    section(f"T={T}")
    for name, fn in (("base", run_base), ("store+reroute", run_ours)):
        ev = bench_ms(fn) * 1e3
        dev = graph_ms(fn) * 1e3
        host = host_us(fn)
        print(f"layer {name:14s}: events {ev:8.1f} us | device (graph) {dev:8.1f} us | host/call {host:8.1f} us")
    x, a = xs[0], aids[0]
    logits = F.linear(x.float(), base.gate_weight.float())
    tw, ids = router_topk(logits, K, adapter_ids=a, expert_map=ours.expert_map, validate=False)
    cfg = _moe_config(T * K, M, DT)
    stages = {
        "router linear": lambda: F.linear(x.float(), base.gate_weight.float()),
        "router_topk+reroute": lambda: router_topk(logits, K, adapter_ids=a, expert_map=ours.expert_map,
                                                   validate=False),
        "align": lambda: moe_align_block_size(ids, cfg["BLOCK_M"], ours.w13.shape[0]),
        "fused_moe (store)": lambda: fused_moe(x, ours.w13, ours.w2, tw, ids, validate=False),
        "shared experts": lambda: base.shared(x),
        "empty tensor": lambda: torch.empty(T, H, device=DEV),
    }
    for name, fn in stages.items():
        print(f"  stage {name:22s}: host {host_us(fn):7.1f} us | device (graph) {graph_ms(fn) * 1e3:7.1f} us")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            run_ours()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=50))


@guarded
def tile_sweep(w13, w2, T):
    from kernels.moe import fused_moe, router_topk

    x = torch.randn(T, H, device=DEV).to(DT)
    tw, ids = router_topk(torch.randn(T, M, device=DEV), K)
    configs = [
        dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=4),
        dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4),
        dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=8, num_stages=3),
        dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=3),
        dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=4, num_warps=4, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    ]
    section(f"fused_moe tile sweep T={T} (device time via graph; bytes read ~{_bytes_read(ids) / 1e6:.0f} MB)")
    for cfg in configs:
        if T * K <= 64 and cfg["BLOCK_M"] > 16:
            continue
        try:
            t = graph_ms(lambda: fused_moe(x, w13, w2, tw, ids, validate=False, config=cfg)) * 1e3
            print(f"  {cfg}: {t:8.1f} us  ({_bytes_read(ids) / t / 1e6:.2f} TB/s)")
        except Exception as err:  # noqa: BLE001
            print(f"  {cfg}: failed {type(err).__name__}: {str(err)[:200]}")


def _bytes_read(ids):
    n = torch.unique(ids).numel()
    return n * 3 * H * I * 2


@guarded
def load_profile(store, w13, w2, gen):
    section("adapter load / unload (cProfile, 3 cycles)")
    ids = torch.randperm(M, generator=gen)[:7].tolist()
    ex = {LAYER: {e: ((w13[e] * 1.02).contiguous(), (w2[e] * 1.02).contiguous()) for e in ids}}
    store.load_adapter("warm", ex)
    store.unload_adapter("warm")
    torch.cuda.synchronize()
    for what in ("load", "unload"):
        pr = cProfile.Profile()
        t = 0.0
        for _ in range(3):
            torch.cuda.synchronize()
            if what == "unload":
                store.load_adapter("p", ex)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                pr.enable()
                store.unload_adapter("p")
            else:
                t0 = time.perf_counter()
                pr.enable()
                store.load_adapter("p", ex)
            torch.cuda.synchronize()
            pr.disable()
            t += time.perf_counter() - t0
            if what == "load":
                store.unload_adapter("p")
        print(f"{what}: {t / 3 * 1e6:.0f} us per call (under cProfile)")
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14)
        print("\n".join(s.getvalue().splitlines()[:40]))
    print("pool stats:", store.pool.stats())


def main():
    quick = "--quick" in sys.argv
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    import triton
    print("triton", triton.__version__)
    store, ours, base, w13, w2, gen = setup()
    for T in ((1, 256) if quick else (1, 16, 64, 256)):
        layer_breakdown(ours, base, T)
    if quick:  # layer breakdown only
        return
    for T in (1, 64, 256):
        tile_sweep(w13, w2, T)
    load_profile(store, w13, w2, gen)


if __name__ == "__main__":
    main()
