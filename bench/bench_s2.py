"""S2-attention (kernels.s2) on the GPU: bf16, Hq=32, Hkv=8, D=128, sparse_block 64,
local_blocks 16, vert_stride 8 and 16, all rows from one run.

- `s2 prefill`: s2_attention_prefill vs dense causal SDPA (flash, cuDNN; K/V pre-expanded to 32
  heads, not timed), goal speed-up >= 0.7 × (causal density / S2 density); vs FlexAttention
  with the same pattern as a block mask (create_block_mask(_compile=True) + compiled
  flex_attention; 16K and 64K, stride 8; skipped if it fails; BENCH_FLEX=0 skips), goal >= 1.2×.
- `s2 decode`: s2_attention_decode on the shared paged cache and on a head-sharded pool
  (per-KV-head block tables, only the blocks each head reads) vs our dense paged decode.
- `s2 kv bytes`: the head-sharded pool's K/V bytes vs the full cache.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from common import compare, graph_time_ms, record_benchmark, time_ms

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"  # a module variable so the suite can be dry-run on CPU at toy sizes
HQ, HKV, D = 32, 8, 128
SB, LOCAL = 64, 16
DT = torch.bfloat16
SCALE = D ** -0.5
TIMING = dict(warmup_ms=10.0, rep_ms=50.0)


def _pattern(stride: int):
    from kernels.s2 import S2Pattern

    return S2Pattern(HQ, SB, LOCAL, stride, num_kv_heads=HKV)


def _flex_time(q4, k4, v4, T: int, p) -> float:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    group, step, stride = HQ // HKV, p.head_sliding_step, p.vert_stride

    def s2_mask(b, h, q_idx, kv_idx):
        qb, kb = q_idx // SB, kv_idx // SB
        shard = ((kb + (h // group) * step) % stride) == 0
        return (q_idx >= kv_idx) & (((qb - kb) < LOCAL) | shard)

    bm = create_block_mask(s2_mask, B=None, H=HQ, Q_LEN=T, KV_LEN=T, device=DEV, _compile=True)
    flex = torch.compile(flex_attention)

    def run():
        flex(q4, k4, v4, block_mask=bm, scale=SCALE, enable_gqa=True)

    run()
    return time_ms(run, **TIMING)


CASES = [(8192, 8), (16384, 8), (16384, 16), (32768, 8), (65536, 8), (65536, 16), (131072, 8)]


@pytest.mark.parametrize("T,stride", CASES)
def test_s2_prefill(benchmark, T, stride):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.s2 import s2_attention_prefill

    p = _pattern(stride)
    q = torch.randn(T, HQ, D, device=DEV, dtype=DT)
    k = torch.randn(T, HKV, D, device=DEV, dtype=DT)
    v = torch.randn_like(k)
    cu = torch.tensor([0, T], dtype=torch.int32, device=DEV)
    out = torch.empty_like(q)

    def ours():
        s2_attention_prefill(q, k, v, cu, cu, p, SCALE, out=out, max_seqlen_q=T, validate=False)

    t_ours = time_ms(ours, **TIMING)
    causal = (T + 1) / (2 * T)
    dens = p.density(T)
    want = 0.7 * causal / dens
    case = f"{T // 1024}K stride={stride}"
    compare("s2 prefill", case, ours=("s2_attention_prefill", t_ours), unit="ms",
            note=f"S2 density {dens:.3f} vs causal {causal:.3f}: ideal speed-up {causal / dens:.1f}×")
    q4 = q.transpose(0, 1).unsqueeze(0)
    kx = k.transpose(0, 1).repeat_interleave(HQ // HKV, 0).unsqueeze(0).contiguous()
    vx = v.transpose(0, 1).repeat_interleave(HQ // HKV, 0).unsqueeze(0).contiguous()
    q4c = q4.contiguous()
    backends = [("SDPA cuDNN causal", SDPBackend.CUDNN_ATTENTION)]
    if T <= 65536:  # dense flash at 128K alone costs seconds of device time
        backends.insert(0, ("SDPA flash causal", SDPBackend.FLASH_ATTENTION))
    for name, backend in backends:
        try:
            with sdpa_kernel(backend):
                def dense():
                    F.scaled_dot_product_attention(q4c, kx, vx, is_causal=True, scale=SCALE)
                dense()
                t = time_ms(dense, **TIMING)
        except Exception as e:
            compare("s2 prefill", case, ours=("s2_attention_prefill", t_ours), note=f"{name} unavailable: {type(e).__name__}")
            continue
        compare("s2 prefill", case, ours=("s2_attention_prefill", t_ours), base=(name, t),
                goal=f"≤ {1 / want:.2f} (speed-up ≥ {want:.1f}×)")
    del kx, vx
    if stride == 8 and T in (16384, 65536) and os.environ.get("BENCH_FLEX", "1") != "0":
        try:
            k4 = k.transpose(0, 1).unsqueeze(0).contiguous()
            v4 = v.transpose(0, 1).unsqueeze(0).contiguous()
            t_flex = _flex_time(q4c, k4, v4, T, p)
            compare("s2 prefill", case, ours=("s2_attention_prefill", t_ours),
                    base=("FlexAttention S2 block mask", t_flex), goal="≤ 0.83 (≥ 1.2× faster)")
        except Exception as e:  # flex/inductor unavailable or failing on this build
            compare("s2 prefill", case, ours=("s2_attention_prefill", t_ours),
                    note=f"FlexAttention failed: {type(e).__name__}: {str(e)[:80]}")
    record_benchmark(benchmark, ours)
    del q, k, v, q4c
    if DEV == "cuda":
        torch.cuda.empty_cache()


def _sharded_pool(p, batch: int, ctx: int):
    """A head-sharded pool holding, per (sequence, KV head), only the blocks that head reads for
    the next query: caches [stored, SB, 1, D], tables [batch, HKV, ctx // SB] (-1 = not stored)."""
    nb = ctx // SB
    reads = p.block_mask(nb)[:, nb - 1].to(DEV)  # [HKV, nb]
    per_seq = int(reads.sum())
    ids = torch.randperm(batch * per_seq, device=DEV).int().view(batch, per_seq)
    tables = torch.full((batch, HKV, nb), -1, dtype=torch.int32, device=DEV)
    tables[:, reads] = ids
    k = torch.randn(batch * per_seq, SB, 1, D, device=DEV, dtype=DT)
    return k, torch.randn_like(k), tables


@pytest.mark.parametrize("ctx", [32768, 65536, 131072])
def test_s2_decode(benchmark, ctx):
    from kernels.attention import paged_attention_decode
    from kernels.s2 import s2_attention_decode

    batch = 8
    nb = ctx // SB
    k = torch.randn(batch * nb, SB, HKV, D, device=DEV, dtype=DT)
    v = torch.randn_like(k)
    bt = torch.randperm(batch * nb, device=DEV).int().view(batch, nb)
    q = torch.randn(batch, HQ, D, device=DEV, dtype=DT)
    sl = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
    out = torch.empty_like(q)

    def dense():
        paged_attention_decode(q, k, v, bt, sl, SCALE, out=out, validate=False)

    # GPU time in a CUDA graph, as the engine runs decode (S2's speed-up is the kernel's: eager,
    # launch overhead of tens of microseconds would hide it); eager times in the notes.
    t_dense, e_dense = graph_time_ms([dense]), time_ms(dense, **TIMING)
    full_bytes = 2 * k.numel() * k.element_size()
    for stride in (8, 16):
        p = _pattern(stride)
        reads = p.block_mask(nb)[:, nb - 1].double().mean().item()
        want = 0.7 / reads
        case = f"b={batch} ctx={ctx // 1024}K stride={stride}"

        def shared():
            s2_attention_decode(q, k, v, bt, sl, p, SCALE, out=out, validate=False)

        compare("s2 decode", case, ours=("s2 decode, shared cache", graph_time_ms([shared])),
                base=("paged_attention_decode (dense)", t_dense),
                goal=f"≤ {1 / want:.2f} (speed-up ≥ {want:.1f}×)",
                note=f"CUDA graph; eager {time_ms(shared, **TIMING):.3g} / {e_dense:.3g} ms")
        kh, vh, bth = _sharded_pool(p, batch, ctx)

        def sharded():
            s2_attention_decode(q, kh, vh, bth, sl, p, SCALE, out=out, validate=False)

        compare("s2 decode", case, ours=("s2 decode, head-sharded pool", graph_time_ms([sharded])),
                base=("paged_attention_decode (dense)", t_dense),
                goal=f"≤ {1 / want:.2f} (speed-up ≥ {want:.1f}×)",
                note=f"CUDA graph; eager {time_ms(sharded, **TIMING):.3g} / {e_dense:.3g} ms")
        compare("s2 kv bytes", case, ours=("head-sharded pool", 2 * kh.numel() * kh.element_size() / 1e9),
                base=("full cache", full_bytes / 1e9), unit="GB",
                goal=f"≈ {reads:.3f} (1/stride + window)")
        if stride == 8:
            record_benchmark(benchmark, sharded)
        del kh, vh, bth
    del k, v
    if DEV == "cuda":
        torch.cuda.empty_cache()
