"""Refcounted, content-addressed blocks of a paged cache (one manager per pool).

A sequence owns a block table: its tokens `[i*block_size, (i+1)*block_size)` live in block
`table[i]`. A full block is named by a content hash of (parent block's hash, its token ids,
the sequence's namespace), so a later sequence with the same prefix *in the same namespace*
reuses it instead of storing it again. The namespace says whose K/V these are (base model, an
agent's adapter, an A matrix): blocks of different namespaces never match even when their
tokens do (vLLM #3264 / #30931 were that bug). A forked sequence shares every block, the
partial last one included; writing into a shared partial block copies it first.

Freed full blocks stay cached (their contents may be hit again) and are evicted, least
recently freed first, only when a request cannot be served from free memory, or, when the
caller asks (`evict_first`: all that save pages, or at most a count), before fresh pages are
mapped: pools drawing on one page pool need that when the pages one would map are the pages the
other needs. Every method
checks its request completely before changing anything, so a CacheFullError leaves the
manager exactly as it was.

Content is registered the moment a block's tokens are known, before its K/V is written. That
is safe because an engine writes all new K/V of a step before any attention of that step reads.
"""
from __future__ import annotations

import hashlib
import operator
import struct
import sys
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Sequence

from .allocator import BlockAllocator, BlockStore
from .errors import CacheFullError

_ROOT = b"\x00" * 16


def _ns_bytes(namespace: str) -> bytes:
    ns = namespace.encode()
    return struct.pack("<I", len(ns)) + ns


def block_hash(parent: bytes, token_ids: Sequence[int], namespace: str) -> bytes:
    """Content hash of one full block: 128-bit BLAKE2b of parent hash, namespace, token ids."""
    toks = token_ids if isinstance(token_ids, array) else array("q", token_ids)
    return hashlib.blake2b(parent + _ns_bytes(namespace) + toks.tobytes(), digest_size=16).digest()


@dataclass
class _Seq:
    namespace: str
    tokens: array  # int64 token ids
    blocks: list[int]
    hashes: list[bytes] = field(default_factory=list)  # one per full block
    num_stored: int = 0  # leading tokens already stored when allocated (not to be written)


@dataclass(frozen=True)
class SeqCheckpoint:
    """A sequence's state before an `allocate` or `append_slots` (`BlockManager.checkpoint`)."""

    seq_id: Hashable
    live: bool
    num_tokens: int = 0
    num_blocks: int = 0
    last_block: int = -1  # an append may replace only this one (copy-on-write), never those before
    num_hashes: int = 0


def _evict_cap(evict_first: bool | int) -> int:
    """Cached blocks a request may evict before it maps pages: none (False), as many as save
    pages (True), or at most `n` (an int)."""
    if isinstance(evict_first, bool):
        return sys.maxsize if evict_first else 0
    try:
        n = operator.index(evict_first)  # ints, numpy's included
    except TypeError:
        n = -1
    if n < 0:
        raise ValueError(f"evict_first must be a bool or an int >= 0, got {evict_first!r}")
    return n


