"""The arena's page table is sparse: reserving address space costs O(1), and every operation
(close and whole-arena walks included) costs O(pages touched or mapped), never O(reserved pages).

Huge arenas (1 TiB of address space: 268M slots of 4 KiB on host) with a few scattered pages are
checked against a plain model of slot -> page id, and by memory and trace counts rather than time
so the tests stay deterministic on a loaded machine."""
from __future__ import annotations

import random
import sys
import tracemalloc
from collections.abc import Callable, Iterator

import pytest
import torch

import vmm
from vmm_helpers import be, fill_random, read  # noqa: F401

HUGE = 1 << 40
ARENA_PY = vmm.arena.__file__


def _host_pool(capacity_pages: int) -> vmm.PagePool:
    be = vmm.get_backend("host")
    return vmm.PagePool(be, capacity_bytes=capacity_pages * be.granularity, page_size=be.granularity)


def _model_runs(slots: dict[int, int], first: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in sorted(i for i in slots if first <= i and (end is None or i < end)):
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out


def _arena_lines(fn: Callable[[], object]) -> int:
    """Python lines of vmm/arena.py that `fn` executes: a step count, so O(reserved) shows as
    millions whatever the machine's speed."""
    count = 0

    def local(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename == ARENA_PY else None

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


def test_reserving_a_huge_arena_allocates_nothing_per_slot():
    pool = _host_pool(8)
    ps = pool.page_size
    tracemalloc.start()
    try:
        arena = vmm.VirtualArena(pool, HUGE)
        assert arena.reserved_bytes == HUGE and HUGE // ps >= 1 << 28
        # Checked at once, so a dense table fails here rather than after walking 268M slots.
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
        for off in (0, 12345 * ps, HUGE // 2 + 7 * ps, HUGE - ps):
            arena.map(off, ps)
        assert arena.mapped_bytes == 4 * ps
        assert arena.mapped_ranges() == [(0, ps), (12345 * ps, ps), (HUGE // 2 + 7 * ps, ps), (HUGE - ps, ps)]
        assert pool.stats()["bytes_reserved"] == HUGE
        arena.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A dense slot list alone would be 2 GiB here; a few pages' bookkeeping is kilobytes.
    assert peak < 4 << 20, f"the arena allocated {peak} bytes for 4 mapped pages"
    s = pool.stats()
    assert s["bytes_reserved"] == 0 and s["bytes_mapped"] == 0 and s["pages_in_use"] == 0 and s["arenas"] == 0
    pool.close()


def test_whole_arena_walks_cost_mapped_pages_not_reserved():
    """close, mapped_ranges and mapped_bytes step through mapped slots only: 1M reserved slots
    (a dense walk would trace millions of lines) with 5 pages mapped."""
    pool = _host_pool(8)
    ps = pool.page_size
    arena = vmm.VirtualArena(pool, (1 << 20) * ps)
    for off in (3 * ps, 4 * ps, 500_000 * ps, ((1 << 20) - 2) * ps, ((1 << 20) - 1) * ps):
        arena.map(off, ps)
    assert _arena_lines(arena.mapped_ranges) < 500
    assert _arena_lines(lambda: arena.mapped_bytes) < 50
    assert _arena_lines(arena.close) < 1000
    assert arena.closed and pool.stats()["pages_in_use"] == 0 and pool.stats()["pages_free"] == 5
    pool.close()


class _Model:
    """slot -> page id, and page id -> bytes last written to it, for one host arena."""

    def __init__(self, arena: vmm.VirtualArena, regions: list[int], width: int) -> None:
        self.arena, self.ps = arena, arena.page_size
        self.regions, self.width = regions, width
        self.slots: dict[int, int] = {}
        self.data: dict[int, torch.Tensor] = {}

    def in_use(self) -> set[int]:
        return set(self.slots.values())

    def write(self, first: int, n: int) -> None:
        data = fill_random(self.arena, first * self.ps, n * self.ps)
        for k in range(n):
            self.data[self.slots[first + k]] = data[k * self.ps:(k + 1) * self.ps]

    def windows(self) -> Iterator[tuple[int, int]]:
        for r in self.regions:
            yield r, min(r + self.width, self.arena.reserved_bytes // self.ps)

    def check(self) -> None:
        arena, ps, slots = self.arena, self.ps, self.slots
        runs = _model_runs(slots)
        assert arena._s.runs() == runs
        assert arena.mapped_ranges() == [(f * ps, n * ps) for f, n in runs]
        assert arena.mapped_bytes == len(slots) * ps
        s = arena.pool.stats()
        assert s["bytes_mapped"] == len(slots) * ps
        assert s["pages_in_use"] == len(self.in_use())
        for lo, hi in self.windows():
            expect = [slots.get(i) for i in range(lo, hi)]
            assert arena.physical_pages(lo * ps, (hi - lo) * ps) == expect
            # A byte range starting and ending mid-page names every page it touches.
            assert arena.physical_pages(lo * ps + 5, (hi - lo - 1) * ps) == expect
            assert arena._s.runs(lo, hi - lo) == _model_runs(slots, lo, hi)
            assert arena.is_mapped(lo * ps, (hi - lo) * ps) == all(e is not None for e in expect)
            hole = next((i for i in range(lo, hi) if i not in slots), None)
            if hole is not None:
                with pytest.raises(vmm.VmmError, match=f"the page at offset {hole * ps} is not"):
                    arena.view(lo * ps, ((hi - lo) * ps,), torch.uint8)
        # Windows wider than the mapped count take the sorted-slots branch of runs().
        lo, hi = self.regions[1], self.regions[-2] + 1
        assert arena._s.runs(lo, hi - lo) == _model_runs(slots, lo, hi)

    def check_bytes(self) -> None:
        for f, n in _model_runs(self.slots):
            got = read(self.arena, f * self.ps, n * self.ps)
            for k in range(n):
                assert torch.equal(got[k * self.ps:(k + 1) * self.ps], self.data[self.slots[f + k]])


def test_scattered_map_unmap_alias_in_a_huge_arena(rng_seed):
    capacity, width = 24, 8
    pool = _host_pool(capacity)
    ps = pool.page_size
    arena = vmm.VirtualArena(pool, HUGE)
    npages = HUGE // ps
    # Far apart, at odd slots, and at both ends of the reservation.
    regions = [0, 13, 4097, 65_537, npages // 3 + 5, npages // 2 - 3, (1 << 31) // ps * 3 + 1, npages - width]
    m = _Model(arena, regions, width)
    rng = random.Random(rng_seed)

    def pick(k: int) -> int:
        lo = rng.choice(regions)
        return rng.randrange(lo, min(lo + width, npages) - k + 1)

    def unchanged(call: Callable[[], object], exc: type = vmm.VmmError) -> None:
        before = (pool.stats(), arena._s.runs())
        with pytest.raises(exc):
            call()
        assert (pool.stats(), arena._s.runs()) == before

    for _ in range(300):
        op, k = rng.choice(("map", "map", "unmap", "alias")), rng.randint(1, 4)
        s = pick(k)
        span = range(s, s + k)
        if op == "map":
            if any(i in m.slots for i in span):
                unchanged(lambda: arena.map(s * ps, k * ps))
            elif k > capacity - len(m.in_use()):
                unchanged(lambda: arena.map(s * ps, k * ps), vmm.OutOfMemoryError)
            else:
                arena.map(s * ps, k * ps)
                ids = arena.physical_pages(s * ps, k * ps)
                assert None not in ids and len(set(ids)) == k and not set(ids) & m.in_use()
                m.slots.update(zip(span, ids))
                m.write(s, k)
        elif op == "unmap":
            if not all(i in m.slots for i in span):
                unchanged(lambda: arena.unmap(s * ps, k * ps))
            else:
                arena.unmap(s * ps, k * ps)
                for i in span:
                    del m.slots[i]
        else:
            d = pick(k)
            if not all(i in m.slots for i in span) or any(i in m.slots for i in range(d, d + k)):
                unchanged(lambda: arena.alias(s * ps, d * ps, k * ps))
            else:
                arena.alias(s * ps, d * ps, k * ps)
                m.slots.update(zip(range(d, d + k), (m.slots[i] for i in span)))
                m.write(d, k)  # through the alias: the source must show it
                assert torch.equal(read(arena, s * ps, k * ps), read(arena, d * ps, k * ps))
        m.check()
    m.check_bytes()
    arena.close()
    s = pool.stats()
    assert s["pages_in_use"] == 0 and s["bytes_mapped"] == 0 and s["pages_free"] == s["pages_total"]
    pool.close()


@pytest.mark.parametrize("per_mapping", [False, True])
def test_failed_far_unmap_and_map_are_undone(monkeypatch, per_mapping):
    """The rollback paths (`_restore`, `undo_maps`) at slots hundreds of millions apart."""
    pool = _host_pool(8)
    ps = pool.page_size
    be = pool.backend
    arena = vmm.VirtualArena(pool, HUGE)
    far = HUGE - 8 * ps
    arena.map(ps, ps)
    arena.map(far, 3 * ps)
    data = fill_random(arena, far, 3 * ps)
    before = (pool.stats(), arena.mapped_ranges(), arena.physical_pages(far, 3 * ps))

    real_unmap, calls = be.unmap, [0]

    def unmap(addr: int, nbytes: int) -> None:
        calls[0] += 1
        if calls[0] == (2 if per_mapping else 1):
            raise vmm.VmmError("injected unmap failure")
        real_unmap(addr, nbytes)

    monkeypatch.setattr(be, "unmap_per_mapping", per_mapping)
    monkeypatch.setattr(be, "unmap", unmap)
    with pytest.raises(vmm.VmmError, match="injected"):
        arena.unmap(far, 3 * ps)
    monkeypatch.undo()
    after = (pool.stats(), arena.mapped_ranges(), arena.physical_pages(far, 3 * ps))
    assert after[1:] == before[1:]
    keys = ("pages_in_use", "pages_free", "bytes_mapped", "bytes_reserved")
    assert [after[0][k] for k in keys] == [before[0][k] for k in keys]
    assert torch.equal(read(arena, far, 3 * ps), data)

    real_map, calls[0] = be.map, 0

    def map_(addr: int, nbytes: int, handle: object) -> None:
        calls[0] += 1
        if calls[0] == 2:
            raise vmm.VmmError("injected map failure")
        real_map(addr, nbytes, handle)

    monkeypatch.setattr(be, "map", map_)
    with pytest.raises(vmm.VmmError, match="injected"):
        arena.map(HUGE // 2 + 3 * ps, 3 * ps)
    monkeypatch.undo()
    assert arena.mapped_ranges() == before[1] and arena.physical_pages(HUGE // 2, 8 * ps) == [None] * 8
    assert [pool.stats()[k] for k in keys] == [before[0][k] for k in keys]
    arena.close()
    pool.close()


def test_close_of_a_huge_arena_returns_every_page(be):  # noqa: F811
    ps = be.granularity
    pool = vmm.PagePool(be, capacity_bytes=8 * ps, page_size=ps)
    arena = vmm.VirtualArena(pool, HUGE)
    other = vmm.VirtualArena(pool, HUGE)
    npages = HUGE // ps
    arena.map(0, ps)
    arena.map((npages // 2 + 1) * ps, 2 * ps)
    arena.map((npages - 1) * ps, ps)
    arena.alias((npages // 2 + 1) * ps, 77 * ps, 2 * ps)      # same arena, far below
    other.alias((npages - 1) * ps, (npages - 3) * ps, ps, src=arena)  # another arena
    ids = (arena.physical_pages(0, ps) + arena.physical_pages((npages // 2 + 1) * ps, 2 * ps)
           + arena.physical_pages((npages - 1) * ps, ps))
    s = pool.stats()
    assert s["pages_in_use"] == 4 and s["bytes_mapped"] == 7 * ps and s["bytes_reserved"] == 2 * HUGE
    arena.close()
    s = pool.stats()
    # The page the other arena still maps stays in use; the three others are free again.
    assert s["pages_in_use"] == 1 and s["pages_free"] == 3 and s["bytes_mapped"] == ps
    assert other.physical_pages((npages - 3) * ps, ps) == [ids[-1]]
    other.close()
    s = pool.stats()
    assert (s["pages_in_use"], s["pages_free"], s["pages_total"]) == (0, 4, 4)
    assert s["bytes_mapped"] == 0 and s["bytes_reserved"] == 0 and s["arenas"] == 0
    creates = s["driver_creates"]
    with vmm.VirtualArena(pool, HUGE) as again:  # the freed pages are the ones reused
        again.map((npages - 4) * ps, 4 * ps)
        assert sorted(again.physical_pages((npages - 4) * ps, 4 * ps)) == sorted(ids)
    assert pool.stats()["driver_creates"] == creates
    pool.close()
