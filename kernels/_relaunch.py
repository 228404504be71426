"""Launch a Triton kernel again without Triton's per-call argument binding.

``kernel[grid](*args, **meta)`` binds every parameter, specialises each argument, builds a
cache key and looks the compiled kernel up on every call: for `_attn_fwd`'s 67 parameters that
took 68 us of host time on an H200 host, against 29 us for the compiled kernel's own launch
(bench/RESULTS.md, Run AA). A decode step's kernel runs for 10-40 us, so eager callers paid
more for the binding than for the attention.

`relaunch` keeps the `CompiledKernel` that a first launch returns, under a key of what Triton
specialises a kernel on that can change between calls: each tensor's dtype and 16-byte
alignment, each tensor descriptor's dtype, box and layout, each integer's class as Triton sees
it (1, a multiple of 16, the 32- or 64-bit range), each other argument's type; and the current
device. A later call with the same key launches that compiled
kernel directly, with the same argument values Triton itself would pass it; any other goes
through Triton (and is kept in turn). Arguments the caller declares fixed (`fixed`: those of
one launch plan, with the constexprs in `meta`) are not keyed: the caller keeps one cache per
such set; `launch` keeps them by kernel and constexprs for call sites without a plan.

Under the interpreter a launch returns nothing to keep, so every call goes through Triton.
"""
from __future__ import annotations

import inspect

import torch

try:
    from triton import knobs as _knobs
    from triton.runtime.driver import driver as _driver
    from triton.runtime.jit import JITFunction as _JITFunction
except ImportError:  # pragma: no cover - a Triton without knobs: always through Triton
    _knobs = None

__all__ = ["SMEM_ATTR_MIN", "launch", "relaunch"]

_MAX_ENTRIES = 64  # kept compiled kernels a cache: a new key past this starts it afresh
_MAX_CONSTEXPR_SETS = 256  # `launch`'s caches, one per kernel and set of constexprs
_I32, _I64 = 1 << 31, 1 << 63


def _arg_key(a):
    """What Triton specialises argument `a` on, as far as it can change from call to call."""
    if isinstance(a, torch.Tensor):
        return a.dtype, not a.data_ptr() & 15
    if isinstance(a, bool) or a is None:
        return a
    if isinstance(a, int):  # Triton's classes: 1 (a constexpr), multiples of 16, i32 / i64 / u64
        return int, a == 1, not a & 15, -_I32 <= a < _I32, a < _I64
    if isinstance(a, float):
        return float
    base = getattr(a, "base", None)
    if isinstance(base, torch.Tensor):  # a tensor descriptor (Triton's or Gluon's)
        return type(a), base.dtype, tuple(a.block_shape), getattr(a, "layout", None)
    return _NO_KEY  # unknown to this module: never kept (see relaunch)


class _Unhashable:
    __hash__ = None


_NO_KEY = _Unhashable()


def relaunch(fn, grid: tuple[int, ...], args: tuple, fixed: tuple, meta: dict, cache: dict,
             min_shared: int = 0) -> None:
    """Launch `fn[grid](*args, *fixed, **meta)`, directly through a compiled kernel `cache` kept
    from an earlier call with the same key (see the module docstring), else through Triton.

    `cache` belongs to the caller, one per (`fixed`, `meta`, `grid`'s length) set: only `args`,
    the grid and the device are keyed. Launch options in `meta` (``num_warps``, ...) are passed
    to Triton on the first call and are part of what it compiled.

    `min_shared`: launch with at least this many bytes of dynamic shared memory, to cap how many
    programs share an SM (one value a `cache`: it is applied once, when a kernel is kept). Only
    for compiled kernels that need more than 48 KB (Triton then allows up to the device's opt-in
    limit) and a Triton whose launch metadata is (warps, CTAs, shared bytes); elsewhere, and on a
    key's first launch (through Triton), the kernel's own."""
    if _knobs is None or not isinstance(fn, _JITFunction):
        # (the interpreter's kernels, and whatever stands in for a kernel: a test's recorder)
        fn[grid](*args, *fixed, **meta)
        return
    device = _driver.active.get_current_device()
    key = (device, grid, *map(_arg_key, args))
    try:
        entry = cache.get(key)
    except TypeError:  # an unhashable part (a descriptor layout of some Triton): never kept
        fn[grid](*args, *fixed, **meta)
        return
    if entry is None:
        kernel = fn[grid](*args, *fixed, **meta)
        if kernel is not None and hasattr(kernel, "run") and hasattr(kernel, "packed_metadata"):
            n = len(args) + len(fixed)
            rest = fn.params[n:]
            if all(p.name in meta or p.default is not inspect.Parameter.empty for p in rest):
                # every parameter in order, constexprs too, as Triton passes them (it skips those)
                tail = (*fixed, *(meta[p.name] if p.name in meta else p.default for p in rest))
                if len(cache) >= _MAX_ENTRIES:
                    cache.clear()
                packed = _with_shared(kernel, kernel.packed_metadata, min_shared) if min_shared else kernel.packed_metadata
                cache[key] = (kernel, tail, packed)
        return
    kernel, tail, packed = entry
    stream = _driver.active.get_current_stream(device)
    g = (*grid, 1, 1)
    vals = (*args, *tail)
    kernel.run(g[0], g[1], g[2], stream, kernel.function, packed,
               kernel.launch_metadata(grid, stream, *vals),
               _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook, *vals)


def _with_shared(kernel, packed: tuple, min_shared: int) -> tuple:
    """`packed` launch metadata asking for `min_shared` bytes of shared memory where that is
    safe (see `relaunch`), else `packed` as it is."""
    shared = getattr(getattr(kernel, "metadata", None), "shared", None)
    if (isinstance(packed, tuple) and len(packed) >= 3 and packed[2] == shared
            and SMEM_ATTR_MIN < shared < min_shared):
        return (*packed[:2], min_shared, *packed[3:])
    return packed


# Triton raises a kernel's dynamic shared memory limit (to the device's opt-in maximum) only
# for kernels that need more than this
SMEM_ATTR_MIN = 48 * 1024

_CACHES: dict = {}


def launch(fn, grid: tuple[int, ...], args: tuple, meta: dict) -> None:
    """`relaunch` with every positional argument keyed and the cache chosen by `fn` and the
    constexprs (and launch options) in `meta`: for call sites without a launch plan to keep one."""
    try:
        cache = _CACHES.get(consts := (fn, *meta.items()))
    except TypeError:  # an unhashable constexpr: through Triton
        fn[grid](*args, **meta)
        return
    if cache is None:
        if len(_CACHES) >= _MAX_CONSTEXPR_SETS:
            _CACHES.clear()
        cache = _CACHES[consts] = {}
    relaunch(fn, grid, args, (), meta, cache)
