"""The four cache modes of LRAgent as one setting for a multi-agent session.

Agents that extend one trajectory differ only by their LoRA adapters. A mode decides what each
agent stores and reads, by choosing the namespace its sequences use in each pool; sharing then
falls out of content addressing (same tokens + same namespace = same blocks):

| mode             | base K/V pool (V without the adapter*) | low-rank pool (x·A_v)         |
|------------------|----------------------------------------|-------------------------------|
| `non_shared`     | private per agent (*V with its adapter) | unused                        |
| `base_shared`    | one namespace for all agents           | private per agent             |
| `base_lr_shared` | one namespace for all agents           | one namespace (needs one A)   |
| `full_shared`    | everyone uses agent 0's (*with adapter) | unused                        |

So for K agents on one trajectory of T tokens the blocks referenced are, with n = T // block
and p = 1 if T % block else 0 (the partial last block is each sequence's own):
non_shared K·(n+p) base; full_shared n + K·p base; base_shared n + K·p base and K·(n+p)
low-rank; base_lr_shared n + K·p base and n + K·p low-rank.

The two pools may draw on one `vmm.PagePool`: every request is then checked against both at
once (what the first pool maps, the second cannot), so a request either succeeds in both pools
or raises CacheFullError having changed neither (a driver that refuses a page the count allowed
is the one exception: the base pool's part is then undone, though cached blocks it evicted stay
evicted). A pool keeps its cached blocks while it can map fresh pages, but when the pages the
base pool would map are the ones the low-rank pool needs, the base pool evicts the fewest of its
own cached blocks that leave the low-rank pool room instead. Pools do not evict each other's cached
blocks; `trim()` gives cached pages back.
"""
from __future__ import annotations

import enum
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Hashable, Iterator, Sequence

from .blocks import SeqCheckpoint
from .errors import CacheFullError
from .pools import KVPool, LowRankPool


class CacheMode(str, enum.Enum):
    NON_SHARED = "non_shared"
    BASE_SHARED = "base_shared"
    BASE_LR_SHARED = "base_lr_shared"
    FULL_SHARED = "full_shared"

    @property
    def uses_lowrank(self) -> bool:
        """Whether agents keep V's adapter part as x·A in a low-rank pool (else the base pool's
        V already includes the adapter)."""
        return self in (CacheMode.BASE_SHARED, CacheMode.BASE_LR_SHARED)


@dataclass(frozen=True)
class AgentSpec:
    """An agent of a session.

    kv_namespace: what the base K/V depends on (the base model, plus any adapter that changes
        K/V of earlier layers); agents with equal kv_namespace may share base K/V.
    lr_namespace: the agent's A_v matrix (equal for agents that share one A); None when the
        agent has no low-rank V (only allowed in modes that do not use the low-rank pool).
    """
    name: str
    kv_namespace: str
    lr_namespace: str | None = None

    def __post_init__(self) -> None:
        for field_name in ("name", "kv_namespace", "lr_namespace"):
            v = getattr(self, field_name)
            if not (isinstance(v, str) or (v is None and field_name == "lr_namespace")):
                raise TypeError(f"AgentSpec.{field_name} must be a str, got {type(v).__name__}")


def _escape(name: str) -> str:
    return name.replace("\\", "\\\\").replace("@", "\\@")


def _shared(namespace: str) -> str:
    """A namespace as every agent that shares it names it."""
    return _escape(namespace)


def _private(namespace: str, agent: str) -> str:
    """`namespace` made private to `agent` (its adapter is in what it stores). Both parts are
    escaped, so no two (namespace, agent) pairs, and no shared namespace, give one string."""
    return f"{_escape(namespace)}@{_escape(agent)}"


@dataclass(frozen=True)
class AgentRoute:
    """Where one agent's cache lives: the namespace of its sequences in the base pool, and in
    the low-rank pool (None: the mode keeps no low-rank cache)."""
    agent: str
    kv_namespace: str
    lr_namespace: str | None


@dataclass(frozen=True)
class SeqSlots:
    """Per pool: block table, or slots of some positions (-1: stored already, do not write).
    `lr` is None in modes without a low-rank cache."""
    kv: list[int]
    lr: list[int] | None


