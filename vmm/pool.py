"""PagePool: the physical pages (driver handles) arenas map, with a free list and a capacity.

Pages are refcounted by their mappings: an arena takes a page with refcount 1, an alias adds one,
and the page goes back to the free list when its last mapping is unmapped. The free list is
always used before the driver creates a page, because creating (and releasing) costs far more
than mapping a recycled page. One re-entrant lock per pool serialises every operation on the
pool and on the arenas that map from it.
"""
from __future__ import annotations

import threading
import weakref
from typing import Any

from .backend import Backend
from .errors import OutOfMemoryError, VmmError

_COUNTERS = ("driver_creates", "driver_releases", "driver_maps", "driver_unmaps", "driver_set_access")


class _Counters:
    """Driver calls made so far. Slots, not a dict: bumped on every map and unmap, where an
    attribute costs half a dict item."""

    __slots__ = _COUNTERS

    def __init__(self) -> None:
        for name in _COUNTERS:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in _COUNTERS}


def _positive_int(name: str, value: object, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


class _PoolState:
    """Everything the pool owns, kept apart from `PagePool` so a finalizer can release it
    without holding the pool object alive."""

    def __init__(self, backend: Backend, page_size: int, capacity_pages: int) -> None:
        self.backend = backend
        self.page_size = page_size
        self.capacity_pages = capacity_pages
        self.lock = threading.RLock()
        self.handles: dict[int, Any] = {}   # page id -> driver handle, every live page
        self.refs: dict[int, int] = {}      # page id -> number of mappings, pages in use only
        self.free: list[int] = []           # page ids with no mapping (LIFO: hottest first)
        self.next_id = 0
        self.counters = _Counters()
        self.bytes_reserved = 0
        self.bytes_mapped = 0
        self.arenas = 0
        self.closed = False

    def create_page(self) -> int:
        handle = self.backend.create(self.page_size)
        self.counters.driver_creates += 1
        pid = self.next_id
        self.next_id += 1
        self.handles[pid] = handle
        return pid

    def release_page(self, pid: int) -> None:
        self.backend.release(self.handles[pid])
        self.counters.driver_releases += 1
        del self.handles[pid]

    def acquire(self, n: int) -> tuple[list[int], list[int]]:
        """Take `n` pages (free list first, then new ones) without marking them in use.
        Returns (page ids, the ids among them created by this call) for `give_back`."""
        free_list = self.free
        free = len(free_list)
        if n <= free:  # recycled pages only: the common case
            ids = free_list[free - n:]
            del free_list[free - n:]
            ids.reverse()
            return ids, []
        creatable = self.capacity_pages - len(self.handles)
        if n > free + creatable:
            raise OutOfMemoryError(
                f"page pool exhausted: need {n} pages of {self.page_size} bytes, have {free} free and "
                f"room to create {creatable} more (capacity {self.capacity_pages} pages = "
                f"{self.capacity_pages * self.page_size} bytes, {len(self.refs)} in use)")
        ids = free_list[::-1]
        free_list.clear()
        created: list[int] = []
        try:
            while len(ids) + len(created) < n:
                created.append(self.create_page())
        except BaseException:
            self.give_back(ids + created, created)
            raise
        return ids + created, created

    def give_back(self, ids: list[int], created: list[int]) -> None:
        """Undo `acquire`: release the pages it created, return the rest to the free list."""
        made = set(created)
        for pid in created:
            try:
                self.release_page(pid)
            except Exception:  # keep it as a free page rather than leak the handle
                self.free.append(pid)
        self.free.extend(pid for pid in reversed(ids) if pid not in made)

    def incref(self, ids: list[int]) -> None:
        refs = self.refs
        for pid in ids:
            refs[pid] = refs.get(pid, 0) + 1

    def decref(self, ids: list[int]) -> None:
        for pid in ids:
            r = self.refs[pid] - 1
            if r:
                self.refs[pid] = r
            else:
                del self.refs[pid]
                self.free.append(pid)

    def release_all(self) -> None:
        """Finalizer: give every handle back to the driver. Never raises (runs at GC/exit)."""
        with self.lock:
            self.closed = True
            for pid in list(self.handles):
                try:
                    self.release_page(pid)
                except Exception:
                    self.handles.pop(pid, None)
            self.free.clear()
            self.refs.clear()


class PagePool:
    """Physical pages of `page_size` bytes from one backend, up to `capacity_bytes`.

    Args:
        backend: from `vmm.get_backend()`.
        capacity_bytes: the most physical memory the pool may hold (free + in use); rounded down
            to whole pages, and at least one page.
        page_size: bytes per page; a multiple of `backend.granularity` (default: the granularity).
        prealloc_pages: pages created up front into the free list (at most the capacity).

    Pages come back to the free list when unmapped and are reused before any new driver create;
    `trim()` gives free pages back to the driver. Pages hold whatever was last written to them:
    mapped memory is uninitialised.
    """

    def __init__(self, backend: Backend, capacity_bytes: int, page_size: int | None = None,
                 prealloc_pages: int = 0) -> None:
        if not isinstance(backend, Backend):
            raise TypeError(f"backend must come from vmm.get_backend(), got {type(backend).__name__}")
        capacity_bytes = _positive_int("capacity_bytes", capacity_bytes)
        if page_size is None:
            page_size = backend.granularity
        page_size = _positive_int("page_size", page_size)
        if page_size % backend.granularity:
            raise ValueError(f"page_size {page_size} is not a multiple of the {backend.name} "
                             f"backend's granularity {backend.granularity}")
        capacity_pages = capacity_bytes // page_size
        if capacity_pages == 0:
            raise ValueError(f"capacity_bytes {capacity_bytes} is less than one page ({page_size} bytes)")
        prealloc_pages = _positive_int("prealloc_pages", prealloc_pages, allow_zero=True)
        if prealloc_pages > capacity_pages:
            raise ValueError(f"prealloc_pages {prealloc_pages} exceeds the capacity of {capacity_pages} pages")
        self._state = _PoolState(backend, page_size, capacity_pages)
        self._finalizer = weakref.finalize(self, _PoolState.release_all, self._state)
        with self._state.lock:
            try:
                for _ in range(prealloc_pages):
                    self._state.free.append(self._state.create_page())
            except BaseException:
                self._finalizer()
                raise

    @property
    def backend(self) -> Backend:
        return self._state.backend

    @property
    def page_size(self) -> int:
        return self._state.page_size

    @property
    def capacity_bytes(self) -> int:
        return self._state.capacity_pages * self._state.page_size

    @property
    def device(self):
        return self._state.backend.device

    @property
    def closed(self) -> bool:
        return self._state.closed

    def stats(self) -> dict:
        """Counters in the spirit of torch.cuda.memory_stats (a snapshot, taken under the lock).

        page_size, capacity_bytes; pages_total (created and not released = free + in use),
        pages_free, pages_in_use, bytes_in_use (physical), bytes_mapped (virtual, aliases counted
        at every address), bytes_reserved, arenas (open arenas); driver_creates, driver_releases,
        driver_maps, driver_unmaps, driver_set_access (driver calls made so far)."""
        s = self._state
        with s.lock:
            return {
                "backend": s.backend.name,
                "page_size": s.page_size,
                "capacity_bytes": s.capacity_pages * s.page_size,
                "pages_total": len(s.handles),
                "pages_free": len(s.free),
                "pages_in_use": len(s.refs),
                "bytes_in_use": len(s.refs) * s.page_size,
                "bytes_mapped": s.bytes_mapped,
                "bytes_reserved": s.bytes_reserved,
                "arenas": s.arenas,
                **s.counters.as_dict(),
            }

    def trim(self) -> int:
        """Release every free page back to the driver; returns how many were released."""
        s = self._state
        with s.lock:
            n = 0
            while s.free:
                s.release_page(s.free[-1])
                s.free.pop()
                n += 1
            return n

    def close(self) -> None:
        """Release every page. Raises VmmError while any page is still mapped (close or unmap
        the arenas first). Idempotent; garbage collection and interpreter exit do this too."""
        s = self._state
        with s.lock:
            if s.closed:
                return
            if s.refs:
                raise VmmError(f"cannot close the pool: {len(s.refs)} pages are still mapped "
                               f"by {s.arenas} open arenas")
            self._finalizer()

    def __enter__(self) -> "PagePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self._state
        return (f"<vmm.PagePool {s.backend.name} page_size={s.page_size} capacity={s.capacity_pages} pages "
                f"in_use={len(s.refs)} free={len(s.free)}{' closed' if s.closed else ''}>")
