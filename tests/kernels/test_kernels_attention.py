"""Paged attention and Flash-LoRA-Attention kernels against their float64 references.

CPU: the Triton kernel runs under the interpreter at small sizes; GPU (@gpu): compiled, at
realistic sizes. Every cache slot past a sequence's end and every block no table uses holds NaN,
and unused block-table entries hold out-of-range ids, so a stray read shows up in the output.
"""
from __future__ import annotations

import functools

import pytest
import torch

from kernels.attention import (flash_lora_decode, flash_lora_prefill, paged_attention_decode,
                               paged_attention_prefill)
from kernels.attention_ref import (flash_lora_decode_ref, flash_lora_prefill_ref,
                                   paged_attention_decode_ref, paged_attention_prefill_ref)

TOL = {torch.bfloat16: 1.5e-2, torch.float16: 5e-3, torch.float32: 1e-4}
EXACT = 1e-5  # two fp32 computations of the same quantity (identity tests)
if torch.cuda.is_available():  # fp32 dots run on TF32 tensor cores on the GPU
    TOL[torch.float32] = EXACT = 5e-3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def poisoned(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def make_paged(lens, hkv, d, bs, dtype, device, *, extra_blocks=3, table_slack=2):
    """Random paged K/V for sequences of `lens` tokens, blocks scattered at random; NaN in every
    slot no sequence owns; table entries past a sequence's blocks point far out of range."""
    batch = len(lens)
    need = [-(-n // bs) for n in lens]
    max_blocks = max(need + [1]) + table_slack
    num_blocks = sum(need) + extra_blocks
    k = torch.full((num_blocks, bs, hkv, d), float("nan"), dtype=dtype, device=device)
    v = torch.full_like(k, float("nan"))
    perm = torch.randperm(num_blocks, device=device)
    tables = torch.full((batch, max_blocks), 10**6, dtype=torch.int32, device=device)
    c = 0
    for b, n in enumerate(lens):
        ids = perm[c:c + need[b]]
        c += need[b]
        tables[b, :need[b]] = ids.int()
        for i, blk in enumerate(ids.tolist()):
            m = min(bs, n - i * bs)
            k[blk, :m] = torch.randn(m, hkv, d, device=device).to(dtype)
            v[blk, :m] = torch.randn(m, hkv, d, device=device).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    return k, v, tables, seq_lens


def make_lowrank(tables, lens, bs, r, num_adapters, hkv, d, dtype, device):
    """A low-rank cache with its own scattered block table, and B matrices for the adapters."""
    batch = len(lens)
    need = [-(-n // bs) for n in lens]
    num_blocks = sum(need) + 2
    lr = torch.full((num_blocks, bs, r), float("nan"), dtype=dtype, device=device)
    perm = torch.randperm(num_blocks, device=device)
    lbt = torch.full((batch, max(need + [1]) + 1), 10**6, dtype=torch.int32, device=device)
    c = 0
    for b, n in enumerate(lens):
        ids = perm[c:c + need[b]]
        c += need[b]
        lbt[b, :need[b]] = ids.int()
        for i, blk in enumerate(ids.tolist()):
            m = min(bs, n - i * bs)
            lr[blk, :m] = torch.randn(m, r, device=device).to(dtype)
    lora_b = (torch.randn(num_adapters, hkv, r, d, device=device) / r ** 0.5).to(dtype)
    return lr, lbt, lora_b


def cu(lengths, device) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def check(out, ref, dtype):
    assert not out.isnan().any(), "some output element was never written"
    assert out.dtype == dtype
    err = rel_err(out, ref)
    assert err < TOL[dtype], err


def decode_into(q, k, v, bt, sl, scale, out, *, lora: bool):
    """Paged decode into `out`, or (`lora`) Flash-LoRA decode on the same K/V over a fresh
    low-rank cache of rank 16 in blocks of K/V's size, adapters 0, none, 1 in turn: returns the
    float64 reference and a function that runs the same call again into another output."""
    if lora:
        bs, hkv, d = k.shape[1:]
        lr, lbt, lb = make_lowrank(bt, sl.tolist(), bs, 16, 2, hkv, d, k.dtype, k.device)
        aid = torch.tensor([(0, -1, 1)[i % 3] for i in range(len(sl))], dtype=torch.int32, device=k.device)

        def run(o):
            flash_lora_decode(q, k, v, lr, lbt, lb, aid, bt, sl, scale, out=o)
        ref = flash_lora_decode_ref(q, k, v, lr, lbt, lb, aid, bt, sl, scale)
    else:
        def run(o):
            paged_attention_decode(q, k, v, bt, sl, scale, out=o)
        ref = paged_attention_decode_ref(q, k, v, bt, sl, scale)
    run(out)
    return ref, run


# ---------------------------------------------------------------- CPU (interpreter) + GPU
DECODE_CASES = [  # (dtype, hq, hkv, d, block_size, lens, num_splits)
    (torch.bfloat16, 4, 2, 32, 16, [37, 1, 0, 50], None),
    (torch.float16, 6, 2, 16, 32, [70, 5, 33], 3),
    (torch.float32, 3, 3, 64, 24, [29, 48], 2),
    (torch.bfloat16, 8, 1, 32, 16, [61], 4),
    (torch.float32, 4, 2, 16, 16, [300, 5, 0], 37),  # many splits in one reduce pass; empty splits
    (torch.float32, 8, 2, 16, 16, [2000, 7], 130),  # > 64 splits: the reduce's online pass loops
    (torch.float16, 4, 1, 16, 256, [301, 9], 2),     # the largest block size: one block, many tiles
    (torch.bfloat16, 4, 2, 32, 2, [37, 1, 66], 3),    # blocks below a tile (an engine may use them)
]


@pytest.mark.parametrize("dtype,hq,hkv,d,bs,lens,splits", DECODE_CASES)
def test_paged_decode_matches_reference(device, rng_seed, dtype, hq, hkv, d, bs, lens, splits):
    k, v, bt, sl = make_paged(lens, hkv, d, bs, dtype, device)
    q = torch.randn(len(lens), hq, d, device=device).to(dtype)
    out = poisoned(q.shape, dtype, device)
    res = paged_attention_decode(q, k, v, bt, sl, 0.17, out=out, num_splits=splits)
    assert res is out
    check(out, paged_attention_decode_ref(q, k, v, bt, sl, 0.17), dtype)
    if 0 in lens:
        assert (out[lens.index(0)] == 0).all(), "an empty sequence gives zeros"


PREFILL_CASES = [  # (dtype, hq, hkv, d, block_size, seq_lens, new tokens)
    (torch.bfloat16, 4, 2, 32, 16, [45, 1, 0, 20], [45, 1, 0, 7]),
    (torch.float16, 6, 3, 32, 16, [67, 9], [31, 9]),
    (torch.float32, 2, 1, 16, 32, [40], [13]),
    (torch.bfloat16, 4, 2, 16, 128, [150, 3], [41, 3]),
]


@pytest.mark.parametrize("dtype,hq,hkv,d,bs,lens,lq", PREFILL_CASES)
def test_paged_prefill_matches_reference(device, rng_seed, dtype, hq, hkv, d, bs, lens, lq):
    k, v, bt, sl = make_paged(lens, hkv, d, bs, dtype, device)
    cq = cu(lq, device)
    q = torch.randn(sum(lq), hq, d, device=device).to(dtype)
    out = poisoned(q.shape, dtype, device)
    paged_attention_prefill(q, k, v, bt, cq, sl, 0.2, out=out)
    check(out, paged_attention_prefill_ref(q, k, v, bt, cq, sl, 0.2), dtype)


LORA_CASES = [  # (dtype, hq, hkv, d, bs, r, lens, adapters, num_splits)
    (torch.bfloat16, 4, 2, 32, 16, 8, [37, 1, 0, 50, 21], [0, -1, 1, 2, -1], None),
    (torch.float16, 6, 3, 16, 32, 24, [58, 17], [1, 0], 2),   # low-rank blocks of 16 (below)
    (torch.float32, 2, 2, 32, 16, 64, [33, 40], [-1, 0], None),
    (torch.bfloat16, 4, 2, 16, 64, 128, [77, 12], [1, 0], 2),  # the largest rank
    (torch.bfloat16, 4, 2, 32, 2, 8, [37, 1, 66, 29], [0, -1, 1, 2], 3),  # blocks of 2, both caches
    (torch.bfloat16, 4, 2, 32, 4, 8, [45, 20], [1, 0], None),
    # group 8 at D 128: the fused split combine takes 20 splits in two passes
    (torch.bfloat16, 8, 1, 128, 16, 16, [301, 5], [0, -1], 20),
]


@pytest.mark.parametrize("dtype,hq,hkv,d,bs,r,lens,aids,splits", LORA_CASES)
def test_flash_lora_decode_matches_reference(device, rng_seed, dtype, hq, hkv, d, bs, r, lens, aids,
                                             splits):
    k, v, bt, sl = make_paged(lens, hkv, d, bs, dtype, device)
    # the low-rank pool has its own block size when the base blocks are large; small blocks
    # are the engine's case (both pools share its block size)
    lr, lbt, lb = make_lowrank(bt, lens, 16 if bs >= 16 else bs, r, 3, hkv, d, dtype, device)
    aid = torch.tensor(aids, dtype=torch.int32, device=device)
    q = torch.randn(len(lens), hq, d, device=device).to(dtype)
    out = poisoned(q.shape, dtype, device)
    flash_lora_decode(q, k, v, lr, lbt, lb, aid, bt, sl, 0.3, out=out, num_splits=splits)
    check(out, flash_lora_decode_ref(q, k, v, lr, lbt, lb, aid, bt, sl, 0.3), dtype)


def run_flash_lora_prefill(lens, lq, aids, hq, hkv, d, bs, r, dtype, device, scale):
    """Flash-LoRA prefill of `lq` new tokens of sequences of `lens` (3 adapters, blocks of `bs`,
    NaN-poisoned output) and its float64 reference: (out, ref)."""
    k, v, bt, sl = make_paged(lens, hkv, d, bs, dtype, device)
    lr, lbt, lb = make_lowrank(bt, lens, bs, r, 3, hkv, d, dtype, device)
    aid = torch.tensor(aids, dtype=torch.int32, device=device)
    cq = cu(lq, device)
    q = torch.randn(sum(lq), hq, d, device=device).to(dtype)
    out = poisoned(q.shape, dtype, device)
    flash_lora_prefill(q, k, v, lr, lbt, lb, aid, bt, cq, sl, scale, out=out)
    return out, flash_lora_prefill_ref(q, k, v, lr, lbt, lb, aid, bt, cq, sl, scale)


@pytest.mark.parametrize("dtype,r", [(torch.bfloat16, 16), (torch.float32, 40)])
def test_flash_lora_prefill_matches_reference(device, rng_seed, dtype, r):
    out, ref = run_flash_lora_prefill([50, 19, 1, 0], [23, 19, 1, 0], [2, -1, 0, 1], 4, 2, 32, 16, r,
                                      dtype, device, 0.25)
    check(out, ref, dtype)


def _materialised(k, v, bt, sl, lr, lora_b, aids, bs):
    """V_base + L·B_a written by hand into each request's own blocks (low-rank blocks share the
    base table here, so block ids line up)."""
    v2 = v.clone()
    for b, n in enumerate(sl.tolist()):
        if aids[b] < 0:
            continue
        for i in range(-(-n // bs)):
            blk = int(bt[b, i])
            v2[blk] = (v[blk].double() + torch.einsum("sr,hrd->shd", lr[blk].double(),
                                                      lora_b[aids[b]].double())).to(v.dtype)
    return v2


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_flash_lora_equals_paged_attention_on_materialised_cache(device, rng_seed, mode):
    dtype, hq, hkv, d, bs, r = torch.float32, 4, 2, 32, 16, 8
    lens, aids = [41, 16, 3], [1, -1, 0]
    k, v, bt, sl = make_paged(lens, hkv, d, bs, dtype, device)
    lr = torch.randn(k.shape[0], bs, r, device=device).to(dtype)
    lb = torch.randn(2, hkv, r, d, device=device).to(dtype)
    aid = torch.tensor(aids, dtype=torch.int32, device=device)
    v2 = _materialised(k, v, bt, sl, lr, lb, aids, bs)
    if mode == "decode":
        q = torch.randn(len(lens), hq, d, device=device).to(dtype)
        ours = flash_lora_decode(q, k, v, lr, bt, lb, aid, bt, sl, 0.2, num_splits=2)
        base = paged_attention_decode(q, k, v2, bt, sl, 0.2)
    else:
        lq = [20, 16, 1]
        cq = cu(lq, device)
        q = torch.randn(sum(lq), hq, d, device=device).to(dtype)
        ours = flash_lora_prefill(q, k, v, lr, bt, lb, aid, bt, cq, sl, 0.2)
        base = paged_attention_prefill(q, k, v2, bt, cq, sl, 0.2)
    assert rel_err(ours, base.double()) < EXACT


@pytest.mark.parametrize("prefetch_b", [False, True], ids=["b-after-loop", "b-prefetched"])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_flash_lora_on_the_kv_table_itself_and_b_prefetch(device, rng_seed, monkeypatch, plan_metas, mode,
                                                         prefetch_b):
    """The low-rank cache paged by the K/V block table itself (the same tensor passed twice, as
    the engine's base_lr_shared does: the kernel reuses the K block ids) or by an equal copy (its
    own table walk); B loaded before or after the key loop: the reference every way."""
    from kernels import attention as A

    monkeypatch.setattr(A, "_prefetch_lora_b", lambda decode, split: prefetch_b)
    dtype, hq, hkv, d, bs, r = torch.bfloat16, 6, 2, 32, 16, 24
    lens, aids = [53, 17, 1, 40], [1, -1, 0, 2]
    k, v, bt, sl = make_paged(lens, hkv, d, bs, dtype, device)
    lr = torch.randn(k.shape[0], bs, r, device=device).to(dtype)
    lb = (torch.randn(3, hkv, r, d, device=device) / r ** 0.5).to(dtype)
    aid = torch.tensor(aids, dtype=torch.int32, device=device)
    lq = [20, 17, 1, 3]
    q = torch.randn(len(lens) if mode == "decode" else sum(lq), hq, d, device=device).to(dtype)
    cq = cu(lq, device)
    for lbt, shared in ((bt, True), (bt.clone(), False)):
        out = poisoned(q.shape, dtype, device)
        if mode == "decode":
            flash_lora_decode(q, k, v, lr, lbt, lb, aid, bt, sl, 0.3, out=out, num_splits=3)
            ref = flash_lora_decode_ref(q, k, v, lr, bt, lb, aid, bt, sl, 0.3)
        else:
            flash_lora_prefill(q, k, v, lr, lbt, lb, aid, bt, cq, sl, 0.3, out=out)
            ref = flash_lora_prefill_ref(q, k, v, lr, bt, lb, aid, bt, cq, sl, 0.3)
        check(out, ref, dtype)
        assert plan_metas[-1]["LR_SHARED_TABLE"] is shared and plan_metas[-1]["PREFETCH_B"] is prefetch_b


@pytest.fixture
def tma_forced(device, monkeypatch):
    """TMA decode under the interpreter (never chosen there on its own) wherever a tile fits a
    cache block; a GPU keeps its own policy."""
    from kernels import attention as A

    if device == "cpu":
        monkeypatch.setattr(A, "_tma_loads", lambda dev, block_size, block_n: block_size % block_n == 0)


TMA_CASES = [  # (dtype, hq, hkv, d, block_size, lens, num_splits, low-rank table: None/"kv"/"own")
    (torch.bfloat16, 8, 2, 32, 128, [300, 1, 0, 129, 128], None, None),
    (torch.float16, 4, 1, 64, 256, [601, 77], 3, None),
    (torch.float32, 6, 3, 32, 128, [257, 40], 1, None),
    (torch.bfloat16, 8, 2, 32, 128, [290, 1, 0, 131], 2, "kv"),
    (torch.float16, 4, 2, 64, 128, [200, 63, 5], None, "own"),
    # the low-rank cache in blocks of its own size (tiles inside them; 16-key tiles on CPU)
    (torch.bfloat16, 4, 2, 32, 128, [200, 63, 5, 40, 129], None, "own-lbs32"),
    (torch.bfloat16, 4, 2, 32, 128, [200, 70, 300, 1], 4, "own-lbs256"),
    # rows of 12 bf16 (24 bytes) are no TMA pitch: L, and so K/V, take per-thread loads
    (torch.bfloat16, 4, 2, 64, 128, [200, 63], None, "own-r12"),
]


@pytest.mark.parametrize("dtype,hq,hkv,d,bs,lens,splits,lowrank", TMA_CASES)
def test_decode_through_tma_descriptors(device, rng_seed, tma_forced, plan_metas, dtype, hq, hkv, d, bs, lens,
                                        splits, lowrank):
    """Decode with K/V tiles loaded through TMA tensor descriptors (whole tiles inside one cache
    block; forced on under the interpreter, the policy's own choice on a GPU at these block
    sizes), paged and Flash-LoRA: the keys a tile reads past a sequence's end are NaN in these
    caches, so a missing mask shows; so are the low-rank rows of requests without adapter. The
    plan must really take the descriptor path, and not for a cache whose rows are not dense or
    whose row pitch is not a multiple of 16 bytes (a descriptor could not address it)."""
    k, v, bt, sl = make_paged(lens, hkv, d, bs, dtype, device)
    q = torch.randn(len(lens), hq, d, device=device).to(dtype)
    out = poisoned(q.shape, dtype, device)
    if lowrank is None:
        paged_attention_decode(q, k, v, bt, sl, 0.21, out=out, num_splits=splits)
        ref = paged_attention_decode_ref(q, k, v, bt, sl, 0.21)
    else:
        r = 12 if lowrank == "own-r12" else 16
        # adapters on long sequences too, whose tail tiles read rows of the tile before
        aid = torch.tensor([(0, -1, 1)[i % 3] for i in range(len(lens))], dtype=torch.int32, device=device)
        if lowrank == "kv":
            lr, lbt = torch.randn(k.shape[0], bs, r, device=device).to(dtype), bt
            for b, n in enumerate(lens):  # L of the requests without adapter: never to be read
                if aid[b] < 0 and n:
                    lr[bt[b, :-(-n // bs)].long()] = float("nan")
            lb = (torch.randn(2, hkv, r, d, device=device) / r ** 0.5).to(dtype)
        else:
            lbs = int(lowrank[len("own-lbs"):]) if lowrank.startswith("own-lbs") else bs
            lr, lbt, lb = make_lowrank(bt, lens, lbs, r, 2, hkv, d, dtype, device)
        flash_lora_decode(q, k, v, lr, lbt, lb, aid, bt, sl, 0.21, out=out, num_splits=splits)
        ref = flash_lora_decode_ref(q, k, v, lr, lbt, lb, aid, bt, sl, 0.21)
        assert plan_metas[-1]["LR_SHARED_TABLE"] is (lowrank == "kv")
    check(out, ref, dtype)
    # (on a GPU, low-rank blocks of 32 hold no half-width tile of 64 keys: per-thread loads)
    assert plan_metas[-1]["TMA"] is (lowrank != "own-r12" and (device == "cpu" or lowrank != "own-lbs32"))
    if plan_metas[-1]["TMA"] and device == "cpu":
        # the shifted tail with Flash-LoRA always, paged decode when unsplit (8 SMs under the
        # interpreter: every case here fits one wave); the masked tail when split
        assert plan_metas[-1]["SHIFT_TAIL"] is (lowrank is not None or splits in (None, 1))
    # the same K/V as every other row of a wider buffer: strided rows, per-thread loads
    kw = torch.full((*k.shape[:-1], d + 16), float("nan"), dtype=dtype, device=device)
    vw = torch.full_like(kw, float("nan"))
    kw[..., :d], vw[..., :d] = k, v
    out = poisoned(q.shape, dtype, device)
    paged_attention_decode(q, kw[..., :d], vw[..., :d], bt, sl, 0.21, out=out, num_splits=splits)
    check(out, paged_attention_decode_ref(q, k, v, bt, sl, 0.21), dtype)
    assert plan_metas[-1]["TMA"] is False


@pytest.mark.parametrize("lowrank, hkv, splits, single", [
    (False, 2, 1, True),
    (True, 2, 1, True),    # Flash-LoRA
    (False, 1, 2, False),  # split launches stay at 2 an SM
    (True, 2, 2, False),
])
def test_decode_one_program_an_sm(device, rng_seed, tma_forced, plan_metas, monkeypatch, lowrank, hkv, splits, single):
    """The double-buffered one-program-an-SM TMA variant of unsplit launches (made possible under
    the interpreter; on a GPU, where the device has the shared memory), and split launches that
    keep 2 an SM: the plans, and the outputs against the reference on caches whose slots past
    each sequence are NaN, with partial tail tiles, a sequence of one token and one of none."""
    from kernels import attention as A

    if device == "cpu":
        monkeypatch.setattr(A, "_tma_single", lambda dev: True)
    elif not A._tma_single(torch.device(device)):
        pytest.skip("this GPU has no TMA or not the shared memory of the variant")
    dtype, hq, d, bs = torch.bfloat16, 4 * hkv, 64, 128
    # 16 tiles at least: 16-key tiles under the interpreter, 128-key ones on a GPU
    lens = [600, 129, 1, 0] if device == "cpu" else [4000, 129, 1, 0]
    k, v, bt, sl = make_paged(lens, hkv, d, bs, dtype, device, table_slack=0)
    q = torch.randn(len(lens), hq, d, device=device).to(dtype)
    out = poisoned(q.shape, dtype, device)
    if lowrank:
        lr, lbt, lb = make_lowrank(bt, lens, bs, 16, 2, hkv, d, dtype, device)
        aid = torch.tensor([0, 1, -1, 0], dtype=torch.int32, device=device)
        flash_lora_decode(q, k, v, lr, lbt, lb, aid, bt, sl, 0.17, out=out, num_splits=splits)
        ref = flash_lora_decode_ref(q, k, v, lr, lbt, lb, aid, bt, sl, 0.17)
    else:
        paged_attention_decode(q, k, v, bt, sl, 0.17, out=out, num_splits=splits)
        ref = paged_attention_decode_ref(q, k, v, bt, sl, 0.17)
    check(out, ref, dtype)
    meta = plan_metas[-1]
    assert meta["TMA"] and meta["SHIFT_TAIL"] is (single or lowrank) and meta["SPLIT"] is (splits > 1)
    assert (meta["num_stages"] == A._SINGLE_STAGES) is single
    # every tile, the partial tails too, in one pipelined loop (split Flash-LoRA's too)
    assert meta["ONE_LOOP"] is (single or (lowrank and splits > 1))
    assert not meta["B_IN_LOOP"]  # (programs of many tiles)


# (dtype, hq, hkv, d, rank, lens, num_splits, lora_b layout: "dense" / "sliced" / "offset")
B_IN_LOOP_CASES = [  # split counts of one tile a program: the tiles of the longest row on CPU (16 keys)
    (torch.bfloat16, 8, 2, 32, 16, [300, 1, 0, 129, 77], 24, "dense"),
    (torch.float16, 4, 1, 64, 8, [601, 77, 2], 40, "dense"),           # r = 8: B's box rows past r, L's columns
    (torch.bfloat16, 8, 2, 32, 32, [250, 128, 16, 3], 17, "dense"),    # fewer tiles than splits
    (torch.bfloat16, 8, 2, 32, 16, [1000, 1, 129], 4, "dense"),        # several tiles a program: B before the loop
    (torch.bfloat16, 8, 2, 32, 16, [300, 1, 129], 24, "sliced"),       # no descriptor for lora_b: B before the loop
    (torch.bfloat16, 8, 2, 32, 16, [300, 1, 129], 24, "offset"),       # lora_b off 16-byte alignment: the same
    (torch.float32, 4, 2, 64, 16, [300, 1, 129], 24, "dense"),         # rows of 256 bytes, L's of 128: B with the tile
    (torch.float32, 4, 2, 64, 64, [300, 1, 129], 24, "dense"),         # L rows of 256 bytes: B's buffer would cost
    (torch.bfloat16, 2, 1, 256, 16, [200, 1, 129], 16, "dense"),       # rows of 512: B's buffer would cost
    (torch.bfloat16, 4, 2, 32, 128, [300, 1, 129], 24, "dense"),       # L tiles of 128 columns: the same
]


@pytest.mark.parametrize("dtype,hq,hkv,d,r,lens,splits,lb_layout", B_IN_LOOP_CASES)
def test_flash_lora_split_decode_b_in_loop(device, rng_seed, tma_forced, plan_metas, dtype, hq, hkv, d, r, lens,
                                           splits, lb_layout):
    """Split Flash-LoRA decode by TMA takes every tile through one loop, and where no program has
    more than one tile (the split count at least the tiles of the longest table row) B_a comes
    by its own TMA copy with each tile, its product folded into the P·V accumulator tile by tile:
    against the reference, with NaN in every K/V/L slot no sequence owns and in the L rows of the
    requests without adapter, adapters mixed, partial tail tiles, sequences of one token and none.
    lora_b that a descriptor cannot address (a slice of a wider tensor, or a base off 16 bytes),
    and rows or L tiles whose B_a buffer would cost the launch residency, keep B before the loop."""
    # 16-key tiles under the interpreter, 64- or 128-key ones on a GPU (blocks of 128)
    k, v, bt, sl = make_paged(lens, hkv, d, 128, dtype, device, table_slack=0)
    q = torch.randn(len(lens), hq, d, device=device).to(dtype)
    lr, lbt = torch.randn(k.shape[0], 128, r, device=device).to(dtype), bt
    aid = torch.tensor([(1, -1, 0, 2)[i % 4] for i in range(len(lens))], dtype=torch.int32, device=device)
    for b, n in enumerate(lens):
        if aid[b] < 0 and n:
            lr[bt[b, :-(-n // 128)].long()] = float("nan")
    lb = (torch.randn(3, hkv, r, d, device=device) / r ** 0.5).to(dtype)
    if lb_layout == "sliced":
        wide = torch.full((3, hkv, r, d + 8), float("nan"), dtype=dtype, device=device)
        wide[..., :d] = lb
        lb = wide[..., :d]
    elif lb_layout == "offset":
        flat = torch.empty(lb.numel() + 1, dtype=dtype, device=device)
        flat[1:] = lb.flatten()
        lb = flat[1:].view(lb.shape)
    out = poisoned(q.shape, dtype, device)
    flash_lora_decode(q, k, v, lr, lbt, lb, aid, bt, sl, 0.19, out=out, num_splits=splits)
    check(out, flash_lora_decode_ref(q, k, v, lr, lbt, lb, aid, bt, sl, 0.19), dtype)
    meta = plan_metas[-1]
    assert meta["TMA"] and meta["SPLIT"] and meta["ONE_LOOP"]
    tiles = -(-bt.shape[1] * 128 // meta["BLOCK_N"])
    fits = d * k.element_size() <= 256 and meta["R_PAD"] * k.element_size() <= 128  # (B_a's buffer: _launch_plan)
    assert meta["B_IN_LOOP"] is (lb_layout == "dense" and tiles <= splits and fits), (tiles, splits)
    if device == "cpu":
        assert tiles <= splits or len(lens) == 3 and lens[0] == 1000, tiles  # (the cases' premise)


TAIL_CASES = [  # (mode, Hkv, lens, (whole programs, splits of the rest)); GQA group 2, D 32
    ("paged", 2, [37, 1, 0, 50, 70, 5], (5, 3)),        # the last 7 items in 3 splits: the 0- and 1-token ones too
    ("paged", 2, [37, 1, 0, 50, 70, 5], (8, 4)),        # whole programs on an empty sequence too
    ("paged", 1, [300, 2, 181, 45], (1, 7)),            # more splits than a short sequence has tiles
    ("paged", 2, [37, 1, 0, 50, 70, 5], (0, 2)),        # every item split
    ("paged-tma", 2, [129, 260, 1, 0, 301], (4, 3)),    # K/V tiles by TMA (forced), blocks of 128
    ("lora", 2, [37, 1, 0, 50, 70, 5], (5, 3)),         # Flash-LoRA: adapters and none, in either part
]


@pytest.mark.parametrize("mode, hkv, lens, tail", TAIL_CASES)
def test_decode_with_its_last_wave_split(device, rng_seed, monkeypatch, tma_forced, plan_metas, mode, hkv, lens,
                                         tail):
    """Decode over several waves whose last is split (`_attn_fwd`'s TAIL, `_tail_split` forced:
    the first `full` (sequence, KV head) items whole, the rest in `splits` each, their partials
    combined by the last split): against the reference, NaN in every slot no sequence owns
    (blocks of 16 under the interpreter, TMA forced; of 128 on a GPU)."""
    from kernels import attention as A

    monkeypatch.setattr(A, "_tail_split", lambda *a, **kw: tail)
    monkeypatch.setattr(A, "_num_sms", lambda dev: 1)  # several waves (and no shifted TMA tail)
    dtype, hq, d = torch.bfloat16, 2 * hkv, 32
    # (a GPU splits a last wave by TMA only, which its own policy takes in blocks that hold a tile)
    bs = 128 if mode == "paged-tma" or device != "cpu" else 16
    k, v, bt, sl = make_paged(lens, hkv, d, bs, dtype, device)
    q = torch.randn(len(lens), hq, d, device=device).to(dtype)
    out = poisoned(q.shape, dtype, device)
    ref, _ = decode_into(q, k, v, bt, sl, 0.19, out, lora=mode == "lora")
    check(out, ref, dtype)
    meta = plan_metas[-1]
    assert meta["TAIL"] and not meta["SPLIT"] and meta["FUSE_REDUCE"]
    if mode == "paged-tma":
        assert meta["TMA"] and not meta["SHIFT_TAIL"]
    if mode == "lora" and device == "cpu":
        assert meta["TMA"] and meta["SHIFT_TAIL"]  # (Flash-LoRA's tail tile, split or not)
    if 0 in lens:
        assert (out[lens.index(0)] == 0).all(), "an empty sequence gives zeros"
    # an explicit split count is the caller's: no tail then
    out = poisoned(q.shape, dtype, device)
    paged_attention_decode(q, k, v, bt, sl, 0.19, out=out, num_splits=1)
    assert not plan_metas[-1]["TAIL"]
    check(out, paged_attention_decode_ref(q, k, v, bt, sl, 0.19), dtype)


def test_decode_over_empty_caches_takes_no_descriptor(device, tma_forced, plan_metas):
    """Caches of no block at all (every sequence empty, no adapter has low-rank rows yet): a
    descriptor cannot have an empty dim, so those launches keep per-thread loads; zeros out."""
    hq, hkv, d, bs = 8, 2, 32, 128
    k = torch.empty(0, bs, hkv, d, dtype=torch.bfloat16, device=device)
    bt = torch.zeros(3, 1, dtype=torch.int32, device=device)
    sl = torch.zeros(3, dtype=torch.int32, device=device)
    q = torch.randn(3, hq, d, device=device).to(torch.bfloat16)
    out = poisoned(q.shape, q.dtype, device)
    paged_attention_decode(q, k, k, bt, sl, 0.2, out=out)
    assert (out == 0).all() and plan_metas[-1]["TMA"] is False
    lr = torch.empty(0, bs, 16, dtype=torch.bfloat16, device=device)
    lb = torch.randn(2, hkv, 16, d, device=device).to(torch.bfloat16)
    aid = torch.full((3,), -1, dtype=torch.int32, device=device)
    out = poisoned(q.shape, q.dtype, device)
    flash_lora_decode(q, k, k, lr, bt, lb, aid, bt, sl, 0.2, out=out)
    assert (out == 0).all() and plan_metas[-1]["TMA"] is False


def test_torch_fallback_matches_reference(device, rng_seed):
    """impl='torch' (the CPU serving path) against the same references."""
    dtype, hq, hkv, d, bs = torch.bfloat16, 4, 2, 16, 16
    lens, lq, aids = [37, 1, 0, 50], [5, 1, 0, 50], [0, -1, 1, 1]
    k, v, bt, sl = make_paged(lens, hkv, d, bs, dtype, device)
    lr, lbt, lb = make_lowrank(bt, lens, bs, 8, 2, hkv, d, dtype, device)
    aid = torch.tensor(aids, dtype=torch.int32, device=device)
    q = torch.randn(len(lens), hq, d, device=device).to(dtype)
    check(paged_attention_decode(q, k, v, bt, sl, 0.3, impl="torch"),
          paged_attention_decode_ref(q, k, v, bt, sl, 0.3), dtype)
    check(flash_lora_decode(q, k, v, lr, lbt, lb, aid, bt, sl, 0.3, impl="torch"),
          flash_lora_decode_ref(q, k, v, lr, lbt, lb, aid, bt, sl, 0.3), dtype)
    cq = cu(lq, device)
    qp = torch.randn(sum(lq), hq, d, device=device).to(dtype)
    check(paged_attention_prefill(qp, k, v, bt, cq, sl, 0.3, impl="torch"),
          paged_attention_prefill_ref(qp, k, v, bt, cq, sl, 0.3), dtype)
    check(flash_lora_prefill(qp, k, v, lr, lbt, lb, aid, bt, cq, sl, 0.3, impl="torch"),
          flash_lora_prefill_ref(qp, k, v, lr, lbt, lb, aid, bt, cq, sl, 0.3), dtype)


def test_tiny_head_dim(device, rng_seed):
    """Head dims below tl.dot's minimum of 16 (toy models) run through zero padding."""
    dtype, lens, aids = torch.float16, [21, 1, 40], [0, -1, 1]
    k, v, bt, sl = make_paged(lens, 2, 8, 16, dtype, device)
    lr, lbt, lb = make_lowrank(bt, lens, 16, 8, 2, 2, 8, dtype, device)
    aid = torch.tensor(aids, dtype=torch.int32, device=device)
    q = torch.randn(3, 4, 8, device=device).to(dtype)
    out = poisoned(q.shape, dtype, device)
    flash_lora_decode(q, k, v, lr, lbt, lb, aid, bt, sl, 0.3, out=out)
    check(out, flash_lora_decode_ref(q, k, v, lr, lbt, lb, aid, bt, sl, 0.3), dtype)
    cq = cu([5, 1, 9], device)
    qp = torch.randn(15, 4, 8, device=device).to(dtype)
    check(paged_attention_prefill(qp, k, v, bt, cq, sl, 0.3),
          paged_attention_prefill_ref(qp, k, v, bt, cq, sl, 0.3), dtype)


def test_empty_batch_and_empty_prefill(device):
    k, v, bt, sl = make_paged([5], 2, 16, 16, torch.float16, device)
    q = torch.randn(0, 2, 16, device=device).to(torch.float16)
    out = paged_attention_prefill(q, k, v, bt, cu([0], device), torch.tensor([5], dtype=torch.int32,
                                  device=device), 1.0)
    assert out.shape == (0, 2, 16)


# ---------------------------------------------------------------- bad inputs
def _decode_inputs(device, dtype=torch.float16):
    k, v, bt, sl = make_paged([20, 9], 2, 16, 16, dtype, device)
    lr, lbt, lb = make_lowrank(bt, [20, 9], 16, 8, 2, 2, 16, dtype, device)
    q = torch.randn(2, 4, 16, device=device).to(dtype)
    aid = torch.tensor([0, -1], dtype=torch.int32, device=device)
    return q, k, v, bt, sl, lr, lbt, lb, aid


def test_bad_inputs_raise_before_writing(device):
    q, k, v, bt, sl, lr, lbt, lb, aid = _decode_inputs(device)
    out = poisoned(q.shape, q.dtype, device)

    def raises(exc, fn, **kw):
        with pytest.raises(exc):
            fn(**kw)
        assert out.isnan().all(), "a rejected call must not write"

    base = dict(q=q, k_cache=k, v_cache=v, block_tables=bt, seq_lens=sl, scale=0.1, out=out)
    raises(TypeError, paged_attention_decode, **{**base, "k_cache": k.float()})
    raises(TypeError, paged_attention_decode, **{**base, "q": q.int()})
    raises(ValueError, paged_attention_decode, **{**base, "q": q[:, :3], "out": None})          # 3 % 2 != 0
    raises(ValueError, paged_attention_decode, **{**base, "q": q[:1], "out": None})             # batch mismatch
    raises(ValueError, paged_attention_decode, **{**base, "v_cache": v[:, :8]})    # shape mismatch
    raises(ValueError, paged_attention_decode, **{**base, "block_tables": bt[:, :1]})  # too short
    raises(ValueError, paged_attention_decode, **{**base, "seq_lens": sl.view(2, 1)})
    raises(TypeError, paged_attention_decode, **{**base, "block_tables": bt.float()})
    raises(TypeError, paged_attention_decode, **{**base, "scale": "x"})
    raises(ValueError, paged_attention_decode, **{**base, "impl": "cuda"})
    raises(ValueError, paged_attention_decode, **{**base, "num_splits": 0})
    bad_bt = bt.clone()
    bad_bt[0, 0] = k.shape[0]
    raises(ValueError, paged_attention_decode, **{**base, "block_tables": bad_bt})
    q12 = torch.randn(2, 4, 12, device=device).to(q.dtype)
    raises(ValueError, paged_attention_decode, **{**base, "q": q12, "out": None,
                                                   "k_cache": k[..., :12], "v_cache": v[..., :12]})

    lora = dict(q=q, k_cache=k, v_cache=v, lr_cache=lr, lr_block_tables=lbt, lora_b=lb,
                adapter_ids=aid, block_tables=bt, seq_lens=sl, scale=0.1, out=out)
    raises(ValueError, flash_lora_decode, **{**lora, "adapter_ids": torch.tensor([2, 0], dtype=torch.int32,
                                                                              device=device)})
    raises(ValueError, flash_lora_decode, **{**lora, "adapter_ids": torch.tensor([-2, 0], dtype=torch.int32,
                                                                               device=device)})
    raises(ValueError, flash_lora_decode, **{**lora, "lora_b": lb[:, :1]})
    raises(ValueError, flash_lora_decode, **{**lora, "lr_block_tables": lbt[:, :1]})
    raises(TypeError, flash_lora_decode, **{**lora, "lr_cache": lr.float()})

    cq = cu([1, 1], device)
    pre = dict(q=q, k_cache=k, v_cache=v, block_tables=bt, cu_seqlens_q=cq, seq_lens=sl, scale=0.1, out=out)
    raises(ValueError, paged_attention_prefill, **{**pre, "cu_seqlens_q": cu([1, 2], device)})  # != total_q
    raises(ValueError, paged_attention_prefill, **{**pre, "q": q.repeat(6, 1, 1), "out": None,
                                                   "cu_seqlens_q": cu([2, 10], device)})  # 10 > seq_len 9
    raises(ValueError, paged_attention_prefill, **{**pre, "max_seqlen_q": 0})  # rows would go unwritten


def _count_device_reads(monkeypatch) -> dict:
    """Count the reads of tensor values into Python (each a device sync on a GPU)."""
    seen = {"reads": 0}
    for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__index__", "nonzero"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **kw):
            seen["reads"] += 1
            return _orig(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return seen


def test_value_checks_read_the_device_once_and_name_what_is_wrong(device, monkeypatch):
    """validate=True reads every device value it checks in one copy (one sync a call, Flash-LoRA
    included), and each failing check names what is wrong; L's table is checked only for the
    requests with an adapter."""
    from kernels import attention as A

    q, k, v, bt, sl, lr, lbt, lb, aid = _decode_inputs(device)
    out = poisoned(q.shape, q.dtype, device)
    monkeypatch.setattr(A, "_run", lambda *a, **kw: kw["out"])  # the checks alone
    base = dict(q=q, k_cache=k, v_cache=v, block_tables=bt, seq_lens=sl, scale=0.1, out=out)
    lora = dict(base, lr_cache=lr, lr_block_tables=lbt, lora_b=lb, adapter_ids=aid)
    pre = dict(base, cu_seqlens_q=cu([1, 1], device), max_seqlen_q=1)
    pre_lora = dict(lora, cu_seqlens_q=cu([1, 1], device), max_seqlen_q=1)
    seen = _count_device_reads(monkeypatch)
    for fn, kw in ((paged_attention_decode, base), (flash_lora_decode, lora),
                   (paged_attention_prefill, pre), (flash_lora_prefill, pre_lora)):
        seen["reads"] = 0
        fn(**kw)
        assert seen["reads"] == 1, (fn.__name__, seen["reads"])
    monkeypatch.undo()
    monkeypatch.setattr(A, "_run", lambda *a, **kw: kw["out"])

    def rejects(fn, kw, msg):
        with pytest.raises(ValueError, match=msg):
            fn(**kw)
        assert out.isnan().all()

    i32 = dict(dtype=torch.int32, device=device)
    rejects(paged_attention_decode, dict(base, seq_lens=torch.tensor([20, -3], **i32)), "seq_lens must be >= 0")
    rejects(paged_attention_decode, dict(base, seq_lens=torch.tensor([20, 65], **i32)),
            r"block_tables too short: a sequence of 65 tokens needs 5 blocks of 16, the table has 4")
    bad = bt.clone()
    bad[1, 0] = -1
    rejects(paged_attention_decode, dict(base, block_tables=bad), r"block_tables holds block ids outside \[0, ")
    rejects(flash_lora_decode, dict(lora, adapter_ids=torch.tensor([0, 2], **i32)),
            r"adapter_ids must be in \[-1, 2\), got values in \[0, 2\]")
    bad_lr = lbt.clone()
    bad_lr[1, 0] = lr.shape[0] + 7  # request 1 has no adapter: its L table is never read
    flash_lora_decode(**dict(lora, lr_block_tables=bad_lr))
    rejects(flash_lora_decode, dict(lora, lr_block_tables=bad_lr, adapter_ids=torch.tensor([0, 1], **i32)),
            r"lr_block_tables holds block ids outside")
    rejects(paged_attention_prefill, dict(pre, cu_seqlens_q=torch.tensor([0, 3, 2], **i32), max_seqlen_q=None),
            "non-decreasing")
    rejects(paged_attention_prefill, dict(pre, cu_seqlens_q=torch.tensor([1, 1, 2], **i32)),
            "cu_seqlens_q must start at 0 and end at total_q=2")
    rejects(paged_attention_prefill, dict(pre, max_seqlen_q=0), r"max_seqlen_q=0 is below the longest query run \(1\)")


def test_value_checks_copy_each_tensor_once(device, monkeypatch):
    """A tensor that several parts of a call check (seq_lens, cu_seqlens_q and adapter_ids by the
    paged and the low-rank checks, a table shared by K/V and L) goes into the one copy once."""
    from kernels import attention as A

    q, k, v, bt, sl, _, _, lb, aid = _decode_inputs(device)
    lr = torch.randn(k.shape[0], k.shape[1], lb.shape[2], device=device).to(q.dtype)  # paged by bt itself
    monkeypatch.setattr(A, "_run", lambda *a, **kw: kw["out"])  # the checks alone
    queued = []
    real_run = A._ValueChecks.run

    def counting_run(self):
        queued.append(list(self._tensors))
        return real_run(self)

    monkeypatch.setattr(A._ValueChecks, "run", counting_run)
    cq = cu([1, 1], device)
    flash_lora_prefill(q, k, v, lr, bt, lb, aid, bt, cq, sl, 0.1, out=poisoned(q.shape, q.dtype, device),
                       max_seqlen_q=1)
    (tensors,) = queued
    assert len(tensors) == 4 and all(any(t is x for t in tensors) for x in (cq, sl, bt, aid))


def test_too_many_sequences_for_one_launch_raise(device):
    """Sequences ride on the grid's third axis (at most 65535): more is a clear error, not a
    launch failure or rows left unwritten."""
    n = 65536
    q = torch.randn(n, 2, 16, device=device)
    k = torch.randn(1, 16, 1, 16, device=device)
    bt = torch.zeros(n, 1, dtype=torch.int32, device=device)
    sl = torch.ones(n, dtype=torch.int32, device=device)
    out = poisoned(q.shape, q.dtype, device)
    with pytest.raises(ValueError, match="65535"):
        paged_attention_decode(q, k, k, bt, sl, 0.1, out=out, validate=False, impl="triton")
    assert out.isnan().all()


def test_validate_false_still_correct(device):
    """validate=False skips the device-value checks (the engine's hot path): a valid call still works."""
    q, k, v, bt, sl, lr, lbt, lb, aid = _decode_inputs(device, torch.float32)
    out = flash_lora_decode(q, k, v, lr, lbt, lb, aid, bt, sl, 0.1, validate=False)
    check(out, flash_lora_decode_ref(q, k, v, lr, lbt, lb, aid, bt, sl, 0.1), torch.float32)


# ---------------------------------------------------------------- GPU, realistic sizes
# GPU grids mirror the benchmark configurations (bf16, D=128, block 16, r 8/64), so the Triton
# cache compiled here serves bench/ too; the other rows add coverage at one compile each.
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,d,bs", [(torch.bfloat16, 128, 16), (torch.float16, 64, 64),
                                        (torch.bfloat16, 256, 32), (torch.bfloat16, 128, 128),
                                        (torch.float16, 64, 256)])
def test_gpu_decode_and_prefill_realistic(rng_seed, dtype, d, bs):
    device = "cuda"
    hq, hkv = 32, 8
    lens = [1531, 1, 0, 4099, 777]
    k, v, bt, sl = make_paged(lens, hkv, d, bs, dtype, device)
    q = torch.randn(len(lens), hq, d, device=device).to(dtype)
    ref = paged_attention_decode_ref(q, k, v, bt, sl, d ** -0.5)
    for splits in (None, 1):
        out = poisoned(q.shape, dtype, device)
        paged_attention_decode(q, k, v, bt, sl, d ** -0.5, out=out, num_splits=splits)
        check(out, ref, dtype)
    lq = [300, 1, 0, 1029, 777]
    cq = cu(lq, device)
    qp = torch.randn(sum(lq), hq, d, device=device).to(dtype)
    out = poisoned(qp.shape, dtype, device)
    paged_attention_prefill(qp, k, v, bt, cq, sl, d ** -0.5, out=out)
    check(out, paged_attention_prefill_ref(qp, k, v, bt, cq, sl, d ** -0.5), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,r,bs", [(torch.bfloat16, 8, 16), (torch.bfloat16, 64, 16), (torch.float16, 128, 16),
                                        (torch.bfloat16, 16, 128), (torch.float16, 64, 64)])
def test_gpu_flash_lora_realistic(rng_seed, dtype, r, bs):
    device = "cuda"
    hq, hkv, d = 32, 8, 128
    lens = [2049, 1, 0, 3001, 515, 64]
    aids = [0, 3, -1, 2, -1, 1]
    k, v, bt, sl = make_paged(lens, hkv, d, bs, dtype, device)
    lr, lbt, lb = make_lowrank(bt, lens, bs, r, 4, hkv, d, dtype, device)
    aid = torch.tensor(aids, dtype=torch.int32, device=device)
    q = torch.randn(len(lens), hq, d, device=device).to(dtype)
    ref = flash_lora_decode_ref(q, k, v, lr, lbt, lb, aid, bt, sl, d ** -0.5)
    for splits in (None, 1):
        out = poisoned(q.shape, dtype, device)
        flash_lora_decode(q, k, v, lr, lbt, lb, aid, bt, sl, d ** -0.5, out=out, num_splits=splits)
        check(out, ref, dtype)
    lq = [700, 1, 0, 1000, 515, 3]
    cq = cu(lq, device)
    qp = torch.randn(sum(lq), hq, d, device=device).to(dtype)
    out = poisoned(qp.shape, dtype, device)
    flash_lora_prefill(qp, k, v, lr, lbt, lb, aid, bt, cq, sl, d ** -0.5, out=out)
    check(out, flash_lora_prefill_ref(qp, k, v, lr, lbt, lb, aid, bt, cq, sl, d ** -0.5), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("bs, lora, batch", [(128, False, 9), (128, True, 9), (64, False, 7), (64, True, 9)])
def test_gpu_decode_with_its_last_wave_split(rng_seed, monkeypatch, plan_metas, bs, lora, batch):
    """The plan's own split last wave (`_tail_split`, TMA launches) on "16 SMs", compiled, at D
    128: 9 sequences × 8 KV heads at 128-key tiles (2 an SM: two waves and 8 programs over), 7
    at 64-key ones (3 an SM: one wave and 8 over; Flash-LoRA's, 4 an SM: 9 sequences, one wave
    and 8 over); whole and split items alike against the
    reference, with odd lengths, and an empty and a one-token sequence among the split ones; and
    per-thread loads (blocks of 16) never split so."""
    from kernels import attention as A

    monkeypatch.setattr(A, "_num_sms", lambda device: 16)
    monkeypatch.setattr(A, "_ring_device", lambda device: False)  # `_attn_fwd`'s (the ring's: its own tests)
    lens = [4096, 3001, 129, 4000, 2063, 17, 0, 4095, 1][-batch:]
    dtype = torch.bfloat16
    k, v, bt, sl = make_paged(lens, 8, 128, bs, dtype, "cuda", table_slack=0)
    q = torch.randn(len(lens), 32, 128, device="cuda").to(dtype)
    out = poisoned(q.shape, dtype, "cuda")
    ref, _ = decode_into(q, k, v, bt, sl, 0.08, out, lora=lora)
    assert plan_metas[-1]["TAIL"] and plan_metas[-1]["TMA"]
    check(out, ref, dtype)
    k16, v16, bt16, sl16 = make_paged(lens, 8, 128, 16, dtype, "cuda", table_slack=0)
    paged_attention_decode(q, k16, v16, bt16, sl16, 0.08, out=out)
    assert not plan_metas[-1]["TMA"] and not plan_metas[-1]["TAIL"]


@pytest.mark.gpu
@pytest.mark.parametrize("r,stages", [(16, 3), (64, 2)])
def test_gpu_flash_lora_prefill_wide_tiles_in_small_blocks(rng_seed, plan_metas, r, stages):
    """Flash-LoRA prefill in blocks of 16 over 4K keys and more takes 128 x 128 tiles (two
    stages at r > 32): right against the reference, odd lengths and a request without adapter
    among them."""
    out, ref = run_flash_lora_prefill([4111, 1, 2500, 0, 333], [1203, 1, 977, 0, 333], [1, 0, -1, 2, 1],
                                      32, 8, 128, 16, r, torch.bfloat16, "cuda", 128 ** -0.5)
    meta = plan_metas[-1]
    assert (meta["BLOCK_M"], meta["BLOCK_N"], meta["num_warps"], meta["num_stages"]) == (128, 128, 8, stages)
    check(out, ref, torch.bfloat16)


def test_strided_q_and_index_vectors(device, rng_seed):
    """q sliced out of a wider tensor (e.g. a fused QKV projection) and strided seq_lens work."""
    k, v, bt, sl = make_paged([70, 33], 2, 32, 16, torch.float16, device)
    q = torch.randn(2, 4, 64, device=device).to(torch.float16)[..., ::2]
    sl2 = torch.stack([sl, sl], 1).flatten()[::2]
    assert not q.is_contiguous() and not sl2.is_contiguous()
    check(paged_attention_decode(q, k, v, bt, sl2, 0.2), paged_attention_decode_ref(q, k, v, bt, sl, 0.2),
          torch.float16)


_COMPILE_SCRIPT = r"""
import json
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import attention as A
from kernels._pdl import ptx_order

def compile_variant(variant):
    fn = A._split_reduce if variant == "reduce" else A._attn_fwd
    ptr_types = {"WsM": "fp32", "WsL": "fp32", "WsAcc": "fp32", "BlockTables": "i32",
                 "LrBlockTables": "i32", "SeqLens": "i32", "CuQ": "i32", "CuK": "i32", "AdapterIds": "i32",
                 "SplitCounters": "i32"}
    pointers = {"Q", "K", "V", "Lr", "LoraB", "Out"} | set(ptr_types)
    decode = variant.startswith("decode")
    # the GPU config, LoRA at r = 64; GQA groups of 4 (of 32: "-g32", the most rows "-single" takes);
    # "prefill-short": Flash-LoRA prefill over short runs in blocks of 128; "-r16": at r = 16 (in
    # blocks of 16 over long runs without "-short": 128-key tiles, three stages, against two at r = 64)
    short = variant.startswith("prefill-short")
    r_cfg = 16 if variant.endswith("-r16") else 64
    bm, bn, warps, stages = A._config(128, 32 if variant.endswith("-g32") else 4, decode, r_cfg, None,
                                      **(dict(long=False, block_size=128) if short else {}))
    # TMA: K/V (and L) through descriptors at blocks of 128, no S2: full-width tiles, Flash-LoRA at
    # r = 16 with its tail tile shifted and the low-rank cache paged by the K/V table (the engine's
    # base_lr_shared) or by its own ("-own"); paged decode split with the tail masked, or unsplit
    # with it shifted ("-shift-nosplit"; see _launch_plan; "-s2": S2 decode over a shared cache);
    # "-single": one program an SM,
    # double-buffered, unsplit, one loop over every tile (Flash-LoRA at r = 64, its widest L tiles);
    # "-bloop": split Flash-LoRA in one loop, B_a by TMA with each tile (B_IN_LOOP)
    tma = variant.startswith("decode-tma")
    bloop = variant.endswith("-bloop")
    lora = variant.startswith("decode-tma-lora") or not tma
    single = "-single" in variant
    tail = variant.endswith("-tail")  # a split last wave (TAIL: the split path's code beside the whole one)
    split = decode and not variant.startswith("decode-tma-shift-nosplit") and not single
    if single:
        stages = A._SINGLE_STAGES
    r_pad, rank = (32, 16) if tma and not (single and lora) else (64, 64)
    if variant.startswith("prefill"):
        r_pad, rank = r_cfg, r_cfg
    consts = dict(HEAD_DIM=128, BLOCK_M=bm, BLOCK_N=bn, R_PAD=r_pad, SPARSE_BLOCK=bn,
                  BLOCK_SIZE=128 if tma or short else 16, LR_BLOCK_SIZE=128 if tma or short else 16, RANK=rank,
                  LR_ALIGN=16, PAGED=True, VARLEN_Q=not decode, HAS_LORA=lora,
                  S2=not tma or variant.endswith("-s2"), SPLIT=split and not tail, UPCAST=False, FUSE_REDUCE=split,
                  GROUP_P2=4,
                  REDUCE_S=A._combine_chunk(4, 128),
                  LR_SHARED_TABLE=variant in ("decode-shared-table", "decode-tma-lora") or (lora and single),
                  PREFETCH_B=variant in ("decode-prefetch-b", "decode-tma-lora", "decode-tma-lora-own") or (lora and single),
                  TMA=tma, ONE_LOOP=single or bloop, TAIL=tail, B_IN_LOOP=bloop,
                  SHIFT_TAIL=tma and (lora or single or not split), PDL=decode)
    if tma:
        ptr_types.update(K=f"tensordesc<bf16[1,{bn},128]>", V=f"tensordesc<bf16[1,{bn},128]>",
                         Lr=f"tensordesc<bf16[1,{bn},{r_pad}]>")
        if bloop:
            ptr_types.update(LoraB=f"tensordesc<bf16[1,{r_pad},128]>")
    if variant == "reduce":
        consts, warps = dict(HEAD_DIM=128, GROUP_P2=4, REDUCE_S=A._combine_chunk(4, 128)), 4
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in pointers:
            t = ptr_types.get(name, "bf16")
            sig[name] = t if t.startswith("tensordesc") else "*" + t
        else:
            sig[name] = "fp32" if name == "qk_scale" else "i32"
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": stages, "launch_pdl": decode})
    ptx = k.asm["ptx"]
    return dict(verdict="SPILLS" if "st.local" in ptx else "COMPILED", smem=k.metadata.shared,
                pdl=ptx_order(ptx) if decode else None)


for variant in json.loads(sys.argv[1]):  # one line of JSON a variant, as it ends
    try:
        out = compile_variant(variant)
    except Exception as e:  # this variant's failure, not the others'
        out = dict(error=f"{type(e).__name__}: {e}"[-3000:])
    print(json.dumps(dict(variant=variant, **out)), flush=True)
"""


_COMPILE_VARIANTS = ["decode", "decode-shared-table", "decode-prefetch-b", "decode-tma", "decode-tma-shift-nosplit",
                     "decode-tma-s2", "decode-tma-shift-nosplit-s2", "decode-tma-lora", "decode-tma-lora-own",
                     "decode-tma-single", "decode-tma-lora-single", "decode-tma-lora-single-g32",
                     "decode-tail", "decode-tma-tail", "decode-tma-lora-tail", "decode-tma-lora-bloop",
                     "prefill", "prefill-r16", "prefill-short", "prefill-short-r16", "reduce"]


@functools.lru_cache(maxsize=None)
def _compiled() -> tuple[dict, int, str]:
    """Every variant of `_COMPILE_VARIANTS` compiled for sm_90 in one subprocess, without
    TRITON_INTERPRET (which the CPU tests set; one process, since its imports cost more than
    most of its compiles): ({variant: result}, its exit code, the end of its stderr)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(_COMPILE_VARIANTS)], env=env, cwd=root,
                         capture_output=True, text=True, timeout=1800)
    results = {}
    for line in res.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[r.pop("variant")] = r
    return results, res.returncode, res.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernel for real")
@pytest.mark.parametrize("variant", _COMPILE_VARIANTS)
def test_kernel_compiles_for_hopper(variant):
    """The interpreter accepts code the compiler rejects: compile the widest variants (every flag
    on) for sm_90 without a GPU, in a process without TRITON_INTERPRET, so CPU-only CI catches it."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no offline compile API")
    results, code, err = _compiled()
    r = results.get(variant)
    assert r is not None, f"the compile subprocess ended (exit {code}) before this variant: {err}"
    if "error" in r and "ptxas" in r["error"].lower() and "CompilationError" not in r["error"]:
        pytest.skip("no ptxas on this machine")
    assert "error" not in r, r["error"]
    assert r["verdict"] == "COMPILED", "register spills in the compiled kernel"
    if variant.startswith("decode"):  # PDL: the wait before any global access, the signal after it (kernels._pdl)
        pdl = r["pdl"]
        assert 0 <= pdl["wait"] < pdl["first_global"] < pdl["signal"], pdl
    if "-single" in variant:
        from kernels import attention as A

        # really double-buffered (one buffer takes 74-106 KB), and within what _tma_single allows
        assert 130 * 1024 < int(r["smem"]) <= A._SINGLE_SMEM, r["smem"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_no_recompile_as_contexts_grow(rng_seed):
    """Split counts and (16-padded, as the engine pads them) table widths change as contexts
    grow; none of them may trigger a new compile mid-serving (a stall of seconds)."""
    from kernels.attention import _attn_fwd, _split_reduce

    def compiled() -> int:
        caches = getattr(_attn_fwd, "device_caches", None)
        if caches is None:
            pytest.skip("this triton keeps its kernel cache elsewhere")
        return sum(len(c[0]) for c in caches.values()) + sum(len(c[0]) for c in _split_reduce.device_caches.values())

    dtype, hq, hkv, d, bs = torch.bfloat16, 8, 2, 64, 16
    counts = []
    for lens, splits in (([4096, 37], 3), ([4131, 50], 5), ([4099, 1], 16), ([4101, 3], 17)):
        k, v, bt, sl = make_paged(lens, hkv, d, bs, dtype, "cuda")
        bt = torch.nn.functional.pad(bt, (0, -bt.shape[1] % 16))
        q = torch.randn(len(lens), hq, d, device="cuda").to(dtype)
        out = poisoned(q.shape, dtype, "cuda")
        paged_attention_decode(q, k, v, bt, sl, d ** -0.5, out=out, num_splits=splits)
        check(out, paged_attention_decode_ref(q, k, v, bt, sl, d ** -0.5), dtype)
        counts.append(compiled())
    assert counts[1:] == counts[:1] * 3, counts