class BlockManager:
    """Blocks of one pool: allocation, prefix sharing, copy-on-write, LRU eviction.

    `store` backs the blocks (a pool's paged tensors; None: an unbounded store, for
    tests and accounting). Sequence ids are any hashable, unique among live sequences.
    """

    def __init__(self, num_blocks: int, block_size: int, *, store: BlockStore | None = None,
                 prefix_caching: bool = True) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._alloc = BlockAllocator(num_blocks, store)
        self.num_blocks = num_blocks
        self._ref: dict[int, int] = {}  # references of every block in use (O(in use), not O(num_blocks))
        self._hash_of: dict[int, bytes] = {}  # registered block -> content hash
        self._by_hash: dict[bytes, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self._seqs: dict[Hashable, _Seq] = {}
        self._num_referenced = 0

    # ---------------------------------------------------------------- counters
    @property
    def store(self) -> BlockStore:
        return self._alloc.store

    @property
    def num_free_blocks(self) -> int:
        """Blocks holding nothing."""
        return self._alloc.num_free

    @property
    def num_cached_blocks(self) -> int:
        """Unreferenced blocks kept for their contents (evictable)."""
        return len(self._lru)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one live sequence."""
        return self._num_referenced

    @property
    def top(self) -> int:
        """1 + the highest block id holding something: blocks below must stay backed."""
        return self._alloc.top

    def num_available(self) -> int:
        """Blocks a request could get now: free (backed or backable) plus evictable."""
        return self._alloc.num_obtainable() + len(self._lru)

    def refcount(self, block: int) -> int:
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} out of range [0, {self.num_blocks})")
        return self._ref.get(block, 0)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def seq_ids(self) -> list[Hashable]:
        return list(self._seqs)

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self._get(seq_id).blocks)

    def num_tokens(self, seq_id: Hashable) -> int:
        return len(self._get(seq_id).tokens)

    def token_ids(self, seq_id: Hashable) -> list[int]:
        return list(self._get(seq_id).tokens)

    def namespace(self, seq_id: Hashable) -> str:
        return self._get(seq_id).namespace

    def slot_mapping(self, seq_id: Hashable, start: int = 0, end: int | None = None) -> list[int]:
        """Flat cache slots (`block * block_size + offset`) of positions `[start, end)`.

        Positions that were already stored when the sequence was allocated (a prefix hit,
        possibly shared with others) map to -1: write kernels skip them.
        """
        s = self._get(seq_id)
        n = len(s.tokens)
        end = n if end is None else end
        if not 0 <= start <= end <= n:
            raise ValueError(f"range [{start}, {end}) outside the sequence's {n} tokens")
        bs = self.block_size
        return [-1 if p < s.num_stored else s.blocks[p // bs] * bs + p % bs for p in range(start, end)]

    # ---------------------------------------------------------------- requests
    def _get(self, seq_id: Hashable) -> _Seq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"no live sequence {seq_id!r}") from None

    def _hashes(self, tokens: array, namespace: str, parent: bytes = _ROOT,
                first_block: int = 0) -> list[bytes]:
        out: list[bytes] = []
        if not self.prefix_caching:
            return out
        # Same bytes as block_hash, without re-encoding the namespace per block.
        step = self.block_size * tokens.itemsize
        buf, ns, blake = tokens.tobytes(), _ns_bytes(namespace), hashlib.blake2b
        for i in range(first_block, len(tokens) // self.block_size):
            parent = blake(parent + ns + buf[i * step:(i + 1) * step], digest_size=16).digest()
            out.append(parent)
        return out

    def _prefix_hits(self, hashes: list[bytes]) -> list[int]:
        hits = []
        if self.prefix_caching:
            for h in hashes:
                b = self._by_hash.get(h)
                if b is None:
                    break
                hits.append(b)
        return hits

    @staticmethod
    def _check_tokens(token_ids: Iterable[int]) -> array:
        try:
            return array("q", token_ids)  # rejects floats, strings, None: TypeError
        except TypeError as e:
            raise TypeError(f"token ids must be ints: {e}") from None
        except OverflowError as e:
            raise ValueError(f"token ids must fit in int64: {e}") from None

    @staticmethod
    def _check_namespace(namespace: str) -> None:
        if not isinstance(namespace, str):
            raise TypeError(f"namespace must be a str, got {type(namespace).__name__}")

    def _plan(self, tokens: array, namespace: str) -> tuple[list[bytes], list[int], int]:
        hashes = self._hashes(tokens, namespace)
        hits = self._prefix_hits(hashes)
        need = -(-len(tokens) // self.block_size) - len(hits)
        return hashes, hits, need

    def _spare(self, reclaimed: Iterable[int] = ()) -> int:
        # Hits sitting in the LRU become referenced, so they are no longer evictable.
        return len(self._lru) - sum(1 for b in set(reclaimed) if b not in self._ref)

    def _can_take(self, need: int, reclaimed: Iterable[int] = ()) -> bool:
        spare = self._spare(reclaimed)
        return need <= self._alloc.num_obtainable(enough=need - spare) + spare

    def _from_allocator(self, n: int, spare: int, cap: int) -> int:
        """How many of `n` new blocks `_take` gets from the allocator (mapping pages where they
        are not backed); it evicts the rest of `spare` cached blocks, up to `cap` of them
        (`_evict_cap`) before mapping. One answer for `_take` and `_pages_to_take`, so the page
        prediction is what the request then does."""
        # Free blocks already backed cost no page, so they are used before any cached block;
        # past the cap the allocator maps, and evicts only what it cannot map.
        first = min(cap, spare, max(0, n - self._alloc.num_free_backed())) if cap else 0
        return min(n - first, self._alloc.num_obtainable(enough=n - first))

    def can_allocate(self, token_ids: Sequence[int], namespace: str = "") -> bool:
        """Whether `allocate` of these tokens would succeed now (prefix hits counted)."""
        self._check_namespace(namespace)
        _, hits, need = self._plan(self._check_tokens(token_ids), namespace)
        return self._can_take(need, hits)

    def _pages_to_take(self, need: int, reclaimed: Iterable[int] = (), evict_first: bool | int = False) -> int:
        # only evicting first reads how many cached blocks there are to evict
        cap = _evict_cap(evict_first)
        spare = self._spare(reclaimed) if cap else 0
        return self._alloc.pages_to_alloc(self._from_allocator(need, spare, cap))

    def pages_to_allocate(self, token_ids: Sequence[int], namespace: str = "", *,
                          evict_first: bool | int = False) -> int:
        """Physical pages `allocate(..., token_ids, namespace, evict_first=evict_first)` would
        map now: 0 when it fits in backed blocks; by default it maps what it can before evicting
        cached blocks, with `evict_first` it evicts them before mapping (an int: at most that
        many, mapping for the rest). Never more with a larger `evict_first`. Assumes it can
        succeed."""
        self._check_namespace(namespace)
        _, hits, need = self._plan(self._check_tokens(token_ids), namespace)
        return self._pages_to_take(need, hits, evict_first)

    def pages_to_append(self, seq_id: Hashable, num_tokens: int = 1, *, evict_first: bool | int = False) -> int:
        """Physical pages `append_slots` of `num_tokens` tokens (with `evict_first`) would map now."""
        return self._pages_to_take(self._append_need(self._get(seq_id), num_tokens), evict_first=evict_first)

    def _pop_lru(self, n: int) -> list[int]:
        """Evict the `n` least recently freed cached blocks; their ids, still allocated."""
        out = []
        for _ in range(n):
            b, _ = self._lru.popitem(last=False)
            del self._by_hash[self._hash_of.pop(b)]
            out.append(b)
        return out

    def _take(self, n: int, *, evict_first: bool | int = False) -> list[int]:
        """n blocks for new contents: free ones first (lowest id, mapping pages if needed), then
        evict cached ones. With `evict_first`, cached blocks (all useful ones, or at most an
        int's worth) are evicted before any page is mapped (free blocks already backed still
        come first)."""
        ids = self._alloc.alloc_many(self._from_allocator(n, len(self._lru), _evict_cap(evict_first)))
        if n - len(ids) > len(self._lru):  # checked before any eviction: a refusal evicts nothing
            self._alloc.release_many(ids)
            raise CacheFullError(f"asked for {n} blocks, only {len(ids) + len(self._lru)} available")
        return ids + self._pop_lru(n - len(ids))

    def _ref_inc(self, b: int) -> None:
        n = self._ref.get(b, 0)
        if n == 0:
            self._lru.pop(b, None)
            self._num_referenced += 1
        self._ref[b] = n + 1

    def _ref_dec(self, b: int, to_release: list[int] | None = None) -> None:
        """Drop a reference; an unreferenced block is cached if registered, else released
        (now, or appended to `to_release` for the caller to release in one go)."""
        n = self._ref[b] - 1
        if n:
            self._ref[b] = n
        else:
            del self._ref[b]
            self._num_referenced -= 1
            if b in self._hash_of:
                self._lru[b] = None
            elif to_release is None:
                self._alloc.release(b)
            else:
                to_release.append(b)

    def _register(self, b: int, h: bytes) -> None:
        if self.prefix_caching and h not in self._by_hash and b not in self._hash_of:
            self._by_hash[h] = b
            self._hash_of[b] = h

    def allocate(self, seq_id: Hashable, token_ids: Sequence[int], namespace: str = "", *,
                 evict_first: bool | int = False) -> int:
        """Give a new sequence blocks for `token_ids`; return how many leading tokens are
        already stored (prefix hits in this namespace: a multiple of block_size, possibly all
        of them). Those positions map to slot -1; the caller computes and writes the rest.
        `evict_first`: evict cached blocks before mapping fresh pages (see `pages_to_allocate`).
        Raises CacheFullError (nothing changed) when the blocks are not available."""
        self._check_namespace(namespace)
        _evict_cap(evict_first)
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} is already allocated")
        tokens = self._check_tokens(token_ids)
        hashes, hits, need = self._plan(tokens, namespace)
        if not self._can_take(need, hits):
            raise CacheFullError(f"sequence {seq_id!r} needs {need} new blocks, "
                                 f"{self.num_available()} available")
        for b in hits:
            self._ref_inc(b)
        try:
            new = self._take(need, evict_first=evict_first)
        except BaseException:
            for b in reversed(hits):
                self._ref_dec(b)
            raise
        for b in new:
            self._ref_inc(b)
        blocks = hits + new
        for i in range(len(hits), len(hashes)):
            self._register(blocks[i], hashes[i])
        num_stored = len(hits) * self.block_size
        self._seqs[seq_id] = _Seq(namespace, tokens, blocks, hashes, num_stored)
        return num_stored

    def _append_need(self, s: _Seq, n: int) -> int:
        if n == 0:
            return 0
        bs = self.block_size
        pos = len(s.tokens)
        new_blocks = -(-(pos + n) // bs) - -(-pos // bs)
        cow = pos % bs != 0 and self._ref[s.blocks[-1]] > 1
        return new_blocks + int(cow)

    def can_append(self, seq_id: Hashable, num_tokens: int = 1) -> bool:
        """Whether `append_slots` of `num_tokens` tokens would succeed now."""
        return self._can_take(self._append_need(self._get(seq_id), num_tokens))

    def append_slots(self, seq_id: Hashable, token_ids: Sequence[int], *,
                     evict_first: bool | int = False) -> list[int]:
        """Extend a sequence by `token_ids`; return their slots (to write their K/V into).
        A shared partial last block is copied first (copy-on-write). `evict_first`: evict
        cached blocks before mapping fresh pages (see `pages_to_append`)."""
        s = self._get(seq_id)
        tokens = self._check_tokens(token_ids)
        _evict_cap(evict_first)
        need = self._append_need(s, len(tokens))
        if not self._can_take(need):
            raise CacheFullError(f"sequence {seq_id!r} needs {need} new blocks, "
                                 f"{self.num_available()} available")
        if not tokens:
            return []
        new = self._take(need, evict_first=evict_first)
        for b in new:
            self._ref_inc(b)
        bs = self.block_size
        pos = len(s.tokens)
        if pos % bs and self._ref[s.blocks[-1]] > 1:
            old, fresh = s.blocks[-1], new.pop(0)
            try:
                self.store.copy_block(old, fresh)
            except BaseException:  # a device error: give the blocks back (cached blocks evicted for them stay evicted)
                released: list[int] = []
                for b in [fresh] + new:
                    self._ref_dec(b, released)
                self._alloc.release_many(released)
                raise
            s.blocks[-1] = fresh
            self._ref_dec(old)
        s.blocks.extend(new)
        s.tokens.extend(tokens)
        parent = s.hashes[-1] if s.hashes else _ROOT
        for i, h in enumerate(self._hashes(s.tokens, s.namespace, parent, len(s.hashes)),
                              start=len(s.hashes)):
            s.hashes.append(h)
            self._register(s.blocks[i], h)
        return [s.blocks[p // bs] * bs + p % bs for p in range(pos, pos + len(tokens))]

    def append_slot(self, seq_id: Hashable, token_id: int) -> int:
        """`append_slots` for one token."""
        return self.append_slots(seq_id, [token_id])[0]

    def fork(self, src_id: Hashable, dst_id: Hashable) -> None:
        """A new sequence sharing every block of `src_id` (its partial last block included)."""
        s = self._get(src_id)
        if dst_id in self._seqs:
            raise ValueError(f"sequence {dst_id!r} is already allocated")
        for b in s.blocks:
            self._ref_inc(b)
        # Everything up to the fork is stored already, so none of it is written through dst.
        self._seqs[dst_id] = _Seq(s.namespace, array("q", s.tokens), list(s.blocks), list(s.hashes),
                                  len(s.tokens))

    def free(self, seq_id: Hashable) -> None:
        """Drop a sequence. Its full blocks stay cached until evicted; others are freed."""
        s = self._seqs.pop(seq_id, None)
        if s is None:
            raise KeyError(f"no live sequence {seq_id!r}")
        # Tail first, so the LRU evicts a sequence's tail before its (more shareable) head.
        released: list[int] = []
        for b in reversed(s.blocks):
            self._ref_dec(b, released)
        self._alloc.release_many(released)

    def checkpoint(self, seq_id: Hashable) -> SeqCheckpoint:
        """What `rollback` needs to undo the next `allocate` of `seq_id` (not live now) or the
        next `append_slots` to it (live)."""
        s = self._seqs.get(seq_id)
        if s is None:
            return SeqCheckpoint(seq_id, False)
        return SeqCheckpoint(seq_id, True, len(s.tokens), len(s.blocks), s.blocks[-1] if s.blocks else -1,
                             len(s.hashes))

    def _forget(self, s: _Seq, first: int) -> None:
        """Unregister the contents this sequence registered for its blocks from `first` on."""
        for i in range(first, len(s.hashes)):
            b, h = s.blocks[i], s.hashes[i]
            if self._hash_of.get(b) == h:
                del self._hash_of[b]
                del self._by_hash[h]

    def rollback(self, cp: SeqCheckpoint) -> None:
        """Undo the `allocate` or `append_slots` made since `cp` was taken, before any of the new
        tokens' K/V was written (a pool sharing the request failed after this one succeeded).
        The blocks it took are free again and the contents it registered are forgotten: they
        were never written, so no later request may hit them. A copy-on-write is undone (the
        sequence shares the block it copied again). Cached blocks it evicted stay evicted."""
        s = self._seqs.get(cp.seq_id)
        if not cp.live:
            if s is None:  # the allocate never happened
                return
            self._forget(s, s.num_stored // self.block_size)  # prefix hits stay: they were written
            self.free(cp.seq_id)
            return
        if s is None:
            raise KeyError(f"no live sequence {cp.seq_id!r}")
        self._forget(s, cp.num_hashes)
        keep = cp.num_blocks
        released: list[int] = []
        if keep and s.blocks[keep - 1] != cp.last_block:  # a copy-on-write: share the original again
            self._ref_inc(cp.last_block)
            self._ref_dec(s.blocks[keep - 1], released)
            s.blocks[keep - 1] = cp.last_block
        for b in reversed(s.blocks[keep:]):
            self._ref_dec(b, released)
        self._alloc.release_many(released)
        del s.blocks[keep:]
        del s.tokens[cp.num_tokens:]
        del s.hashes[cp.num_hashes:]

    def evict(self, max_blocks: int | None = None) -> int:
        """Drop up to `max_blocks` cached unreferenced blocks (all when None), oldest first;
        return how many were dropped."""
        n = len(self._lru) if max_blocks is None else min(max(0, max_blocks), len(self._lru))
        dropped = self._pop_lru(n)
        self._alloc.release_many(dropped)
        return len(dropped)
