"""Block manager: refcounts, prefix sharing by content and namespace, copy-on-write, LRU
eviction, exhaustion; checked against a model that stores each token's identity in its slot."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cachepool import BlockManager, CacheFullError


class FakeStore:
    """Backs blocks page by page up to a capacity and keeps one value per slot, so the test
    can read back what each sequence sees."""

    def __init__(self, num_blocks, block_size, capacity_blocks, blocks_per_page):
        self.num_blocks, self.bs = num_blocks, block_size
        self.capacity, self.bpp = capacity_blocks, blocks_per_page
        self.pages = 0
        self.slots = {}

    def backed_blocks(self):
        return min(self.pages * self.bpp, self.num_blocks)

    def max_backable(self):
        return min(self.capacity // self.bpp * self.bpp, self.num_blocks)

    def grow_to(self, n):
        if n > self.max_backable():
            raise CacheFullError("fake store full")
        self.pages = max(self.pages, -(-n // self.bpp))

    def shrink_to(self, n):
        self.pages = -(-n // self.bpp)
        for s in [s for s in self.slots if s >= self.pages * self.bpp * self.bs]:
            del self.slots[s]  # unmapped memory forgets its contents

    def copy_block(self, src, dst):
        for o in range(self.bs):
            if src * self.bs + o in self.slots:
                self.slots[dst * self.bs + o] = self.slots[src * self.bs + o]
            else:
                self.slots.pop(dst * self.bs + o, None)


def _write(store, slots, ns, tokens, start):
    for i, s in enumerate(slots):
        if s >= 0:
            store.slots[s] = (ns, tuple(tokens[:start + i + 1]))


def test_prefix_hit_same_namespace_only():
    m = BlockManager(16, 4)
    toks = list(range(10))
    assert m.allocate("a", toks, "base") == 0
    assert m.allocate("b", toks + [99], "base") == 8  # two full blocks shared
    assert m.block_table("a")[:2] == m.block_table("b")[:2]
    assert m.block_table("a")[2] != m.block_table("b")[2]  # partial blocks are never shared
    assert m.slot_mapping("b")[:8] == [-1] * 8
    # the same tokens under another namespace share nothing (vLLM #3264 / #30931)
    assert m.allocate("c", toks, "agent1") == 0
    assert not set(m.block_table("c")) & set(m.block_table("a"))
    assert m.refcount(m.block_table("a")[0]) == 2


def test_full_hit_and_lru_eviction_order():
    m = BlockManager(4, 2)
    m.allocate("a", [1, 2, 3, 4], "x")
    table = m.block_table("a")
    m.free("a")
    assert m.num_cached_blocks == 2 and m.num_used_blocks == 0
    assert m.allocate("b", [1, 2, 3, 4], "x") == 4  # everything stored already
    assert m.block_table("b") == table
    m.free("b")
    # freeing is tail first, so the tail block is evicted before the head
    m.allocate("c", [7, 8, 9, 10, 11, 12], "x")  # needs 3: 2 free + evicts the tail
    assert table[0] not in m.block_table("c") and table[1] in m.block_table("c")
    assert m.can_allocate([1, 2], "x")  # the head is still cached: a hit, no new block
    assert m.can_allocate([5, 6], "x")  # by evicting the head
    assert not m.can_allocate([5, 6, 7], "x")


def test_copy_on_write_of_shared_partial_block():
    store = FakeStore(8, 4, 8, 1)
    m = BlockManager(8, 4, store=store)
    m.allocate("a", [1, 2, 3, 4, 5, 6], "n")
    _write(store, m.slot_mapping("a"), "n", [1, 2, 3, 4, 5, 6], 0)
    m.fork("a", "b")
    assert m.block_table("a") == m.block_table("b")
    sa = m.append_slot("a", 7)
    sb = m.append_slot("b", 8)
    ta, tb = m.block_table("a"), m.block_table("b")
    assert ta[0] == tb[0] and ta[1] != tb[1]
    assert sa // 4 != sb // 4
    # the copy carried the two tokens written before the fork
    for o in range(2):
        assert store.slots[ta[1] * 4 + o] == store.slots[tb[1] * 4 + o]


def test_exhaustion_raises_and_changes_nothing():
    m = BlockManager(3, 2)
    m.allocate("a", [1, 2, 3], "n")
    before = (m.block_table("a"), m.num_free_blocks, m.num_used_blocks)
    assert not m.can_allocate([5, 6, 7], "n")
    with pytest.raises(CacheFullError):
        m.allocate("b", [5, 6, 7], "n")
    assert "b" not in m and (m.block_table("a"), m.num_free_blocks, m.num_used_blocks) == before
    m.append_slots("a", [4])
    with pytest.raises(CacheFullError):
        m.append_slots("a", [5, 6, 7])
    assert m.num_tokens("a") == 4 and m.num_free_blocks == 1


def test_bad_requests():
    m = BlockManager(4, 2)
    with pytest.raises(TypeError):
        m.allocate("a", [1, 2], namespace=3)
    with pytest.raises(TypeError):
        m.allocate("a", [1.5])
    m.allocate("a", [1])
    with pytest.raises(ValueError):
        m.allocate("a", [1])
    with pytest.raises(KeyError):
        m.free("zz")
    with pytest.raises(ValueError):
        m.slot_mapping("a", 0, 5)
    with pytest.raises(ValueError):
        BlockManager(0, 4)


NUM_BLOCKS, BS = 12, 3
tokens_st = st.lists(st.integers(0, 2), min_size=0, max_size=10)


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.store = FakeStore(NUM_BLOCKS, BS, capacity_blocks=10, blocks_per_page=2)
        self.m = BlockManager(NUM_BLOCKS, BS, store=self.store)
        self.seqs = {}  # id -> (namespace, tokens)
        self.next_id = 0

    def _new_id(self):
        self.next_id += 1
        return self.next_id

    def _snapshot(self):
        return ({k: self.m.block_table(k) for k in self.seqs}, self.m.num_free_blocks,
                self.m.num_cached_blocks, self.m.num_used_blocks, self.m.top)

    @rule(ns=st.sampled_from(["a", "b"]), extra=tokens_st, base=st.integers(0, 100), cut=st.integers(0, 12))
    def allocate(self, ns, extra, base, cut):
        prefix = []
        if self.seqs and base % 2:  # often reuse a live sequence's prefix, to provoke sharing
            prefix = list(self.seqs)[base % len(self.seqs)]
            prefix = self.seqs[prefix][1][:cut]
        toks = prefix + extra
        sid = self._new_id()
        ok = self.m.can_allocate(toks, ns)
        before = self._snapshot()
        if not ok:
            event("allocate: full")
            with pytest.raises(CacheFullError):
                self.m.allocate(sid, toks, ns)
            assert self._snapshot() == before
            return
        stored = self.m.allocate(sid, toks, ns)
        assert stored % BS == 0 and stored <= len(toks)
        event("allocate: prefix hit" if stored else "allocate: no hit")
        _write(self.store, self.m.slot_mapping(sid), ns, toks, 0)
        self.seqs[sid] = (ns, toks)

    @precondition(lambda self: self.seqs)
    @rule(pick=st.integers(0, 100), extra=st.lists(st.integers(0, 2), min_size=1, max_size=5))
    def append(self, pick, extra):
        sid = list(self.seqs)[pick % len(self.seqs)]
        ns, toks = self.seqs[sid]
        before = self._snapshot()
        if not self.m.can_append(sid, len(extra)):
            event("append: full")
            with pytest.raises(CacheFullError):
                self.m.append_slots(sid, extra)
            assert self._snapshot() == before
            return
        shared_tail = len(toks) % BS and self.m.refcount(self.m.block_table(sid)[-1]) > 1
        event("append: copy-on-write" if shared_tail else "append: plain")
        slots = self.m.append_slots(sid, extra)
        # a slot handed out for writing is never shared with anyone
        for s in slots:
            assert self.m.refcount(s // BS) == 1
        new = toks + extra
        _write(self.store, slots, ns, new, len(toks))
        self.seqs[sid] = (ns, new)

    @precondition(lambda self: self.seqs)
    @rule(pick=st.integers(0, 100))
    def fork(self, pick):
        src = list(self.seqs)[pick % len(self.seqs)]
        dst = self._new_id()
        self.m.fork(src, dst)
        self.seqs[dst] = (self.seqs[src][0], list(self.seqs[src][1]))

    @precondition(lambda self: self.seqs)
    @rule(pick=st.integers(0, 100))
    def free(self, pick):
        sid = list(self.seqs)[pick % len(self.seqs)]
        self.m.free(sid)
        del self.seqs[sid]

    @rule(n=st.integers(0, 4))
    def evict(self, n):
        cached = self.m.num_cached_blocks
        assert self.m.evict(n) == min(n, cached)

    @invariant()
    def refcounts_match_owners(self):
        owners = {}
        for sid in self.seqs:
            table = self.m.block_table(sid)
            assert len(table) == len(set(table)) == -(-len(self.seqs[sid][1]) // BS)
            for b in table:
                owners[b] = owners.get(b, 0) + 1
        for b in range(NUM_BLOCKS):
            assert self.m.refcount(b) == owners.get(b, 0)
        assert self.m.num_used_blocks == len(owners)
        assert self.m.num_used_blocks + self.m.num_cached_blocks + self.m.num_free_blocks == NUM_BLOCKS

    @invariant()
    def every_sequence_reads_its_own_tokens(self):
        # Shared blocks are only ever shared by identical (namespace, prefix) contents.
        for sid, (ns, toks) in self.seqs.items():
            table = self.m.block_table(sid)
            for p in range(len(toks)):
                slot = table[p // BS] * BS + p % BS
                assert self.store.slots.get(slot) == (ns, tuple(toks[:p + 1])), (sid, p)

    @invariant()
    def backing_follows_top(self):
        assert self.store.backed_blocks() >= self.m.top
        assert self.store.pages == -(-self.m.top // 2)

    def teardown(self):
        for sid in list(self.seqs):
            self.m.free(sid)
        self.m.evict()
        # every freed block is reusable and the store has given back all its pages
        assert self.m.num_free_blocks == NUM_BLOCKS and self.m.top == 0 and self.store.pages == 0
        assert self.m.can_allocate(list(range(10 * BS)), "z")  # the store's capacity
        assert not self.m.can_allocate(list(range(10 * BS + 1)), "z")


BlockManagerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestBlockManagerMachine = BlockManagerMachine.TestCase


def test_chain_hash_is_the_public_block_hash():
    from array import array

    from cachepool import block_hash
    m = BlockManager(8, 3)
    h1 = block_hash(b"\0" * 16, [1, 2, 3], "ns")
    assert m._hashes(array("q", [1, 2, 3, 4, 5, 6, 7]), "ns") == [h1, block_hash(h1, [4, 5, 6], "ns")]
    assert block_hash(b"\0" * 16, [1, 2, 3], "ns2") != h1
