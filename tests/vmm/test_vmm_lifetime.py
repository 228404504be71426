"""close / garbage collection / interpreter exit release every handle and address range."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import vmm
from vmm_helpers import be, fill_random, read, small_page  # noqa: F401

REPO = Path(__file__).resolve().parents[2]


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _reserved(addr: int) -> bool:
    """Whether /proc/self/maps has a mapping that contains `addr`."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return True
    return False


def test_host_pages_are_fds_and_gc_releases_them():
    be = vmm.get_backend("host")
    ps = small_page(be)
    gc.collect()
    fds0 = _fds()
    pool = vmm.PagePool(be, capacity_bytes=8 * ps, page_size=ps)
    arena = vmm.VirtualArena(pool, 16 * ps)
    base = arena.base_address
    arena.map(0, 3 * ps)
    arena.map(8 * ps, 2 * ps)
    arena.alias(0, 12 * ps, ps)
    assert _fds() == fds0 + 5 and _reserved(base) and _reserved(base + 15 * ps)
    del arena, pool
    gc.collect()
    assert _fds() == fds0
    assert not _reserved(base) and not _reserved(base + 15 * ps)


def test_explicit_close_frees_the_address_range():
    be = vmm.get_backend("host")
    ps = small_page(be)
    pool = vmm.PagePool(be, capacity_bytes=2 * ps, page_size=ps)
    with vmm.VirtualArena(pool, 4 * ps) as arena:
        base = arena.base_address
        arena.map(ps, ps)
    assert not _reserved(base)
    fds = _fds()
    assert pool.trim() == 1 and _fds() == fds - 1


def test_gc_runs_finalizers_and_views_keep_the_arena_alive(be):
    ps = small_page(be)
    pool = vmm.PagePool(be, capacity_bytes=4 * ps, page_size=ps)
    state = pool._state
    arena = vmm.VirtualArena(pool, 4 * ps)
    arena.map(0, 2 * ps)
    data = fill_random(arena, 0, 2 * ps)
    view = arena.view(0, (2 * ps,), torch.uint8)
    arena_fin, pool_fin = arena._finalizer, pool._finalizer
    del arena, pool
    gc.collect()
    # The view holds the arena, the arena holds the pool: nothing may be released yet.
    assert arena_fin.alive and pool_fin.alive
    assert torch.equal(view.cpu(), data)
    del view
    gc.collect()
    assert not arena_fin.alive and not pool_fin.alive
    assert state.closed and not state.handles and state.bytes_reserved == 0
    assert state.counters.driver_releases == state.counters.driver_creates == 2


@pytest.mark.parametrize("name", ["host", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_interpreter_exit_releases_everything(name):
    """A process that exits with pages mapped and views alive releases every page and
    reservation (counted through the backend) and exits cleanly."""
    script = textwrap.dedent(f"""
        import weakref
        import torch, vmm
        be = vmm.get_backend({name!r})
        calls = {{"release": 0, "free": 0}}
        rel, free = be.release, be.free_reservation
        def release(h):
            calls["release"] += 1
            rel(h)
        def free_reservation(a, n):
            calls["free"] += 1
            free(a, n)
        be.release, be.free_reservation = release, free_reservation
        # Finalizers run newest first at exit, so this one (the oldest) reports after vmm's.
        weakref.finalize(vmm, lambda: print("released", calls["release"], "freed", calls["free"], flush=True))
        ps = be.granularity
        pool = vmm.PagePool(be, capacity_bytes=8 * ps)
        a = vmm.VirtualArena(pool, 8 * ps)
        b = vmm.VirtualArena(pool, 8 * ps)
        a.map(0, 3 * ps); b.map(ps, 2 * ps); b.alias(0, 5 * ps, 3 * ps, src=a)
        v = a.view(0, (3 * ps // 2,), torch.bfloat16); v.fill_(1.0)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr
    assert out.stdout.split() == ["released", "5", "freed", "2"], out.stdout
