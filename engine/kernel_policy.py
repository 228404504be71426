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


def kernel_impl(t: torch.Tensor) -> str:
    """"triton" or "torch" for a kernel call on tensor `t` (see the module doc)."""
    force = os.environ.get("VMWEAVE_KERNELS", "").strip().lower()
    if force == "torch":
        return "torch"
    if force == "triton":
        if t.is_cuda:
            return "triton"
        from kernels._dispatch import interpreter_on

        return "triton" if interpreter_on() else "torch"
    return "triton" if t.is_cuda else "torch"


def use_kernels(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the engine takes the kernel path (paged / Flash-LoRA attention, fused MoE)."""
    force = os.environ.get("VMWEAVE_KERNELS", "").strip().lower()
    if force == "torch":
        return False
    if force == "triton":
        return kernel_impl(t) == "triton"
    return t.is_cuda and dtype in (torch.float16, torch.bfloat16)
