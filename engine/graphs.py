"""CUDA graphs of the engine's decode forwards.

A decode step of a few layers costs the host more than the GPU: a few hundred torch ops and a
dozen Triton launches, each some microseconds of Python and driver time (see
bench/profile_engine_step.py). A CUDA graph replays the whole forward in one launch.

A forward is graphable when everything the host decides for it (shapes, which kernels, their
launch plans, the groups of chunks, the adapters in play) is fixed by a *key*, and everything
else it reads lives in device tensors: its *inputs* (token ids, positions, slots, block tables,
sequence lengths, LoRA plans), which the engine builds each step as usual. `StepGraphs.run`
runs the first forward of a key eagerly (it compiles the kernels and builds what is memoised
per adapter set), captures the second into a graph, and from then on copies each step's inputs
into the captured step's tensors and replays. Keys repeat: a decode batch keeps its shapes until
a request joins or leaves or a block table grows past its 16-block alignment.

Inputs are copied buffer by buffer: the engine packs a step's index arrays into a few device
buffers (engine.attention.to_device_packed, kernels.lora's host plans), and the key holds the
layout of every input inside its buffer, so equal keys mean byte-identical layouts.

What a graph holds (tensors derived from the adapters, the caches' addresses) is valid until
the adapter set changes: the engine calls `clear()` then.

On a machine without CUDA, `StepGraphs(emulate=True)` replays by running the captured forward
again on the captured step's tensors, after the same copies: a graph in all but speed, so CPU
tests check that every value a step varies reaches the forward through its inputs (a value that
bypassed them would come out stale, as it would from a real graph).
"""
from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch

_MAX_SEEN = 4096  # keys counted towards a capture (a long-running server sees many once)


def _whole(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    """A uint8 tensor over all of `storage`."""
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


def buffer_layout(inputs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], tuple]:
    """The distinct buffers (storages) `inputs` live in, in first-use order, as uint8 tensors,
    and a hashable description of where each input sits (buffer index, byte offset, shape,
    strides, dtype) with each buffer's size: equal layouts let one step's buffers be copied onto
    another's whole."""
    bufs: list[torch.Tensor] = []
    index: dict[tuple, int] = {}
    where = []
    for t in inputs:
        st = t.untyped_storage()
        sk = (st.data_ptr(), st.nbytes())
        i = index.setdefault(sk, len(bufs))
        if i == len(bufs):
            bufs.append(_whole(st, t.device))
        where.append((i, t.storage_offset() * t.element_size(), tuple(t.shape), t.stride(), t.dtype))
    return bufs, (tuple(where), tuple(b.numel() for b in bufs))


@dataclass
class _Captured:
    buffers: list[torch.Tensor]  # the captured step's input buffers: each replay's copies land here
    replay: Callable[[], torch.Tensor]


