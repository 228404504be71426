"""Programmatic dependent launch (PDL): a decode kernel launched while the one before it drains.

Between two kernels of a stream the GPU normally finishes the first, flushes its writes, and
only then launches the second: its grid setup, its programs' dispatch and their prologue all
sit in the gap. A kernel launched with PDL (``launch_pdl=True``, Hopper and later) may start
as soon as every program of the kernel before it has signalled (``griddepcontrol.
launch_dependents``) or exited; it must then wait (``griddepcontrol.wait``) before it touches
global memory, which returns once the kernel before it has completed and its writes are
visible. So the two kernels' results are exactly those of serial execution; only the gap
shrinks. A serving engine's decode step is a chain of short kernels (FlashInfer and TRT-LLM
launch theirs this way on Hopper).

Kernels of this package that take a ``PDL`` constexpr (`_attn_fwd`, the ring kernel) do, when
it is set:

- ``gdc_wait()`` before their first global load or store, and
- ``gdc_launch_dependents()`` once a program's key loop is done (only its epilogue left: the
  split partial and combine, or the output store): the next kernel is launched once every
  program has got there or exited, and its programs take the SM slots this one's leave.

Both are no-ops when the launch is not a PDL one, and a kernel before ours that never signals
(any torch kernel) simply lets ours start when it exits.

H200, bf16, Hq 32, Hkv 8, D 128, CUDA graphs of back-to-back decode calls, us, the same plans
with PDL off / signalling at the start / after the key loop / never (implicit at exit), two
passes averaged in one process (bench/RESULTS.md, Run AH): blocks of 128, 1 × 4K 9.58 / 8.88 /
8.88 / 9.40, 1 × 32K 37.32 / 37.22 / 36.89 / 37.16, 8 × 4K 36.75 / 36.54 / 36.24 / 36.50, 16 ×
32K 475.9 / 483.3 / 475.6 / 475.8; blocks of 64, 1 × 4K 9.78 / 10.41 / 9.56 / 9.65; blocks of
16, 1 × 4K 11.32 / 10.76 / 10.68 / 11.10, 16 × 4K 67.71 / 66.41 / 65.59 / 65.99, 16 × 32K 485.8
/ 492.3 / 485.3 / 485.9, 64 × 32K 1905 / 1935 / 1916 / 1917; Flash-LoRA r = 64 at 1 × 32K,
blocks of 64, 40.64 / 39.68 / 39.56 / 40.09. A signal at the start lost on long launches of
one program an SM (the next kernel's programs wait in the SMs this launch leaves idle, and
the whole launch ran 1.5% slower); after the key loop it was never more than 0.6% slower and
gained up to 7% on short launches.
"""
from __future__ import annotations

import os

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - a Triton without grid dependency control
    gdc_wait = gdc_launch_dependents = None

__all__ = ["gdc_launch_dependents", "gdc_wait", "pdl_available"]

# Read once, at import, like TRITON_INTERPRET: VMWEAVE_PDL=0 launches every kernel plainly.
_ENV_ON = os.environ.get("VMWEAVE_PDL", "1") not in ("", "0")


def pdl_available() -> bool:
    """Whether this Triton has grid dependency control and ``VMWEAVE_PDL=0`` does not turn PDL
    off. Which devices and launches take it is the caller's rule (`kernels.attention._pdl`:
    compiled kernels on compute capability 9.0 and later)."""
    return _ENV_ON and gdc_wait is not None


_GLOBAL_ACCESS = ("ld.global", "st.global", "atom.global", "red.global", "cp.async.bulk", "cp.async.ca",
                  "cp.async.cg", "prefetch.global")


def ptx_order(ptx: str) -> dict:
    """Where a compiled kernel's PTX places the wait, its first global access and the signal
    (character offsets, -1 where absent): a kernel is PDL-safe when the wait comes first. The
    kernels' compile tests check their sm_90 builds with it."""
    accesses = [i for i in (ptx.find(op) for op in _GLOBAL_ACCESS) if i >= 0]
    return dict(wait=ptx.find("griddepcontrol.wait"), first_global=min(accesses, default=-1),
                signal=ptx.find("griddepcontrol.launch_dependents"))
