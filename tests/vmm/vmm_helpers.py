"""Shared helpers for the vmm tests (imported by name: tests/vmm is on sys.path under pytest)."""
from __future__ import annotations

import pytest
import torch

import vmm

BACKENDS = ["host", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=BACKENDS)
def be(request) -> vmm.Backend:
    return vmm.get_backend(request.param)


def small_page(be: vmm.Backend) -> int:
    """A page size that keeps tests light: 4 host pages (16 KiB), one granule (2 MiB) on cuda."""
    return be.granularity if be.name == "cuda" else 4 * be.granularity


def rand_bytes(n: int, device) -> torch.Tensor:
    # Values 1..255 so a page that was never written (zeros on host) can't pass for one that was.
    return torch.randint(1, 256, (n,), dtype=torch.uint8).to(device)


def fill_random(arena: vmm.VirtualArena, offset: int, nbytes: int) -> torch.Tensor:
    """Write random bytes through a view; returns the bytes written (on cpu)."""
    data = rand_bytes(nbytes, "cpu")
    arena.view(offset, (nbytes,), torch.uint8).copy_(data.to(arena.device))
    return data


def read(arena: vmm.VirtualArena, offset: int, nbytes: int) -> torch.Tensor:
    return arena.view(offset, (nbytes,), torch.uint8).cpu().clone()


def snapshot(arena: vmm.VirtualArena) -> tuple:
    """Everything a failed call must leave unchanged: pool counters, layout, page identity, bytes."""
    ranges = arena.mapped_ranges()
    return (arena.pool.stats(), ranges, arena.physical_pages(0, arena.reserved_bytes), arena.mapped_bytes,
            [read(arena, o, n) for o, n in ranges])


def assert_same(a: tuple, b: tuple) -> None:
    assert a[:4] == b[:4]
    assert len(a[4]) == len(b[4]) and all(torch.equal(x, y) for x, y in zip(a[4], b[4]))
