"""S2Pattern semantics, and S2-attention prefill/decode kernels against the dense-mask reference."""
from __future__ import annotations

import itertools

import pytest
import torch

from kernels.attention import paged_attention_prefill
from kernels.attention_ref import s2_attention_decode_ref, s2_attention_prefill_paged_ref, s2_attention_prefill_ref
from kernels.s2 import S2Pattern, s2_attention_decode, s2_attention_prefill, s2_attention_prefill_paged

TOL = {torch.bfloat16: 1.5e-2, torch.float16: 5e-3, torch.float32: 1e-4}
EXACT = 1e-5  # two fp32 computations of the same quantity (identity tests)
if torch.cuda.is_available():  # fp32 dots run on TF32 tensor cores on the GPU
    TOL[torch.float32] = EXACT = 5e-3


def rel_err(out, ref) -> float:
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(out, ref, dtype):
    assert not out.isnan().any(), "some output element was never written"
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype], rel_err(out, ref)


def cu(lengths, device) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def brute_mask(p: S2Pattern, n: int) -> torch.Tensor:
    """The issue's definition, literally, one (head, q, k) at a time."""
    m = torch.zeros(p.num_heads, n, n, dtype=torch.bool)
    step = p.head_sliding_step
    for h, qi, ki in itertools.product(range(p.num_heads), range(n), range(n)):
        if ki > qi:
            continue
        i, j = qi // p.sparse_block, ki // p.sparse_block
        kvh = h // (p.num_heads // p.num_kv_heads)
        dense = h >= p.num_heads - p.num_dense_heads
        s = 0 if p.homo_head else kvh
        m[h, qi, ki] = dense or i - j < p.local_blocks or (j + s * step + p.offset) % p.vert_stride == 0
    return m


PATTERNS = [
    S2Pattern(4, 16, 2, 3),                                                 # heterogeneous heads
    S2Pattern(8, 16, 1, 4, num_kv_heads=2, num_dense_heads=4),              # GQA + dense heads
    S2Pattern(6, 32, 2, 2, num_kv_heads=3, homo_head=True, offset=1),       # homogeneous, offset
    S2Pattern(4, 16, 3, 5, num_kv_heads=2, head_sliding_step=2),            # explicit step
]


# ---------------------------------------------------------------- the pattern
@pytest.mark.parametrize("p", PATTERNS, ids=repr)
def test_mask_matches_definition(p):
    n = 3 * p.sparse_block + 7
    assert torch.equal(p.mask(n), brute_mask(p, n))


@pytest.mark.parametrize("p", PATTERNS, ids=repr)
def test_block_questions_agree_with_mask(p):
    nb = 9
    bm = p.block_mask(nb)
    for h in range(p.num_kv_heads):
        for i in range(nb):
            assert p.key_blocks(h, i) == [j for j in range(nb) if bm[h, i, j]]
            for j in range(nb):
                assert p.kv_head_reads(h, i, j) == bool(bm[h, i, j])
                assert p.reads(h * p.group, i, j) == bool(bm[h, i, j])
                # keeps(j at query block i) <=> some later query block reads j
                later = any(p.kv_head_reads(h, i2, j) for i2 in range(max(i, j), i + 4 * p.vert_stride + p.local_blocks))
                assert p.kv_head_keeps(h, j, i) == later


@pytest.mark.parametrize("p", PATTERNS, ids=repr)
def test_kept_blocks_are_what_later_queries_read(p):
    sb = p.sparse_block
    for h in range(p.num_kv_heads):
        assert p.kept_blocks(h, 0) == []
        for n in (1, sb, sb + 1, 7 * sb + 3):
            i = (n - 1) // sb
            later = {j for i2 in range(i, i + 3 * p.vert_stride + p.local_blocks)
                     for j in p.key_blocks(h, i2) if j <= i}
            assert set(p.kept_blocks(h, n)) == later
            assert set(p.key_blocks(h, i)) <= later


@pytest.mark.parametrize("p", PATTERNS, ids=repr)
def test_density_matches_mask(p):
    for n in (1, 17, 3 * p.sparse_block + 5):
        assert abs(p.density(n) - p.mask(n).double().mean().item()) < 1e-12


def test_heads_together_cover_the_context():
    """With a shard per residue (Phi-3-small: 32 q / 8 kv heads, stride 8), every causal block is
    read by some head, so no token is lost to the model as a whole."""
    p = S2Pattern(32, 64, 16, 8, num_kv_heads=8)
    nb = 200
    union = p.block_mask(nb).any(0)
    assert torch.equal(union, torch.ones(nb, nb, dtype=torch.bool).tril())
    # and each head alone reads about 1/stride of the distant blocks
    far = p.block_mask(nb)[:, -1, : nb - 16].double().mean(1)
    assert torch.allclose(far, torch.full_like(far, 1 / 8), atol=0.01)
    homo = S2Pattern(32, 64, 16, 8, num_kv_heads=8, homo_head=True)
    assert not torch.equal(homo.block_mask(nb).any(0), union)


