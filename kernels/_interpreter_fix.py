"""A fix for Triton's interpreter (TRITON_INTERPRET=1), applied only when it is on.

The interpreter builds a comparison's result with the operands' type (`lhs.dtype`), not int1,
so a *scalar* comparison (`n > 0`, `adapter >= 0`) broadcast into a block mask becomes an
int32 block. Triton 3.8's masked load let that through; 3.9's rejects it ("mask has
unsupported dtype"), which breaks every kernel that ANDs a block mask with a scalar condition.
Compiled kernels are unaffected: the compiler types comparisons as int1. Giving the
interpreter's comparisons the int1 type they have on the GPU is correct on every version.
"""
from __future__ import annotations

_PREDICATES = ("SLE", "SLT", "SGE", "SGT", "ULE", "ULT", "UGE", "UGT", "EQ", "NE")
_FLOAT_PREDICATES = ("OLT", "OGT", "OLE", "OGE", "OEQ", "ONE", "ULT", "UGT", "ULE", "UGE",
                     "UEQ", "UNE")


def apply() -> bool:
    """Patch the interpreter's comparison builders to return int1; True if anything was patched."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
        builder, handle = interpreter.InterpreterBuilder, interpreter.TensorHandle
    except (ImportError, AttributeError):  # no triton, or an interpreter laid out differently
        return False
    names = [f"create_icmp{p}" for p in _PREDICATES] + [f"create_fcmp{p}" for p in _FLOAT_PREDICATES]
    patched = False
    for name in names:
        fn = getattr(builder, name, None)
        if fn is None or getattr(fn, "_vmweave_int1", False):
            continue

        def as_int1(self, lhs, rhs, _fn=fn):
            out = _fn(self, lhs, rhs)
            return handle(np.asarray(out.data, dtype=np.bool_), tl.int1)

        as_int1._vmweave_int1 = True
        setattr(builder, name, as_int1)
        patched = True
    return patched
