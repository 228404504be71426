"""The engine's attention backend: writes new tokens' K/V (per cache mode) and attends over the
paged caches, for a batch of chunks from many sessions and agents.

Per layer, every chunk's new K/V are written first and only then does any chunk attend, so
several consecutive chunks of one session (a replay of tokens that different agents processed)
run correctly in one forward.

S2-attention layers keep the kv streams' K/V in the head-sharded storage (`kv.s2`, see
engine/s2.py). On the kernel path every group attends there through
`kernels.s2_attention_prefill_paged` / `s2_attention_decode` with per-KV-head block tables; a
group reading an agent's low-rank V passes its low-rank cache and B stack too (Flash-LoRA inside
S2, as in the dense layers). Chunks of an agent with its own K namespace take the torch path in
every layer, reading the same sharded K/V in S2 layers.

Host work is paid once where it can be: per forward, the constructor plans every layer's cache
writes (one indexed write per stream group, all chunks together) and kernel groups, and sends
their index arrays (slots, block tables, lengths) to the device in one copy; per adapter set,
what is derived from the adapters (Flash-LoRA's B stacks, the stacked low-rank A) is kept in the
LoraSet until an adapter is added or removed. A layer then only launches its math.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .cache import Agent, KVManager
from .kvcache import BlockPool, Stream
from .model import Rope

V_PROJ, K_PROJ = "self_attn.v_proj", "self_attn.k_proj"


@dataclass
class Chunk:
    sid: int
    agent: Agent | None  # the agent whose pass processes these tokens (None: base model)
    start: int  # position of the first new token
    end: int  # one past the last new token
    row0: int  # first row of the chunk in the batch
    streams: dict = field(default_factory=dict)  # stream key -> Stream

    @property
    def rows(self) -> slice:
        return slice(self.row0, self.row0 + self.end - self.start)


def _write(pool_tensor: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    flat = pool_tensor.view(-1, *pool_tensor.shape[2:])
    flat[slots] = values.to(flat.dtype)


def _read(pool_tensor: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return pool_tensor.view(-1, *pool_tensor.shape[2:])[slots]


def _kv_key(ch: Chunk) -> tuple:
    """The chunk's ("kv", ...) stream key: the K/V every chunk reads."""
    return next(k for k in ch.streams if k[0] == "kv")


TABLE_ALIGN = 16  # table widths a multiple of 16: the kernels' row strides keep one
# specialisation (Triton compiles per "1 / multiple of 16 / other") as contexts grow


