"""BlockAllocator on its own: lowest id first, the top and the store's grow/shrink calls, and bad
requests that raise and change nothing."""
from __future__ import annotations

import random

import pytest

from cachepool import BlockAllocator, CacheFullError


class RecordingStore:
    """A BlockStore that backs at most `limit` blocks and records every grow and shrink."""

    def __init__(self, limit: int) -> None:
        self.limit, self.backed, self.calls = limit, 0, []

    def backed_blocks(self) -> int:
        return self.backed

    def max_backable(self) -> int:
        return self.limit

    def grow_to(self, num_blocks: int) -> None:
        if num_blocks > self.limit:
            raise CacheFullError(f"cannot back {num_blocks} blocks")
        self.calls.append(("grow", num_blocks))
        self.backed = max(self.backed, num_blocks)

    def shrink_to(self, num_blocks: int) -> None:
        self.calls.append(("shrink", num_blocks))
        self.backed = num_blocks

    def copy_block(self, src: int, dst: int) -> None:
        raise AssertionError("not used")


def _state(a: BlockAllocator, store: RecordingStore) -> tuple:
    return a.top, a.num_free, sorted(b for b in range(a.num_blocks) if a.is_free(b)), store.backed, len(store.calls)


def test_lowest_free_ids_first_against_a_reference(rng_seed):
    rnd = random.Random(rng_seed)
    n = 37
    a = BlockAllocator(n, RecordingStore(n))
    held: set[int] = set()
    for _ in range(600):
        if held and rnd.random() < 0.45:
            gone = rnd.sample(sorted(held), rnd.randint(1, len(held)))
            a.release_many(gone)
            held.difference_update(gone)
        else:
            k = rnd.randint(0, n - len(held))
            free = sorted(set(range(n)) - held)
            assert a.alloc_many(k) == free[:k]
            held.update(free[:k])
        assert a.top == (max(held) + 1 if held else 0)
        assert a.num_allocated == len(held) and a.num_free == n - len(held)
        assert [b for b in range(n) if not a.is_free(b)] == sorted(held)


def test_a_huge_id_space_costs_only_what_is_in_use():
    """A budget of tens of GB over blocks of a few dozen bytes is a billion ids: nothing may be
    built per id (the free list holds only ids returned below the top)."""
    import tracemalloc

    tracemalloc.start()
    a = BlockAllocator(10**12)
    ids = a.alloc_many(1000)
    a.release_many(ids[10:20])
    assert a.alloc_many(12) == [*range(10, 20), 1000, 1001]
    a.release_many(list(range(900, 1002)))
    assert a.top == 900 and a.num_free == 10**12 - 900
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 10 << 20


def test_store_grows_to_the_top_and_shrinks_when_the_top_empties():
    store = RecordingStore(20)
    a = BlockAllocator(20, store)
    assert a.alloc_many(7) == list(range(7))
    assert store.calls == [("grow", 7)] and a.top == 7
    a.release_many([2, 4])  # below the top: nothing to shrink
    assert store.calls == [("grow", 7)] and a.top == 7
    a.release_many([6, 5])  # 6 and 5 go, and 4 below them is already free
    assert store.calls[-1] == ("shrink", 4) and a.top == 4
    assert a.alloc_many(3) == [2, 4, 5]  # reuses the low hole first, no grow needed below backed
    assert a.top == 6


def test_failed_grow_changes_nothing():
    store = RecordingStore(5)
    a = BlockAllocator(12, store)
    a.alloc_many(4)
    a.release_many([1])
    before = _state(a, store)
    with pytest.raises(CacheFullError):
        a.alloc_many(3)  # ids 1, 4, 5: block 5 cannot be backed
    assert _state(a, store) == before
    assert a.alloc_many(2) == [1, 4]


@pytest.mark.parametrize("n", [-1, 1.0, True, None])
def test_bad_alloc_count_raises_and_changes_nothing(n):
    store = RecordingStore(8)
    a = BlockAllocator(8, store)
    a.alloc_many(3)
    before = _state(a, store)
    with pytest.raises(ValueError):
        a.alloc_many(n)
    assert _state(a, store) == before


def test_more_than_free_raises_cache_full_and_changes_nothing():
    store = RecordingStore(8)
    a = BlockAllocator(8, store)
    a.alloc_many(5)
    before = _state(a, store)
    with pytest.raises(CacheFullError):
        a.alloc_many(4)
    assert _state(a, store) == before


@pytest.mark.parametrize("bad", [[3], [9], [-1], [1, 1], [0, 7]])
def test_bad_release_raises_and_changes_nothing(bad):
    store = RecordingStore(10)
    a = BlockAllocator(10, store)
    a.alloc_many(3)
    before = _state(a, store)
    with pytest.raises(ValueError):
        a.release_many(bad)
    assert _state(a, store) == before
