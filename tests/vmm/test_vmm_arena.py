"""VirtualArena / PagePool semantics on every backend (host here, cuda on the GPU)."""
from __future__ import annotations

import threading

import pytest
import torch

import vmm
from vmm_helpers import assert_same, be, fill_random, rand_bytes, read, small_page, snapshot  # noqa: F401


@pytest.fixture
def setup(be):
    """A pool of 6 pages and an arena of 10 pages over it."""
    ps = small_page(be)
    pool = vmm.PagePool(be, capacity_bytes=6 * ps, page_size=ps)
    arena = vmm.VirtualArena(pool, 10 * ps)
    yield pool, arena, ps
    arena.close()
    pool.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool])
def test_views_are_zero_copy_and_typed(setup, dtype, rng_seed):
    pool, arena, ps = setup
    arena.map(ps, 3 * ps)
    off = ps + 8 * 3  # not page aligned, but a multiple of every element size
    n = (3 * ps - 24) // dtype.itemsize - 5
    v = arena.view(off, (n,), dtype)
    assert v.dtype == dtype and v.shape == (n,) and v.is_contiguous() and v.device == arena.device
    assert v.data_ptr() == arena.base_address + off
    if dtype.is_floating_point:
        ref = torch.randn(n, dtype=torch.float64).to(dtype)
    elif dtype == torch.bool:
        ref = torch.rand(n) < 0.5
    else:
        ref = torch.randint(-100, 100, (n,), dtype=dtype)
    v.copy_(ref.to(v.device))
    # The bytes must land exactly where a uint8 view of the same address sees them.
    got = read(arena, off, n * dtype.itemsize)
    assert torch.equal(got, ref.contiguous().view(torch.uint8))
    m = arena.view(off, (n // 7, 7), dtype)
    assert torch.equal(m.cpu(), ref[: (n // 7) * 7].view(n // 7, 7))


def test_map_recycles_pages_before_creating(setup):
    pool, arena, ps = setup
    arena.map(0, 4 * ps)
    ids = set(arena.physical_pages(0, 4 * ps))
    s = pool.stats()
    assert (s["driver_creates"], s["pages_total"], s["pages_in_use"], s["bytes_in_use"]) == (4, 4, 4, 4 * ps)
    arena.unmap(0, 4 * ps)
    s = pool.stats()
    assert (s["pages_free"], s["pages_in_use"], s["bytes_mapped"]) == (4, 0, 0)
    arena.map(5 * ps, 3 * ps)
    s = pool.stats()
    assert s["driver_creates"] == 4 and s["pages_free"] == 1
    assert set(arena.physical_pages(5 * ps, 3 * ps)) <= ids
    arena.map(0, 2 * ps)  # one recycled + one fresh
    assert pool.stats()["driver_creates"] == 5 and pool.stats()["pages_free"] == 0


def test_trim_releases_free_pages(setup):
    pool, arena, ps = setup
    arena.map(0, 5 * ps)
    arena.unmap(ps, 3 * ps)
    assert pool.trim() == 3
    s = pool.stats()
    assert (s["pages_total"], s["pages_free"], s["driver_releases"], s["pages_in_use"]) == (2, 0, 3, 2)
    assert pool.trim() == 0
    arena.map(ps, ps)
    assert pool.stats()["driver_creates"] == 6


def test_map_batches_set_access(setup):
    pool, arena, ps = setup
    before = pool.stats()
    arena.map(2 * ps, 5 * ps)
    after = pool.stats()
    assert after["driver_maps"] - before["driver_maps"] == 5
    assert after["driver_set_access"] - before["driver_set_access"] == 1
    arena.alias(2 * ps, 8 * ps, 2 * ps)
    assert pool.stats()["driver_set_access"] - after["driver_set_access"] == 1


def test_prealloc(be):
    ps = small_page(be)
    pool = vmm.PagePool(be, capacity_bytes=4 * ps, page_size=ps, prealloc_pages=3)
    s = pool.stats()
    assert (s["driver_creates"], s["pages_free"], s["pages_total"]) == (3, 3, 3)
    with vmm.VirtualArena(pool, 4 * ps) as arena:
        arena.map(0, 2 * ps)
        assert pool.stats()["driver_creates"] == 3
    pool.close()
    assert pool.stats()["pages_total"] == 0 and pool.stats()["driver_releases"] == 3


def test_alias_shares_bytes_and_refcounts(setup):
    pool, arena, ps = setup
    arena.map(0, 2 * ps)
    data = fill_random(arena, 0, 2 * ps)
    arena.alias(0, 6 * ps, 2 * ps)
    assert arena.physical_pages(6 * ps, 2 * ps) == arena.physical_pages(0, 2 * ps)
    assert torch.equal(read(arena, 6 * ps, 2 * ps), data)
    # A write at the alias straddling its two pages is seen at the source.
    new = rand_bytes(ps, "cpu")
    arena.view(6 * ps + ps // 2, (ps,), torch.uint8).copy_(new.to(arena.device))
    assert torch.equal(read(arena, ps // 2, ps), new)
    s = pool.stats()
    assert (s["pages_in_use"], s["bytes_in_use"], s["bytes_mapped"]) == (2, 2 * ps, 4 * ps)
    assert arena.mapped_bytes == 4 * ps
    arena.unmap(0, 2 * ps)  # the alias keeps both pages in use
    s = pool.stats()
    assert (s["pages_in_use"], s["pages_free"]) == (2, 0)
    assert torch.equal(read(arena, 6 * ps + ps // 2, ps), new)
    arena.unmap(6 * ps, ps)
    assert pool.stats()["pages_free"] == 1
    arena.unmap(7 * ps, ps)
    assert pool.stats()["pages_free"] == 2 and pool.stats()["pages_in_use"] == 0


def test_alias_across_arenas(be):
    ps = small_page(be)
    pool = vmm.PagePool(be, capacity_bytes=4 * ps, page_size=ps)
    other = vmm.PagePool(be, capacity_bytes=4 * ps, page_size=ps)
    with vmm.VirtualArena(pool, 4 * ps) as a, vmm.VirtualArena(pool, 4 * ps) as b, \
            vmm.VirtualArena(other, 4 * ps) as c:
        a.map(ps, 2 * ps)
        data = fill_random(a, ps, 2 * ps)
        b.alias(ps, 0, 2 * ps, src=a)
        assert torch.equal(read(b, 0, 2 * ps), data)
        snap = snapshot(c)
        with pytest.raises(vmm.VmmError, match="different page pool"):
            c.alias(ps, 0, ps, src=a)
        assert_same(snap, snapshot(c))
        a.close()  # b still maps the pages
        assert pool.stats()["pages_in_use"] == 2
        assert torch.equal(read(b, 0, 2 * ps), data)
    assert pool.stats()["pages_in_use"] == 0 and pool.stats()["arenas"] == 0


BAD = {
    "map unaligned offset": (lambda a, ps: a.map(ps // 2, ps), "not aligned"),
    "map unaligned size": (lambda a, ps: a.map(0, ps + 1), "not aligned"),
    "map out of range": (lambda a, ps: a.map(9 * ps, 2 * ps), "out of range"),
    "map negative": (lambda a, ps: a.map(-ps, ps), "negative"),
    "map overlapping": (lambda a, ps: a.map(2 * ps, 3 * ps), "already mapped"),
    "unmap partly unmapped": (lambda a, ps: a.unmap(0, 4 * ps), "is not mapped"),
    "unmap unaligned": (lambda a, ps: a.unmap(ps, ps - 1), "not aligned"),
    "alias unmapped source": (lambda a, ps: a.alias(4 * ps, 6 * ps, ps), "is not mapped"),
    "alias onto mapped": (lambda a, ps: a.alias(ps, 2 * ps, ps), "already mapped"),
    "alias out of range": (lambda a, ps: a.alias(ps, 9 * ps, 2 * ps), "out of range"),
    "view straddling unmapped": (lambda a, ps: a.view(4 * ps - 8, (16,), torch.uint8), "not all mapped"),
    "view out of range": (lambda a, ps: a.view(9 * ps, (ps + 4,), torch.uint8, require_mapped=False), "outside"),
    "view misaligned for dtype": (lambda a, ps: a.view(ps + 2, (4,), torch.float32), "element size"),
    "is_mapped out of range": (lambda a, ps: a.is_mapped(0, 11 * ps), "outside"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_raise_and_change_nothing(setup, case):
    pool, arena, ps = setup
    arena.map(ps, 3 * ps)  # pages 1..3
    fill_random(arena, ps, 3 * ps)
    arena.unmap(3 * ps, ps)
    arena.map(3 * ps, ps)  # a recycled page, so the free list has been in play
    call, message = BAD[case]
    before = snapshot(arena)
    with pytest.raises(vmm.VmmError, match=message):
        call(arena, ps)
    assert_same(before, snapshot(arena))


def test_out_of_memory_changes_nothing(setup):
    pool, arena, ps = setup
    arena.map(0, 5 * ps)
    fill_random(arena, 0, 5 * ps)
    arena.unmap(ps, ps)  # 4 in use, 1 free, room to create 1 more
    before = snapshot(arena)
    with pytest.raises(vmm.OutOfMemoryError, match="exhausted"):
        arena.map(6 * ps, 3 * ps)
    assert_same(before, snapshot(arena))
    assert isinstance(vmm.OutOfMemoryError("x"), vmm.VmmError)
    arena.map(6 * ps, 2 * ps)  # exactly what is left: the free page plus one new
    s = pool.stats()
    assert (s["pages_in_use"], s["pages_total"], s["driver_creates"]) == (6, 6, 6)
    with pytest.raises(vmm.OutOfMemoryError):
        arena.map(ps, ps)


def test_view_of_partly_mapped_range(setup):
    pool, arena, ps = setup
    whole = arena.view(0, (10, ps // 4), torch.float32, require_mapped=False)
    with pytest.raises(vmm.VmmError):
        arena.view(0, (10, ps // 4), torch.float32)
    arena.map(2 * ps, ps)
    arena.map(7 * ps, 2 * ps)
    ref = torch.randn(3, ps // 4)
    whole[2] = ref[0].to(whole.device)
    whole[7:9] = ref[1:].to(whole.device)
    assert torch.equal(arena.view(2 * ps, (ps // 4,), torch.float32).cpu(), ref[0])
    assert torch.equal(arena.view(7 * ps, (2, ps // 4), torch.float32).cpu(), ref[1:])
    assert arena.is_mapped(7 * ps + 3, ps) and not arena.is_mapped(6 * ps + 3, ps)
    assert arena.is_mapped(5 * ps, 0) and not arena.is_mapped(0, 1)
    assert arena.mapped_ranges() == [(2 * ps, ps), (7 * ps, 2 * ps)]
    assert arena.view(ps, (0, 5), torch.bfloat16).shape == (0, 5)


def test_close_releases_everything_and_blocks_use(setup):
    pool, arena, ps = setup
    arena.map(0, 3 * ps)
    arena.alias(0, 5 * ps, ps)
    assert pool.stats()["bytes_reserved"] == 10 * ps and pool.stats()["arenas"] == 1
    with pytest.raises(vmm.VmmError, match="still mapped"):
        pool.close()
    arena.close()
    arena.close()  # idempotent
    s = pool.stats()
    assert (s["pages_in_use"], s["pages_free"], s["bytes_mapped"], s["bytes_reserved"], s["arenas"]) == (0, 3, 0, 0, 0)
    assert arena.closed and arena.mapped_bytes == 0
    for op in (lambda: arena.map(0, ps), lambda: arena.unmap(0, ps), lambda: arena.view(0, 4, torch.uint8),
               lambda: arena.is_mapped(0, ps), lambda: arena.alias(0, ps, ps)):
        with pytest.raises(vmm.VmmError, match="closed"):
            op()
    pool.close()
    assert pool.closed and pool.stats()["pages_total"] == 0 and pool.stats()["driver_releases"] == 3
    with pytest.raises(vmm.VmmError, match="closed"):
        vmm.VirtualArena(pool, ps)


def test_threads_never_share_a_page(be):
    """Threads map, tag, check and unmap pages of one arena concurrently with a pool too small
    for all of them at once; a page handed out twice would show another thread's tag."""
    ps = small_page(be)
    nthreads, slots, rounds = 4, 6, 25 if be.name == "host" else 8
    pool = vmm.PagePool(be, capacity_bytes=12 * ps, page_size=ps)
    arena = vmm.VirtualArena(pool, nthreads * slots * ps)
    errors: list[BaseException] = []
    ooms = [0] * nthreads

    def worker(t: int) -> None:
        g = torch.Generator().manual_seed(t)
        try:
            for r in range(rounds):
                k = int(torch.randint(1, 5, (1,), generator=g))
                first = (t * slots + int(torch.randint(0, slots - k + 1, (1,), generator=g))) * ps
                try:
                    arena.map(first, k * ps)
                except vmm.OutOfMemoryError:
                    ooms[t] += 1
                    continue
                tag = t * 1000 + r
                v = arena.view(first, (k * ps // 8,), torch.int64)
                v.fill_(tag)
                for _ in range(3):  # give the other threads time to map and write
                    assert bool((v == tag).all()), f"thread {t}: a page was handed out twice"
                ids = arena.physical_pages(first, k * ps)
                assert len(set(ids)) == k
                arena.unmap(first, k * ps)
        except BaseException as e:  # surfaced in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    s = pool.stats()
    assert s["pages_in_use"] == 0 and s["pages_total"] == s["pages_free"] <= 12
    assert arena.mapped_bytes == 0 and sum(ooms) < nthreads * rounds
    arena.close()
    pool.close()


def test_threads_mapping_disjoint_pages_all_distinct(be):
    ps = small_page(be)
    nthreads, per = 4, 3
    pool = vmm.PagePool(be, capacity_bytes=nthreads * per * ps, page_size=ps)
    arena = vmm.VirtualArena(pool, nthreads * per * ps)
    barrier = threading.Barrier(nthreads)

    def worker(t: int) -> None:
        barrier.wait()
        for i in range(per):
            arena.map((t * per + i) * ps, ps)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    ids = arena.physical_pages(0, arena.reserved_bytes)
    assert None not in ids and len(set(ids)) == nthreads * per
    assert pool.stats()["pages_in_use"] == nthreads * per
    arena.close()
    pool.close()
