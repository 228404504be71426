"""Multi-LoRA shrink + expand (kernels.lora) on decode batches of mixed adapters.

Rows (same run, same card):
- `lora decode`: our shrink+expand (plan built once per batch, as the engine does) vs a torch
  loop over the adapters present (per-adapter gather + matmuls + index_add, indices precomputed:
  the vLLM-style path without SGMV), and vs one dense `x·A·B` for a single adapter (the lower
  bound: no grouping at all).
- `lora shared-A`: the dense fast path (`lora_a` [H, r]) vs the general grouped path on the
  same (identical) As.
- `lora prefill`, `lora shrink_all`, `lora plan`: a prefill-sized batch, the stacked all-agents
  shrink vs torch's broadcast matmul, and the host cost of building a plan.
Weights rotate over enough copies to exceed L2 (50 MB), as between layers of a real model.
The `lora decode`, `lora shared-A` and `lora shrink_all` rows are timed as a serving engine runs
them, captured in a CUDA graph (GPU time, launch overhead excluded: at T = 1 a call is a few
microseconds of GPU work under tens of launch overhead), with eager times
(`triton.testing.do_bench`) in the notes; `lora prefill` stays eager (GPU-bound).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from common import compare, graph_time_ms, host_time_us, record_benchmark, time_ms

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

H = N = 4096
DT = torch.bfloat16
L2_BYTES = 50 << 20
TIMING = dict(warmup_ms=10.0, rep_ms=40.0)


def _ids(T: int, A: int) -> torch.Tensor:
    """Mixed adapters in random order, about 1 in 8 tokens base-only (-1); token 0 always has
    an adapter so T=1 measures real work."""
    ids = torch.randint(0, A, (T,), dtype=torch.int32, device="cuda")
    none = torch.rand(T, device="cuda") < 0.125
    none[0] = False
    return torch.where(none, -1, ids).to(torch.int32)


def _weight_sets(A: int, r: int):
    per_set = 2 * A * H * r * 2
    n = max(2, min(64, -(-2 * L2_BYTES // per_set)))
    return [((torch.randn(A, H, r, device="cuda") / H ** 0.5).to(DT),
             (torch.randn(A, r, N, device="cuda") / r ** 0.5).to(DT)) for _ in range(n)]


def _torch_loop(x, ids, res):
    """Per-adapter matmuls with precomputed row indices (no SGMV)."""
    groups = [(a, (ids == a).nonzero().flatten()) for a in torch.unique(ids).tolist() if a >= 0]

    def run(a_w, b_w):
        for a, idx in groups:
            res.index_add_(0, idx, (x.index_select(0, idx) @ a_w[a]) @ b_w[a])
    return run


@pytest.mark.parametrize("A", [3, 16])
@pytest.mark.parametrize("T", [1, 16, 64, 256])
def test_lora_decode(benchmark, T, A):
    from kernels.lora import lora_expand, lora_plan, lora_shrink

    x = torch.randn(T, H, device="cuda").to(DT)
    ids = _ids(T, A)
    res = torch.randn(T, N, device="cuda").to(DT)
    plan = lora_plan(ids, A)
    keep = None
    for r in (8, 16, 64):
        sets = _weight_sets(A, r)
        cyc = itertools.cycle(range(len(sets)))
        loop = _torch_loop(x, ids, res)

        def ours():
            a, b = sets[next(cyc)]
            lora_expand(lora_shrink(x, a, ids, plan=plan), b, ids, plan=plan, out=res)

        def base_loop():
            loop(*sets[next(cyc)])

        def dense():
            a, b = sets[next(cyc)]
            res.addmm_(x @ a[0], b[0])

        e_ours, e_loop, e_dense = (time_ms(f, **TIMING) for f in (ours, base_loop, dense))
        t_ours, t_loop, t_dense = (graph_time_ms([f] * len(sets)) for f in (ours, base_loop, dense))
        case = f"T={T} r={r} A={A}"
        compare("lora decode", case, ours=("sgmv shrink+expand", t_ours), base=("torch loop", t_loop),
                goal="< 1", note=f"CUDA graph, plan prebuilt; eager {e_ours:.3g} / {e_loop:.3g} ms")
        compare("lora decode", case, ours=("sgmv shrink+expand", t_ours),
                base=("dense x·A·B, 1 adapter", t_dense), goal="lower bound",
                note=f"CUDA graph; eager {e_ours:.3g} / {e_dense:.3g} ms")
        if r == 16:
            keep = ours
    record_benchmark(benchmark, keep)


@pytest.mark.parametrize("T", [16, 256, 4096])
def test_lora_shared_a(benchmark, T):
    from kernels.lora import lora_plan, lora_shrink

    A, r = 16, 16
    x = torch.randn(T, H, device="cuda").to(DT)
    ids = _ids(T, A)
    plan = lora_plan(ids, A)
    sets = [s[0][:1].expand(A, H, r).contiguous() for s in _weight_sets(A, r)[:8]]
    cyc = itertools.cycle(range(len(sets)))

    def fast():
        lora_shrink(x, sets[next(cyc)][0], ids, plan=plan)

    def general():
        lora_shrink(x, sets[next(cyc)], ids, plan=plan)

    e_fast, e_general = time_ms(fast, **TIMING), time_ms(general, **TIMING)
    compare("lora shared-A", f"T={T} r={r} A={A}", ours=("dense fast path", graph_time_ms([fast] * len(sets))),
            base=("grouped path", graph_time_ms([general] * len(sets))), goal="≤ 1",
            note=f"CUDA graph; eager {e_fast:.3g} / {e_general:.3g} ms")
    record_benchmark(benchmark, fast)


def test_lora_prefill(benchmark):
    from kernels.lora import lora_expand, lora_plan, lora_shrink

    T, A, r = 4096, 3, 16
    x = torch.randn(T, H, device="cuda").to(DT)
    ids = _ids(T, A)
    res = torch.randn(T, N, device="cuda").to(DT)
    plan = lora_plan(ids, A)
    sets = _weight_sets(A, r)[:4]  # x and res (64 MB) already exceed L2
    cyc = itertools.cycle(range(len(sets)))
    loop = _torch_loop(x, ids, res)

    def ours():
        a, b = sets[next(cyc)]
        lora_expand(lora_shrink(x, a, ids, plan=plan), b, ids, plan=plan, out=res)

    def base():
        loop(*sets[next(cyc)])

    t_ours = time_ms(ours, **TIMING)
    moved = (2 * T * H + 2 * T * N) * 2  # x read, res read + written, weights negligible
    compare("lora prefill", f"T={T} r={r} A={A}", ours=("sgmv shrink+expand", t_ours),
            base=("torch loop", time_ms(base, **TIMING)), goal="< 1",
            note=f"{moved / t_ours / 1e9:.2f} TB/s of x+out traffic")
    record_benchmark(benchmark, ours)


def test_lora_shrink_all(benchmark):
    from kernels.lora import lora_shrink_all

    T, A, r = 256, 16, 16
    x = torch.randn(T, H, device="cuda").to(DT)
    sets = [s[0] for s in _weight_sets(A, r)]
    cyc = itertools.cycle(range(len(sets)))

    def ours():
        lora_shrink_all(x, sets[next(cyc)])

    def base():
        torch.matmul(x.unsqueeze(0), sets[next(cyc)])

    e_ours, e_base = time_ms(ours, **TIMING), time_ms(base, **TIMING)
    compare("lora shrink_all", f"T={T} r={r} A={A}", ours=("stacked shrink", graph_time_ms([ours] * len(sets))),
            base=("torch broadcast matmul", graph_time_ms([base] * len(sets))), goal="≤ 1",
            note=f"CUDA graph; eager {e_ours:.3g} / {e_base:.3g} ms")
    record_benchmark(benchmark, ours)


def test_lora_plan(benchmark):
    from kernels.lora import lora_plan

    for T in (16, 256, 4096):
        ids = _ids(T, 16)
        host = ids.cpu().numpy()
        synced = host_time_us(lambda: lora_plan(ids, 16))
        compare("lora plan", f"T={T} A=16", ours=("lora_plan from host ids", host_time_us(
                lambda: lora_plan(host, 16, device="cuda"))), base=("lora_plan from device ids (synced)", synced),
                unit="us", note="once per batch, shared by all layers; the engine plans from host ids")
    record_benchmark(benchmark, lambda: lora_plan(host, 16, device="cuda"))
