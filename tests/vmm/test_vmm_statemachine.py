"""Random map / unmap / alias / write / read / trim sequences against a pure-Python model of
pages (identity, refcounts, free list size) and bytes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import vmm
from vmm_helpers import small_page

SLOTS, CAPACITY = 10, 6


class ArenaModel(RuleBasedStateMachine):
    backend_name = "host"

    def __init__(self) -> None:
        super().__init__()
        be = vmm.get_backend(self.backend_name)
        # The granularity itself on host (4 KiB) keeps steps cheap; 2 MiB on cuda.
        self.ps = be.granularity if be.name == "host" else small_page(be)
        self.pool = vmm.PagePool(be, capacity_bytes=CAPACITY * self.ps, page_size=self.ps)
        self.arena = vmm.VirtualArena(self.pool, SLOTS * self.ps)
        self.slot: list[int | None] = [None] * SLOTS   # slot -> model page
        self.refs: dict[int, int] = {}
        self.data: dict[int, np.ndarray] = {}           # model page -> bytes
        self.known: dict[int, np.ndarray] = {}          # model page -> which bytes are known
        self.next_page = 0
        self.free = 0        # pages in the pool's free list
        self.total = 0       # pages created and not released
        self.creates = 0

    def teardown(self) -> None:
        self.arena.close()
        self.pool.close()

    # ---- helpers ---------------------------------------------------------------------------
    def _in_range(self, s: int, k: int) -> bool:
        return 0 <= s and s + k <= SLOTS

    def _expect_error(self, fn, exc=vmm.VmmError) -> None:
        before = (self.pool.stats(), self.arena.physical_pages(0, self.arena.reserved_bytes))
        with pytest.raises(exc):
            fn()
        assert before == (self.pool.stats(), self.arena.physical_pages(0, self.arena.reserved_bytes))

    def _new_page(self) -> int:
        p = self.next_page
        self.next_page += 1
        self.refs[p] = 1
        self.data[p] = np.zeros(self.ps, np.uint8)
        self.known[p] = np.zeros(self.ps, bool)  # fresh or recycled: contents undefined
        return p

    # ---- operations (checked against the model; invalid requests must raise and change nothing)
    def _map(self, s: int, k: int) -> None:
        if not self._in_range(s, k) or any(self.slot[i] is not None for i in range(s, s + k)):
            return self._expect_error(lambda: self.arena.map(s * self.ps, k * self.ps))
        if k > self.free + CAPACITY - self.total:
            return self._expect_error(lambda: self.arena.map(s * self.ps, k * self.ps), vmm.OutOfMemoryError)
        self.arena.map(s * self.ps, k * self.ps)
        made = max(0, k - self.free)  # the free list is used before any create
        self.free -= k - made
        self.total += made
        self.creates += made
        for i in range(s, s + k):
            self.slot[i] = self._new_page()

    def _unmap(self, s: int, k: int) -> None:
        if not self._in_range(s, k) or any(self.slot[i] is None for i in range(s, s + k)):
            return self._expect_error(lambda: self.arena.unmap(s * self.ps, k * self.ps))
        self.arena.unmap(s * self.ps, k * self.ps)
        for i in range(s, s + k):
            p = self.slot[i]
            self.slot[i] = None
            self.refs[p] -= 1
            if not self.refs[p]:
                del self.refs[p], self.data[p], self.known[p]
                self.free += 1

    def _alias(self, src: int, dst: int, k: int) -> None:
        ok = (self._in_range(src, k) and self._in_range(dst, k)
              and all(self.slot[i] is not None for i in range(src, src + k))
              and all(self.slot[i] is None for i in range(dst, dst + k)))
        if not ok:
            return self._expect_error(lambda: self.arena.alias(src * self.ps, dst * self.ps, k * self.ps))
        self.arena.alias(src * self.ps, dst * self.ps, k * self.ps)
        for j in range(k):
            p = self.slot[src + j]
            self.slot[dst + j] = p
            self.refs[p] += 1

    def _write(self, s: int, k: int, lo: int, hi: int, seed: int) -> None:
        start, end = s * self.ps + lo, (s + k) * self.ps - hi
        if not self._in_range(s, k) or any(self.slot[i] is None for i in range(s, s + k)):
            return self._expect_error(lambda: self.arena.view(start, (end - start,), torch.uint8))
        vals = np.random.default_rng(seed).integers(0, 256, end - start, dtype=np.uint8)
        self.arena.view(start, (end - start,), torch.uint8).copy_(torch.from_numpy(vals).to(self.arena.device))
        writes: dict[int, np.ndarray] = {}  # model page -> how many times this copy wrote each byte
        for i in range(s, s + k):
            a, b = max(start, i * self.ps), min(end, (i + 1) * self.ps)
            p = self.slot[i]
            self.data[p][a - i * self.ps:b - i * self.ps] = vals[a - start:b - start]
            self.known[p][a - i * self.ps:b - i * self.ps] = True
            writes.setdefault(p, np.zeros(self.ps, np.uint8))[a - i * self.ps:b - i * self.ps] += 1
        # A range that maps one page twice (an alias inside it) has one copy write those bytes
        # twice, with different values: on a device its threads race, and which value lands is
        # undefined (on host the later one). Those bytes are unknown.
        for p, times in writes.items():
            self.known[p][times > 1] = False

    # ---- rules: fully random arguments (mostly invalid requests) ... -----------------------
    @rule(s=st.integers(0, SLOTS - 1), k=st.integers(1, 4))
    def map_any(self, s: int, k: int) -> None:
        self._map(s, k)

    @rule(s=st.integers(0, SLOTS - 1), k=st.integers(1, 4))
    def unmap_any(self, s: int, k: int) -> None:
        self._unmap(s, k)

    @rule(src=st.integers(0, SLOTS - 1), dst=st.integers(0, SLOTS - 1), k=st.integers(1, 3))
    def alias_any(self, src: int, dst: int, k: int) -> None:
        self._alias(src, dst, k)

    @rule(s=st.integers(0, SLOTS - 1), k=st.integers(1, 3), lo=st.integers(0, 999), hi=st.integers(0, 999),
          seed=st.integers(0, 2**32 - 1))
    def write_any(self, s: int, k: int, lo: int, hi: int, seed: int) -> None:
        self._write(s, k, lo, hi, seed)

    @rule(offset=st.integers(1, SLOTS * 4096 - 1), k=st.integers(1, 2))
    def map_unaligned(self, offset: int, k: int) -> None:
        if offset % self.ps:
            self._expect_error(lambda: self.arena.map(offset, k * self.ps))

    # ---- ... and arguments drawn from the model's state, so valid sequences are common ------
    def _run(self, data, mapped: bool) -> tuple[int, int]:
        """A random slot in the wanted state and a run length within that state."""
        s = data.draw(st.sampled_from([i for i in range(SLOTS) if (self.slot[i] is not None) == mapped]))
        end = s
        while end < SLOTS and (self.slot[end] is not None) == mapped:
            end += 1
        return s, data.draw(st.integers(1, end - s))

    @precondition(lambda self: None in self.slot)
    @rule(data=st.data())
    def map_free_run(self, data) -> None:
        self._map(*self._run(data, mapped=False))

    @precondition(lambda self: any(p is not None for p in self.slot))
    @rule(data=st.data())
    def unmap_mapped_run(self, data) -> None:
        self._unmap(*self._run(data, mapped=True))

    @precondition(lambda self: None in self.slot and any(p is not None for p in self.slot))
    @rule(data=st.data())
    def alias_mapped_run(self, data) -> None:
        src, k = self._run(data, mapped=True)
        dst, room = self._run(data, mapped=False)
        self._alias(src, dst, min(k, room))

    @precondition(lambda self: any(p is not None for p in self.slot))
    @rule(data=st.data(), lo=st.integers(0, 999), hi=st.integers(0, 999), seed=st.integers(0, 2**32 - 1))
    def write_mapped_run(self, data, lo: int, hi: int, seed: int) -> None:
        self._write(*self._run(data, mapped=True), lo, hi, seed)

    @precondition(lambda self: any(p is not None for p in self.slot))
    @rule(data=st.data())
    def read(self, data) -> None:
        mapped = [i for i, p in enumerate(self.slot) if p is not None]
        i = data.draw(st.sampled_from(mapped))
        got = self.arena.view(i * self.ps, (self.ps,), torch.uint8).cpu().numpy()
        p = self.slot[i]
        np.testing.assert_array_equal(got[self.known[p]], self.data[p][self.known[p]])

    @rule()
    def trim(self) -> None:
        assert self.pool.trim() == self.free
        self.total -= self.free
        self.free = 0

    # ---- invariants ------------------------------------------------------------------------
    @invariant()
    def pool_matches_model(self) -> None:
        s = self.pool.stats()
        in_use = len(self.refs)
        assert s["pages_in_use"] == in_use and s["bytes_in_use"] == in_use * self.ps
        assert s["pages_free"] == self.free and s["pages_total"] == self.total == in_use + self.free
        assert s["driver_creates"] == self.creates and s["driver_creates"] - s["driver_releases"] == self.total
        assert self.total <= CAPACITY
        mapped = sum(p is not None for p in self.slot)
        assert self.arena.mapped_bytes == s["bytes_mapped"] == mapped * self.ps

    @invariant()
    def layout_matches_model(self) -> None:
        phys = self.arena.physical_pages(0, self.arena.reserved_bytes)
        for i in range(SLOTS):
            assert (phys[i] is not None) == (self.slot[i] is not None)
            assert self.arena.is_mapped(i * self.ps, self.ps) == (self.slot[i] is not None)
        # Slots share a physical page exactly when the model says they alias.
        for i in range(SLOTS):
            for j in range(i + 1, SLOTS):
                if self.slot[i] is not None and self.slot[j] is not None:
                    assert (phys[i] == phys[j]) == (self.slot[i] == self.slot[j])


ArenaModel.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestHostArena = ArenaModel.TestCase


class CudaArenaModel(ArenaModel):
    backend_name = "cuda"


CudaArenaModel.TestCase.settings = settings(
    max_examples=15, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestCudaArena = pytest.mark.gpu(CudaArenaModel.TestCase)
