"""A driver call that fails midway: the operation undoes what it did and changes nothing.

Faults are injected by wrapping the (shared, cached) backend's methods for one test."""
from __future__ import annotations

import pytest
import torch

import vmm
from vmm_helpers import be, fill_random, read, small_page  # noqa: F401

# Driver counters count real calls (a rolled-back call made some), so they are left out here.
STATE_KEYS = ("pages_total", "pages_free", "pages_in_use", "bytes_in_use", "bytes_mapped", "bytes_reserved", "arenas")


def _state(arena: vmm.VirtualArena) -> tuple:
    s = arena.pool.stats()
    return (tuple(s[k] for k in STATE_KEYS), arena.mapped_ranges(), arena.physical_pages(0, arena.reserved_bytes))


def _fail_on(monkeypatch, be, method: str, nth: int, exc: type = vmm.VmmError) -> list[int]:
    """Make the `nth` call (1-based) of `be.method` from now on raise `exc`."""
    orig = getattr(be, method)
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth:
            raise exc(f"injected {method} failure")
        return orig(*args, **kwargs)

    monkeypatch.setattr(be, method, wrapped)
    return calls


@pytest.fixture
def setup(be):
    ps = small_page(be)
    pool = vmm.PagePool(be, capacity_bytes=8 * ps, page_size=ps)
    arena = vmm.VirtualArena(pool, 12 * ps)
    arena.map(0, 3 * ps)
    data = fill_random(arena, 0, 3 * ps)
    arena.unmap(ps, ps)  # one page on the free list, so a map mixes recycled and new pages
    yield pool, arena, ps, data
    arena.close()
    pool.close()


@pytest.mark.parametrize("method,nth", [("map", 1), ("map", 3), ("set_access", 1), ("create", 2)])
def test_failed_map_is_undone(setup, monkeypatch, method, nth):
    pool, arena, ps, data = setup
    be = arena.backend
    before = _state(arena)
    creates = pool.stats()["driver_creates"]
    _fail_on(monkeypatch, be, method, nth)
    with pytest.raises(vmm.VmmError, match="injected"):
        arena.map(4 * ps, 4 * ps)
    monkeypatch.undo()
    assert _state(arena) == before
    s = pool.stats()
    # Pages this call created went back to the driver; the recycled one is free again.
    assert s["driver_creates"] - creates == s["driver_releases"]
    assert torch.equal(read(arena, 0, ps), data[:ps]) and torch.equal(read(arena, 2 * ps, ps), data[2 * ps:])
    arena.map(4 * ps, 4 * ps)  # and the same request then works
    fill_random(arena, 4 * ps, 4 * ps)


def test_driver_out_of_memory_is_undone(setup, monkeypatch):
    pool, arena, ps, _ = setup
    before = _state(arena)
    _fail_on(monkeypatch, arena.backend, "create", 1, vmm.OutOfMemoryError)
    with pytest.raises(vmm.OutOfMemoryError):
        arena.map(4 * ps, 3 * ps)
    monkeypatch.undo()
    assert _state(arena) == before


def test_failed_alias_is_undone(setup, monkeypatch):
    pool, arena, ps, data = setup
    before = _state(arena)
    _fail_on(monkeypatch, arena.backend, "map", 1)
    with pytest.raises(vmm.VmmError, match="injected"):
        arena.alias(2 * ps, 6 * ps, ps)
    monkeypatch.undo()
    assert _state(arena) == before
    arena.alias(2 * ps, 6 * ps, ps)
    assert torch.equal(read(arena, 6 * ps, ps), data[2 * ps:])


@pytest.mark.parametrize("per_mapping", [False, True])
def test_failed_unmap_is_undone(setup, monkeypatch, per_mapping):
    """Per-mapping unmap (the cuda rule) that fails on its second page maps the first back."""
    pool, arena, ps, data = setup
    be = arena.backend
    arena.map(4 * ps, 3 * ps)
    more = fill_random(arena, 4 * ps, 3 * ps)
    before = _state(arena)
    monkeypatch.setattr(be, "unmap_per_mapping", per_mapping)
    _fail_on(monkeypatch, be, "unmap", 2 if per_mapping else 1)
    with pytest.raises(vmm.VmmError, match="injected"):
        arena.unmap(4 * ps, 3 * ps)
    monkeypatch.undo()
    assert _state(arena) == before
    assert torch.equal(read(arena, 4 * ps, 3 * ps), more)
    arena.unmap(4 * ps, 3 * ps)
    assert pool.stats()["pages_free"] == 3 and pool.stats()["pages_in_use"] == 2


@pytest.mark.parametrize("method", ["map", "set_access", "unmap", "synchronize"])
def test_failed_one_page_call_is_undone(setup, monkeypatch, method):
    """The one-page fast paths (a recycled page into a free slot; one mapped page out) undo
    what they did as the general path does: the recycled page goes back to the free list."""
    pool, arena, ps, data = setup
    be = arena.backend
    if method in ("unmap", "synchronize"):
        arena.map(5 * ps, ps)  # the recycled page
        more = fill_random(arena, 5 * ps, ps)
        before = _state(arena)
        _fail_on(monkeypatch, be, method, 1)
        with pytest.raises(vmm.VmmError, match="injected"):
            arena.unmap(5 * ps, ps)
        monkeypatch.undo()
        assert _state(arena) == before
        assert torch.equal(read(arena, 5 * ps, ps), more)
        arena.unmap(5 * ps, ps)
    else:
        before = _state(arena)
        assert pool.stats()["pages_free"] == 1
        _fail_on(monkeypatch, be, method, 1)
        with pytest.raises(vmm.VmmError, match="injected"):
            arena.map(5 * ps, ps)
        monkeypatch.undo()
        assert _state(arena) == before
        arena.map(5 * ps, ps)
        assert pool.stats()["pages_free"] == 0  # the same recycled page, not a new one
    assert torch.equal(read(arena, 0, ps), data[:ps]) and torch.equal(read(arena, 2 * ps, ps), data[2 * ps:])
