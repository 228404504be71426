"""How a kernel wrapper chooses between its Triton kernel and its torch fallback.

Triton runs when the tensors live on a CUDA device, or on CPU tensors when the Triton
interpreter is on (`TRITON_INTERPRET=1`: how CI checks the kernels). Otherwise, e.g. the
engine's demo on a CPU-only machine, the torch fallback runs. `impl=` on every wrapper
overrides the choice ("triton" or "torch").
"""
from __future__ import annotations

import os

import torch

IMPLS = ("triton", "torch")


# Read once, at import: Triton itself picks interpreter or compiler when a @triton.jit function
# is decorated (when kernels/ is imported), so a later change of the variable could not switch
# the kernels anyway; and reading os.environ costs about a microsecond on every kernel call.
_INTERPRETER_ON = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if _INTERPRETER_ON:
    from kernels import _interpreter_fix

    _interpreter_fix.apply()


def interpreter_on() -> bool:
    """Whether Triton kernels run in Triton's interpreter (TRITON_INTERPRET set at import)."""
    return _INTERPRETER_ON


def choose_impl(t: torch.Tensor, impl: str | None = None) -> str:
    """Return "triton" or "torch" for a kernel whose main input is `t`."""
    if impl is not None:
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS} or None, got {impl!r}")
        if impl == "triton" and not (t.is_cuda or interpreter_on()):
            raise ValueError("impl='triton' on CPU tensors needs TRITON_INTERPRET=1")
        return impl
    return "triton" if (t.is_cuda or interpreter_on()) else "torch"