def table_width(n_blocks: int) -> int:
    """Block-table width for `n_blocks` blocks, rounded up to TABLE_ALIGN."""
    return max(1, -(-n_blocks // TABLE_ALIGN)) * TABLE_ALIGN


PACK_ALIGN = 64  # bytes: each packed array starts as aligned as its own allocation would
# (Triton specialises pointer arguments on 16-byte alignment)
_NP_DTYPES = {torch.int32: np.int32, torch.int64: np.int64}


def to_device_packed(parts: Sequence[tuple[Sequence[int] | np.ndarray, torch.dtype]], device) -> list[torch.Tensor]:
    """1-D tensors holding `parts` ((values, torch.int32 or torch.int64) each; values a sequence
    of ints or a numpy array), on `device`, from ONE host->device copy: the small index arrays of
    a forward go over together (a separate copy per array is a transfer each, and on CUDA an
    unpinned blocking copy also waits for the stream; this one is pinned and does not). Each
    tensor is a view into one byte buffer, starting PACK_ALIGN-byte aligned."""
    if not parts:
        return []
    spans = []
    end = 0
    for values, dtype in parts:
        npdt = _NP_DTYPES.get(dtype)
        if npdt is None:
            raise TypeError(f"to_device_packed packs int32 / int64 arrays, got {dtype}")
        start = -(-end // PACK_ALIGN) * PACK_ALIGN
        end = start + len(values) * dtype.itemsize
        spans.append((start, end, dtype, npdt, values))
    end = -(-end // 8) * 8  # the buffer is viewed as int64 whole (one view per dtype, not per part)
    buf = np.zeros(end, dtype=np.uint8)
    for start, stop, _, npdt, values in spans:
        # numpy converts a list of ints (or copies an array) in C; an int64 id that does not
        # fit int32 raises here instead of wrapping
        buf[start:stop].view(npdt)[:] = values
    host = torch.frombuffer(buf, dtype=torch.uint8) if end else torch.empty(0, dtype=torch.uint8)
    if torch.device(device).type == "cuda":
        # from pinned memory the copy is asynchronous: the host does not wait for the stream
        dev = host.pin_memory().to(device, non_blocking=True)
    else:
        dev = host.to(device)
    typed = {dtype: dev.view(dtype) for dtype in {sp[2] for sp in spans}}
    return [typed[dtype][start // dtype.itemsize:stop // dtype.itemsize] for start, stop, dtype, _, _ in spans]


class Uploads:
    """Index arrays a forward needs on the device, collected on the host and sent in one copy
    (`to_device_packed`); each lands in its place through its `assign` callback."""

    def __init__(self):
        self._parts: list[tuple[list[int], torch.dtype]] = []
        self._assign: list[tuple[Callable[[torch.Tensor], None], tuple[int, ...]]] = []

    def add(self, values: list[int], dtype: torch.dtype, assign: Callable[[torch.Tensor], None],
            shape: tuple[int, ...] | None = None) -> None:
        self._parts.append((values, dtype))
        self._assign.append((assign, shape or (len(values),)))

    def send(self, device) -> None:
        for t, (assign, shape) in zip(to_device_packed(self._parts, device), self._assign):
            assign(t if len(shape) == 1 else t.view(shape))
        self._parts, self._assign = [], []


def _cat(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts)


def _padded_table(streams: Sequence[Stream]) -> np.ndarray:
    """The streams' block tables as one int32 [batch, width] array, short rows padded with block
    0 (never read); rows are copied from each stream's host mirror (no per-id Python work)."""
    rows = [s.host_table() for s in streams]
    out = np.zeros((len(rows), table_width(max(len(r) for r in rows))), dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def attend_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, scale: float,
                 window: int | None = None, head_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal GQA attention of queries at positions q_start.. over keys 0..T-1, fp32 math.

    q [n, Hq, D], k/v [T, Hkv, D]; head_mask [Hq, n, T] bool (S2 pattern) restricts further.
    """
    n, hq, _ = q.shape
    t, hkv, _ = k.shape
    g = hq // hkv
    kf = k.float().repeat_interleave(g, dim=1)
    vf = v.float().repeat_interleave(g, dim=1)
    s = torch.einsum("nhd,thd->hnt", q.float(), kf) * scale
    qpos = torch.arange(q_start, q_start + n, device=q.device)
    kpos = torch.arange(t, device=q.device)
    mask = kpos[None, :] <= qpos[:, None]
    if window:
        mask = mask & (kpos[None, :] > qpos[:, None] - window)
    mask = mask[None].expand(hq, n, t)
    if head_mask is not None:
        mask = mask & head_mask
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("hnt,thd->nhd", p, vf).to(q.dtype)


@dataclass
class _Writes:
    """Where one layer's new tokens go for one stream group, for every chunk of a forward at once
    (one indexed write per layer, not one per chunk)."""
    pool: BlockPool
    slots: torch.Tensor | None = None  # flat slots of its chunks' new tokens, in batch-row order
    rows: torch.Tensor | None = None  # the batch rows they come from; None: every row, in order
    s2_slots: torch.Tensor | None = None  # kv group, S2 layers: per-KV-head slots [n, Hkv]
    twin: bool = False  # slots and rows are the kv group's (same chunks, same block ids)

    def pick(self, values: torch.Tensor) -> torch.Tensor:
        """The rows of `values` [N, ...] this group writes."""
        return values if self.rows is None else values.index_select(0, self.rows)


def _write_group(key: tuple) -> tuple:
    """The write group of a stream key: every chunk's K/V stream ("kv") goes to the one kv pool,
    so they form one group; each K namespace / low-rank stream key is its own."""
    return ("kv",) if key[0] == "kv" else key


class PagedAttention:
    """AttentionBackend for one forward over `chunks` (see engine/model.py).

    What is the same for every layer (write slots, kernel groups, block tables, sequence
    lengths) is computed once in the constructor; what is the same for every forward until the
    adapter set changes (the stacked v_proj A of the low-rank streams, Flash-LoRA's B stacks) is
    kept by the LoraSet (`LoraSet.memo`)."""

    def __init__(self, kv: KVManager, chunks: list[Chunk], lora, uploads: Uploads, s2=None,
                 kernels: str | None = None):
        """The plan's index arrays go into `uploads`, which the caller sends with the batch's
        own (one copy a forward), then calls `sent`."""
        self.kv, self.chunks, self.lora = kv, chunks, lora
        self.ids: torch.Tensor | None = None  # the rows' LoRA slots (set by `sent`)
        self.s2 = s2  # engine/s2.py S2Masks (the torch path's masks) or None
        self.sharded = kv.s2  # the S2 layers' head-sharded K/V (engine/s2.py ShardedKV) or None
        self.impl = kernels  # None: torch attention per chunk; "triton"/"torch": the paged kernels
        c = kv.config
        self.scale = c.head_dim ** -0.5
        self.window = c.sliding_window
        self.kv_keys = [_kv_key(ch) for ch in chunks]
        self._twin_of: dict[tuple[int, int], bool] = {}  # (id(lr stream), id(kv stream)) -> _twins
        self.n_rows = sum(ch.end - ch.start for ch in chunks)
        self._r_slots: dict[int, dict] = {}  # read slots, built only for chunks the torch path attends
        # the S2 layers' streams (created by the scheduler's reservation)
        self.s2_streams = [kv.sessions[ch.sid].sharded[k] for ch, k in zip(chunks, self.kv_keys)] \
            if self.sharded else []
        # what follows from the agent set alone is cached by the KVManager until it changes
        self.k_agents = kv.derived("k_agents", lambda: [a for a in kv._sorted() if a.k_lora]) \
            if kv.shared else []
        self.lr_keys = kv.derived("lr_keys", lambda: [k for k in kv.stream_keys(None) if k[0] == "lr"]) \
            if kv.shared else []
        # which adapter owns each low-rank stream: part of the key of the stacked A (see _lr_a)
        self._lr_owners = kv.derived("lr_owners", lambda: tuple((k, self._lr_owner(k).lora_id)
                                                                 for k in self.lr_keys))
        self.writes = self._plan_writes(uploads)
        self.groups, self.torch_chunks = ({}, list(range(len(chunks)))) if kernels is None else self._plan(uploads)

    def sent(self, lora_ids: torch.Tensor) -> None:
        """What follows the uploads reaching the device: the rows' LoRA slots (`lora_ids`, one of
        the caller's arrays), and twin write groups take the kv group's slots and rows."""
        self.ids = lora_ids
        for w in self.writes.values():
            if w.twin:
                w.slots, w.rows = self.writes[("kv",)].slots, self.writes[("kv",)].rows

    # ---- for CUDA graphs (engine/graphs.py) ------------------------------------------------------
    _GROUP_TENSORS = ("bt", "seq_lens", "cu_q", "rows", "lr_bt", "aid", "s2_bt")

    def graph_inputs(self) -> list[torch.Tensor]:
        """Every device tensor this forward's plan made (slots, rows, block tables, lengths,
        adapter slots), in a fixed order: what differs between two forwards of one graph key."""
        out = []
        for w in self.writes.values():
            if not w.twin:  # a twin's tensors are the kv group's, listed once
                out += [t for t in (w.slots, w.rows, w.s2_slots) if t is not None]
        for g in self.groups.values():
            out += [g[n] for n in self._GROUP_TENSORS if g.get(n) is not None]
        return out

    def graph_key(self) -> tuple | None:
        """Everything this forward decided on the host, or None when it is not graphable (some
        chunk takes the torch path, which builds device tensors as it goes)."""
        if self.torch_chunks or self.impl is None:
            return None
        writes = tuple((g, id(w.pool), w.rows is None, w.s2_slots is None, w.twin) for g, w in self.writes.items())
        groups = tuple((key, tuple(g["idx"]), g["decode"], g["max_q"], id(g["kv_pool"]), id(g.get("lr_pool")),
                        g.get("lr_twin", False),
                        tuple(a.lora_id for a in g.get("agents", ())),
                        tuple(n for n in self._GROUP_TENSORS if g.get(n) is not None))
                       for key, g in self.groups.items())
        return self.impl, len(self.chunks), writes, groups

    # ---- the plan, once per forward ------------------------------------------------------------
    def _all_rows_in_order(self, idx: list[int]) -> bool:
        """Whether chunks `idx` (ascending) cover the batch's rows 0..N-1 in order."""
        row = 0
        for i in idx:
            if self.chunks[i].row0 != row:
                return False
            row += self.chunks[i].end - self.chunks[i].start
        return row == self.n_rows

    def _rows_of(self, idx: list[int]) -> list[int]:
        return [r for i in idx for r in range(self.chunks[i].row0, self.chunks[i].row0
                                                 + self.chunks[i].end - self.chunks[i].start)]

    def _twins(self, stream: Stream, i: int) -> bool:
        """Whether `stream` (a low-rank V stream of chunk i) holds the same block ids as the
        chunk's kv stream: in base_lr_shared both are reserved and freed together from pools
        that hand out the lowest free id, so they do, and one block table and one set of
        write slots serve both (checked, not assumed: base_shared's per-rank pools differ).
        Asked by the write plan and by the kernel groups: compared once a forward, on the
        streams' int32 host mirrors (a list compare costs ~20 us per 1K blocks)."""
        kv = self.chunks[i].streams[self.kv_keys[i]]
        pair = (id(stream), id(kv))
        got = self._twin_of.get(pair)
        if got is None:
            got = self._twin_of[pair] = bool(np.array_equal(stream.host_table(), kv.host_table()))
        return got

    def _plan_writes(self, uploads: Uploads) -> dict[tuple, _Writes]:
        """Per write group, the slots of every member chunk's new tokens, concatenated (slots
        are the same for every layer: computed once per forward, on the host)."""
        members: dict[tuple, list[tuple[int, tuple]]] = {}
        for i, ch in enumerate(self.chunks):
            for key in ch.streams:
                members.setdefault(_write_group(key), []).append((i, key))
        out = {}
        kv_idx = [i for i, _ in members.get(("kv",), ())]
        for g, m in members.items():
            pools = {id(self.chunks[i].streams[k].pool) for i, k in m}
            assert len(pools) == 1, f"write group {g} spans {len(pools)} pools"
            w = out[g] = _Writes(self.chunks[m[0][0]].streams[m[0][1]].pool)
            if g[0] == "lr" and [i for i, _ in m] == kv_idx and all(
                    self._twins(self.chunks[i].streams[k], i) for i, k in m):
                w.twin = True  # the kv group's slots and rows (set once they are on the device)
                continue
            slots = [x for i, k in m
                     for x in self.chunks[i].streams[k].host_slots(self.chunks[i].start, self.chunks[i].end)]
            uploads.add(slots, torch.int64, lambda t, w=w: setattr(w, "slots", t))
            idx = [i for i, _ in m]
            if not self._all_rows_in_order(idx):
                uploads.add(self._rows_of(idx), torch.int64, lambda t, w=w: setattr(w, "rows", t))
        if self.sharded is not None and "kv" in {g[0] for g in out}:
            out[("kv",)].s2_slots = _cat([self.sharded.slots(s, ch.start, ch.end)
                                          for s, ch in zip(self.s2_streams, self.chunks)])
        return out

    # ---- the kernel path: chunks grouped into one paged-kernel call each ---------------------
    def _plan(self, uploads: Uploads):
        """Group chunks by what they read: plain paged attention over the KV pool, or
        Flash-LoRA over the KV pool plus one low-rank pool. Chunks the kernels do not cover
        (an agent's own K namespace, a sliding window in reach) take the torch path. Every
        group's index arrays go into `uploads`."""
        groups: dict[tuple, dict] = {}
        rest = []
        for i, ch in enumerate(self.chunks):
            a = ch.agent
            if self.window and ch.end > self.window:
                rest.append(i)
                continue
            if self.kv.shared and a is not None and a.k_lora:
                rest.append(i)
                continue
            if self.kv.shared and a is not None and a.v_rank:
                lkey = self._lr_key(a)
                key = ("lora", ch.streams[lkey].pool.name)
            else:
                lkey, key = None, ("plain",)
            g = groups.setdefault(key, {"idx": [], "lkeys": []})
            g["idx"].append(i)
            g["lkeys"].append(lkey)
        for key, g in groups.items():
            self._group_arrays(key, g, uploads)
            if self.sharded is not None:
                g["s2_bt"] = self.sharded.block_tables([self.s2_streams[i] for i in g["idx"]])
        return groups, rest

    def _lr_key(self, a: Agent) -> tuple:
        """The low-rank stream agent `a` reads its V adapter part from."""
        return ("lr", a.name) if self.kv.mode == "base_shared" else ("lr", None)

    def _group_arrays(self, key: tuple, g: dict, uploads: Uploads) -> None:
        """A group's host-side facts (pools, agents, shapes) into `g`, and its index arrays
        (block tables, lengths, adapter slots, rows) into `uploads`, to land in `g`."""
        chs = [self.chunks[i] for i in g["idx"]]
        kvs = [ch.streams[k] for ch, k in zip(chs, (self.kv_keys[i] for i in g["idx"]))]
        n = [ch.end - ch.start for ch in chs]
        g["kv_pool"] = kvs[0].pool
        g["decode"] = all(x == 1 for x in n)
        g["max_q"] = max(n)

        def put(name: str, values: list[int], shape=None, dtype=torch.int32) -> None:
            uploads.add(values, dtype, lambda t: g.__setitem__(name, t), shape)

        bt = _padded_table(kvs)
        put("bt", bt.reshape(-1), bt.shape)
        put("seq_lens", [ch.end for ch in chs])
        put("cu_q", [0, *itertools.accumulate(n)])
        g["rows"] = None  # every row, in order
        if not self._all_rows_in_order(g["idx"]):
            put("rows", self._rows_of(g["idx"]), dtype=torch.int64)  # index_copy_ takes int64 only
        if key[0] == "lora":
            lrs = [ch.streams[lk] for ch, lk in zip(chs, g["lkeys"])]
            g["lr_pool"] = lrs[0].pool
            g["agents"] = self._pool_agents(g["lr_pool"])
            g["lr_twin"] = all(self._twins(lr, i) for lr, i in zip(lrs, g["idx"]))
            if not g["lr_twin"]:  # else the kv table serves the low-rank cache too
                lbt = _padded_table(lrs)
                put("lr_bt", lbt.reshape(-1), lbt.shape)
            put("aid", [g["agents"].index(ch.agent) for ch in chs])

    def _pool_agents(self, pool) -> list[Agent]:
        """Every registered agent whose low-rank V lives in `pool`, in name order: the rows of
        the pool's Flash-LoRA B stack (the same for every forward while the agents stay)."""
        r = pool.token_shape[0]  # base_shared keeps one low-rank pool per rank
        return self.kv.derived(("pool_agents", pool.name), lambda: [
            a for a in self.kv._sorted() if a.v_rank and (self.kv.mode != "base_shared" or a.v_rank == r)])

    # ---- what is derived from the adapters, kept across forwards -------------------------------
    def _lora_b(self, agents: list[Agent], layer: int, pool) -> torch.Tensor:
        """[n_agents, Hkv, r, D] B matrices (LoRA scale folded in) of v_proj in `layer`, built
        once per (agents, layer, pool) while the adapter set stays the same."""
        key = ("flash_lora_b", layer, pool.name, tuple(a.lora_id for a in agents))
        return self.lora.memo(key, lambda: self._stack_lora_b(agents, layer, pool))

    def _stack_lora_b(self, agents: list[Agent], layer: int, pool) -> torch.Tensor:
        c = self.kv.config
        r = pool.token_shape[0]
        out = []
        for a in agents:
            ab = a.lora.get(layer, V_PROJ)
            if ab is None:
                out.append(torch.zeros(c.num_kv_heads, r, c.head_dim, dtype=pool.dtype, device=self.kv.device))
            else:
                out.append(ab[1].view(c.num_kv_heads, c.head_dim, r).transpose(1, 2))
        return torch.stack(out).to(pool.dtype).contiguous()

    def _lr_a(self, layer: int) -> tuple[torch.Tensor | None, list[tuple], list[int]]:
        """The v_proj A of every low-rank stream's owner in `layer`, stacked [sum of ranks, H]
        for one shrink, with the stream keys and ranks it holds (A None: no adapter in this
        layer); built once per layer while the adapter set stays the same."""
        return self.lora.memo(("lr_a", layer, self._lr_owners), lambda: self._stack_lr_a(layer))

    def _stack_lr_a(self, layer: int) -> tuple[torch.Tensor | None, list[tuple], list[int]]:
        mats, keys = [], []
        for key in self.lr_keys:
            ab = self._lr_owner(key).lora.get(layer, V_PROJ)
            if ab is not None:
                mats.append(ab[0])
                keys.append(key)
        return (torch.cat(mats, 0) if mats else None), keys, [m.shape[0] for m in mats]

    # ---- attention ---------------------------------------------------------------------------
    def _attend_kernels(self, layer: int, q: torch.Tensor, s2_layer: bool) -> tuple[torch.Tensor | None, set[int]]:
        """Run every kernel group of this layer. Returns the output rows the kernels computed —
        the kernel's own output when one group covers the whole batch in order (no gather, no
        scatter), else an [N, Hq, D] tensor — and the chunks done. In S2 layers every group
        runs the S2 kernels over the head-sharded K/V (with its low-rank V where it has one)."""
        runs = list(self.groups.items())
        if len(runs) == 1 and runs[0][1]["rows"] is None:
            key, g = runs[0]
            return self._run_group(layer, key, g, q, s2_layer).to(q.dtype), set(g["idx"])
        out, done = torch.empty_like(q), set()
        for key, g in runs:
            o = self._run_group(layer, key, g, q.index_select(0, g["rows"]), s2_layer)
            out.index_copy_(0, g["rows"], o.to(out.dtype))
            done.update(g["idx"])
        return out, done

    def _run_group(self, layer: int, key: tuple, g: dict, qg: torch.Tensor, s2_layer: bool) -> torch.Tensor:
        return self._s2_kernel(layer, key, g, qg) if s2_layer else self._dense_kernel(layer, key, g, qg)

    def _flash_lora_args(self, layer: int, g: dict) -> dict:
        """A Flash-LoRA group's low-rank operands for `layer`, as the kernels' keywords."""
        return dict(lr_cache=g["lr_pool"].layer(0, layer), lr_block_tables=g["bt"] if g["lr_twin"] else g["lr_bt"],
                    lora_b=self._lora_b(g["agents"], layer, g["lr_pool"]), adapter_ids=g["aid"])

    def _s2_kernel(self, layer: int, key: tuple, g: dict, qg: torch.Tensor) -> torch.Tensor:
        from kernels import s2_attention_decode, s2_attention_prefill_paged

        kc, vc = self.sharded.k_cache(layer), self.sharded.v_cache(layer)
        pattern, kw = self.sharded.pattern, dict(impl=self.impl, validate=False)
        if key[0] == "lora":
            kw.update(self._flash_lora_args(layer, g))
        if g["decode"]:
            return s2_attention_decode(qg, kc, vc, g["s2_bt"], g["seq_lens"], pattern, self.scale, **kw)
        return s2_attention_prefill_paged(qg, kc, vc, g["s2_bt"], g["cu_q"], g["seq_lens"], pattern,
                                          self.scale, max_seqlen_q=g["max_q"], **kw)

    def _dense_kernel(self, layer: int, key: tuple, g: dict, qg: torch.Tensor) -> torch.Tensor:
        from kernels import (flash_lora_decode, flash_lora_prefill, paged_attention_decode,
                             paged_attention_prefill)

        kl = self.kv.kv_layer(layer)
        kc, vc = g["kv_pool"].layer(0, kl), g["kv_pool"].layer(1, kl)
        kw = dict(impl=self.impl, validate=False)
        if key[0] == "lora":
            kw.update(self._flash_lora_args(layer, g), block_tables=g["bt"], seq_lens=g["seq_lens"],
                      scale=self.scale)
            if g["decode"]:
                return flash_lora_decode(qg, kc, vc, **kw)
            return flash_lora_prefill(qg, kc, vc, cu_seqlens_q=g["cu_q"], max_seqlen_q=g["max_q"], **kw)
        if g["decode"]:
            return paged_attention_decode(qg, kc, vc, g["bt"], g["seq_lens"], self.scale, **kw)
        return paged_attention_prefill(qg, kc, vc, g["bt"], g["cu_q"], g["seq_lens"], self.scale,
                                       max_seqlen_q=g["max_q"], **kw)

    def attend(self, model, layer: int, x, q, k, v, rope: Rope) -> torch.Tensor:
        if self.kv.shared:
            self._write_shared(model, layer, x, k, v, rope)
        else:
            self._write_full(model, layer, x, k, v, rope)
        s2_layer = self._sharded_layer(layer)
        out, done = self._attend_kernels(layer, q, s2_layer) if self.groups else (None, set())
        if out is None:
            out = torch.empty_like(q)
        for i in (i for i in range(len(self.chunks)) if i not in done):
            ch = self.chunks[i]
            out[ch.rows] = self._attend_chunk(i, ch, layer, q[ch.rows])
        return out

    def _sharded_layer(self, layer: int) -> bool:
        """Whether `layer` keeps its K/V in the head-sharded S2 storage."""
        return self.sharded is not None and self.sharded.holds(layer)

    # ---- writes ------------------------------------------------------------------------------
    def _write_kv(self, layer: int, w: _Writes, k: torch.Tensor, v: torch.Tensor) -> None:
        """The new K/V (rows of k, v) of every chunk into the kv pool, or in S2 layers into the
        head-sharded storage."""
        k, v = w.pick(k), w.pick(v)
        if self._sharded_layer(layer):
            self.sharded.write(layer, w.s2_slots, k, v)
            return
        kl = self.kv.kv_layer(layer)
        _write(w.pool.layer(0, kl), w.slots, k)
        _write(w.pool.layer(1, kl), w.slots, v)

    def _write_all(self, layer: int, k: torch.Tensor, v: torch.Tensor, others: dict) -> None:
        """Every write group of this layer: K/V to the kv group, `others[stream key]` [N, ...]
        to that stream's group (a K namespace or a low-rank V)."""
        for g, w in self.writes.items():
            if g[0] == "kv":
                self._write_kv(layer, w, k, v)
            elif g in others:
                _write(w.pool.layer(0, layer), w.slots, w.pick(others[g]))

    def _write_full(self, model, layer, x, k, v, rope):
        # k and v are this layer's fresh projections, read by nothing after the write: their
        # LoRA deltas go straight into them
        kf = model.finish_k(layer, self.lora.add_to(K_PROJ, layer, x, self.ids, k), rope)
        vf = model.finish_v(self.lora.add_to(V_PROJ, layer, x, self.ids, v))
        self._write_all(layer, kf, vf, {})

    def _write_shared(self, model, layer, x, k, v, rope):
        kb = model.finish_k(layer, k, rope)
        vb = model.finish_v(v)
        others = {}
        for a in self.k_agents:
            ab = a.lora.get(layer, K_PROJ)
            others[("k", a.name)] = kb if ab is None else model.finish_k(
                layer, k + F.linear(F.linear(x, ab[0]), ab[1]), rope)
        # LRAgent: the low-rank V of every agent from one shrink with the A matrices stacked
        if self.lr_keys:
            a_all, keys, ranks = self._lr_a(layer)
            if a_all is not None:
                low = F.linear(x, a_all)
                others.update(zip(keys, torch.split(low, ranks, dim=1)))
        self._write_all(layer, kb, vb, others)

    def _lr_owner(self, key) -> Agent:
        if key[1] is not None:
            return self.kv.agents[key[1]]
        return next(a for a in self.kv._sorted() if a.v_rank)

    def _read_slots(self, i: int) -> dict:
        if i not in self._r_slots:
            ch = self.chunks[i]
            self._r_slots[i] = {k: s.slots(0, ch.end) for k, s in ch.streams.items()}
        return self._r_slots[i]

    # ---- reads -------------------------------------------------------------------------------
    def _read_kv(self, i: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [end, Hkv, D] of chunk i's kv stream up to its last token (in S2 layers zeros
        where a head stores nothing: the S2 mask never lets those be read)."""
        ch = self.chunks[i]
        if self._sharded_layer(layer):
            return self.sharded.read(layer, self.s2_streams[i], ch.end)
        key = self.kv_keys[i]
        pool, slots, kl = ch.streams[key].pool, self._read_slots(i)[key], self.kv.kv_layer(layer)
        return _read(pool.layer(0, kl), slots), _read(pool.layer(1, kl), slots)

    def _attend_chunk(self, i: int, ch: Chunk, layer: int, q: torch.Tensor) -> torch.Tensor:
        K, V = self._read_kv(i, layer)
        a = ch.agent
        if self.kv.shared and a is not None:
            if a.k_lora and ("k", a.name) in ch.streams:
                K = _read(ch.streams[("k", a.name)].pool.layer(0, layer), self._read_slots(i)[("k", a.name)])
            ab = a.lora.get(layer, V_PROJ) if a.v_rank else None
            if ab is not None:
                lkey = self._lr_key(a)
                L = _read(ch.streams[lkey].pool.layer(0, layer), self._read_slots(i)[lkey])
                # the torch fallback materialises L·B; Flash-LoRA (kernels) never does
                V = V + F.linear(L, ab[1]).view_as(V).to(V.dtype)
        head_mask = self.s2.mask(layer, ch.start, ch.end, q.device) if self.s2 is not None else None
        return attend_torch(q, K, V, ch.start, self.scale, self.window, head_mask)
