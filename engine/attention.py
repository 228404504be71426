"""The engine's attention backend: writes new tokens' K/V (per cache mode) and attends over the
paged caches, for a batch of chunks from many sessions and agents.

Per layer, every chunk's new K/V are written first and only then does any chunk attend, so
several consecutive chunks of one session (a replay of tokens that different agents processed)
run correctly in one forward.

S2-attention layers keep the kv streams' K/V in the head-sharded storage (`kv.s2`, see
engine/s2.py). On the kernel path, chunks that read plain K/V (no LoRA inside attention) attend
there through `kernels.s2_attention_prefill_paged` / `s2_attention_decode` with per-KV-head block
tables. Chunks that need LoRA inside attention (shared modes: an agent's low-rank V, or its own K
namespace) have no S2 kernel and take the torch path in S2 layers, reading the same sharded K/V.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .cache import Agent, KVManager
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


def _tables(rows: list[list[int]], device) -> torch.Tensor:
    """Block tables [batch, width] int32, short rows padded with block 0 (never read)."""
    width = table_width(max(len(r) for r in rows))
    t = torch.zeros(len(rows), width, dtype=torch.int32)
    for i, r in enumerate(rows):
        t[i, : len(r)] = torch.tensor(r, dtype=torch.int32)
    return t.to(device)


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


class PagedAttention:
    """AttentionBackend for one forward over `chunks` (see engine/model.py)."""

    def __init__(self, kv: KVManager, chunks: list[Chunk], lora, lora_ids: torch.Tensor, s2=None,
                 kernels: str | None = None):
        self.kv, self.chunks, self.lora, self.ids = kv, chunks, lora, lora_ids
        self.s2 = s2  # engine/s2.py S2Masks (the torch path's masks) or None
        self.sharded = kv.s2  # the S2 layers' head-sharded K/V (engine/s2.py ShardedKV) or None
        self.impl = kernels  # None: torch attention per chunk; "triton"/"torch": the paged kernels
        c = kv.config
        self.scale = c.head_dim ** -0.5
        self.window = c.sliding_window
        # slots are the same for every layer: compute them once per forward
        self.w_slots = [{k: s.slots(ch.start, ch.end) for k, s in ch.streams.items()} for ch in chunks]
        self._r_slots: dict[int, dict] = {}  # read slots, built only for chunks the torch path attends
        # the S2 layers' streams (created by the scheduler's reservation) and their write slots
        self.s2_streams = [kv.sessions[ch.sid].sharded[_kv_key(ch)] for ch in chunks] if self.sharded else []
        self.s2_slots = [self.sharded.slots(s, ch.start, ch.end) for s, ch in zip(self.s2_streams, chunks)]
        self.k_agents = [a for a in kv._sorted() if a.k_lora] if kv.shared else []
        self.lr_keys = [k for k in kv.stream_keys(None) if k[0] == "lr"] if kv.shared else []
        self.groups, self.torch_chunks = ({}, list(range(len(chunks)))) if kernels is None else self._plan()

    # ---- the kernel path: chunks grouped into one paged-kernel call each ---------------------
    def _plan(self):
        """Group chunks by what they read: plain paged attention over the KV pool, or
        Flash-LoRA over the KV pool plus one low-rank pool. Chunks the kernels do not cover
        (an agent's own K namespace, a sliding window in reach) take the torch path."""
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
                lkey = ("lr", a.name) if self.kv.mode == "base_shared" else ("lr", None)
                key = ("lora", ch.streams[lkey].pool.name)
            else:
                lkey, key = None, ("plain",)
            g = groups.setdefault(key, {"idx": [], "lkeys": [], "agents": []})
            g["idx"].append(i)
            g["lkeys"].append(lkey)
            if lkey is not None and a not in g["agents"]:
                g["agents"].append(a)
        dev = self.kv.device
        for key, g in groups.items():
            chs = [self.chunks[i] for i in g["idx"]]
            kvs = [ch.streams[_kv_key(ch)] for ch in chs]
            g["kv_pool"] = kvs[0].pool
            g["bt"] = _tables([s.blocks for s in kvs], dev)
            g["seq_lens"] = torch.tensor([ch.end for ch in chs], dtype=torch.int32, device=dev)
            n = [ch.end - ch.start for ch in chs]
            g["decode"] = all(x == 1 for x in n)
            g["max_q"] = max(n)
            g["cu_q"] = torch.tensor([0] + list(itertools.accumulate(n)), dtype=torch.int32, device=dev)
            g["rows"] = torch.cat([torch.arange(ch.row0, ch.row0 + m) for ch, m in zip(chs, n)]).to(dev)
            if key[0] == "lora":
                lrs = [ch.streams[lk] for ch, lk in zip(chs, g["lkeys"])]
                g["lr_pool"] = lrs[0].pool
                g["lr_bt"] = _tables([s.blocks for s in lrs], dev)
                g["aid"] = torch.tensor([g["agents"].index(ch.agent) for ch in chs], dtype=torch.int32, device=dev)
            elif self.sharded is not None:
                g["s2_bt"] = self.sharded.block_tables([self.s2_streams[i] for i in g["idx"]])
        return groups, rest

    def _lora_b(self, agents, layer: int, pool) -> torch.Tensor:
        """[n_agents, Hkv, r, D] B matrices (LoRA scale folded in) of v_proj in `layer`."""
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

    def _attend_kernels(self, layer: int, q: torch.Tensor, out: torch.Tensor, s2_layer: bool) -> set[int]:
        """Run every kernel group of this layer; returns the chunks done. In S2 layers only plain
        groups have a kernel (S2 over the head-sharded K/V); Flash-LoRA groups take the torch path."""
        done: set[int] = set()
        for key, g in self.groups.items():
            if s2_layer and key[0] != "plain":
                continue
            qg = q.index_select(0, g["rows"])
            o = self._s2_kernel(layer, g, qg) if s2_layer else self._dense_kernel(layer, key, g, qg)
            out.index_copy_(0, g["rows"], o.to(out.dtype))
            done.update(g["idx"])
        return done

    def _s2_kernel(self, layer: int, g: dict, qg: torch.Tensor) -> torch.Tensor:
        from kernels import s2_attention_decode, s2_attention_prefill_paged

        kc, vc = self.sharded.k_cache(layer), self.sharded.v_cache(layer)
        pattern, kw = self.sharded.pattern, dict(impl=self.impl, validate=False)
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
            lr = g["lr_pool"].layer(0, layer)
            b = self._lora_b(g["agents"], layer, g["lr_pool"])
            if g["decode"]:
                return flash_lora_decode(qg, kc, vc, lr, g["lr_bt"], b, g["aid"], g["bt"], g["seq_lens"],
                                         self.scale, **kw)
            return flash_lora_prefill(qg, kc, vc, lr, g["lr_bt"], b, g["aid"], g["bt"], g["cu_q"],
                                      g["seq_lens"], self.scale, max_seqlen_q=g["max_q"], **kw)
        if g["decode"]:
            return paged_attention_decode(qg, kc, vc, g["bt"], g["seq_lens"], self.scale, **kw)
        return paged_attention_prefill(qg, kc, vc, g["bt"], g["cu_q"], g["seq_lens"], self.scale,
                                       max_seqlen_q=g["max_q"], **kw)

    def attend(self, model, layer: int, x, q, k, v, rope: Rope) -> torch.Tensor:
        if self.kv.shared:
            self._write_shared(model, layer, x, k, v, rope)
        else:
            self._write_full(model, layer, x, k, v, rope)
        out = torch.empty_like(q)
        s2_layer = self._sharded_layer(layer)
        done = self._attend_kernels(layer, q, out, s2_layer) if self.groups else set()
        for i in (i for i in range(len(self.chunks)) if i not in done):
            ch = self.chunks[i]
            out[ch.rows] = self._attend_chunk(i, ch, layer, q[ch.rows])
        return out

    def _sharded_layer(self, layer: int) -> bool:
        """Whether `layer` keeps its K/V in the head-sharded S2 storage."""
        return self.sharded is not None and self.sharded.holds(layer)

    # ---- writes ------------------------------------------------------------------------------
    def _write_kv(self, i: int, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Chunk i's new K/V (rows of k, v) into its kv stream: the kv pool, or in S2 layers the
        head-sharded storage."""
        ch = self.chunks[i]
        if self._sharded_layer(layer):
            self.sharded.write(layer, self.s2_slots[i], k[ch.rows], v[ch.rows])
            return
        key = _kv_key(ch)
        pool, slots, kl = ch.streams[key].pool, self.w_slots[i][key], self.kv.kv_layer(layer)
        _write(pool.layer(0, kl), slots, k[ch.rows])
        _write(pool.layer(1, kl), slots, v[ch.rows])

    def _write_full(self, model, layer, x, k, v, rope):
        dk = self.lora.delta(K_PROJ, layer, x, self.ids)
        dv = self.lora.delta(V_PROJ, layer, x, self.ids)
        kf = model.finish_k(layer, k if dk is None else k + dk, rope)
        vf = model.finish_v(v if dv is None else v + dv)
        for i in range(len(self.chunks)):
            self._write_kv(i, layer, kf, vf)

    def _write_shared(self, model, layer, x, k, v, rope):
        kb = model.finish_k(layer, k, rope)
        vb = model.finish_v(v)
        extra_k = {}
        for a in self.k_agents:
            ab = a.lora.get(layer, K_PROJ)
            extra_k[a.name] = kb if ab is None else model.finish_k(layer, k + F.linear(F.linear(x, ab[0]), ab[1]), rope)
        # LRAgent: the low-rank V of every agent from one shrink with the A matrices stacked
        lows = {}
        if self.lr_keys:
            mats, keys = [], []
            for key in self.lr_keys:
                a = self._lr_owner(key)
                ab = a.lora.get(layer, V_PROJ)
                if ab is not None:
                    mats.append(ab[0])
                    keys.append(key)
            if mats:
                low = F.linear(x, torch.cat(mats, 0))
                for key, part in zip(keys, torch.split(low, [m.shape[0] for m in mats], dim=1)):
                    lows[key] = part
        for i, ch in enumerate(self.chunks):
            rows = ch.rows
            for key, s in ch.streams.items():
                slots = self.w_slots[i][key]
                if key[0] == "kv":
                    self._write_kv(i, layer, kb, vb)
                elif key[0] == "k":
                    _write(s.pool.layer(0, layer), slots, extra_k[key[1]][rows])
                elif key in lows:
                    _write(s.pool.layer(0, layer), slots, lows[key][rows])

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
        key = _kv_key(ch)
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
                lkey = ("lr", a.name) if self.kv.mode == "base_shared" else ("lr", None)
                L = _read(ch.streams[lkey].pool.layer(0, layer), self._read_slots(i)[lkey])
                # the torch fallback materialises L·B; Flash-LoRA (kernels) never does
                V = V + F.linear(L, ab[1]).view_as(V).to(V.dtype)
        head_mask = self.s2.mask(layer, ch.start, ch.end, q.device) if self.s2 is not None else None
        return attend_torch(q, K, V, ch.start, self.scale, self.window, head_mask)