class MultiAgentCache:
    """The pools and namespaces a multi-agent session uses under one cache mode.

    Sequences are named per agent: `(agent, seq_id)`. Per layer `l` an agent reads and writes
    `kv_pool.k_caches[l]`, `kv_pool.v_caches[l]` through `block_tables(...).kv`, and (modes with
    a low-rank cache) `lr_pool.caches[l]` through `.lr`.
    """

    def __init__(self, mode: CacheMode | str, agents: Sequence[AgentSpec], kv_pool: KVPool,
                 lr_pool: LowRankPool | None = None) -> None:
        try:
            mode = CacheMode(mode)
        except ValueError:
            raise ValueError(f"unknown cache mode {mode!r}; use one of {[m.value for m in CacheMode]}") from None
        agents = list(agents)
        if not agents:
            raise ValueError("a session needs at least one agent")
        for a in agents:
            if not isinstance(a, AgentSpec):
                raise TypeError(f"agents must be AgentSpec, got {type(a).__name__}")
        names = [a.name for a in agents]
        if len(set(names)) != len(names):
            raise ValueError(f"agent names must be unique, got {names}")
        if not isinstance(kv_pool, KVPool):
            raise TypeError(f"kv_pool must be a KVPool, got {type(kv_pool).__name__}")
        if mode.uses_lowrank:
            if not isinstance(lr_pool, LowRankPool):
                raise ValueError(f"mode {mode.value} needs a LowRankPool")
            missing = [a.name for a in agents if a.lr_namespace is None]
            if missing:
                raise ValueError(f"mode {mode.value} needs an lr_namespace for agents {missing}")
            if mode is CacheMode.BASE_LR_SHARED and len({a.lr_namespace for a in agents}) != 1:
                raise ValueError("base_lr_shared needs one A shared by all agents (one lr_namespace), got "
                                 f"{sorted({a.lr_namespace for a in agents})}")
        if mode is not CacheMode.NON_SHARED and len({a.kv_namespace for a in agents}) != 1:
            # Sharing base K/V across different base namespaces is exactly vLLM #3264.
            raise ValueError(f"mode {mode.value} shares base K/V, so all agents need one kv_namespace, got "
                             f"{sorted({a.kv_namespace for a in agents})}")
        self.mode = mode
        self.agents = {a.name: a for a in agents}
        self.kv_pool = kv_pool
        self.lr_pool = lr_pool if mode.uses_lowrank else None
        first = agents[0]
        self._routes = {a.name: self._route(a, first) for a in agents}

    def _route(self, a: AgentSpec, first: AgentSpec) -> AgentRoute:
        m = self.mode
        if m is CacheMode.NON_SHARED:
            return AgentRoute(a.name, _private(a.kv_namespace, a.name), None)
        if m is CacheMode.FULL_SHARED:
            return AgentRoute(a.name, _private(first.kv_namespace, first.name), None)
        lr = _shared(a.lr_namespace) if m is CacheMode.BASE_LR_SHARED else _private(a.lr_namespace, a.name)
        return AgentRoute(a.name, _shared(a.kv_namespace), lr)

    def route(self, agent: str) -> AgentRoute:
        """The namespaces `agent`'s sequences use in each pool (KeyError for an unknown agent)."""
        try:
            return self._routes[agent]
        except KeyError:
            raise KeyError(f"unknown agent {agent!r}") from None

    def _lr_after_kv(self, kv_pages: int) -> ContextManager[None]:
        """While checking the low-rank pool: the pages the base pool is about to map are gone
        when both draw on one page pool."""
        lr = self.lr_pool
        if lr is None or not kv_pages or lr.store.page_pool is not self.kv_pool.store.page_pool:
            return nullcontext()
        return lr.store.holding_pages(kv_pages)

    def _kv_plan(self, kv_fits: bool, kv_pages: Callable[[bool | int], int],
                 lr_fits: Callable[[], bool]) -> int | None:
        """`evict_first` for the base pool's part of a joint request: 0 (keep its cached blocks)
        or the fewest cached blocks it must evict before mapping pages to leave the low-rank
        pool room; None when the request cannot succeed. `kv_fits`: the base pool's own check;
        `kv_pages(evict_first)`: the pages the base pool would map (never more for a larger
        `evict_first`); `lr_fits()`: the low-rank pool's own check."""
        if not kv_fits:
            return None
        if self.lr_pool is None:
            return 0

        def fits(evict: bool | int) -> bool:
            with self._lr_after_kv(kv_pages(evict)):
                return lr_fits()

        if fits(0):
            return 0
        if self.lr_pool.store.page_pool is not self.kv_pool.store.page_pool or not fits(True):
            return None
        # The low-rank pool needs no plan of its own: it goes second, so the eviction it falls
        # back on already sees the pages the base pool took. Evicting more only maps fewer
        # pages, so the fewest evictions that fit are found by bisection.
        lo, hi = 0, self.kv_pool.manager.num_cached_blocks  # fits(hi) (True evicts no more), not fits(lo)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(mid):
                hi = mid
            else:
                lo = mid
        return hi

    @contextmanager
    def _undo_on_error(self, kv_checkpoint: SeqCheckpoint) -> Iterator[None]:
        """The low-rank pool's part of a request the joint plan said fits: if it fails anyway
        (the driver refused a page the page pool's count allowed), the base pool's part is
        undone, so the pools stay in step and nothing unwritten stays cached. Cached blocks the
        base pool evicted for it stay evicted, and its prefix hits are cached again as the most
        recently freed (`BlockManager.rollback`)."""
        try:
            yield
        except BaseException:
            self.kv_pool.rollback(kv_checkpoint)
            raise

    def _live(self, key: tuple, live: bool) -> None:
        pools = [self.kv_pool] if self.lr_pool is None else [self.kv_pool, self.lr_pool]
        if live and not all(key in p for p in pools):
            raise KeyError(f"no live sequence {key[1]!r} of agent {key[0]!r}")
        if not live and any(key in p for p in pools):
            raise ValueError(f"agent {key[0]!r} sequence {key[1]!r} is already allocated")

    # ---- sequences ---------------------------------------------------------------------------
    def _allocate_plan(self, r: AgentRoute, token_ids: Sequence[int]) -> int | None:
        """The base pool's `evict_first` for this allocate; None: it cannot succeed."""
        return self._kv_plan(
            self.kv_pool.can_allocate(token_ids, r.kv_namespace),
            lambda ef: self.kv_pool.pages_to_allocate(token_ids, r.kv_namespace, evict_first=ef),
            lambda: self.lr_pool.can_allocate(token_ids, r.lr_namespace))

    def can_allocate(self, agent: str, token_ids: Sequence[int]) -> bool:
        """Whether `allocate` of these tokens for `agent` would succeed now, in every pool."""
        return self._allocate_plan(self.route(agent), token_ids) is not None

    def allocate(self, agent: str, seq_id: Hashable, token_ids: Sequence[int]) -> tuple[int, int | None]:
        """Blocks for `agent`'s new sequence in every pool it uses; returns the number of leading
        tokens stored already per pool (kv, lr or None). The caller computes from the smaller
        one on; `slot_mapping` marks what each pool already has with -1. A count may equal
        len(token_ids) (everything cached): the last token must still run for its logits, and
        its K/V write is skipped (slot -1) since the pool holds it already.
        CacheFullError when either pool cannot take it; nothing changes in either then (but
        for a driver failure after the plan said yes: see `_undo_on_error`)."""
        r = self.route(agent)
        key = (agent, seq_id)
        self._live(key, live=False)
        evict_first = self._allocate_plan(r, token_ids)
        if evict_first is None:
            raise CacheFullError(f"no room for agent {agent!r} sequence {seq_id!r} of {len(token_ids)} tokens")
        cp = self.kv_pool.checkpoint(key)
        kv = self.kv_pool.allocate(key, token_ids, r.kv_namespace, evict_first=evict_first)
        if self.lr_pool is None:
            return kv, None
        with self._undo_on_error(cp):
            lr = self.lr_pool.allocate(key, token_ids, r.lr_namespace)
        return kv, lr

    def _append_plan(self, key: tuple, num_tokens: int) -> int | None:
        """The base pool's `evict_first` for this append; None: it cannot succeed."""
        return self._kv_plan(
            self.kv_pool.can_append(key, num_tokens),
            lambda ef: self.kv_pool.pages_to_append(key, num_tokens, evict_first=ef),
            lambda: self.lr_pool.can_append(key, num_tokens))

    def can_append(self, agent: str, seq_id: Hashable, num_tokens: int = 1) -> bool:
        """Whether `append_slots` of `num_tokens` tokens would succeed now, in every pool."""
        self.route(agent)
        return self._append_plan((agent, seq_id), num_tokens) is not None

    def append_slots(self, agent: str, seq_id: Hashable, token_ids: Sequence[int]) -> SeqSlots:
        """Extend a sequence in every pool; the slots to write the new tokens' K/V (and x·A) at.
        CacheFullError when either pool cannot take them; nothing changes in either then (but
        for a driver failure after the plan said yes: see `_undo_on_error`)."""
        self.route(agent)
        key = (agent, seq_id)
        self._live(key, live=True)
        evict_first = self._append_plan(key, len(token_ids))
        if evict_first is None:
            raise CacheFullError(f"no room to append {len(token_ids)} tokens to {agent!r} sequence {seq_id!r}")
        cp = self.kv_pool.checkpoint(key)
        kv = self.kv_pool.append_slots(key, token_ids, evict_first=evict_first)
        if self.lr_pool is None:
            return SeqSlots(kv, None)
        with self._undo_on_error(cp):
            lr = self.lr_pool.append_slots(key, token_ids)
        return SeqSlots(kv, lr)

    def fork(self, agent: str, src_id: Hashable, dst_id: Hashable) -> None:
        """A new sequence `dst_id` of `agent` sharing every block of `src_id` in every pool."""
        self.route(agent)
        self._live((agent, src_id), live=True)
        self._live((agent, dst_id), live=False)
        self.kv_pool.fork((agent, src_id), (agent, dst_id))
        if self.lr_pool is not None:
            self.lr_pool.fork((agent, src_id), (agent, dst_id))

    def free(self, agent: str, seq_id: Hashable) -> None:
        """Drop `agent`'s sequence from every pool (full blocks stay cached for prefix hits)."""
        self.route(agent)
        self._live((agent, seq_id), live=True)
        self.kv_pool.free((agent, seq_id))
        if self.lr_pool is not None:
            self.lr_pool.free((agent, seq_id))

    def trim(self) -> None:
        """Evict every cached block of every pool and unmap the pages above the live blocks
        (what a request that found no room may do before trying again)."""
        self.kv_pool.trim()
        if self.lr_pool is not None:
            self.lr_pool.trim()

    def block_table(self, agent: str, seq_id: Hashable) -> SeqSlots:
        """The sequence's block table in each pool."""
        self.route(agent)
        key = (agent, seq_id)
        return SeqSlots(self.kv_pool.block_table(key),
                        None if self.lr_pool is None else self.lr_pool.block_table(key))

    def slot_mapping(self, agent: str, seq_id: Hashable, start: int = 0, end: int | None = None) -> SeqSlots:
        """Slots of positions `[start, end)` in each pool; -1 where that pool stores it already."""
        self.route(agent)
        key = (agent, seq_id)
        return SeqSlots(self.kv_pool.slot_mapping(key, start, end),
                        None if self.lr_pool is None else self.lr_pool.slot_mapping(key, start, end))

    # ---- accounting --------------------------------------------------------------------------
    def memory_report(self) -> dict:
        """{"mode", "agents", "pools": {"kv": {...}, "lowrank": {...}}, "total": {...}}: reserved,
        mapped, used and cached bytes per pool the mode uses, and their totals."""
        pools = {"kv": self.kv_pool.memory_report()}
        if self.lr_pool is not None:
            pools["lowrank"] = self.lr_pool.memory_report()
        keys = ("reserved_bytes", "mapped_bytes", "used_bytes", "cached_bytes")
        total = {k: sum(p[k] for p in pools.values()) for k in keys}
        return {"mode": self.mode.value, "agents": len(self.agents), "pools": pools, "total": total}
