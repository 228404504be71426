"""Multi-LoRA projections for a batch of tokens of mixed adapters (the Punica / vLLM SGMV idea).

    y   = lora_shrink(x, lora_a, adapter_ids)          # x [T, H] · A[a_t] [H, r]  -> [T, r]
    out = lora_expand(y, lora_b, adapter_ids, out=res) # res[t] += y[t] · B[a_t]    -> [T, N]

Design (one Triton kernel, `_sgmv_kernel`, for all of it):
- Segmented path (one A per adapter): a `LoraPlan` sorts the tokens by adapter id *by index*
  (rows are gathered by the kernel, never copied) and cuts each adapter's run of tokens into
  tiles of `block_m`; each program multiplies one tile against its adapter's weight with
  `tl.dot`, so an adapter's weight is read once per tile rather than once per token. Building a
  plan validates the ids (one device->host sync); a batch's plan is the same for every layer and
  for shrink and expand, so callers build it once per step and pass `plan=` everywhere.
- Dense path (one A shared by all agents, `lora_a` given as [H, r]): plain row tiles of the
  batch in their own order, one GEMM for the whole batch; ids only mask rows of -1. No plan.
- Stacked path (`lora_shrink_all`): every token against every adapter's A in one pass, the
  adapters folded into the GEMM's N dimension (`n = a*r + j`), writing `[A, T, r]`.
- Shrink has a tiny N (r) and a long K (H): at decode sizes there are too few tiles to fill the
  GPU, so K is split over a third grid axis into an fp32 workspace, summed in split order
  (deterministic, unlike atomics): by the last of a tile's splits to finish (an arrival counter,
  `kernels._counters`; FUSE_SPLIT) where a tile's partials are few, with no second launch, else
  by one torch.sum launch. Expand has K = r and a wide N, so it never splits and can add into the
  residual in place (ADD_INPUTS).

Every wrapper takes `impl=None` (`kernels._dispatch.choose_impl`); the torch fallback computes in
fp32 with one matmul per adapter present. Float64 references are in `kernels.lora_ref`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from ._counters import split_counters
from ._dispatch import choose_impl

__all__ = ["LoraPlan", "lora_plan", "lora_shrink", "lora_expand", "lora_shrink_all", "shares_one_a"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_SUM_LOADS = 4  # split-K partials the last split loads at once for its sum (_sgmv_kernel)
# Split launches whose tiles' partials (tile outputs × splits) are at most this many sum them in
# the kernel (FUSE_SPLIT): 128 KB of fp32 for one SM to read; more keep a torch.sum launch (_launch).
_FUSED_SUM_MAX_PARTIALS = 32768
_MAX_SPLITS = 8  # K splits a shrink takes by itself (_split_for): the last one sums them all


# ----------------------------------------------------------------------------------------------
# kernel

@triton.jit
def _sgmv_kernel(
    inp_ptr, w_ptr, out_ptr, ids_ptr, tiles_ptr, order_ptr, fin_ptr, counters_ptr,
    M, N, K, R, k_per_split, scale,
    s_im, s_ik, s_wa, s_wk, s_wn, s_os, s_oa, s_om, s_on, f_oa, f_om, f_on,
    SEGMENTED: tl.constexpr, HAS_IDS: tl.constexpr, ADD_INPUTS: tl.constexpr, DOT_F32: tl.constexpr,
    FUSE_SPLIT: tl.constexpr, SUM_LOADS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[rows, n] (+)= scale * inp[rows, :] @ W[adapter + n // R][:, n % R] over one K split.

    FUSE_SPLIT: `out` is the fp32 workspace of the K splits (split s at `s * s_os`), and the
    last of a tile's splits to arrive (`counters_ptr`, one counter a tile, left at zero) writes
    their sum, in split order, to `fin_ptr` (strides f_oa, f_om, f_on).

    SEGMENTED: program m takes tile m of the plan (adapter, start, length); its rows are
    order[start : start + length]. Otherwise program m takes rows m*BLOCK_M.. in batch order
    and (HAS_IDS) rows whose id is -1 are dead. A dead row reads nothing; it is written as 0
    unless ADD_INPUTS, where it is left alone. R folds stacked adapters into N (R = N otherwise).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = tl.arange(0, BLOCK_M)
    k_steps = k_per_split
    if SEGMENTED:
        adapter = tl.load(tiles_ptr + pid_m * 3)
        start = tl.load(tiles_ptr + pid_m * 3 + 1)
        length = tl.load(tiles_ptr + pid_m * 3 + 2)
        row_in = offs_m < length
        rows = tl.load(order_ptr + start + offs_m, mask=row_in, other=0).to(tl.int64)
        row_live = row_in & (adapter >= 0)
        w_base = w_ptr + tl.maximum(adapter, 0).to(tl.int64) * s_wa
        if adapter < 0:
            k_steps = 0  # the no-adapter segment: nothing to multiply, only zeros to write
    else:
        rows = (pid_m * BLOCK_M + offs_m).to(tl.int64)
        row_in = rows < M
        if HAS_IDS:
            rid = tl.load(ids_ptr + rows, mask=row_in, other=-1)
            row_live = row_in & (rid >= 0)
        else:
            row_live = row_in
        w_base = w_ptr

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = offs_n < N
    a_n = (offs_n // R).to(tl.int64)
    j_n = (offs_n % R).to(tl.int64)
    w_cols = a_n * s_wa + j_n * s_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_s * k_per_split
    for k0 in range(0, k_steps, BLOCK_K):
        kk = k_lo + k0 + tl.arange(0, BLOCK_K)
        k_in = kk < K
        a = tl.load(inp_ptr + rows[:, None] * s_im + kk[None, :] * s_ik,
                    mask=row_live[:, None] & k_in[None, :], other=0.0)
        b = tl.load(w_base + kk[:, None] * s_wk + w_cols[None, :],
                    mask=k_in[:, None] & n_in[None, :], other=0.0)
        if DOT_F32:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    acc = acc * scale

    o_ptrs = out_ptr + pid_s * s_os + rows[:, None] * s_om + (a_n * s_oa + j_n * s_on)[None, :]
    if ADD_INPUTS:
        o_mask = row_live[:, None] & n_in[None, :]
        acc += tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        o_mask = row_in[:, None] & n_in[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)
        if FUSE_SPLIT:
            # In place of a second launch, whose gap and tail cost more than this sum at the
            # sizes that split (decode). The barrier orders every thread's partial stores before
            # the one release of the arrival atomic; the sum reads past L1 (.cg), as the
            # partials were written by other SMs.
            tl.debug_barrier()
            counter = counters_ptr + pid_m * tl.num_programs(1) + pid_n
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == tl.num_programs(2) - 1:
                tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # ready for the next launch
                parts = out_ptr + rows[:, None] * s_om + (a_n * s_oa + j_n * s_on)[None, :]
                splits = tl.num_programs(2)
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for s0 in range(0, splits, SUM_LOADS):
                    # SUM_LOADS partials in flight at once: one at a time, a sum of many waited
                    # out as many round trips (H200, [64 × 64] tiles, 16 splits: 15.1 us vs 8.2;
                    # bench/RESULTS.md Run AC). Added in split order all the same.
                    for u in tl.static_range(SUM_LOADS):
                        total += tl.load(parts + (s0 + u) * s_os, mask=o_mask & (s0 + u < splits), other=0.0,
                                         cache_modifier=".cg")
                f_ptrs = fin_ptr + rows[:, None] * f_om + (a_n * f_oa + j_n * f_on)[None, :]
                tl.store(f_ptrs, total.to(fin_ptr.dtype.element_ty), mask=o_mask)


# ----------------------------------------------------------------------------------------------
# plan: tokens grouped by adapter

@dataclass(frozen=True)
class LoraPlan:
    """Tokens of one batch grouped by adapter; build with `lora_plan`, reuse for every layer.

    `tiles` [num_tiles, 3] int32 rows of (adapter or -1, start in `order`, length <= block_m);
    `order` [T] int32 token indices sorted by adapter id (stable); `counts[a + 1]` tokens of
    adapter a (index 0: no adapter), on the host.
    """
    adapter_ids: torch.Tensor
    num_adapters: int
    block_m: int
    order: torch.Tensor
    tiles: torch.Tensor
    counts: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return self.adapter_ids.numel()

    @property
    def num_tiles(self) -> int:
        return self.tiles.shape[0]


def _check_ids(adapter_ids, num_tokens: int, device: torch.device) -> torch.Tensor:
    if not isinstance(adapter_ids, torch.Tensor):
        raise TypeError(f"adapter_ids must be a torch.Tensor, got {type(adapter_ids).__name__}")
    if adapter_ids.dtype.is_floating_point or adapter_ids.dtype.is_complex or adapter_ids.dtype == torch.bool:
        raise TypeError(f"adapter_ids must be an integer tensor (int32), got {adapter_ids.dtype}")
    if adapter_ids.dim() != 1 or adapter_ids.numel() != num_tokens:
        raise ValueError(f"adapter_ids must be [T] = [{num_tokens}], got {list(adapter_ids.shape)}")
    if adapter_ids.device != device:
        raise ValueError(f"adapter_ids is on {adapter_ids.device}, inputs on {device}")
    return adapter_ids.to(torch.int32).contiguous()


def _id_range(ids: torch.Tensor) -> tuple[int, int]:
    lo, hi = torch.stack([ids.min(), ids.max()]).tolist()
    return int(lo), int(hi)


def _check_id_range(lo: int, hi: int, num_adapters: int | None) -> None:
    if lo < -1:
        raise ValueError(f"adapter id {lo} out of range: ids are -1 (no adapter) or >= 0")
    if num_adapters is not None and hi >= num_adapters:
        raise ValueError(f"adapter id {hi} out of range for {num_adapters} adapters")


def _pick_block_m(counts: list[int]) -> int:
    # Tiles never straddle adapters, so a tile bigger than a typical adapter's run of tokens
    # only multiplies padding; tl.dot needs at least 16 rows.
    runs = [c for c in counts if c > 0]
    avg = sum(runs) / max(len(runs), 1)
    return 16 if avg <= 16 else 32 if avg <= 32 else 64


def lora_plan(adapter_ids: torch.Tensor | np.ndarray, num_adapters: int, *, block_m: int | None = None,
              device: torch.device | str | None = None) -> LoraPlan:
    """Group a batch's tokens by adapter for `lora_shrink` / `lora_expand` (`plan=`).

    Validates the ids (-1 or in [0, num_adapters)); the plan depends only on the ids, so one per
    batch serves every layer and both projections. `device`: where the plan's tensors go
    (default: the ids' device). Ids on the CPU are planned on the host (numpy) and the plan sent
    in one copy, with no device sync: a serving engine, which knows its batch's ids on the host,
    passes them so with `device="cuda"` (as a CPU tensor or a 1-D numpy integer array). Ids
    already on a GPU cost one device->host sync.
    """
    if not isinstance(num_adapters, int) or num_adapters < 1:
        raise ValueError(f"num_adapters must be a positive int, got {num_adapters!r}")
    if block_m is not None and block_m not in (16, 32, 64, 128):
        raise ValueError(f"block_m must be one of 16, 32, 64, 128, got {block_m}")
    if isinstance(adapter_ids, np.ndarray):
        if adapter_ids.dtype.kind not in "iu" or adapter_ids.ndim != 1:
            raise TypeError(f"numpy adapter_ids must be a 1-D integer array, got {adapter_ids.dtype} "
                            f"{list(adapter_ids.shape)}")
        dev = torch.device("cpu") if device is None else torch.device(device)
        return _host_plan(adapter_ids, num_adapters, block_m, dev)
    if not isinstance(adapter_ids, torch.Tensor):
        raise TypeError(f"adapter_ids must be a torch.Tensor, got {type(adapter_ids).__name__}")
    ids = _check_ids(adapter_ids, adapter_ids.numel(), adapter_ids.device)
    dev = ids.device if device is None else torch.device(device)
    if ids.device.type == "cpu":
        return _host_plan(ids.numpy(), num_adapters, block_m, dev)
    if dev != ids.device:
        raise ValueError(f"a plan for {dev} is built from ids on that device or on the CPU, "
                         f"got ids on {ids.device}")
    return _device_plan(ids, num_adapters, block_m)


def _tile_rows(counts, bm: int) -> list[tuple[int, int, int]]:
    """(adapter or -1, start in the sorted order, length) of every tile: tiles never straddle
    adapters."""
    rows, seg = [], 0
    for a, c in enumerate(counts):
        rows.extend((a - 1, seg + s, min(bm, c - s)) for s in range(0, c, bm))
        seg += c
    return rows


def _empty_plan(num_adapters: int, block_m: int | None, dev: torch.device) -> LoraPlan:
    e = torch.empty(0, dtype=torch.int32, device=dev)
    return LoraPlan(e, num_adapters, block_m or 16, e, e.view(0, 3), (0,) * (num_adapters + 1))


def _host_plan(ids: np.ndarray, num_adapters: int, block_m: int | None, dev: torch.device) -> LoraPlan:
    """The plan of 1-D integer host ids, built with numpy; ids, order and tiles reach `dev` as
    views of one int32 tensor (one host->device copy)."""
    T = ids.size
    if T == 0:
        return _empty_plan(num_adapters, block_m, dev)
    # checked before the cast to int32, which could wrap a huge id into range
    _check_id_range(int(ids.min()), int(ids.max()), num_adapters)
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    counts = np.bincount(ids + 1, minlength=num_adapters + 1).tolist()
    bm = block_m or _pick_block_m(counts)
    order = np.argsort(ids, kind="stable").astype(np.int32)
    tiles = np.asarray(_tile_rows(counts, bm), dtype=np.int32).reshape(-1)
    packed = torch.frombuffer(np.concatenate([ids, order, tiles]), dtype=torch.int32)
    if dev.type == "cuda":
        packed = packed.pin_memory()
    packed = packed.to(dev, non_blocking=True)
    return LoraPlan(packed[:T], num_adapters, bm, packed[T:2 * T], packed[2 * T:].view(-1, 3),
                    tuple(counts))


def _device_plan(ids: torch.Tensor, num_adapters: int, block_m: int | None) -> LoraPlan:
    """The plan of int32 ids on their device: one sync for the range check and the counts."""
    dev = ids.device
    if ids.numel() == 0:
        return _empty_plan(num_adapters, block_m, dev)
    key = ids.to(torch.int64) + 1
    # Out-of-range ids go to clamped buckets so bincount cannot fail before we can report them.
    hist = torch.bincount(key.clamp(0, num_adapters + 1), minlength=num_adapters + 2)
    stats = torch.cat([torch.stack([ids.min(), ids.max()]).to(torch.int64), hist]).tolist()  # the one sync
    _check_id_range(stats[0], stats[1], num_adapters)
    counts = stats[2:2 + num_adapters + 1]
    bm = block_m or _pick_block_m(counts)
    order = torch.argsort(key, stable=True).to(torch.int32)
    tiles = torch.tensor(_tile_rows(counts, bm), dtype=torch.int32).view(-1, 3).to(dev, non_blocking=True)
    return LoraPlan(ids, num_adapters, bm, order, tiles, tuple(counts))


# ----------------------------------------------------------------------------------------------
# launch helpers

@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# Plain-Python helpers: triton.cdiv / next_power_of_2 are JIT functions whose host-side call
# costs microseconds, which adds up at decode sizes.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int, lo: int = 16, hi: int = 128) -> int:
    return max(lo, min(hi, 1 << (max(n, 1) - 1).bit_length()))


def _split_for(t: torch.Tensor, programs: int, K: int, block_k: int, split_k: int | None,
               waves: int = 2) -> int:
    if split_k is not None:
        if not isinstance(split_k, int) or split_k < 1:
            raise ValueError(f"split_k must be a positive int, got {split_k!r}")
        return min(split_k, _cdiv(K, block_k))
    if not t.is_cuda:
        return 1  # the interpreter gains nothing from more programs
    # Enough programs for `waves` waves on the chip, but keep >= 2 K-blocks per split, and at
    # most _MAX_SPLITS: one program sums a tile's partials (H200, CUDA graph, us: T = 256 over
    # 3 adapters, r = 64, 32 splits 12.0 vs 8 splits 7.0; bench/RESULTS.md Run AC).
    target, s = waves * _sm_count(t.device.index or 0), 1
    while s < _MAX_SPLITS and programs * s * 2 <= target and K // (s * 2) >= 2 * block_k:
        s *= 2
    return s


def _launch(inp, w, out, *, ids, plan, M, N, K, R, w_strides, out_strides, scale, add,
            block_m, block_n, block_k, split, num_warps=4, num_stages=3):
    """Run `_sgmv_kernel`; with split > 1, `out` is written through an fp32 workspace, summed by
    the last split of each tile to finish where a tile's partials number at most
    `_FUSED_SUM_MAX_PARTIALS`, else by a torch.sum launch. One SM sums a tile's partials: at
    decode sizes that beats a second launch, over more partials it reads too much alone (H200,
    shrink + expand in a CUDA graph, us, against the sum launch: [16 × 16] tiles × 8 splits,
    T = 1, A = 16, r = 16 5.9 vs 7.8; [16 × 64] × 8, T = 64, A = 16, r = 64 12.5 vs 14.7; but
    [64 × 16] × 32, T = 256, A = 3, r = 8 19.7 vs 13.3; bench/RESULTS.md Run AC)."""
    segmented = plan is not None
    m_tiles = plan.num_tiles if segmented else _cdiv(M, block_m)
    if m_tiles == 0 or N == 0:
        return
    if add and split > 1:
        raise ValueError("a split launch cannot add into its output")
    dummy = out  # pointer arguments that a mode does not read
    target, s_os = out, 0
    s_oa, s_om, s_on = out_strides
    n_tiles = _cdiv(N, block_n)
    fuse = split > 1 and block_m * block_n * split <= _FUSED_SUM_MAX_PARTIALS
    counters = split_counters(out.device, m_tiles * n_tiles) if fuse else dummy
    if split > 1:
        target = torch.empty((split,) + tuple(out.shape), dtype=torch.float32, device=out.device)
        s_os = target.stride(0)
        # `out` is [T, N] or [A, T, r]; the workspace keeps the same logical layout.
        st = target.stride()[1:]
        s_oa, s_om, s_on = (0, st[0], st[1]) if out.dim() == 2 else (st[0], st[1], st[2])
    grid = (m_tiles, n_tiles, split)
    k_per_split = _cdiv(_cdiv(K, split), block_k) * block_k
    _sgmv_kernel[grid](
        inp, w, target,
        ids if ids is not None else dummy,
        plan.tiles if segmented else dummy,
        plan.order if segmented else dummy,
        out, counters,
        M, N, K, R, k_per_split, float(scale),
        inp.stride(0), inp.stride(1), *w_strides, s_os, s_oa, s_om, s_on, *out_strides,
        SEGMENTED=segmented, HAS_IDS=ids is not None, ADD_INPUTS=add, FUSE_SPLIT=fuse,
        SUM_LOADS=_SUM_LOADS,
        # fp32 keeps fp32 math (no tf32); the interpreter's tl.dot mishandles bf16 operands.
        DOT_F32=inp.dtype == torch.float32 or (inp.dtype == torch.bfloat16 and not inp.is_cuda),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )
    if split > 1 and not fuse:
        torch.sum(target, dim=0, out=out)  # fp32 sum, cast on write: one launch


# ----------------------------------------------------------------------------------------------
# validation

def _check_float(name: str, t, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def _check_weight(name: str, w, x: torch.Tensor, k_dim: int, k_name: str) -> None:
    _check_float(name, w, x.device)
    if w.dtype != x.dtype:
        raise TypeError(f"{name} dtype {w.dtype} differs from the input's {x.dtype}")
    if w.dim() not in (2, 3):
        raise ValueError(f"{name} must be [num_adapters, {k_name}, n] or [{k_name}, n], got {list(w.shape)}")
    if w.shape[-2] != k_dim:
        raise ValueError(f"{name} has {k_name} = {w.shape[-2]}, input has {k_dim}")
    if w.shape[-1] < 1 or (w.dim() == 3 and w.shape[0] < 1):
        raise ValueError(f"{name} has an empty dimension: {list(w.shape)}")


def _resolve_plan(plan, ids, w: torch.Tensor, T: int):
    """Validated int32 ids and (for per-adapter weights) a plan, before any launch."""
    num_adapters = w.shape[0] if w.dim() == 3 else None
    if plan is not None:
        if not isinstance(plan, LoraPlan):
            raise TypeError(f"plan must be a LoraPlan, got {type(plan).__name__}")
        if plan.num_tokens != T or plan.adapter_ids.device != w.device:
            raise ValueError(f"plan is for {plan.num_tokens} tokens on {plan.adapter_ids.device}, "
                             f"inputs have {T} on {w.device}")
        if num_adapters is not None and plan.num_adapters != num_adapters:
            raise ValueError(f"plan is for {plan.num_adapters} adapters, weights have {num_adapters}")
        # The plan's ids are used; comparing their values with `ids` would cost a sync.
        if isinstance(ids, torch.Tensor) and ids.shape != plan.adapter_ids.shape:
            raise ValueError(f"adapter_ids {list(ids.shape)} do not match the plan's {list(plan.adapter_ids.shape)}")
        return plan.adapter_ids, (plan if num_adapters is not None else None)
    ids = _check_ids(ids, T, w.device)
    if num_adapters is None:  # shared weight: only the mask matters, any id >= -1 is an agent
        if T:
            _check_id_range(*_id_range(ids), None)
        return ids, None
    return ids, lora_plan(ids, num_adapters)


# ----------------------------------------------------------------------------------------------
# torch fallback (fp32 math, one matmul per adapter present)

def _torch_sgmv(inp, w, ids, plan, scale, out, add):
    f = inp.float()
    if plan is None:  # one weight for all tokens
        d = (f @ w.float()) * scale
        live = (ids >= 0)[:, None]
    else:
        order = plan.order.long()
        fs = f.index_select(0, order)
        ds = torch.zeros(fs.shape[0], w.shape[-1], dtype=torch.float32, device=f.device)
        start = plan.counts[0]  # no-adapter tokens sort first and stay zero
        for a, c in enumerate(plan.counts[1:]):
            if c:
                ds[start:start + c] = fs[start:start + c] @ w[a].float()
            start += c
        d = torch.empty_like(ds).index_copy_(0, order, ds) * scale
        live = (ids >= 0)[:, None]
    if add:
        out.copy_(torch.where(live, out.float() + d, out.float()).to(out.dtype))
    else:
        out.copy_(torch.where(live, d, torch.zeros((), device=d.device)).to(out.dtype))
    return out


# ----------------------------------------------------------------------------------------------
# public API

def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, adapter_ids: torch.Tensor, *,
                scale: float = 1.0, plan: LoraPlan | None = None, split_k: int | None = None,
                impl: str | None = None) -> torch.Tensor:
    """Low-rank projection of a batch of mixed adapters: `y[t] = scale * x[t] @ A[adapter_ids[t]]`.

    x: [T, H] float16/bfloat16/float32. lora_a: [num_adapters, H, r], or [H, r] for one A shared
    by all agents (the fast path: one dense GEMM for the whole batch, no grouping).
    adapter_ids: [T] int32, -1 = no adapter (that row of y is zero). Returns y [T, r] in x's
    dtype, accumulated in fp32. `plan`: a `lora_plan(adapter_ids, num_adapters)` to reuse
    (skips validating and grouping the ids again). `split_k`: force the K split (tuning/tests).
    """
    _check_float("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got {list(x.shape)}")
    T, H = x.shape
    if H < 1:
        raise ValueError("x has H = 0")
    _check_weight("lora_a", lora_a, x, H, "H")
    impl = choose_impl(x, impl)
    ids, plan = _resolve_plan(plan, adapter_ids, lora_a, T)
    r = lora_a.shape[-1]
    y = torch.empty((T, r), dtype=x.dtype, device=x.device)
    if T == 0:
        return y
    if impl == "torch":
        return _torch_sgmv(x, lora_a, ids, plan, scale, y, add=False)
    block_m = plan.block_m if plan is not None else (16 if T <= 16 else 32 if T <= 32 else 64)
    block_n = _pow2(r)
    block_k = 128 if block_m <= 32 else 64
    m_tiles = plan.num_tiles if plan is not None else _cdiv(T, block_m)
    split = _split_for(x, m_tiles * _cdiv(r, block_n), H, block_k, split_k)
    w_strides = (lora_a.stride(0), lora_a.stride(1), lora_a.stride(2)) if lora_a.dim() == 3 \
        else (0, lora_a.stride(0), lora_a.stride(1))
    _launch(x, lora_a, y, ids=None if plan is not None else ids, plan=plan, M=T, N=r, K=H, R=r,
            w_strides=w_strides, out_strides=(0, y.stride(0), y.stride(1)), scale=scale, add=False,
            block_m=block_m, block_n=block_n, block_k=block_k, split=split)
    return y


def lora_expand(y: torch.Tensor, lora_b: torch.Tensor, adapter_ids: torch.Tensor, *,
                out: torch.Tensor | None = None, scale: float = 1.0, plan: LoraPlan | None = None,
                impl: str | None = None) -> torch.Tensor:
    """Expand the low-rank activations of a batch of mixed adapters: `scale * y[t] @ B[adapter_ids[t]]`.

    y: [T, r]; lora_b: [num_adapters, r, N] (or [r, N], shared); adapter_ids: [T] int32, -1 = no
    adapter. Without `out`, returns a new [T, N] tensor in y's dtype (zero rows for id -1). With
    `out` ([T, N], any float dtype, same device), adds in place: `out += scale * y·B_a` (rows of
    id -1 untouched) and returns `out` — the fused residual use. fp32 accumulation.
    """
    _check_float("y", y)
    if y.dim() != 2:
        raise ValueError(f"y must be [T, r], got {list(y.shape)}")
    T, r = y.shape
    if r < 1:
        raise ValueError("y has rank r = 0")
    _check_weight("lora_b", lora_b, y, r, "r")
    N = lora_b.shape[-1]
    if out is not None:
        _check_float("out", out, y.device)
        if tuple(out.shape) != (T, N):
            raise ValueError(f"out must be [T, N] = [{T}, {N}], got {list(out.shape)}")
    impl = choose_impl(y, impl)
    ids, plan = _resolve_plan(plan, adapter_ids, lora_b, T)
    add = out is not None
    if out is None:
        out = torch.empty((T, N), dtype=y.dtype, device=y.device)
    if T == 0:
        return out
    if impl == "torch":
        return _torch_sgmv(y, lora_b, ids, plan, scale, out, add=add)
    block_m = plan.block_m if plan is not None else (16 if T <= 16 else 32 if T <= 32 else 64)
    block_k = _pow2(r)
    w_strides = (lora_b.stride(0), lora_b.stride(1), lora_b.stride(2)) if lora_b.dim() == 3 \
        else (0, lora_b.stride(0), lora_b.stride(1))
    _launch(y, lora_b, out, ids=None if plan is not None else ids, plan=plan, M=T, N=N, K=r, R=N,
            w_strides=w_strides, out_strides=(0, out.stride(0), out.stride(1)), scale=scale, add=add,
            block_m=block_m, block_n=128 if N >= 128 else 64 if N >= 64 else 32, block_k=block_k, split=1,
            # r <= 128 is one K step: pipeline stages would only triple shared memory (48 -> 147 KB
            # at 64x128x128 in the sm_90 build) and cut occupancy.
            num_stages=1 if r <= block_k else 2)
    return out


def lora_shrink_all(x: torch.Tensor, lora_a: torch.Tensor, *, scale: float = 1.0,
                    split_k: int | None = None, impl: str | None = None) -> torch.Tensor:
    """Every token's low-rank projection for every adapter in one pass (LRAgent `base_shared`).

    x: [T, H]; lora_a: [A, H, r]. Returns [A, T, r] in x's dtype (each agent's `x·A_a` is a
    contiguous [T, r] slice), computed as one GEMM of x against the stacked [H, A*r] weight.
    """
    _check_float("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got {list(x.shape)}")
    T, H = x.shape
    if H < 1:
        raise ValueError("x has H = 0")
    _check_weight("lora_a", lora_a, x, H, "H")
    if lora_a.dim() != 3:
        raise ValueError(f"lora_a must be [A, H, r], got {list(lora_a.shape)}")
    A, _, r = lora_a.shape
    impl = choose_impl(x, impl)
    out = torch.empty((A, T, r), dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    if impl == "torch":
        out.copy_((torch.matmul(x.float().unsqueeze(0), lora_a.float()) * scale).to(x.dtype))
        return out
    block_m = 16 if T <= 16 else 32 if T <= 32 else 64
    # 64 columns a tile: 8 splits of [64 × 64] tiles are summed in the kernel, where [64 × 128]
    # ones are too many partials for one SM (H200, T = 256, A = 16, r = 16, CUDA graph, us:
    # 9.05 against 12.19 fused and 10.49 with the sum launch; torch's broadcast matmul 9.77;
    # bench/RESULTS.md Run AC).
    block_n = _pow2(A * r, hi=64)
    block_k = 128 if block_m <= 32 else 64
    # One wave of splits: each split writes an fp32 [A, T, r] partial for the sum, which two
    # waves' worth made the launch's largest traffic (H200, T = 256, A = 16, r = 16, CUDA graph,
    # us: 16 splits 11.6, 32 splits 14.8, 8 splits 11.7; torch's broadcast matmul 9.8).
    split = _split_for(x, _cdiv(T, block_m) * _cdiv(A * r, block_n), H, block_k, split_k, waves=1)
    _launch(x, lora_a, out, ids=None, plan=None, M=T, N=A * r, K=H, R=r,
            w_strides=(lora_a.stride(0), lora_a.stride(1), lora_a.stride(2)),
            out_strides=(out.stride(0), out.stride(1), out.stride(2)), scale=scale, add=False,
            block_m=block_m, block_n=block_n, block_k=block_k, split=split)
    return out


def shares_one_a(lora_a: torch.Tensor) -> bool:
    """True when every adapter's A is identical (so `lora_shrink(x, lora_a[0], ids)` — the dense
    fast path — gives the same result). A 2-D [H, r] A is shared by definition. One sync."""
    if not isinstance(lora_a, torch.Tensor):
        raise TypeError(f"lora_a must be a torch.Tensor, got {type(lora_a).__name__}")
    if lora_a.dim() == 2:
        return True
    if lora_a.dim() != 3:
        raise ValueError(f"lora_a must be [A, H, r] or [H, r], got {list(lora_a.shape)}")
    if lora_a.shape[0] == 0:
        return False
    return bool(torch.equal(lora_a, lora_a[:1].expand_as(lora_a)))
