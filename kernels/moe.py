"""ExpertWeave kernels: router top-k, adapter reroute, fused MoE over an extended expert table.

- `router_topk`: softmax over the router logits in fp32, then the top-k experts per token.
- `reroute_experts`: `ids'[t, j] = expert_map[adapter_ids[t], ids[t, j]]` (adapter -1 = base,
  ids pass through) — one gather for a batch whose tokens belong to different adapters.
- `fused_moe`: SwiGLU experts as a grouped GEMM. As in vLLM's fused_moe, the (token, choice)
  pairs are sorted by expert and each expert's run is padded to a multiple of BLOCK_M
  (`moe_align_block_size`), so every M-tile of the GEMM reads one expert's weights. Stage 1 computes
  gate and up tiles together and writes `silu(gate) * up`; stage 2 multiplies by `w2` and the routing
  weight; the k choices of a token are summed last (no atomics, deterministic).

Router conventions (softmax, top-k, then renormalise or not) — pass `renormalize=` accordingly:
  Mixtral: always renormalises.            Qwen3-MoE: `norm_topk_prob` (true in released models).
  Qwen2-MoE: `norm_topk_prob` (false).     OLMoE: `norm_topk_prob` (false in OLMoE-1B-7B).
  DeepSeek-V2(-Lite): `norm_topk_prob` (false) and then `routed_scaling_factor` (1.0 for Lite);
  the full DeepSeek-V2's group-limited routing is not implemented here.
`ROUTER_RENORMALIZE` records these defaults; a model's config.json wins where it says otherwise.
"""
from __future__ import annotations

import torch

from ._dispatch import choose_impl

try:  # triton is optional: without it only the torch fallbacks run
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

ROUTER_RENORMALIZE = {
    "mixtral": True,
    "qwen3_moe": True,
    "qwen2_moe": False,
    "olmoe": False,
    "deepseek_v2": False,
}

