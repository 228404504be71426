"""Timing and result-table helpers shared by every benchmark suite.

Each suite times its own code and the baseline *in the same run* and records a row with
`compare(...)`; `bench/conftest.py` prints all rows as one table at the end of the session and
writes them to `$BENCH_OUT/rows.json` (the GPU script then renders `bench/RESULTS.md` from it).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Callable, Sequence

import torch

ROWS: list[dict] = []


@contextlib.contextmanager
def one_host_core():
    """Run the body on one CPU core with one torch thread, then restore both. An engine step is
    about half host time (planning, launch, sampling), so its speed follows the core the thread
    lands on: on an H200 host, four passes of one mode at 4K spread 1619-1921 tok/s free to
    migrate and 1864-1933 pinned."""
    getaff = getattr(os, "sched_getaffinity", None)
    old_cores = getaff(0) if getaff else None
    old_threads = torch.get_num_threads()
    if old_cores:
        cores = sorted(old_cores)
        os.sched_setaffinity(0, {cores[len(cores) // 2]})  # not core 0, which takes interrupts
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        if old_cores:
            os.sched_setaffinity(0, old_cores)


@contextlib.contextmanager
def policy_off(name: str):
    """`kernels.attention`'s policy function `name` answering None (its choice off) while in scope."""
    from kernels import attention

    old = getattr(attention, name)
    setattr(attention, name, lambda *a, **kw: None)
    try:
        yield
    finally:
        setattr(attention, name, old)


def lora_operands(k_cache: torch.Tensor, batch: int, rank: int):
    """Flash-LoRA's operands over the paged cache `k_cache` (``[blocks, block_size, Hkv, D]``)
    for `batch` requests, as every attention bench and sweep builds them (so their numbers
    compare): adapter ids (4 adapters in turn, every fifth request none), a low-rank cache of
    `rank` columns paged by the K/V table, and B ``[4, Hkv, rank, D]``, in the cache's dtype."""
    nb, bs, hkv, d = k_cache.shape
    dev, dt = k_cache.device, k_cache.dtype
    ids = torch.arange(batch, dtype=torch.int32, device=dev) % 4
    ids[1::5] = -1
    lr = torch.randn(nb, bs, rank, device=dev, dtype=dt)
    lb = (torch.randn(4, hkv, rank, d, device=dev) / rank ** 0.5).to(dt)
    return ids, lr, lb


def copy_time_ms(numel: int, dtype: torch.dtype, device: str = "cuda") -> tuple[float, int]:
    """One device-to-device copy of `numel` elements: (time in ms, bytes moved, read + write),
    the yardstick memory-bound kernels are measured against."""
    x = torch.randn(numel, device=device, dtype=dtype)
    y = torch.empty_like(x)
    t = time_ms(lambda: y.copy_(x), warmup_ms=10.0, rep_ms=50.0)
    return t, 2 * x.numel() * x.element_size()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], *, warmup_ms: float = 25.0, rep_ms: float = 100.0) -> float:
    """Median time of `fn` in milliseconds: CUDA events through triton's do_bench on a GPU,
    a synchronised host clock otherwise."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 5 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 1000:
            break
    return statistics.median(times)


def graph_time_ms(fns: Sequence[Callable[[], object]], *, reps: int = 20) -> float:
    """GPU time of one call, launch overhead excluded: the calls `fns` (one per rotated input
    copy) captured `reps` times in a CUDA graph, replayed, timed with events (median of 5).
    This is how a serving engine runs decode (vLLM captures it in graphs). On CPU: `time_ms`."""
    if not torch.cuda.is_available():
        it = iter(range(1 << 62))
        return time_ms(lambda: fns[next(it) % len(fns)]())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles, allocator) outside the capture
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for f in fns:
                f()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / (reps * len(fns)))
    del graph
    return statistics.median(times)


def host_time_us(fn: Callable[[], object], *, repeat: int = 200, sync_each: bool = True) -> float:
    """Median wall time of a host-side operation (driver calls, allocator work) in µs."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if sync_each:
            sync()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def host_us_per_call(fn: Callable[[], object], *, calls: int = 300, rounds: int = 7, warmup: int = 30) -> float:
    """Host time of one call in µs, `calls` back to back (GPU work queues behind them), best of
    `rounds` (the least disturbed by other work on the machine); synchronised between rounds."""
    for _ in range(warmup):
        fn()
    sync()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        sync()
    return best


def card_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def compare(table: str, case: str, *, ours: tuple[str, float], base: tuple[str, float] | None = None,
            unit: str = "ms", goal: str = "", lower_is_better: bool = True, note: str = "") -> dict:
    """Record one result row: our number, the baseline's number measured in the same run, and
    their ratio (ours / baseline for times, baseline / ours reported as speed-up in `note`)."""
    row = {
        "table": table, "case": case, "card": card_name(), "unit": unit,
        "ours": ours[0], "ours_value": float(ours[1]),
        "base": base[0] if base else "", "base_value": float(base[1]) if base else None,
        "ratio": (float(ours[1]) / float(base[1])) if base and base[1] else None,
        "lower_is_better": lower_is_better, "goal": goal, "note": note,
    }
    ROWS.append(row)
    _save_rows()
    return row


def _save_rows() -> None:
    """Write every row so far, so a suite cut off by a time limit still leaves its numbers."""
    import json
    import os
    from pathlib import Path

    out = Path(os.environ.get("BENCH_OUT", "bench/out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.json").write_text(json.dumps(ROWS, indent=1))


def record_benchmark(benchmark, fn: Callable[[], object], rounds: int = 5) -> None:
    """Also put `fn` through pytest-benchmark so its JSON holds every suite (host clock,
    synchronised); the table uses the event timings from `time_ms`."""
    def run():
        fn()
        sync()
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