class StepGraphs:
    """Captured forwards by key (see the module doc). At most `max_graphs` are kept: capturing
    one more drops them all first (destroying a graph may release what the graphs captured on
    the same stream share, so none outlives another's destruction); `capture_after`: eager
    runs of a key before it is captured. After a capture fails, every step runs eagerly.
    `device`: the CUDA device the forwards run on (default: the current one)."""

    def __init__(self, *, emulate: bool = False, max_graphs: int = 32, capture_after: int = 1,
                 device: torch.device | str | None = None):
        if max_graphs < 1 or capture_after < 1:
            raise ValueError("max_graphs and capture_after must be >= 1")
        self.emulate = emulate
        self.max_graphs = max_graphs
        self.capture_after = capture_after
        self.device = None if device is None else torch.device(device)
        self.failed: str | None = None  # why capturing was given up, once it was
        self._graphs: dict[Hashable, _Captured] = {}
        self._seen: dict[Hashable, int] = {}
        self._stream = None  # this object's capture stream (CUDA), made on first capture
        self.captures = 0
        self.replays = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        """Forget every graph (what they captured may no longer be valid)."""
        self._graphs.clear()
        self._seen.clear()

    def run(self, key: Hashable, inputs: Sequence[torch.Tensor], forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`forward()`'s result, from a graph where `key` has one. `forward` reads the step's
        device data only through `inputs` (and what stays fixed while the key does)."""
        if self.failed is not None:
            return forward()
        roots, layout = buffer_layout(inputs)
        full_key = (key, layout)
        cap = self._graphs.get(full_key)
        if cap is not None:
            for dst, src in zip(cap.buffers, roots):
                dst.copy_(src, non_blocking=True)
            self.replays += 1
            return cap.replay()
        n = self._seen.get(full_key, 0)
        if n < self.capture_after:
            if len(self._seen) >= _MAX_SEEN:  # keys seen once and never again: forget them
                self._seen.clear()
            self._seen[full_key] = n + 1
            return forward()
        self._seen.pop(full_key, None)
        if len(self._graphs) >= self.max_graphs:
            self._graphs.clear()
        try:
            cap, out = self._capture(roots, forward)
        except Exception as e:  # an op that cannot be captured, or the driver refused
            self.failed = f"{type(e).__name__}: {e}"
            self._graphs.clear()
            warnings.warn(f"CUDA graph capture failed, steps run eagerly from now on: {self.failed}",
                          RuntimeWarning, stacklevel=2)
            if not self.emulate:
                try:
                    torch.cuda.synchronize()
                except Exception:
                    pass  # the eager forward below reports a real error
            return forward()
        self._graphs[full_key] = cap
        self.captures += 1
        return out

    def _capture(self, roots: list[torch.Tensor], forward) -> tuple[_Captured, torch.Tensor]:
        if self.emulate:
            return _Captured(roots, lambda: forward()), forward()
        dev = self.device if self.device is not None else torch.device("cuda", torch.cuda.current_device())
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=dev)
        stream, current = self._stream, torch.cuda.current_stream(dev)
        # the capture stream must see the inputs the current stream copied in
        stream.wait_stream(current)
        g = torch.cuda.CUDAGraph()
        # Driven by hand rather than through torch.cuda.graph: its __enter__ switches streams
        # before capture_begin, so a capture_begin that raises would leave this thread on the
        # capture stream; it also flushes the allocator's cache at every capture.
        # capture_begin puts the device's default CUDA generator into capture mode and only a
        # capture_end that succeeds takes it out: a failed capture would leave every later
        # random op on the device (sampling, randperm) raising "Offset increment outside graph
        # capture". Its state from before is put back on failure.
        rng = torch.cuda.default_generators[dev.index if dev.index is not None else torch.cuda.current_device()]
        rng_before = rng.clone_state()
        try:
            return self._capture_on(g, dev, stream, current, forward, roots)
        except BaseException:
            rng.graphsafe_set_state(rng_before)
            raise

    def _capture_on(self, g, dev, stream, current, forward, roots) -> tuple[_Captured, torch.Tensor]:
        with torch.cuda.device(dev), torch.cuda.stream(stream):
            _warm_blas(dev)
            # No garbage collection while capturing: a collected engine's finalizers synchronise
            # and unmap its pages (vmm), CUDA calls that a capturing stream forbids.
            gc_was_on = gc.isenabled()
            gc.disable()
            try:
                # Each graph gets its own memory pool (pool=None): a pool shared by graphs that
                # are dropped and captured again trips a use-count assert in torch's caching
                # allocator once its last graph is gone (seen with torch 2.11 on an H200).
                g.capture_begin(capture_error_mode="thread_local")
                try:
                    static_out = forward()
                finally:
                    g.capture_end()
            finally:
                if gc_was_on:
                    gc.enable()
        current.wait_stream(stream)
        g.replay()  # capture only records: this step's forward runs now

        def replay() -> torch.Tensor:
            g.replay()
            # the next replay of any graph may reuse this memory: hand out a copy
            return static_out.clone()

        return _Captured(roots, replay), static_out.clone()


def _warm_blas(dev: torch.device) -> None:
    """A matmul per float type on the capture stream, outside any capture: torch keeps one
    cuBLAS workspace per (handle, stream), made on the stream's first GEMM, and one made inside
    a capture would live in that graph's memory pool."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a = torch.ones(16, 16, dtype=dtype, device=dev)
        torch.nn.functional.linear(a, a)
