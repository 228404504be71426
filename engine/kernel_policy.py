"""When the engine calls the Triton kernels and when their torch fallbacks.

On CPU the engine passes impl="torch": under TRITON_INTERPRET=1 (how CI checks the kernels
themselves) the interpreter would otherwise run every kernel of every layer and make the engine's
tests crawl. `VMWEAVE_KERNELS=triton` forces the kernels (e.g. to run the engine through the
interpreter on purpose), `VMWEAVE_KERNELS=torch` forbids them.

On CUDA the attention/MoE kernels are used for half-precision models. An fp32 model (what the
parity tests against transformers use) keeps torch math there: Triton's fp32 `tl.dot` runs in
tf32 on Hopper and would not hold fp32 tolerances.
"""
from __future__ import annotations

import os

import torch


def _on_cuda(where: torch.Tensor | torch.device) -> bool:
    return where.is_cuda if isinstance(where, torch.Tensor) else torch.device(where).type == "cuda"


def kernel_impl(where: torch.Tensor | torch.device) -> str:
    """"triton" or "torch" for a kernel call on tensor (or device) `where` (see the module doc)."""
    force = os.environ.get("VMWEAVE_KERNELS", "").strip().lower()
    if force == "torch":
        return "torch"
    if force == "triton":
        if _on_cuda(where):
            return "triton"
        from kernels._dispatch import interpreter_on

        return "triton" if interpreter_on() else "torch"
    return "triton" if _on_cuda(where) else "torch"


def use_kernels(where: torch.Tensor | torch.device, dtype: torch.dtype) -> bool:
    """Whether the engine takes the kernel path (paged / Flash-LoRA attention, fused MoE) for a
    model of `dtype` on `where`'s device."""
    force = os.environ.get("VMWEAVE_KERNELS", "").strip().lower()
    if force == "torch":
        return False
    if force == "triton":
        return kernel_impl(where) == "triton"
    return _on_cuda(where) and dtype in (torch.float16, torch.bfloat16)


def default_block_size(device: torch.device | str, dtype: torch.dtype) -> int:
    """Tokens per KV block when the caller names none: 128 where decode takes the kernel path on
    a GPU of compute capability 9.0 or later, whose paged decode then reads each 128-key tile
    of K and V by one TMA copy (`kernels.attention._tma_loads`; on an H200 0.83-1.01x of SDPA's
    time on contiguous K/V where blocks of 16 take 1.02-1.12x, bench/RESULTS.md Run Q); 16
    elsewhere, where it only sets the granularity of allocation and prefix sharing. The price of 128:
    sessions share identical prefixes (prefix caching) in whole blocks only, so prompts of
    fewer than 128 common tokens share nothing; pass `block_size=16` where that matters more."""
    device = torch.device(device)
    if _on_cuda(device) and use_kernels(device, dtype) and torch.cuda.get_device_capability(device) >= (9, 0):
        return 128
    return 16