_INT_DTYPES = (torch.int32, torch.int64)
MAX_CHUNK_TOKENS = 4096  # fused_moe runs longer batches in chunks of this many tokens
# moe_align_block_size runs in one program (one launch) up to these sizes (decode batches)
ALIGN_ONE_PROGRAM_MAX_PAIRS = 2048
ALIGN_ONE_PROGRAM_MAX_EXPERTS = 1024
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _check_same_device(**tensors: torch.Tensor) -> None:
    devs = {name: t.device for name, t in tensors.items()}
    if len(set(devs.values())) > 1:
        raise ValueError(f"tensors must be on one device, got {devs}")


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _router_topk_kernel(logits_ptr, w_ptr, ids_ptr, adapter_ptr, map_ptr, T, E, stride_lt,
                            stride_le, stride_map, stride_map_e,
                            TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                            BLOCK_E: tl.constexpr, RENORM: tl.constexpr, REROUTE: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, BLOCK_E)
        rmask = rows < T
        cmask = cols < E
        x = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_lt + cols[None, :] * stride_le,
                    mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        x = tl.where(cmask[None, :], x, float("-inf"))
        m = tl.max(x, axis=1)
        p = tl.exp(x - m[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
        # padding columns can never win, even against probabilities that underflowed to 0
        p = tl.where(cmask[None, :], p, -1.0)
        kcols = tl.arange(0, K_PAD)
        wacc = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
        iacc = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
        for j in tl.static_range(TOP_K):
            best = tl.max(p, axis=1)
            idx = tl.min(tl.where(p == best[:, None], cols[None, :], BLOCK_E), axis=1)
            wacc = tl.where(kcols[None, :] == j, best[:, None], wacc)
            iacc = tl.where(kcols[None, :] == j, idx[:, None], iacc)
            p = tl.where(cols[None, :] == idx[:, None], -2.0, p)
        if RENORM:
            wacc = wacc / tl.sum(wacc, axis=1)[:, None]
        optr = rows.to(tl.int64)[:, None] * TOP_K + kcols[None, :]
        omask = rmask[:, None] & (kcols[None, :] < TOP_K)
        if REROUTE:
            a = tl.load(adapter_ptr + rows, mask=rmask, other=-1).to(tl.int64)
            hit = omask & (a >= 0)[:, None]
            r = tl.load(map_ptr + a[:, None] * stride_map + iacc * stride_map_e, mask=hit, other=0)
            iacc = tl.where(hit, r, iacc)
        tl.store(w_ptr + optr, wacc, mask=omask)
        tl.store(ids_ptr + optr, iacc, mask=omask)

    @triton.jit
    def _reroute_kernel(ids_ptr, adapter_ptr, map_ptr, out_ptr, N, K, stride_map, stride_map_e,
                        BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        e = tl.load(ids_ptr + offs, mask=mask, other=0).to(tl.int32)
        a = tl.load(adapter_ptr + offs // K, mask=mask, other=-1).to(tl.int64)
        hit = mask & (a >= 0)
        r = tl.load(map_ptr + a * stride_map + e * stride_map_e, mask=hit, other=0)
        tl.store(out_ptr + offs, tl.where(a >= 0, r, e), mask=mask)

    @triton.jit
    def _align_count_kernel(ids_ptr, counts_ptr, rank_ptr, N, BLOCK: tl.constexpr):
        # rank of each pair within its expert = the count before it (order within an expert is
        # arbitrary on a GPU; each pair's output row is computed on its own, so results are not)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        e = tl.load(ids_ptr + offs, mask=mask, other=0).to(tl.int32)
        r = tl.atomic_add(counts_ptr + e, tl.full([BLOCK], 1, tl.int32), mask=mask)
        tl.store(rank_ptr + offs, r, mask=mask)

    @triton.jit
    def _align_experts_kernel(counts_ptr, pad_start_ptr, expert_ids_ptr, num_post_ptr, E,
                              BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
        # one program per expert: its padded start, the tile -> expert entries of its tiles
        e = tl.program_id(0)
        offs = tl.arange(0, BLOCK_E)
        c = tl.load(counts_ptr + offs, mask=offs < E, other=0)
        padded = (c + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        start = tl.sum(tl.where(offs < e, padded, 0), axis=0)
        mine = tl.sum(tl.where(offs == e, padded, 0), axis=0)
        tl.store(pad_start_ptr + e, start)
        tl.store(num_post_ptr, tl.sum(padded, axis=0), mask=e == 0)
        first = start // BLOCK_M
        for b in range(0, mine // BLOCK_M):
            tl.store(expert_ids_ptr + first + b, e)

    @triton.jit
    def _align_scatter_kernel(ids_ptr, rank_ptr, pad_start_ptr, sorted_ptr, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        e = tl.load(ids_ptr + offs, mask=mask, other=0).to(tl.int32)
        r = tl.load(rank_ptr + offs, mask=mask, other=0)
        start = tl.load(pad_start_ptr + e, mask=mask, other=0)
        tl.store(sorted_ptr + start + r, offs, mask=mask)

    @triton.jit
    def _align_one_program_kernel(ids_ptr, counts_ptr, pad_start_ptr, sorted_ptr, expert_ids_ptr,
                                  num_post_ptr, N, E, EM, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr,
                                  BLOCK_M: tl.constexpr, TILE_CHUNK: tl.constexpr):
        # the three align steps in one program for decode-sized batches: on a GPU each launch
        # and each torch.zeros/full costs more host time than the whole step takes on the device.
        # debug_barrier (CTA barrier) makes each step's global writes visible to the next.
        eoffs = tl.arange(0, BLOCK_E)
        emask = eoffs < E
        tl.store(counts_ptr + eoffs, tl.zeros([BLOCK_E], dtype=tl.int32), mask=emask)
        offs = tl.arange(0, BLOCK)
        for s0 in range(0, EM, BLOCK):
            tl.store(sorted_ptr + s0 + offs, tl.full([BLOCK], 0, tl.int32) + N, mask=s0 + offs < EM)
        tl.debug_barrier()
        mask = offs < N
        e = tl.load(ids_ptr + offs, mask=mask, other=0).to(tl.int32)
        rank = tl.atomic_add(counts_ptr + e, tl.full([BLOCK], 1, tl.int32), mask=mask)
        tl.debug_barrier()
        c = tl.load(counts_ptr + eoffs, mask=emask, other=0)
        padded = (c + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        end = tl.cumsum(padded, axis=0)
        tl.store(pad_start_ptr + eoffs, end - padded, mask=emask)
        tl.store(num_post_ptr, tl.sum(padded, axis=0))
        # tile b belongs to the first expert whose padded run ends past b * BLOCK_M (in chunks
        # of tiles, so the [tiles, experts] comparison stays small)
        num_tiles = EM // BLOCK_M
        for t0 in range(0, num_tiles, TILE_CHUNK):
            tiles = t0 + tl.arange(0, TILE_CHUNK)
            before = tl.sum(((end[None, :] <= tiles[:, None] * BLOCK_M) & emask[None, :]).to(tl.int32), axis=1)
            tl.store(expert_ids_ptr + tiles, tl.minimum(before, E - 1), mask=tiles < num_tiles)
        tl.debug_barrier()
        start = tl.load(pad_start_ptr + e, mask=mask, other=0)
        tl.store(sorted_ptr + start + rank, offs, mask=mask)

    @triton.jit
    def _moe_gemm_kernel(a_ptr, b_ptr, c_ptr, rw_ptr, sorted_ids_ptr, expert_ids_ptr,
                         num_post_ptr, N, K, EM, num_valid, up_offset,
                         stride_am, stride_ak, stride_be, stride_bn, stride_bk,
                         stride_cm, stride_cn,
                         A_DIV: tl.constexpr, GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
        """C[pair] = A[pair // A_DIV] @ B[expert]^T over expert-sorted, padded pair tiles.

        GATED: B holds gate rows [0, N) and up rows [up_offset, up_offset + N); the tile
        computes both and stores silu(gate) * up. MUL_WEIGHT scales rows by the routing weight.
        """
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(EM, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        # grouped ordering so consecutive programs reuse the same expert's B tiles from L2
        width = GROUP_M * num_pid_n
        group = pid // width
        first_m = group * GROUP_M
        gsize = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + ((pid % width) % gsize)
        pid_n = (pid % width) // gsize
        num_post = tl.load(num_post_ptr)
        if pid_m * BLOCK_M >= num_post:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids_ptr + offs_m)
        pmask = pair < num_valid
        pair64 = pair.to(tl.int64)
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + (pair64 // A_DIV)[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = (b_ptr + expert * stride_be + offs_n.to(tl.int64)[None, :] * stride_bn
                  + offs_k[:, None] * stride_bk)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # defined either way so the loop carries the same values in both variants (unused ones
        # are dead code when not GATED)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        bu_ptrs = b_ptrs + up_offset * stride_bn
        for k0 in range(0, tl.cdiv(K, BLOCK_K)):
            kmask = offs_k < K - k0 * BLOCK_K
            a = tl.load(a_ptrs, mask=pmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
            if DOT_F32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            if GATED:
                bu = tl.load(bu_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
                if DOT_F32:
                    bu = bu.to(tl.float32)
                acc_up = tl.dot(a, bu, acc_up, input_precision=PRECISION)
                bu_ptrs += BLOCK_K * stride_bk
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        if GATED:
            acc = acc * tl.sigmoid(acc) * acc_up
        if MUL_WEIGHT:
            rw = tl.load(rw_ptr + pair64, mask=pmask, other=0.0)
            acc = acc * rw[:, None]
        c_ptrs = c_ptr + pair64[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=pmask[:, None] & nmask[None, :])


# ----------------------------------------------------------------------------------------------
# router top-k
# ----------------------------------------------------------------------------------------------
def router_topk(router_logits: torch.Tensor, top_k: int, *, renormalize: bool = False,
                adapter_ids: torch.Tensor | None = None, expert_map: torch.Tensor | None = None,
                validate: bool = True, impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (fp32) over experts, then the `top_k` largest per token.

    Args:
        router_logits: `[tokens, experts]` float16/bfloat16/float32.
        top_k: experts per token, `1 <= top_k <= experts`.
        renormalize: divide the chosen weights by their sum (Mixtral; Qwen3-MoE/OLMoE/Qwen2-MoE/
            DeepSeek-V2 when their config's `norm_topk_prob` is true; see `ROUTER_RENORMALIZE`).
        adapter_ids, expert_map: optionally reroute in the same kernel, exactly as
            `reroute_experts(ids, adapter_ids, expert_map)` would (no extra launch).
        validate: with rerouting, check adapter id ranges first (one device sync).
    Returns:
        `(topk_weights float32 [tokens, top_k], topk_ids int32 [tokens, top_k])`, weights in
        descending order; ties go to the lower expert index.
    """
    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2:
        raise ValueError("router_logits must be a 2-D tensor [tokens, experts]")
    if router_logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"router_logits must be float16/bfloat16/float32, got {router_logits.dtype}")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    T, E = router_logits.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, {E}] for {E} experts, got {top_k}")
    reroute = adapter_ids is not None or expert_map is not None
    if reroute:
        if adapter_ids is None or expert_map is None:
            raise ValueError("rerouting needs both adapter_ids and expert_map")
        _check_reroute_args(T, adapter_ids, expert_map)
        if expert_map.shape[1] != E:
            raise ValueError(f"expert_map has {expert_map.shape[1]} columns but the router {E} experts")
        _check_same_device(router_logits=router_logits, adapter_ids=adapter_ids, expert_map=expert_map)
        if validate and T:
            _check_adapter_range(adapter_ids, expert_map.shape[0])
    which = choose_impl(router_logits, impl)
    dev = router_logits.device
    if which == "torch" or T == 0:
        p = torch.softmax(router_logits.float(), dim=-1)
        w, i = torch.topk(p, top_k, dim=-1)
        if renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        i = i.to(torch.int32)
        if reroute:
            i = _reroute_torch(i, adapter_ids, expert_map)
        return w.contiguous(), i.contiguous()
    block_e = _next_pow2(E)
    block_t = max(1, min(64, 4096 // block_e))
    w = torch.empty((T, top_k), dtype=torch.float32, device=dev)
    ids = torch.empty((T, top_k), dtype=torch.int32, device=dev)
    grid = (triton.cdiv(T, block_t),)
    _router_topk_kernel[grid](router_logits, w, ids,
                              adapter_ids.contiguous() if reroute else ids,
                              expert_map if reroute else ids, T, E, router_logits.stride(0),
                              router_logits.stride(1), expert_map.stride(0) if reroute else 0,
                              expert_map.stride(1) if reroute else 0,
                              TOP_K=top_k, K_PAD=_next_pow2(top_k), BLOCK_T=block_t, BLOCK_E=block_e,
                              RENORM=bool(renormalize), REROUTE=reroute)
    return w, ids


# ----------------------------------------------------------------------------------------------
# reroute
# ----------------------------------------------------------------------------------------------
def _check_reroute_args(tokens: int, adapter_ids: object, expert_map: object) -> None:
    for name, t in (("adapter_ids", adapter_ids), ("expert_map", expert_map)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if adapter_ids.dim() != 1 or adapter_ids.dtype not in _INT_DTYPES:
        raise ValueError(f"adapter_ids must be a 1-D int32/int64 tensor, got {tuple(adapter_ids.shape)} {adapter_ids.dtype}")
    if expert_map.dim() != 2 or expert_map.dtype != torch.int32:
        raise ValueError(f"expert_map must be a 2-D int32 tensor, got {tuple(expert_map.shape)} {expert_map.dtype}")
    if adapter_ids.shape[0] != tokens:
        raise ValueError(f"adapter_ids has {adapter_ids.shape[0]} tokens, topk_ids/logits {tokens}")


def _check_adapter_range(adapter_ids: torch.Tensor, rows: int) -> None:
    lo, hi = torch.stack([adapter_ids.min().long(), adapter_ids.max().long()]).tolist()
    if lo < -1 or hi >= rows:
        raise ValueError(f"adapter_ids must be -1 or in [0, {rows}), got [{lo}, {hi}]")


def _reroute_torch(topk_ids: torch.Tensor, adapter_ids: torch.Tensor, expert_map: torch.Tensor) -> torch.Tensor:
    a = adapter_ids.long()
    rows = expert_map[a.clamp(min=0)]                       # [T, M]
    mapped = torch.gather(rows, 1, topk_ids.long())
    return torch.where((a >= 0)[:, None], mapped, topk_ids.to(torch.int32)).to(torch.int32)


def reroute_experts(topk_ids: torch.Tensor, adapter_ids: torch.Tensor, expert_map: torch.Tensor,
                    *, validate: bool = True, impl: str | None = None) -> torch.Tensor:
    """Map each token's chosen experts to its adapter's copies: one gather for a mixed batch.

    Args:
        topk_ids: `[tokens, k]` int32/int64 base expert ids in `[0, M)`.
        adapter_ids: `[tokens]` int32/int64; `-1` is the base model (ids pass through),
            otherwise a row of `expert_map`.
        expert_map: `[max_adapters, M]` int32; row `a`, column `e` is the extended index of adapter
            a's copy of expert e (or e itself).
        validate: check id ranges first (one device sync). Hot paths that produced the ids
            themselves may pass False.
    Returns:
        extended ids `[tokens, k]` int32.
    """
    if not isinstance(topk_ids, torch.Tensor):
        raise TypeError(f"topk_ids must be a torch.Tensor, got {type(topk_ids).__name__}")
    if topk_ids.dim() != 2 or topk_ids.dtype not in _INT_DTYPES:
        raise ValueError(f"topk_ids must be a 2-D int32/int64 tensor, got {tuple(topk_ids.shape)} {topk_ids.dtype}")
    _check_reroute_args(topk_ids.shape[0], adapter_ids, expert_map)
    _check_same_device(topk_ids=topk_ids, adapter_ids=adapter_ids, expert_map=expert_map)
    T, K = topk_ids.shape
    A, M = expert_map.shape
    if topk_ids.numel() == 0:
        return torch.empty((T, K), dtype=torch.int32, device=topk_ids.device)
    if validate:
        lo_e, hi_e = torch.stack([topk_ids.min().long(), topk_ids.max().long()]).tolist()
        if lo_e < 0 or hi_e >= M:
            raise ValueError(f"topk_ids must be in [0, {M}) (expert_map has {M} columns), got [{lo_e}, {hi_e}]")
        _check_adapter_range(adapter_ids, A)
    which = choose_impl(topk_ids, impl)
    if which == "torch":
        return _reroute_torch(topk_ids, adapter_ids, expert_map)
    ids = topk_ids.contiguous()
    out = torch.empty((T, K), dtype=torch.int32, device=topk_ids.device)
    n = T * K
    block = 1024
    _reroute_kernel[(triton.cdiv(n, block),)](ids, adapter_ids.contiguous(), expert_map, out, n, K,
                                              expert_map.stride(0), expert_map.stride(1), BLOCK=block)
    return out


# ----------------------------------------------------------------------------------------------
# fused MoE
# ----------------------------------------------------------------------------------------------
def _align_bound(n: int, block_m: int, num_experts: int) -> int:
    """Upper bound on the padded pair count, known without a device sync."""
    em = n + num_experts * (block_m - 1)
    if n < num_experts:  # at most n experts are used, each padded to one tile at most
        em = min(em, n * block_m)
    return -(-em // block_m) * block_m


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int, *,
                         impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort (token, choice) pairs by expert and pad each expert's run to a multiple of `block_m`.

    Returns `(sorted_pair_ids int32 [EM], expert_ids int32 [EM // block_m], num_post_padded int32 [1])`
    where padding entries hold `tokens * k` (an invalid pair). `EM` is an upper bound known without
    a device sync, so this never waits on the GPU; tiles at or past `num_post_padded` are empty
    (their `expert_ids` entries are unspecified). Pairs of one expert come in pair order with the
    torch implementation, in arbitrary order with the Triton one (1 launch up to
    `ALIGN_ONE_PROGRAM_MAX_PAIRS` pairs, else 3, instead of ~25).
    """
    flat = topk_ids.reshape(-1)
    n = flat.numel()
    dev = flat.device
    em = _align_bound(n, block_m, num_experts)
    if choose_impl(flat, impl) == "triton" and n > 0 and n <= ALIGN_ONE_PROGRAM_MAX_PAIRS \
            and num_experts <= ALIGN_ONE_PROGRAM_MAX_EXPERTS:
        # one scratch allocation and one launch (see _align_one_program_kernel)
        tiles = em // block_m
        buf = torch.empty(2 * num_experts + em + tiles + 1, dtype=torch.int32, device=dev)
        counts, pad_start = buf[:num_experts], buf[num_experts:2 * num_experts]
        sorted_ids = buf[2 * num_experts:2 * num_experts + em]
        expert_ids = buf[2 * num_experts + em:2 * num_experts + em + tiles]
        num_post = buf[2 * num_experts + em + tiles:]
        _align_one_program_kernel[(1,)](flat.contiguous(), counts, pad_start, sorted_ids, expert_ids,
                                        num_post, n, num_experts, em, BLOCK=_next_pow2(n),
                                        BLOCK_E=_next_pow2(num_experts), BLOCK_M=block_m,
                                        TILE_CHUNK=max(1, 8192 // _next_pow2(num_experts)))
        return sorted_ids, expert_ids, num_post
    if choose_impl(flat, impl) == "triton" and n > 0:
        counts = torch.zeros(num_experts, dtype=torch.int32, device=dev)
        rank = torch.empty(n, dtype=torch.int32, device=dev)
        pad_start = torch.empty(num_experts, dtype=torch.int32, device=dev)
        sorted_ids = torch.full((em,), n, dtype=torch.int32, device=dev)
        expert_ids = torch.empty(em // block_m, dtype=torch.int32, device=dev)
        num_post = torch.empty(1, dtype=torch.int32, device=dev)
        ids = flat.contiguous()
        block = 1024
        grid = (triton.cdiv(n, block),)
        _align_count_kernel[grid](ids, counts, rank, n, BLOCK=block)
        _align_experts_kernel[(num_experts,)](counts, pad_start, expert_ids, num_post, num_experts,
                                              BLOCK_M=block_m, BLOCK_E=_next_pow2(num_experts))
        _align_scatter_kernel[grid](ids, rank, pad_start, sorted_ids, n, BLOCK=block)
        return sorted_ids, expert_ids, num_post
    flat = flat.to(torch.int64)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    start = torch.cumsum(counts, 0) - counts
    sorted_e, order = torch.sort(flat, stable=True)
    dest = pad_start[sorted_e] + torch.arange(n, device=dev) - start[sorted_e]
    sorted_ids = torch.full((em,), n, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)
    block_starts = torch.arange(0, em, block_m, device=dev)
    expert_ids = torch.searchsorted(pad_end, block_starts, right=True).clamp_(max=num_experts - 1)
    return sorted_ids, expert_ids.to(torch.int32), pad_end[-1:].to(torch.int32)


def _moe_config(num_pairs: int, num_experts: int, dtype: torch.dtype) -> dict:
    # Decode (few pairs per expert): small M tiles, weight-bandwidth bound; prefill: larger tiles
    # with L2 grouping. Chosen from the pair count only, not the table size, so a store with many
    # (mostly idle) adapter slots gets the same tiles as the base model for the same batch.
    # BLOCK_K 128 on H200 (DeepSeek-V2-Lite experts, graph-timed): 279 vs 291 us at 64 tokens,
    # 305 vs 365 us (BLOCK_M 16) at 256 tokens; ~3.9 of 4.8 TB/s.
    if num_pairs <= 1024:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    elif num_pairs <= 4096:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=4, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
    if dtype == torch.float32:
        cfg["BLOCK_K"] = 32
        cfg["num_stages"] = 2
    return cfg


def _fused_moe_torch(x, w13, w2, topk_weights, topk_ids):
    """Grouped fallback: one SwiGLU per expert that has tokens (CPU demo path).

    Computed in float64 so that a token's output does not depend on which other tokens share its
    experts: the BLAS picks its blocking by the row count, and in fp32 that moved results by a few
    ulps when an adapter's unload re-routed other tokens. In fp64 those differences sit far below
    the final rounding to `x.dtype`, as the Triton path's per-row tiles are by construction."""
    T, H = x.shape
    inter = w2.shape[2]
    out = torch.zeros((T, H), dtype=torch.float64, device=x.device)
    ids = topk_ids.long()
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    tw = topk_weights.double().reshape(-1)
    xf = x.double()
    pos = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        pairs = order[pos:pos + c]
        pos += c
        tok = pairs // ids.shape[1]
        h = xf[tok] @ w13[e].double().T
        y = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]) @ w2[e].double().T
        out.index_add_(0, tok, y * tw[pairs, None])
    return out.to(x.dtype)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, validate: bool = True, config: dict | None = None,
              impl: str | None = None) -> torch.Tensor:
    """`out[t] = sum_j w[t, j] * (silu(x[t] Wg_e^T) * (x[t] Wu_e^T)) W2_e^T`, `e = topk_ids[t, j]`.

    Args:
        x: `[T, H]` float16/bfloat16/float32.
        w13: `[E, 2I, H]`, same dtype as x: each expert's gate rows then up rows (may be a view
            of a partly mapped virtual tensor: only experts named in `topk_ids` are read).
        w2: `[E, H, I]`, same dtype as x.
        topk_weights: `[T, k]` float; topk_ids: `[T, k]` int32/int64 in `[0, E)`.
        validate: check id ranges first (one device sync).
        config: override the tile config (BLOCK_M/N/K, GROUP_M, num_warps, num_stages).
    Returns:
        `[T, H]` in x's dtype (accumulated in fp32).
    """
    for name, t in (("x", x), ("w13", w13), ("w2", w2), ("topk_weights", topk_weights),
                    ("topk_ids", topk_ids)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be a 2-D float16/bfloat16/float32 tensor, got {tuple(x.shape)} {x.dtype}")
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"w13 must be [E, 2I, H] and w2 [E, H, I], got {tuple(w13.shape)} and {tuple(w2.shape)}")
    if w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise TypeError(f"w13/w2 must have x's dtype {x.dtype}, got {w13.dtype}/{w2.dtype}")
    T, H = x.shape
    E, I2, H1 = w13.shape
    if H1 != H or I2 % 2 != 0 or tuple(w2.shape) != (E, H, I2 // 2):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, w13 {tuple(w13.shape)} (want [E, 2I, {H}]), "
                         f"w2 {tuple(w2.shape)} (want [{E}, {H}, {I2 // 2}])")
    if topk_ids.dim() != 2 or topk_ids.dtype not in _INT_DTYPES:
        raise ValueError(f"topk_ids must be a 2-D int32/int64 tensor, got {tuple(topk_ids.shape)} {topk_ids.dtype}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape) or not topk_weights.is_floating_point():
        raise ValueError(f"topk_weights must be a float tensor shaped like topk_ids {tuple(topk_ids.shape)}, "
                         f"got {tuple(topk_weights.shape)} {topk_weights.dtype}")
    if topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids has {topk_ids.shape[0]} tokens, x has {T}")
    _check_same_device(x=x, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids)
    if T == 0 or topk_ids.shape[1] == 0:
        return torch.zeros((T, H), dtype=x.dtype, device=x.device)
    if validate:
        lo, hi = torch.stack([topk_ids.min().long(), topk_ids.max().long()]).tolist()
        if lo < 0 or hi >= E:
            raise ValueError(f"topk_ids must be in [0, {E}) for {E} experts, got [{lo}, {hi}]")
    which = choose_impl(x, impl)
    if which == "torch":
        return _fused_moe_torch(x, w13, w2, topk_weights, topk_ids)
    if T > MAX_CHUNK_TOKENS:  # bounds the fp32 per-choice scratch (T * k * H * 4 bytes)
        return torch.cat([fused_moe(x[i:i + MAX_CHUNK_TOKENS], w13, w2, topk_weights[i:i + MAX_CHUNK_TOKENS],
                                    topk_ids[i:i + MAX_CHUNK_TOKENS], validate=False, config=config, impl=which)
                          for i in range(0, T, MAX_CHUNK_TOKENS)])

    K = topk_ids.shape[1]
    inter = I2 // 2
    n_pairs = T * K
    cfg = dict(_moe_config(n_pairs, E, x.dtype))
    if config:
        cfg.update(config)
    bm, bn, bk, gm = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["GROUP_M"]
    launch = {} if not x.is_cuda else dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    # Triton's CPU interpreter computes bf16 tl.dot wrongly (garbage, triton 3.8); upcast there only
    dot_f32 = (not x.is_cuda) and x.dtype == torch.bfloat16
    if dot_f32:
        precision = "ieee"
    sorted_ids, expert_ids, num_post = moe_align_block_size(topk_ids, bm, E, impl=which)
    em = sorted_ids.numel()
    rw = topk_weights.reshape(-1).to(torch.float32).contiguous()
    act = torch.empty((n_pairs, inter), dtype=x.dtype, device=x.device)
    grid1 = (triton.cdiv(em, bm) * triton.cdiv(inter, bn),)
    _moe_gemm_kernel[grid1](
        x, w13, act, rw, sorted_ids, expert_ids, num_post, inter, H, em, n_pairs, inter,
        x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2),
        act.stride(0), act.stride(1),
        A_DIV=K, GATED=True, MUL_WEIGHT=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm,
        PRECISION=precision, DOT_F32=dot_f32, **launch)
    per_choice = torch.empty((n_pairs, H), dtype=torch.float32, device=x.device)
    grid2 = (triton.cdiv(em, bm) * triton.cdiv(H, bn),)
    _moe_gemm_kernel[grid2](
        act, w2, per_choice, rw, sorted_ids, expert_ids, num_post, H, inter, em, n_pairs, 0,
        act.stride(0), act.stride(1), w2.stride(0), w2.stride(1), w2.stride(2),
        per_choice.stride(0), per_choice.stride(1),
        A_DIV=1, GATED=False, MUL_WEIGHT=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm,
        PRECISION=precision, DOT_F32=dot_f32, **launch)
    return per_choice.view(T, K, H).sum(dim=1).to(x.dtype)