def test_pattern_validation():
    with pytest.raises(ValueError, match="power of two"):
        S2Pattern(4, 48, 2, 2)
    with pytest.raises(ValueError):
        S2Pattern(4, 8, 2, 2)
    with pytest.raises(ValueError, match="vert_stride"):
        S2Pattern(4, 16, 2, 0)
    with pytest.raises(ValueError, match="local_blocks"):
        S2Pattern(4, 16, 0, 2)
    with pytest.raises(ValueError, match="multiple"):
        S2Pattern(6, 16, 2, 2, num_kv_heads=4)
    with pytest.raises(ValueError, match="num_dense_heads"):
        S2Pattern(8, 16, 2, 2, num_kv_heads=2, num_dense_heads=3)
    with pytest.raises(TypeError):
        S2Pattern(4.0, 16, 2, 2)
    with pytest.raises(TypeError):
        S2Pattern(4, 16, 2, 2, homo_head=1)
    p = S2Pattern(32, 64, 16, 8, num_kv_heads=8)
    assert p.head_sliding_step == 1 and p == S2Pattern(32, 64, 16, 8, num_kv_heads=8)
    assert S2Pattern(4, 16, 2, 16).head_sliding_step == 4
    with pytest.raises(AttributeError):
        p.vert_stride = 4


