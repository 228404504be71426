"""Cache modes (LRAgent): which streams of which pools a session's agents write and read.

Streams of a session, by mode (`agent` = an agent name):
- non_shared:     ("kv", agent) for every agent that has run on the session; each has its own
                  coverage (an agent joining a trajectory re-runs the tokens it has not seen).
- full_shared:    ("kv", None), written by whichever agent processes each token (its LoRA applied
                  to K and V), read by all.
- base_shared:    ("kv", None) base K/V (no LoRA on K or V); ("lr", agent) = x·A_v,agent for every
                  agent with a v_proj LoRA, all written in the same pass; ("k", agent) for an agent
                  with a k_proj LoRA: its K lives in its own namespace.
- base_lr_shared: as base_shared with one ("lr", None) stream (one A shared by all agents).
In the shared modes every stream of a session covers the same tokens (one coverage counter).

S2-attention layers keep the K/V of every ("kv", ...) stream in head-sharded storage
(`engine.s2.ShardedKV`, one `ShardedStream` per kv stream), so the "kv" pool holds the dense
layers only; the K namespaces and low-rank V keep every layer in their pools. Prefix sharing
between sessions is off for such models: a session that attaches another's blocks would need
window blocks of the S2 layers that the other session may already have given back.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .config import ModelConfig
from .kvcache import BlockPool, ByteBudget, CacheFull, Stream, make_page_pool, reserve_all
from .s2 import ShardedKV, ShardedStream, s2_layers, s2_pattern

MODES = ("non_shared", "base_shared", "base_lr_shared", "full_shared")


class _AllAgents:
    def __repr__(self) -> str:
        return "ALL_AGENTS"


# A session's whole cache, every agent's streams, as a victim of `KVManager.caches_to_free`
# (an agent name, None included, means "all but that agent's").
ALL_AGENTS = _AllAgents()


@dataclass
class Agent:
    name: str
    lora_id: int = -1  # slot in the LoraSet, -1 = none
    lora: object | None = None  # LoraAdapter
    esft_id: int = -1  # ESFT adapter slot, -1 = base experts
    esft: str | None = None  # ESFT adapter name
    k_lora: bool = False
    v_rank: int = 0


@dataclass
class SessionCache:
    streams: dict = field(default_factory=dict)  # key -> Stream
    covered: dict = field(default_factory=dict)  # coverage key -> tokens cached
    sharded: dict = field(default_factory=dict)  # ("kv", ...) key -> ShardedStream (S2 layers)


class AgentTable(dict):
    """The registered agents by name; `version` changes with every insertion or removal, so what
    is derived from the set (each agent's stream keys) can be cached against it."""

    version = 0

    def _bump(self) -> None:
        self.version += 1

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self._bump()

    def __delitem__(self, key) -> None:
        super().__delitem__(key)
        self._bump()

    def pop(self, *args):
        out = super().pop(*args)
        self._bump()
        return out

    def popitem(self):
        out = super().popitem()
        self._bump()
        return out

    def setdefault(self, key, default=None):
        out = super().setdefault(key, default)
        self._bump()
        return out

    def update(self, *args, **kwargs) -> None:
        super().update(*args, **kwargs)
        self._bump()

    def clear(self) -> None:
        super().clear()
        self._bump()


class KVManager:
    def __init__(self, config: ModelConfig, mode: str, block_size: int, budget_bytes: int, device, dtype,
                 prefix_caching: bool = True):
        if mode not in MODES:
            raise ValueError(f"cache_mode must be one of {MODES}, got {mode!r}")
        self.config, self.mode, self.block_size = config, mode, block_size
        self.device, self.dtype = device, dtype
        self.budget = ByteBudget(budget_bytes)
        self.page_pool = make_page_pool(device, budget_bytes, config.num_layers)
        self.pools: dict[str, BlockPool] = {}
        self.sessions: dict[int, SessionCache] = {}
        self.agents: dict[str, Agent] = AgentTable()  # the registered agents (shared modes write for all)
        self._derived: dict = {}  # name -> a value derived from the agent set of version _derived_at
        self._derived_at = self.agents.version
        self.uids: dict[str | None, int] = {None: 0}  # agent -> registration id (content-hash namespace)
        sparse = s2_layers(config)
        self.s2: ShardedKV | None = None
        if sparse:
            self.s2 = ShardedKV(s2_pattern(config), sparse, config.head_dim, block_size, dtype, self.budget,
                                self.page_pool)
        self.prefix_caching = prefix_caching and self.s2 is None
        # the "kv" pool's layers: the dense ones (a model with S2 in every layer keeps one unused)
        dense = [layer for layer in range(config.num_layers) if layer not in set(sparse)]
        self._kv_index = {layer: i for i, layer in enumerate(dense)}

    @property
    def shared(self) -> bool:
        return self.mode in ("base_shared", "base_lr_shared")

    # ---- pools -----------------------------------------------------------------------------
    def pool(self, kind: str, rank: int = 0) -> BlockPool:
        name = kind if kind != "lr" else f"lr{rank}"
        if name not in self.pools:
            c = self.config
            shape, n = ((c.num_kv_heads, c.head_dim), 2 if kind == "kv" else 1) if kind != "lr" else ((rank,), 1)
            layers = max(1, len(self._kv_index)) if kind == "kv" else c.num_layers
            self.pools[name] = BlockPool(name, layers, self.block_size, shape, n, self.dtype,
                                         self.device, self.budget, self.page_pool)
        return self.pools[name]

    def kv_layer(self, layer: int) -> int:
        """Index of model layer `layer` among the "kv" pool's layers (S2 layers are not there)."""
        try:
            return self._kv_index[layer]
        except KeyError:
            raise ValueError(f"layer {layer} keeps its K/V in the head-sharded S2 storage, "
                             "not in the kv pool") from None

    # ---- which streams -----------------------------------------------------------------------
    def cov_key(self, agent: str | None):
        return agent if self.mode == "non_shared" else None

    def stream_keys(self, agent: str | None) -> list[tuple]:
        """Every stream a chunk processed by `agent` writes (in shared modes: for all agents).
        The list is shared between calls: do not modify it."""
        return self.derived(("stream_keys", agent), lambda: self._stream_keys(agent))

    def derived(self, name, build: Callable[[], object]):
        """`build()`, a value derived from the registered agents alone, cached until the agent
        set changes (a decode step asks for stream keys and agent lists ~20 times). Callers
        must not modify what it returns."""
        if self._derived_at != self.agents.version:
            self._derived.clear()
            self._derived_at = self.agents.version
        try:
            return self._derived[name]
        except KeyError:
            out = self._derived[name] = build()
            return out

    def _stream_keys(self, agent: str | None) -> list[tuple]:
        if self.mode == "non_shared":
            return [("kv", agent)]
        if self.mode == "full_shared":
            return [("kv", None)]
        keys = [("kv", None)]
        keys += [("k", a.name) for a in self._sorted() if a.k_lora]
        if self.mode == "base_shared":
            keys += [("lr", a.name) for a in self._sorted() if a.v_rank]
        elif any(a.v_rank for a in self.agents.values()):
            keys.append(("lr", None))
        return keys

    def _sorted(self) -> list[Agent]:
        return self.derived("sorted", lambda: [self.agents[n] for n in sorted(self.agents)])

    def lr_rank(self, key: tuple) -> int:
        if key[1] is not None:
            return self.agents[key[1]].v_rank
        return max(a.v_rank for a in self.agents.values())

    def _pool_for(self, key: tuple) -> BlockPool:
        # a decode step asks for every stream's pool several times: kept per agent set
        return self.derived(("pool_for", key), lambda: self.pool(key[0], self.lr_rank(key) if key[0] == "lr" else 0))

    def state(self, sid: int) -> SessionCache:
        return self.sessions.setdefault(sid, SessionCache())

    def coverage(self, sid: int, agent: str | None) -> int:
        st = self.sessions.get(sid)
        return 0 if st is None else st.covered.get(self.cov_key(agent), 0)

    def streams(self, sid: int, agent: str | None) -> dict:
        st = self.state(sid)
        out = {}
        for key in self.stream_keys(agent):
            if key not in st.streams:
                st.streams[key] = Stream(self._pool_for(key))
            out[key] = st.streams[key]
        return out

    def sharded(self, sid: int, agent: str | None) -> dict[tuple, ShardedStream]:
        """The S2 layers' streams `agent` writes (one per kv stream; none without S2 layers)."""
        if self.s2 is None:
            return {}
        st = self.state(sid)
        out = {}
        for key in self.stream_keys(agent):
            if key[0] == "kv":
                if key not in st.sharded:
                    st.sharded[key] = self.s2.new_stream()
                out[key] = st.sharded[key]
        return out

    def reserve(self, sid: int, agent: str | None, end: int) -> None:
        """Room for tokens [0, end) in every stream `agent` writes, all or nothing (CacheFull)."""
        streams = self.streams(sid, agent)
        shards = self.sharded(sid, agent)
        need = self.bytes_to_reserve(sid, agent, end)
        if need == 0:
            return  # e.g. a decode step inside the last block (most steps)
        if self.budget.used + need > self.budget.capacity:
            raise CacheFull(f"session {sid}: {need} more KV bytes needed, "
                            f"{self.budget.capacity - self.budget.used} free of {self.budget.capacity}")
        # Dense streams first (all or nothing across them), then the head-sharded one (a call
        # writes at most one "kv" stream); a page pool that runs out half-way hands back what
        # this call took.
        had = {k: len(s.blocks) for k, s in streams.items()}
        reserve_all(streams.values(), end)
        try:
            for s in shards.values():
                self.s2.reserve(s, end)
        except CacheFull:
            for k, s in streams.items():
                s.truncate_blocks(had[k])
            raise

    def bytes_to_reserve(self, sid: int, agent: str | None, end: int) -> int:
        """KV bytes `reserve(sid, agent, end)` would take."""
        st = self.sessions.get(sid)
        total = 0
        for key in self.stream_keys(agent):
            s = st.streams.get(key) if st else None
            if s is not None:
                total += s.blocks_needed(end) * s.pool.block_bytes
            else:  # a stream not started yet
                pool = self._pool_for(key)
                total += -(-end // pool.block_size) * pool.block_bytes
            if self.s2 is not None and key[0] == "kv":
                total += self.s2.bytes_to_reserve(st.sharded.get(key) if st else None, end)
        return total

    def advance(self, sid: int, agent: str | None, end: int) -> None:
        st = self.state(sid)
        k = self.cov_key(agent)
        st.covered[k] = max(st.covered.get(k, 0), end)
        for key in self.stream_keys(agent):
            st.streams[key].length = max(st.streams[key].length, end)
        for s in self.sharded(sid, agent).values():
            self.s2.trim(s, end)  # the window has moved: give back what no later query reads

    # ---- prefix sharing (content-addressed full blocks) ---------------------------------------
    def _hash_chain(self, key: tuple, tokens: list[int], procs: list, n_blocks: int, start: int = 0,
                    parent: int | None = None) -> list[int]:
        """Content hashes of blocks [start, n_blocks) of a stream. A block's K/V depend on every
        earlier token, on the stream (kind, owner agent) and, outside non_shared, on which agent
        processed each token: all of it goes into the chain (parent hash + block contents)."""
        bs = self.block_size
        uid = self.uids.get
        ns = (self.mode, key[0], uid(key[1], -1) if key[1] is not None else None)
        out = []
        for i in range(start, n_blocks):
            toks = tuple(tokens[i * bs:(i + 1) * bs])
            who = () if self.mode == "non_shared" else tuple(uid(p, -1) for p in procs[i * bs:(i + 1) * bs])
            parent = hash((parent, toks, who, ns))
            out.append(parent)
        return out

    def register(self, sid: int, agent: str | None, tokens: list[int], procs: list) -> None:
        """Make the session's newly completed full blocks findable by content."""
        if not self.prefix_caching:
            return
        st = self.sessions.get(sid)
        if st is None:
            return
        for key in self.stream_keys(agent):
            s = st.streams.get(key)
            if s is None:
                continue
            full, n0 = s.length // self.block_size, len(s.hashes)
            if full > n0:
                s.hashes += self._hash_chain(key, tokens, procs, full, n0, s.hashes[-1] if s.hashes else None)
                for i in range(n0, full):
                    s.pool.register(s.blocks[i], s.hashes[i])

    def attach_prefix(self, sid: int, agent: str | None, tokens: list[int], procs: list) -> int:
        """For a session with nothing cached: share the longest run of leading full blocks that
        live sessions already hold with the same content in every stream it needs. Returns the
        tokens now cached (at least one token is always left to compute)."""
        if not self.prefix_caching or self.coverage(sid, agent) > 0:
            return 0
        limit = (len(tokens) - 1) // self.block_size
        if limit <= 0:
            return 0
        st = self.sessions.get(sid)
        keys = self.stream_keys(agent)
        if st is not None and any(st.streams[k].blocks for k in keys if k in st.streams):
            return 0
        chains, common = {}, limit
        for key in keys:
            chain = self._hash_chain(key, tokens, procs, limit)
            by_hash, n = self._pool_for(key).by_hash, 0
            while n < len(chain) and chain[n] in by_hash:
                n += 1
            chains[key] = chain
            common = min(common, n)
            if common == 0:
                return 0  # nothing to share: no cache entry is made for the session
        streams = self.streams(sid, agent)
        for key, s in streams.items():
            s.hashes = chains[key][:common]
            s.blocks = [s.pool.by_hash[h] for h in s.hashes]
            for b in s.blocks:
                s.pool.share(b)
            s.length = common * self.block_size
        self.state(sid).covered[self.cov_key(agent)] = common * self.block_size
        return common * self.block_size

    # ---- freeing -----------------------------------------------------------------------------
    def truncate(self, sid: int, end: int) -> None:
        """Cut session `sid`'s caches back to its first `end` tokens (its trajectory was cut
        there). A stream that covers more keeps only its blocks wholly below `end`: the block
        holding `end` has later tokens in it and may be shared or findable by content, so it is
        given back and its first tokens are recomputed when needed. Head-sharded S2 storage
        cannot be cut back: such a session's cache is freed and recomputed."""
        st = self.sessions.get(sid)
        cut = [s for s in st.streams.values() if s.length > end] if st is not None else []
        if not cut:
            return
        if st.sharded:
            self.free_session(sid)
            return
        # a cut on a block boundary leaves nothing to compute; a next request with an empty prompt
        # gets its logits from the scheduler recomputing the last token (reopen_last)
        keep = end // self.block_size
        for s in cut:
            s.truncate_blocks(keep)
        for k, n in st.covered.items():
            if n > end:
                st.covered[k] = keep * self.block_size

    def reopen_last(self, sid: int, agent: str | None) -> None:
        """Make the last token `agent`'s streams cover pending again: a request that must sample
        after a session whose every token is cached (an overlapped step ran the token its
        previous request stopped on) gets its logits by computing that token again. The same
        token, processing agent and prefix give the same K/V, so a partial last block (never
        shared nor findable by content) is rewritten in place; a full one may be shared, so it
        is given back and its tokens recomputed into a new block. Head-sharded S2 storage may
        already have given back the token's window block: those streams are dropped."""
        st = self.sessions.get(sid)
        k = self.cov_key(agent)
        n = st.covered.get(k, 0) if st is not None else 0
        if n == 0:
            return
        keys = [key for key in self.stream_keys(agent) if key in st.streams]
        if st.sharded:
            for key in keys:
                self._drop_stream(st, key)
            st.covered.pop(k)
            return
        bs = self.block_size
        keep = n - 1 if n % bs else n - bs
        for key in keys:
            s = st.streams[key]
            if n % bs == 0:
                s.truncate_blocks(min(len(s.blocks), keep // bs))
            s.length = min(s.length, keep)
        st.covered[k] = keep

    def _drop_stream(self, st: SessionCache, key: tuple) -> int:
        """Free one stream of a session (and its S2 layers' blocks); returns the bytes freed."""
        s = st.streams.pop(key)
        n = s.nbytes()
        s.release()
        shard = st.sharded.pop(key, None)
        if shard is not None:
            n += self.s2.release(shard)
        return n

    def free_session(self, sid: int) -> int:
        st = self.sessions.get(sid)
        if st is None:
            return 0
        n = sum(self._drop_stream(st, key) for key in list(st.streams))
        del self.sessions[sid]
        return n

    def session_bytes(self, sid: int) -> int:
        st = self.sessions.get(sid)
        if st is None:
            return 0
        return (sum(s.nbytes() for s in st.streams.values())
                + sum(self.s2.nbytes(s) for s in st.sharded.values()))

    def caches_to_free(self, victims: Sequence[tuple[int, object]], room: int) -> int | None:
        """How many leading `victims`, freed in order, give back at least `room` bytes; None when
        all of them together do not. A victim is (session, ALL_AGENTS) for its whole cache
        (`free_session`) or, non_shared, (session, agent) for its streams of every agent but that
        one (`free_other_agents`). A block that a cache outside them also holds (prefix sharing)
        is not given back, one several of them hold is once all of those are counted: so this
        can ask for more than their `session_bytes`. Reads only the blocks of the victims it
        counts."""
        if room <= 0:
            return 0
        picked = []  # one entry a victim, so that counting stops at the victim's index
        for x, keep in victims:
            st = self.sessions.get(x)
            picked.append((st, self._keys_freed(st, keep) if st is not None else []))
        # an upper bound first, without reading a block: what cannot fit is refused at once
        if sum(st.streams[k].nbytes() + (self.s2.nbytes(st.sharded[k]) if k in st.sharded else 0)
               for st, keys in picked for k in keys) < room:
            return None
        refs: Counter = Counter()
        freed = 0
        for i, (st, keys) in enumerate(picked, 1):
            for key in keys:
                s = st.streams[key]
                pool_refs = s.pool.refs
                for b in s.blocks:
                    refs[(s.pool, b)] += 1
                    if refs[(s.pool, b)] == pool_refs[b]:
                        freed += s.pool.block_bytes
                if key in st.sharded:  # never shared: S2 models have no prefix caching
                    freed += self.s2.nbytes(st.sharded[key])
            if freed >= room:
                return i
        return None

    def _keys_freed(self, st: SessionCache, keep: object) -> list[tuple]:
        """The streams of a session that `free_session` (keep=ALL_AGENTS) or
        `free_other_agents(sid, keep)` frees."""
        if keep is ALL_AGENTS:
            return list(st.streams)
        return [k for k in st.streams if k[1] != keep] if self.mode == "non_shared" else []

    def drop_agent(self, name: str) -> None:
        """Free every stream that belongs to agent `name` (its own K/V, K namespace, low-rank V)."""
        for st in self.sessions.values():
            for key in [k for k in st.streams if k[1] == name]:
                self._drop_stream(st, key)
            st.covered.pop(name, None) if self.mode == "non_shared" else None

    def free_other_agents(self, sid: int, keep: str | None) -> int:
        """non_shared: free the session's streams of every agent but `keep` (they are recomputed
        when those agents next run on it). Returns the bytes freed."""
        st = self.sessions.get(sid)
        if st is None or self.mode != "non_shared":
            return 0
        freed = 0
        for key in self._keys_freed(st, keep):
            freed += self._drop_stream(st, key)
            st.covered.pop(key[1], None)
        return freed

    # ---- accounting ----------------------------------------------------------------------------
    def report(self) -> dict:
        pools = {n: p.report() for n, p in self.pools.items()}
        blocks: dict[str, set] = {}
        tokens = 0
        for st in self.sessions.values():
            for (kind, who), s in st.streams.items():
                label = {"kv": "kv", "k": "k", "lr": "lowrank"}[kind] + (f":{who}" if who else ":shared")
                if kind == "kv" and self.mode != "non_shared":
                    label = "kv:base" if self.mode != "full_shared" else "kv:shared"
                # a block shared by content between sessions is counted once
                blocks.setdefault(label, set()).update((s.pool.name, b) for b in s.blocks)
            tokens += max(st.covered.values(), default=0)
        ns = {label: sum(self.pools[p].block_bytes for p, _ in bs) for label, bs in blocks.items()}
        c = self.config
        elt = torch.empty((), dtype=self.dtype).element_size()
        kv_tok = 2 * c.num_layers * c.kv_size * elt
        k_tok = kv_tok // 2
        n = max(1, len(self.agents))
        v_ranks = [a.v_rank for a in self.agents.values() if a.v_rank]
        nk = sum(1 for a in self.agents.values() if a.k_lora)
        lr_tok = c.num_layers * elt
        per_token = {
            "non_shared": n * kv_tok,
            "full_shared": kv_tok,
            "base_shared": kv_tok + nk * k_tok + lr_tok * sum(v_ranks),
            "base_lr_shared": kv_tok + nk * k_tok + lr_tok * (max(v_ranks) if v_ranks else 0),
        }
        stores = list(pools.values())
        s2 = None
        if self.s2 is not None:
            s2 = self.s2.report([s for st in self.sessions.values() for s in st.sharded.values()])
            stores.append(s2)
        return {
            "cache_mode": self.mode,
            "block_size": self.block_size,
            "budget_bytes": self.budget.capacity,
            "used_bytes": self.budget.used,
            "mapped_bytes": sum(p["mapped_bytes"] for p in stores),
            "reserved_bytes": sum(p["reserved_bytes"] for p in stores),
            "pages_mapped": sum(p["pages_mapped"] for p in stores),
            # S2 layers' head-sharded K/V: used_bytes vs full_bytes (every block, every KV head)
            "s2": s2,
            "page_pool": self.page_pool.stats(),
            "pools": pools,
            "namespaces": ns,
            "k_namespace_agents": sorted(a.name for a in self.agents.values() if a.k_lora)
            if self.mode in ("base_shared", "base_lr_shared") else [],
            "note": ("agents with a k_proj LoRA keep their K in their own namespace ('k:<agent>'); "
                     "V stays shared as base + low-rank") if self.shared and nk else "",
            "sessions": len(self.sessions),
            "shared_blocks": sum(sum(1 for r in p.refs.values() if r > 1) for p in self.pools.values()),
            "tokens_cached": tokens,
            "per_token_bytes_by_mode": per_token,
        }
