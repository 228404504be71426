"""VirtualArena: a reserved virtual address range whose pages are mapped from a PagePool.

Reserving costs no memory; `map` backs page-aligned ranges with pool pages, `alias` maps pages
that are already mapped a second time (writes show at both addresses), `unmap` hands pages back
(to the free list once their last mapping goes), and `view` gives zero-copy torch tensors.
Every request is validated in full before anything changes; if a driver call fails midway the
call undoes what it did, so an error leaves arena and pool as they were.
"""
from __future__ import annotations

import weakref
from typing import Sequence

import torch

from .errors import VmmError
from .pool import PagePool, _PoolState


def _int(name: str, value: object) -> int:
    if type(value) is int:  # the common case first: map/unmap sit on the allocator's hot path
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


class _ArenaState:
    """The arena's resources, apart from the arena object so its finalizer can free them."""

    def __init__(self, pool: PagePool, reserve_bytes: int) -> None:
        self.pool = pool  # strong: pages must outlive every arena that maps them
        self.ps: _PoolState = pool._state
        self.backend = self.ps.backend
        self.page_size = self.ps.page_size
        self.npages = -(-reserve_bytes // self.page_size)
        self.reserved_bytes = self.npages * self.page_size
        # Mapped slots only (slot -> page id): reserving terabytes of address space must cost
        # nothing, so nothing here may be sized by the reservation. Its length is the mapped count.
        self.pages: dict[int, int] = {}
        self.closed = False
        with self.ps.lock:
            if self.ps.closed:
                raise VmmError("the page pool is closed")
            self.base = self.backend.reserve(self.reserved_bytes, self.page_size)
            self.ps.bytes_reserved += self.reserved_bytes
            self.ps.arenas += 1

    def addr(self, page: int) -> int:
        return self.base + page * self.page_size

    def map_slots(self, first: int, ids: list[int], new: bool) -> None:
        """Map pages `ids` at consecutive slots from `first` with one set-access over the range;
        `new`: mappings that take a reference on their pages (not so a failed unmap's restore,
        whose pages kept theirs). Lock held, slots free. On failure undoes its own mappings and
        re-raises."""
        be, ps, size = self.backend, self.ps, self.page_size
        handles, n = ps.handles, len(ids)
        addr = self.base + first * size
        done = 0
        try:
            for pid in ids:
                be.map(addr + done * size, size, handles[pid])
                done += 1
            be.set_access(addr, n * size)
        except BaseException:
            self.undo_maps(first, done)
            raise
        counters = ps.counters
        counters.driver_maps += n
        counters.driver_set_access += 1
        self.pages.update(zip(range(first, first + n), ids))
        ps.bytes_mapped += n * size
        if new:
            ps.incref(ids)

    def map_one(self, first: int) -> None:
        """`map_slots` for one free slot and a page off the free list, in one pass. Lock held,
        slot free, free list not empty. On failure the page goes back to the free list."""
        ps, size = self.ps, self.page_size
        pid = ps.free.pop()
        addr = self.base + first * size
        be = self.backend
        try:
            be.map(addr, size, ps.handles[pid])
        except BaseException:
            ps.free.append(pid)
            raise
        try:
            be.set_access(addr, size)
        except BaseException:
            self.undo_maps(first, 1)
            ps.free.append(pid)
            raise
        counters = ps.counters
        counters.driver_maps += 1
        counters.driver_set_access += 1
        self.pages[first] = pid
        ps.bytes_mapped += size
        ps.refs[pid] = 1  # a free page has no mapping

    def unmap_one(self, first: int) -> None:
        """`unmap_slots` for one mapped slot. Lock held, slot mapped."""
        be, ps, size = self.backend, self.ps, self.page_size
        be.synchronize()
        be.unmap(self.base + first * size, size)  # one mapping a page: nothing to restore
        ps.counters.driver_unmaps += 1
        pid = self.pages.pop(first)
        ps.bytes_mapped -= size
        refs = ps.refs
        r = refs[pid] - 1
        if r:
            refs[pid] = r
        else:
            del refs[pid]
            ps.free.append(pid)

    def undo_maps(self, first: int, done: int) -> None:
        """After a failed map: unmap the `done` slots from `first` it mapped (counted as driver
        maps: they were made). Never raises: the original error is the one worth reporting."""
        self.ps.counters.driver_maps += done
        try:
            self.driver_unmap(first, done)
        except Exception:
            pass

    def driver_unmap(self, first: int, n: int) -> None:
        if n == 0:
            return
        be, size, counters = self.backend, self.page_size, self.ps.counters
        if not be.unmap_per_mapping:
            be.unmap(self.base + first * size, n * size)
            counters.driver_unmaps += 1
            return
        for i in range(first, first + n):
            be.unmap(self.base + i * size, size)
            counters.driver_unmaps += 1

    def unmap_slots(self, first: int, n: int) -> None:
        """Unmap mapped slots [first, first+n) and drop their page references. Lock held."""
        be, size, ps = self.backend, self.page_size, self.ps
        be.synchronize()
        if be.unmap_per_mapping:
            addr = self.base + first * size
            done = 0
            try:
                while done < n:
                    be.unmap(addr + done * size, size)
                    done += 1
            except BaseException:
                ps.counters.driver_unmaps += done
                self._restore(first, done)
                raise
            ps.counters.driver_unmaps += n
        else:
            self.driver_unmap(first, n)
        ids = list(map(self.pages.pop, range(first, first + n)))
        ps.bytes_mapped -= n * size
        ps.decref(ids)

    def _restore(self, first: int, n: int) -> None:
        """After a failed unmap, map back the pages it already unmapped; if even that fails,
        record them as unmapped so the bookkeeping matches the driver."""
        ids = list(map(self.pages.pop, range(first, first + n)))
        try:
            self.ps.bytes_mapped -= n * self.page_size
            self.map_slots(first, ids, new=False)
        except Exception:
            self.ps.decref(ids)

    def runs(self, first: int = 0, n: int | None = None) -> list[tuple[int, int]]:
        """Contiguous mapped slot runs (start, count) within [first, first+n), in slot order."""
        pages = self.pages
        end = self.npages if n is None else first + n
        # Walk whichever is smaller, the window or the mapped slots: either way the cost never
        # depends on how much address space is reserved.
        if end - first <= len(pages):
            slots: list[int] = [i for i in range(first, end) if i in pages]
        else:
            slots = sorted(i for i in pages if first <= i < end)
        out: list[tuple[int, int]] = []
        start = prev = -2
        for i in slots:
            if i != prev + 1:
                if prev >= 0:
                    out.append((start, prev + 1 - start))
                start = i
            prev = i
        if prev >= 0:
            out.append((start, prev + 1 - start))
        return out

    def all_mapped(self, first: int, n: int) -> bool:
        # all() over map() stays in C: no Python frame per slot.
        return all(map(self.pages.__contains__, range(first, first + n)))

    def first_not(self, first: int, n: int, mapped: bool) -> int | None:
        """The lowest slot in [first, first+n) that is not `mapped` (unmapped for True, mapped
        for False), or None."""
        pages = self.pages
        return next((i for i in range(first, first + n) if (i in pages) != mapped), None)

    def close(self) -> None:
        """Unmap everything and free the reservation. Never raises (also the finalizer)."""
        with self.ps.lock:
            if self.closed:
                return
            self.closed = True
            try:
                self.backend.synchronize()
            except Exception:
                pass
            pages = self.pages
            for first, n in self.runs():
                ids = list(map(pages.__getitem__, range(first, first + n)))
                try:
                    self.driver_unmap(first, n)
                except Exception:
                    pass  # freeing the reservation below still drops the mappings on host
                self.ps.bytes_mapped -= n * self.page_size
                self.ps.decref(ids)
            pages.clear()
            try:
                self.backend.free_reservation(self.base, self.reserved_bytes)
            except Exception:
                pass
            self.ps.bytes_reserved -= self.reserved_bytes
            self.ps.arenas -= 1


class VirtualArena:
    """A virtual address range of `reserve_bytes` (rounded up to whole pages) backed page by
    page from `pool`.

    Offsets are bytes from the start of the arena. map/unmap/alias take page-aligned ranges;
    `nbytes == 0` is a no-op. Thread-safe: every operation holds the pool's lock.

    Lifetime: `close()` (or `with`, garbage collection, interpreter exit) unmaps every page and
    frees the address range. Tensors from `view` keep the arena object alive, so collection
    never pulls memory from under a live view (except, on cuda, a `require_mapped=False` view
    whose first byte was unmapped when it was made: keep the arena referenced while using it);
    an explicit `close()` or `unmap` does pull it, and touching such a view afterwards is the
    caller's bug (SIGSEGV on host, an illegal address on cuda).
    """

    def __init__(self, pool: PagePool, reserve_bytes: int) -> None:
        if not isinstance(pool, PagePool):
            raise TypeError(f"pool must be a vmm.PagePool, got {type(pool).__name__}")
        reserve_bytes = _int("reserve_bytes", reserve_bytes)
        if reserve_bytes <= 0:
            raise ValueError(f"reserve_bytes must be > 0, got {reserve_bytes}")
        self._s = _ArenaState(pool, reserve_bytes)
        self._finalizer = weakref.finalize(self, _ArenaState.close, self._s)

    # ---- properties -------------------------------------------------------------------------
    @property
    def pool(self) -> PagePool:
        return self._s.pool

    @property
    def backend(self):
        return self._s.backend

    @property
    def device(self) -> torch.device:
        return self._s.backend.device

    @property
    def page_size(self) -> int:
        return self._s.page_size

    @property
    def reserved_bytes(self) -> int:
        return self._s.reserved_bytes

    @property
    def mapped_bytes(self) -> int:
        """Bytes of the arena currently mapped (an aliased page counts at each address)."""
        return len(self._s.pages) * self._s.page_size

    @property
    def base_address(self) -> int:
        """The arena's start address (device pointer on cuda)."""
        return self._s.base

    @property
    def closed(self) -> bool:
        return self._s.closed

    # ---- validation -------------------------------------------------------------------------
    def _open(self) -> _ArenaState:
        s = self._s
        if s.closed:
            raise VmmError("the arena is closed")
        if s.ps.closed:
            raise VmmError("the arena's page pool is closed")
        return s

    def _pages(self, what: str, offset: object, nbytes: object) -> tuple[int, int]:
        """Validate a page-aligned range; returns (first page, page count)."""
        s = self._s
        size = s.page_size
        # One combined test on the hot path; the message is worked out only for a bad range.
        if (type(offset) is not int or type(nbytes) is not int or offset < 0 or nbytes < 0
                or offset % size or nbytes % size or offset + nbytes > s.reserved_bytes):
            offset, nbytes = self._checked_range(what, offset, nbytes)
        return offset // size, nbytes // size

    def _checked_range(self, what: str, offset: object, nbytes: object) -> tuple[int, int]:
        """`_pages`'s slow path: the error for a bad range, or the range as ints (an int
        subclass, such as an IntEnum member, is a valid offset)."""
        offset, nbytes = _int("offset", offset), _int("nbytes", nbytes)
        s = self._s
        if offset < 0 or nbytes < 0:
            raise VmmError(f"{what}: negative offset or size (offset={offset}, nbytes={nbytes})")
        if offset % s.page_size or nbytes % s.page_size:
            raise VmmError(f"{what}: range [{offset}, {offset + nbytes}) is not aligned to the "
                           f"page size {s.page_size}")
        if offset + nbytes > s.reserved_bytes:
            raise VmmError(f"{what}: range [{offset}, {offset + nbytes}) is out of range; the arena "
                           f"reserves {s.reserved_bytes} bytes")
        return int(offset), int(nbytes)

    def _require(self, what: str, first: int, n: int, mapped: bool, arena: "VirtualArena | None" = None) -> None:
        s = (arena or self)._s
        # Both checks run in C over the touched slots only; the page is named only on error.
        ok = s.all_mapped(first, n) if mapped else s.pages.keys().isdisjoint(range(first, first + n))
        if ok:
            return
        i = s.first_not(first, n, mapped)
        state = "is not mapped" if mapped else "is already mapped"
        raise VmmError(f"{what}: the page at offset {i * s.page_size} {state}")

    # ---- operations -------------------------------------------------------------------------
    def map(self, offset: int, nbytes: int) -> None:
        """Back [offset, offset+nbytes) with pool pages (recycled ones first).

        Raises VmmError if the range is unaligned, out of range or overlaps a mapped page, and
        OutOfMemoryError if the pool cannot supply the pages; either way nothing changes.
        """
        s = self._s
        ps = s.ps
        # acquire/release, not `with`: a third less of this call's own time on CPython 3.11-3.12,
        # and map/unmap are the allocator's hot path.
        lock = ps.lock
        lock.acquire()
        try:
            if s.closed or ps.closed:
                self._open()  # raises
            # One free page-aligned slot and a recycled page: the allocator's steady state,
            # checked and done in one pass (bookkeeping is most of our cost over the driver).
            if (nbytes == s.page_size and type(offset) is int and type(nbytes) is int
                    and 0 <= offset < s.reserved_bytes and not offset % nbytes):
                first = offset // nbytes
                if first not in s.pages and ps.free:
                    s.map_one(first)
                    return
            first, n = self._pages("map", offset, nbytes)
            if n == 0:
                return
            self._require("map", first, n, mapped=False)
            ids, created = ps.acquire(n)
            try:
                s.map_slots(first, ids, new=True)
            except BaseException:
                ps.give_back(ids, created)
                raise
        finally:
            lock.release()

    def unmap(self, offset: int, nbytes: int) -> None:
        """Unmap [offset, offset+nbytes), every page of which must be mapped. Synchronises the
        device first. A page returns to the pool's free list when its last mapping goes."""
        s = self._s
        ps = s.ps
        lock = ps.lock
        lock.acquire()
        try:
            if s.closed or ps.closed:
                self._open()  # raises
            if (nbytes == s.page_size and type(offset) is int and type(nbytes) is int
                    and 0 <= offset < s.reserved_bytes and not offset % nbytes):
                first = offset // nbytes
                if first in s.pages:
                    s.unmap_one(first)
                    return
            first, n = self._pages("unmap", offset, nbytes)
            if n == 0:
                return
            self._require("unmap", first, n, mapped=True)
            s.unmap_slots(first, n)
        finally:
            lock.release()

    def alias(self, src_offset: int, dst_offset: int, nbytes: int, *, src: "VirtualArena | None" = None) -> None:
        """Map the physical pages behind [src_offset, +nbytes) again at [dst_offset, +nbytes).

        The source range must be fully mapped and the destination range fully unmapped. `src`
        names another arena of the same pool to alias from (default: this arena). Writes through
        either address are seen at both; each page stays in use until its last mapping goes.
        """
        with self._s.ps.lock:
            s = self._open()
            src = self if src is None else src
            if not isinstance(src, VirtualArena):
                raise TypeError(f"src must be a VirtualArena, got {type(src).__name__}")
            if src._s.ps is not s.ps:
                raise VmmError("alias: the source arena maps from a different page pool")
            src._open()
            sfirst, n = src._pages("alias source", src_offset, nbytes)
            dfirst, _ = self._pages("alias destination", dst_offset, nbytes)
            if n == 0:
                return
            src._require("alias source", sfirst, n, mapped=True)
            self._require("alias destination", dfirst, n, mapped=False)
            ids = list(map(src._s.pages.__getitem__, range(sfirst, sfirst + n)))
            s.map_slots(dfirst, ids, new=True)

    def is_mapped(self, offset: int, nbytes: int) -> bool:
        """Whether every page touching the byte range [offset, offset+nbytes) is mapped (any
        byte range; True for an empty one). Raises VmmError for a range outside the arena."""
        offset, nbytes = _int("offset", offset), _int("nbytes", nbytes)
        with self._s.ps.lock:
            s = self._open()
            self._check_bytes("is_mapped", offset, nbytes)
            if nbytes == 0:
                return True
            first, last = offset // s.page_size, (offset + nbytes - 1) // s.page_size
            return s.all_mapped(first, last + 1 - first)

    def _check_bytes(self, what: str, offset: int, nbytes: int) -> None:
        if offset < 0 or nbytes < 0 or offset + nbytes > self._s.reserved_bytes:
            raise VmmError(f"{what}: byte range [{offset}, {offset + nbytes}) is outside the arena's "
                           f"{self._s.reserved_bytes} reserved bytes")

    def mapped_ranges(self) -> list[tuple[int, int]]:
        """The mapped parts of the arena as (offset, nbytes), contiguous runs merged."""
        with self._s.ps.lock:
            s = self._s
            return [(f * s.page_size, n * s.page_size) for f, n in s.runs()]

    def physical_pages(self, offset: int, nbytes: int) -> list[int | None]:
        """The pool's page id behind each page touching [offset, offset+nbytes) (None where
        unmapped): equal ids at two offsets mean the same physical page (an alias)."""
        offset, nbytes = _int("offset", offset), _int("nbytes", nbytes)
        with self._s.ps.lock:
            s = self._open()
            self._check_bytes("physical_pages", offset, nbytes)
            if nbytes == 0:
                return []
            first, last = offset // s.page_size, (offset + nbytes - 1) // s.page_size
            return list(map(s.pages.get, range(first, last + 1)))

    def view(self, offset: int, shape: int | Sequence[int] | torch.Size, dtype: torch.dtype, *,
             require_mapped: bool = True) -> torch.Tensor:
        """A contiguous zero-copy tensor of `shape` and `dtype` starting at byte `offset`, on
        `arena.device`.

        `offset` must be a multiple of the dtype's size. With `require_mapped=True` (default)
        every byte must be mapped, else VmmError. `require_mapped=False` allows one view over a
        whole reserved range of which only parts are mapped (KV pools, expert stores map pages
        as they go); reading or writing an unmapped part through it is then the caller's bug.
        """
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
        shape_t = (shape,) if isinstance(shape, int) else tuple(shape)
        for d in shape_t:
            if isinstance(d, bool) or not isinstance(d, int) or d < 0:
                raise ValueError(f"shape must be non-negative ints, got {tuple(shape_t)}")
        offset = _int("offset", offset)
        itemsize = dtype.itemsize
        numel = 1
        for d in shape_t:
            numel *= d
        nbytes = numel * itemsize
        if offset % itemsize:
            raise VmmError(f"view: offset {offset} is not a multiple of the {dtype} element size {itemsize}")
        with self._s.ps.lock:
            s = self._open()
            self._check_bytes("view", offset, nbytes)
            if require_mapped and nbytes:
                first, last = offset // s.page_size, (offset + nbytes - 1) // s.page_size
                # the check in C first; the generator that names the hole only on error
                i = None if s.all_mapped(first, last + 1 - first) else s.first_not(first, last + 1 - first, True)
                if i is not None:
                    raise VmmError(f"view: bytes [{offset}, {offset + nbytes}) are not all mapped; "
                                   f"the page at offset {i * s.page_size} is not")
            if nbytes == 0:
                return torch.empty(shape_t, dtype=dtype, device=s.backend.device)
            start_mapped = offset // s.page_size in s.pages
            raw = s.backend.tensor(s.base + offset, nbytes, owner=self, start_mapped=start_mapped)
        return raw.view(dtype).view(shape_t)

    # ---- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap every page (back to the pool) and free the address range. Idempotent."""
        self._finalizer()

    def __enter__(self) -> "VirtualArena":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self._s
        return (f"<vmm.VirtualArena {s.backend.name} reserved={s.reserved_bytes} mapped={len(s.pages) * s.page_size} "
                f"page_size={s.page_size}{' closed' if s.closed else ''}>")