@pytest.mark.parametrize("hq, hkv, stride", [(32, 8, 16), (8, 2, 4), (8, 2, 8), (12, 3, 5), (4, 4, 9), (32, 8, 64)])
def test_default_step_is_the_issues_over_q_heads(hq, hkv, stride):
    # The published default counts q heads even under GQA (the shard index is still the KV head).
    p = S2Pattern(hq, 16, 2, stride, num_kv_heads=hkv)
    assert p.head_sliding_step == max(1, stride // hq)
    even = max(1, stride // hkv)
    spread = S2Pattern(hq, 16, 2, stride, num_kv_heads=hkv, head_sliding_step=even)
    assert spread.head_sliding_step == even
    # Which key blocks the last query block reads, from the issue's formula, vectorised.
    nb = stride + 3
    j = torch.arange(nb)
    for pat, step in ((p, max(1, stride // hq)), (spread, even)):
        for h in range(hq):
            want = (nb - 1 - j < 2) | ((j + (h // (hq // hkv)) * step) % stride == 0)
            got = pat.mask(nb * 16)[h, -1, ::16]
            assert torch.equal(got, want), (h, step)


# ---------------------------------------------------------------- kernels
def _prefill_inputs(p, lq, lk, d, dtype, device):
    cq, ck = cu(lq, device), cu(lk, device)
    q = torch.randn(sum(lq), p.num_heads, d, device=device).to(dtype)
    k = torch.randn(sum(lk), p.num_kv_heads, d, device=device).to(dtype)
    v = torch.randn_like(k)
    return q, k, v, cq, ck


PREFILL_CASES = [(p, dt, "triton") for p, dt in zip(PATTERNS, [torch.bfloat16, torch.float16,
                                                               torch.float32, torch.bfloat16])]
PREFILL_CASES += [(PATTERNS[1], torch.float32, "torch"), (PATTERNS[2], torch.bfloat16, "torch")]


@pytest.mark.parametrize("p,dtype,impl", PREFILL_CASES, ids=lambda x: repr(x)[:40])
def test_s2_prefill_matches_masked_reference(device, rng_seed, p, dtype, impl):
    lq, lk = [29, 1, 0, 50, 9], [110, 1, 5, 50, 9]
    q, k, v, cq, ck = _prefill_inputs(p, lq, lk, 32, dtype, device)
    out = torch.full_like(q, float("nan"))
    s2_attention_prefill(q, k, v, cq, ck, p, 0.2, out=out, impl=impl)
    check(out, s2_attention_prefill_ref(q, k, v, cq, ck, p, 0.2), dtype)


def test_s2_dense_pattern_equals_causal_attention(device, rng_seed):
    """vert_stride 1 reads every block: S2 prefill must equal plain causal paged prefill."""
    p = S2Pattern(4, 16, 1, 1, num_kv_heads=2)
    lq, lk = [33, 50], [33, 70]
    q, k, v, cq, ck = _prefill_inputs(p, lq, lk, 32, torch.float32, device)
    ours = s2_attention_prefill(q, k, v, cq, ck, p, 0.3)
    bs = 16  # the same K/V as one paged cache, one block run per sequence
    kc = torch.zeros(10, bs, 2, 32, device=device)
    vc = torch.zeros_like(kc)
    bt = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], dtype=torch.int32, device=device)
    for b, (k0, n) in enumerate([(0, 33), (33, 70)]):
        kc.view(2, 5 * bs, 2, 32)[b, :n] = k[k0:k0 + n]
        vc.view(2, 5 * bs, 2, 32)[b, :n] = v[k0:k0 + n]
    sl = torch.tensor(lk, dtype=torch.int32, device=device)
    base = paged_attention_prefill(q, kc, vc, bt, cq, sl, 0.3)
    assert rel_err(ours, base.double()) < EXACT


def make_shared_and_sharded(p, lens, bs, d, dtype, device, len_q=None):
    """One paged cache shared by all KV heads, and the same data as a head-sharded pool: blocks of
    one KV head each, only those the head reads for the sequence's last `len_q` queries (default:
    one, a decode), -1 elsewhere, NaN in the rest."""
    batch, hkv = len(lens), p.num_kv_heads
    len_q = [1] * batch if len_q is None else len_q
    max_blocks = max(-(-n // bs) for n in lens) + 1
    nb = batch * max_blocks + 2
    k = torch.randn(nb, bs, hkv, d, device=device).to(dtype)
    v = torch.randn_like(k)
    bt = torch.randperm(nb, device=device)[:batch * max_blocks].view(batch, max_blocks).int()
    kh = torch.full((nb * hkv, bs, 1, d), float("nan"), device=device, dtype=dtype)
    vh = torch.full_like(kh, float("nan"))
    bth = torch.full((batch, hkv, max_blocks), -1, dtype=torch.int32, device=device)
    free = torch.randperm(nb * hkv).tolist()
    stored = 0
    for b, (n, nq) in enumerate(zip(lens, len_q)):
        if n == 0 or nq == 0:
            continue
        q_blocks = range((n - nq) // p.sparse_block, (n - 1) // p.sparse_block + 1)
        for h in range(hkv):
            for lb in range(-(-n // bs)):
                j_first, j_last = lb * bs // p.sparse_block, (min(lb * bs + bs, n) - 1) // p.sparse_block
                if any(p.kv_head_reads(h, i, j) for i in q_blocks for j in range(j_first, j_last + 1)):
                    phys = free.pop()
                    kh[phys, :, 0] = k[bt[b, lb], :, h]
                    vh[phys, :, 0] = v[bt[b, lb], :, h]
                    bth[b, h, lb] = phys
                    stored += 1
    return (k, v, bt), (kh, vh, bth), stored


def gather_contiguous(k_cache, bt, lens):
    """The sequences of a shared paged cache as contiguous [sum(lens), Hkv, D] (for the
    contiguous-K/V reference)."""
    bs = k_cache.shape[1]
    rows = [k_cache[bt[b].long()].reshape(-1, *k_cache.shape[2:])[:n] for b, n in enumerate(lens)]
    return torch.cat(rows)


DECODE_CASES = [  # (pattern index, dtype, block_size, lens, num_splits)
    (0, torch.bfloat16, 16, [130, 1, 0, 77], None),
    (1, torch.float16, 16, [161, 33], 3),
    (2, torch.float32, 16, [200, 64, 65], 2),    # pool blocks smaller than sparse blocks
    (3, torch.bfloat16, 64, [250], 1),           # pool blocks spanning several sparse blocks
]


@pytest.mark.parametrize("pi,dtype,bs,lens,splits", DECODE_CASES)
def test_s2_decode_shared_and_sharded_match_reference(device, rng_seed, pi, dtype, bs, lens, splits):
    p = PATTERNS[pi]
    (k, v, bt), (kh, vh, bth), stored = make_shared_and_sharded(p, lens, bs, 32, dtype, device)
    sl = torch.tensor(lens, dtype=torch.int32, device=device)
    q = torch.randn(len(lens), p.num_heads, 32, device=device).to(dtype)
    ref = s2_attention_decode_ref(q, k, v, bt, sl, p, 0.2)
    for cache in ((k, v, bt), (kh, vh, bth)):
        out = torch.full_like(q, float("nan"))
        s2_attention_decode(q, *cache, sl, p, 0.2, out=out, num_splits=splits)
        check(out, ref, dtype)
    assert torch.allclose(s2_attention_decode_ref(q, kh, vh, bth, sl, p, 0.2), ref)
    full = sum(-(-n // bs) for n in lens) * p.num_kv_heads
    if p.num_dense_heads == 0 and max(lens) > (p.local_blocks + p.vert_stride) * p.sparse_block:
        assert stored < full  # the sharded pool really holds less


def test_s2_decode_torch_fallback(device, rng_seed):
    p = PATTERNS[1]
    (k, v, bt), (kh, vh, bth), _ = make_shared_and_sharded(p, [150, 1, 0], 16, 16, torch.float32, device)
    sl = torch.tensor([150, 1, 0], dtype=torch.int32, device=device)
    q = torch.randn(3, p.num_heads, 16, device=device)
    ref = s2_attention_decode_ref(q, k, v, bt, sl, p, 0.5)
    check(s2_attention_decode(q, k, v, bt, sl, p, 0.5, impl="torch"), ref, torch.float32)
    check(s2_attention_decode(q, kh, vh, bth, sl, p, 0.5, impl="torch"), ref, torch.float32)


PAGED_PREFILL_CASES = [  # (pattern index, dtype, block_size, seq_lens, len_q, impl)
    # whole prompts, a prefill on top of a cached prefix, a one-token chunk, an idle sequence
    (0, torch.bfloat16, 16, [77, 50, 1, 40], [77, 19, 1, 0], "triton"),
    (1, torch.float16, 16, [150, 37], [45, 37], "triton"),
    (2, torch.float32, 16, [131, 70], [30, 9], "triton"),   # pool blocks smaller than sparse blocks
    (3, torch.bfloat16, 32, [203, 29], [20, 29], "triton"),  # pool blocks spanning sparse blocks
    (1, torch.float32, 16, [150, 37], [45, 37], "torch"),
]


@pytest.mark.parametrize("pi,dtype,bs,lens,lq,impl", PAGED_PREFILL_CASES)
def test_s2_prefill_paged_shared_and_sharded_match_reference(device, rng_seed, pi, dtype, bs, lens, lq, impl):
    """New tokens at positions seq_len - len_q .. seq_len - 1, against the float64 reference on
    the same K/V laid out contiguously; the sharded pool holds only what these queries read."""
    p = PATTERNS[pi]
    (k, v, bt), (kh, vh, bth), stored = make_shared_and_sharded(p, lens, bs, 32, dtype, device, lq)
    sl = torch.tensor(lens, dtype=torch.int32, device=device)
    cq = cu(lq, device)
    q = torch.randn(sum(lq), p.num_heads, 32, device=device).to(dtype)
    ref = s2_attention_prefill_ref(q, gather_contiguous(k, bt, lens), gather_contiguous(v, bt, lens),
                                   cq, cu(lens, device), p, 0.2)
    for cache in ((k, v, bt), (kh, vh, bth)):
        out = torch.full_like(q, float("nan"))
        s2_attention_prefill_paged(q, *cache, cq, sl, p, 0.2, out=out, impl=impl, max_seqlen_q=max(lq))
        check(out, ref, dtype)
    if p.num_dense_heads == 0:
        assert stored < sum(-(-n // bs) for n in lens) * p.num_kv_heads  # some blocks really are -1


def test_s2_prefill_paged_dense_pattern_equals_paged_prefill(device, rng_seed):
    """vert_stride 1 reads every block: paged S2 prefill must equal plain causal paged prefill."""
    p = S2Pattern(4, 16, 1, 1, num_kv_heads=2)
    lens, lq = [83, 29], [40, 29]
    (k, v, bt), _, _ = make_shared_and_sharded(p, lens, 16, 32, torch.float32, device, lq)
    sl, cq = torch.tensor(lens, dtype=torch.int32, device=device), cu(lq, device)
    q = torch.randn(sum(lq), 4, 32, device=device)
    ours = s2_attention_prefill_paged(q, k, v, bt, cq, sl, p, 0.3)
    assert rel_err(ours, paged_attention_prefill(q, k, v, bt, cq, sl, 0.3).double()) < EXACT


@pytest.mark.parametrize("decode", [False, True])
def test_s2_paged_rejects_missing_blocks_the_pattern_reads(device, decode):
    """-1 is fine where the pattern never reads; a -1 where some query of the batch reads is a
    clear error and nothing is written."""
    p = PATTERNS[0]  # 4 KV heads, stride 3, 2 local blocks
    lens = [110, 45]
    lq = [1, 1] if decode else [30, 45]
    (_, _, _), (kh, vh, bth), _ = make_shared_and_sharded(p, lens, 16, 16, torch.float32, device, lq)
    sl, cq = torch.tensor(lens, dtype=torch.int32, device=device), cu(lq, device)
    q = torch.randn(sum(lq), p.num_heads, 16, device=device)

    def call(table):
        out = torch.full_like(q, float("nan"))
        if decode:
            s2_attention_decode(q, kh, vh, table, sl, p, 0.3, out=out)
        else:
            s2_attention_prefill_paged(q, kh, vh, table, cq, sl, p, 0.3, out=out)
        return out

    assert not call(bth).isnan().any()  # the table as built: -1 only where nothing reads
    assert bool((bth[0] < 0).any())
    # sequence 0, its first query block, KV head 1: a window block, then a shard block
    i0 = (lens[0] - lq[0]) // p.sparse_block
    shard = next(j for j in range(i0) if p.in_shard(1, j) and not p.in_shard(0, j))
    for h, blk in ((1, i0 - 1), (1, shard)):
        bad = bth.clone()
        assert bad[0, h, blk] >= 0
        bad[0, h, blk] = -1
        with pytest.raises(ValueError, match=rf"block_tables\[0, {h}, {blk}\] is -1"):
            call(bad)
    # a block out of every head's reach may be -1: head 0's non-shard block far behind the window
    far = next(j for j in range(i0 - p.local_blocks) if not p.in_shard(0, j))
    assert bth[0, 0, far] == -1
    ok = bth.clone()
    ok[1, :, -1] = -1  # past the end of sequence 1: never in use
    assert not call(ok).isnan().any()


def test_s2_value_checks_read_the_device_once(device, monkeypatch):
    """validate=True on S2 decode (shared and head-sharded caches, Flash-LoRA inside) reads every
    device value it checks in one copy: one sync a call."""
    from test_kernels_attention import _count_device_reads

    import kernels.s2 as S

    p = S2Pattern(8, 16, 2, 4, num_kv_heads=2)
    lens = [70, 33, 1]
    (kc, vc, bt), (kh, vh, bth), _ = make_shared_and_sharded(p, lens, 16, 32, torch.float32, device)
    lr, lbt, lb, aid = make_low_rank(lens, 8, 2, 2, 32, torch.float32, device)
    sl = torch.tensor(lens, dtype=torch.int32, device=device)
    q = torch.randn(3, 8, 32, device=device)
    monkeypatch.setattr(S, "_run", lambda *a, **kw: kw["out"])  # the checks alone
    seen = _count_device_reads(monkeypatch)
    for cache, lora in (((kc, vc, bt), {}), ((kh, vh, bth), {}),
                        ((kc, vc, bt), dict(lr_cache=lr, lr_block_tables=lbt, lora_b=lb, adapter_ids=aid))):
        seen["reads"] = 0
        s2_attention_decode(q, *cache, sl, p, 0.1, out=torch.empty_like(q), **lora)
        assert seen["reads"] == 1, seen["reads"]


def test_s2_bad_inputs(device):
    p = S2Pattern(4, 16, 2, 2, num_kv_heads=2)
    q, k, v, cq, ck = _prefill_inputs(p, [5], [9], 16, torch.float16, device)
    with pytest.raises(ValueError, match="pattern"):
        s2_attention_prefill(q, k, v, cq, ck, S2Pattern(4, 16, 2, 2), 0.1)
    with pytest.raises(TypeError):
        s2_attention_prefill(q, k, v, cq, ck, "dense", 0.1)
    with pytest.raises(ValueError):
        s2_attention_prefill(q, k, v, ck, cq, p, 0.1)  # len_q > len_k
    with pytest.raises(ValueError):
        s2_attention_prefill(q, k, v, cq, cu([9, 1], device), p, 0.1)  # wrong batch
    with pytest.raises(ValueError, match="max_seqlen_q"):  # rows would go unwritten
        s2_attention_prefill(q, k, v, cq, ck, p, 0.1, max_seqlen_q=4)
    (kc, vc, bt), (kh, vh, bth), _ = make_shared_and_sharded(p, [40], 16, 16, torch.float16, device)
    sl = torch.tensor([40], dtype=torch.int32, device=device)
    qd = torch.randn(1, 4, 16, device=device).to(torch.float16)
    with pytest.raises(ValueError, match="one KV head per block"):
        s2_attention_decode(qd, kc, vc, bth, sl, p, 0.1)
    with pytest.raises(ValueError):
        s2_attention_decode(qd, kh, vh, bth[:, :1], sl, p, 0.1)  # 1 kv head vs pattern's 2
    with pytest.raises(ValueError):
        s2_attention_decode(qd, kc, vc, bt[:, :2], sl, p, 0.1)  # table too short for 40 tokens
    cq1 = cu([1], device)
    with pytest.raises(ValueError, match="pattern"):
        s2_attention_prefill_paged(qd, kh, vh, bth, cq1, sl, S2Pattern(4, 16, 2, 2), 0.1)
    with pytest.raises(ValueError, match="one KV head per block"):
        s2_attention_prefill_paged(qd, kc, vc, bth, cq1, sl, p, 0.1)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        s2_attention_prefill_paged(qd, kh, vh, bth, cq1, sl, p, 0.1, max_seqlen_q=0)
    with pytest.raises(ValueError, match="seq_lens"):  # more new tokens than the sequence holds
        s2_attention_prefill_paged(qd, kh, vh, bth, cq1, torch.zeros_like(sl), p, 0.1)


S2_TMA_CASES = [  # (dtype, shared cache's block size, head-sharded pool's, num_splits)
    (torch.bfloat16, 64, 64, None),
    (torch.float16, 128, 64, 1),     # unsplit: the tail tile read shifted back
    (torch.bfloat16, 64, 128, 3),    # pool blocks over a sparse block: per-thread loads
    (torch.bfloat16, 64, 64, 6),     # a split count no power of two (S2's own, see below)
]


@pytest.mark.parametrize("dtype,bs,pool_bs,splits", S2_TMA_CASES)
def test_s2_decode_through_tma_descriptors(device, rng_seed, monkeypatch, plan_metas, dtype, bs, pool_bs, splits):
    """S2 decode with K/V tiles by TMA (forced under the interpreter where a tile fits a cache
    block, the policy's own choice on a GPU): over the shared cache and over the head-sharded pool
    in blocks inside a sparse block (never in larger ones: a shifted tail tile could re-read keys
    the head neither reads nor stores). Every slot past a sequence's end is NaN, so a tail tile
    that lets one through shows."""
    from kernels import attention as A

    if device == "cpu":
        monkeypatch.setattr(A, "_tma_loads", lambda dev, block_size, block_n: block_size % block_n == 0)
    d = 32 if device == "cpu" else 128
    p = S2Pattern(8, 64, 1, 3, num_kv_heads=2)
    lens = [643, 1, 0, 130, 257]
    (k, v, bt), _, _ = make_shared_and_sharded(p, lens, bs, d, dtype, device)
    _, (kh, vh, bth), stored = make_shared_and_sharded(p, lens, pool_bs, d, dtype, device)
    # the sharded pool from the shared cache's data: the same keys under both tables
    for b, n in enumerate(lens):
        rows = -(-n // pool_bs) * pool_bs
        seq_k, seq_v = (c[bt[b].long()].flatten(0, 1)[:rows] for c in (k, v))  # [rows, Hkv, D]
        for lb in range(rows // pool_bs):
            for h in range(p.num_kv_heads):
                phys = bth[b, h, lb].item()
                if phys >= 0:
                    kh[phys, :, 0] = seq_k[lb * pool_bs:(lb + 1) * pool_bs, h]
                    vh[phys, :, 0] = seq_v[lb * pool_bs:(lb + 1) * pool_bs, h]
    for b, n in enumerate(lens):  # NaN past each sequence's end, in both
        if n % bs:
            k[bt[b, n // bs], n % bs:] = v[bt[b, n // bs], n % bs:] = float("nan")
        if n % pool_bs:
            for h in range(p.num_kv_heads):
                phys = bth[b, h, n // pool_bs].item()
                kh[phys, n % pool_bs:] = vh[phys, n % pool_bs:] = float("nan")
    sl = torch.tensor(lens, dtype=torch.int32, device=device)
    q = torch.randn(len(lens), p.num_heads, d, device=device).to(dtype)
    ref = s2_attention_decode_ref(q, k, v, bt, sl, p, 0.2)
    assert stored < sum(-(-n // pool_bs) for n in lens) * p.num_kv_heads  # the pool really holds less
    for cache, sharded in (((k, v, bt), False), ((kh, vh, bth), True)):
        out = torch.full_like(q, float("nan"))
        s2_attention_decode(q, *cache, sl, p, 0.2, out=out, num_splits=splits)
        check(out, ref, dtype)
        meta = plan_metas[-1]
        block = pool_bs if sharded else bs
        assert meta["TMA"] is (block % meta["BLOCK_N"] == 0 and (not sharded or block <= p.sparse_block))
        if not sharded or pool_bs <= p.sparse_block:
            assert meta["TMA"], "these block sizes hold whole tiles: the descriptor path"


@pytest.mark.parametrize("ctx", [32768, 131072])
@pytest.mark.parametrize("sharded", [False, True])
def test_s2_decode_splits_fill_the_slots(monkeypatch, ctx, sharded):
    """On a GPU (read off shapes: meta tensors, an H200's 132 SMs) S2 decode splits as many ways
    as fill the resident programs, 6 at b = 8 × 8 KV heads, 64-key tiles, 3 an SM (396 slots),
    not the power of two below (4) that paged decode rounds to."""
    from kernels import attention as A

    monkeypatch.setattr(A, "interpreter_on", lambda: False)
    monkeypatch.setattr(A, "_num_sms", lambda device: 132)
    monkeypatch.setattr(A, "_has_tma", lambda device: True)
    monkeypatch.setattr(A, "_tma_single", lambda device: True)
    A._launch_plan.cache_clear()
    p = S2Pattern(32, 64, 16, 16, num_kv_heads=8)
    meta = dict(dtype=torch.bfloat16, device="meta")
    nb = ctx // 64
    q = torch.empty(8, 32, 128, **meta)
    if sharded:
        k, bt = torch.empty(nb, 64, 1, 128, **meta), torch.empty(8, 8, nb, dtype=torch.int32, device="meta")
    else:
        k, bt = torch.empty(8 * nb, 64, 8, 128, **meta), torch.empty(8, nb, dtype=torch.int32, device="meta")
    key = A._launch_key(q, k, k, q, paged=True, decode=True, batch=8, block_tables=bt, lora=None,
                        s2=p._kernel_args(), max_seqlen_q=None, num_splits=None)
    plan = A._launch_plan(key)
    A._launch_plan.cache_clear()
    assert plan.meta["TMA"] and plan.meta["BLOCK_N"] == 64
    assert plan.grid == (1, 8 * 6, 8)  # (query tiles, KV heads × splits, sequences)
    assert plan.ws_total > 0  # split: the partials' workspace


# ---------------------------------------------------------------- GPU, realistic sizes
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,stride,homo,dense", [(torch.bfloat16, 8, False, 0), (torch.float16, 16, False, 8),
                                                     (torch.bfloat16, 8, True, 0)])
def test_gpu_s2_realistic(rng_seed, dtype, stride, homo, dense):
    device = "cuda"
    p = S2Pattern(32, 64, 16, stride, num_kv_heads=8, homo_head=homo, num_dense_heads=dense)
    lq, lk = [3000, 1, 0, 1200], [3000, 1, 7, 2500]
    q, k, v, cq, ck = _prefill_inputs(p, lq, lk, 128, dtype, device)
    out = torch.full_like(q, float("nan"))
    s2_attention_prefill(q, k, v, cq, ck, p, 128 ** -0.5, out=out)
    check(out, s2_attention_prefill_ref(q, k, v, cq, ck, p, 128 ** -0.5), dtype)
    lens = [3000, 1, 0, 2500]
    (kc, vc, bt), (kh, vh, bth), _ = make_shared_and_sharded(p, lens, 64, 128, dtype, device)
    sl = torch.tensor(lens, dtype=torch.int32, device=device)
    qd = torch.randn(len(lens), 32, 128, device=device).to(dtype)
    ref = s2_attention_decode_ref(qd, kc, vc, bt, sl, p, 128 ** -0.5)
    for cache in ((kc, vc, bt), (kh, vh, bth)):
        for splits in (None, 1):
            out = torch.full_like(qd, float("nan"))
            s2_attention_decode(qd, *cache, sl, p, 128 ** -0.5, out=out, num_splits=splits)
            check(out, ref, dtype)
    # paged prefill on top of a cached prefix, shared and head-sharded
    lq = [700, 1, 0, 300]
    (kc, vc, bt), (kh, vh, bth), _ = make_shared_and_sharded(p, lens, 64, 128, dtype, device, lq)
    qp, cq = torch.randn(sum(lq), 32, 128, device=device).to(dtype), cu(lq, device)
    ref = s2_attention_prefill_ref(qp, gather_contiguous(kc, bt, lens), gather_contiguous(vc, bt, lens),
                                   cq, cu(lens, device), p, 128 ** -0.5)
    for cache in ((kc, vc, bt), (kh, vh, bth)):
        out = torch.full_like(qp, float("nan"))
        s2_attention_prefill_paged(qp, *cache, cq, sl, p, 128 ** -0.5, out=out)
        check(out, ref, dtype)


# ---------------------------------------------------------------- Flash-LoRA inside S2
def make_low_rank(lens, r, num_adapters, hkv, d, dtype, device, lr_bs=16):
    """A low-rank cache [blocks, lr_bs, r] with its own shuffled per-sequence table, B stacks
    [num_adapters, Hkv, r, D] and adapter ids cycling through -1 and every adapter."""
    batch = len(lens)
    width = max(-(-n // lr_bs) for n in lens) + 1
    nb = batch * width + 3
    lr = torch.randn(nb, lr_bs, r, device=device).to(dtype)
    lbt = torch.randperm(nb, device=device)[:batch * width].view(batch, width).int()
    lora_b = (0.5 * torch.randn(num_adapters, hkv, r, d, device=device)).to(dtype)
    aid = torch.tensor([(i % (num_adapters + 1)) - 1 for i in range(1, batch + 1)], dtype=torch.int32,
                       device=device)
    return lr, lbt, lora_b, aid


S2_LORA_CASES = [  # (pattern index, dtype, block size, lens, len_q (None: decode), rank)
    (0, torch.bfloat16, 16, [130, 1, 0, 77], None, 8),
    (1, torch.float16, 16, [161, 33, 90], None, 16),
    (2, torch.float32, 16, [131, 70], [30, 9], 8),
    (3, torch.bfloat16, 32, [203, 29, 57], [20, 29, 1], 64),
]


@pytest.mark.parametrize("pi,dtype,bs,lens,lq,r", S2_LORA_CASES)
def test_s2_flash_lora_matches_reference(device, rng_seed, pi, dtype, bs, lens, lq, r):
    """S2 attention with V = V_base + L·B_a (per sequence; -1 = no adapter), decode and prefill,
    over the shared cache and the head-sharded pool, against the float64 reference; the
    adapter part must matter (the plain S2 output is far from it)."""
    p = PATTERNS[pi]
    d = 32
    (k, v, bt), (kh, vh, bth), _ = make_shared_and_sharded(p, lens, bs, d, dtype, device, lq)
    lr, lbt, lora_b, aid = make_low_rank(lens, r, 2, p.num_kv_heads, d, dtype, device)
    sl = torch.tensor(lens, dtype=torch.int32, device=device)
    nq = len(lens) if lq is None else sum(lq)
    q = torch.randn(nq, p.num_heads, d, device=device).to(dtype)
    lora = (lr, lbt, lora_b, aid)
    kw = dict(lr_cache=lr, lr_block_tables=lbt, lora_b=lora_b, adapter_ids=aid)
    if lq is None:
        ref = s2_attention_decode_ref(q, k, v, bt, sl, p, 0.2, lora=lora)
        plain = s2_attention_decode_ref(q, k, v, bt, sl, p, 0.2)
    else:
        cq = cu(lq, device)
        ref = s2_attention_prefill_paged_ref(q, k, v, bt, cq, sl, p, 0.2, lora=lora)
        plain = s2_attention_prefill_paged_ref(q, k, v, bt, cq, sl, p, 0.2)
    assert rel_err(plain, ref) > 20 * TOL[dtype]
    for cache in ((k, v, bt), (kh, vh, bth)):
        for splits in ((None, 3) if lq is None else (None,)):
            out = torch.full_like(q, float("nan"))
            if lq is None:
                s2_attention_decode(q, *cache, sl, p, 0.2, out=out, num_splits=splits, **kw)
            else:
                s2_attention_prefill_paged(q, *cache, cq, sl, p, 0.2, out=out, max_seqlen_q=max(lq), **kw)
            check(out, ref, dtype)


def test_s2_flash_lora_torch_fallback_and_bad_inputs(device, rng_seed):
    """The torch fallback agrees with the reference; LoRA arguments given in part, an adapter id
    out of range or a B stack of the wrong head count raise before anything is written."""
    p = PATTERNS[1]
    lens = [150, 1, 40]
    (k, v, bt), (kh, vh, bth), _ = make_shared_and_sharded(p, lens, 16, 16, torch.float32, device)
    lr, lbt, lora_b, aid = make_low_rank(lens, 8, 2, p.num_kv_heads, 16, torch.float32, device)
    sl = torch.tensor(lens, dtype=torch.int32, device=device)
    q = torch.randn(3, p.num_heads, 16, device=device)
    ref = s2_attention_decode_ref(q, k, v, bt, sl, p, 0.5, lora=(lr, lbt, lora_b, aid))
    kw = dict(lr_cache=lr, lr_block_tables=lbt, lora_b=lora_b, adapter_ids=aid)
    for cache in ((k, v, bt), (kh, vh, bth)):
        check(s2_attention_decode(q, *cache, sl, p, 0.5, impl="torch", **kw), ref, torch.float32)
    out = torch.full_like(q, float("nan"))
    bad = [(dict(kw, lora_b=None), "together"),
           (dict(kw, adapter_ids=torch.tensor([0, 2, -1], dtype=torch.int32, device=device)), "adapter_ids"),
           (dict(kw, lora_b=lora_b[:, :1].contiguous()), "lora_b must be")]
    for args, msg in bad:
        for cache in ((k, v, bt), (kh, vh, bth)):
            with pytest.raises(ValueError, match=msg):
                s2_attention_decode(q, *cache, sl, p, 0.5, out=out, **args)
    assert out.isnan().all()
