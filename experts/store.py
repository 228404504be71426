"""ExpertStore: MoE expert weights of a base model and many ESFT adapters in virtual memory.

Per MoE layer there is one virtual tensor per stacked weight, `w13 [M + S, 2I, H]` (gate rows then
up rows) and `w2 [M + S, H, I]`, each a view over its own `vmm.VirtualArena`. Rows `0..M-1` are the
base experts, mapped and kept for the store's lifetime; rows `M..M+S-1` are adapter slots. Loading
an adapter puts each fine-tuned expert into the lowest free slot of its layer (first fit), maps
only the pages those slots touch that are not mapped yet, and copies the weights in. An expert is
rarely a whole number of pages, so neighbouring slots share the page at their boundary: pages are
refcounted by the live slots touching them, mapped on the first and unmapped on the last. Nothing
is ever padded or moved, so the tensors (and anything holding them, e.g. a captured CUDA graph)
stay valid across loads and unloads.

The expert map of a layer, `[max_adapters, M] int32` on the store's device, says for adapter row
`a` and base expert `e` which row of the extended table serves it (`e` itself where the adapter did
not fine-tune `e`). It is updated in place: after the weights are copied on load, before any page
is unmapped on unload.
"""
from __future__ import annotations

import operator
import threading
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

import vmm

from .errors import (DuplicateAdapterError, NoFreeSlotsError, StoreOutOfMemoryError,
                     UnknownAdapterError)

ExpertWeights = Mapping[int, Mapping[int, "tuple[torch.Tensor, torch.Tensor]"]]


@dataclass
class AdapterInfo:
    """A loaded adapter: its expert-map row and, per layer, base expert id -> extended row."""
    name: str
    index: int
    slots: dict[int, dict[int, int]] = field(default_factory=dict)
    exact_bytes: int = 0

    @property
    def num_experts(self) -> int:
        return sum(len(s) for s in self.slots.values())


class _Weight:
    """One stacked weight of one layer: an arena, its whole-reservation view, page refcounts."""

    def __init__(self, pool: vmm.PagePool, rows: int, row_shape: tuple[int, int], dtype: torch.dtype):
        self.row_bytes = row_shape[0] * row_shape[1] * dtype.itemsize
        self.page = pool.page_size
        self.arena = vmm.VirtualArena(pool, rows * self.row_bytes)
        self.refs = [0] * (self.arena.reserved_bytes // self.page)
        self.rows, self.row_shape, self.dtype = rows, row_shape, dtype
        self.tensor: torch.Tensor | None = None

    def make_view(self) -> None:
        # after the base rows are mapped, so the view's first page is always backed
        self.tensor = self.arena.view(0, (self.rows, *self.row_shape), self.dtype, require_mapped=False)

    def pages_of(self, row: int) -> range:
        start = row * self.row_bytes
        return range(start // self.page, (start + self.row_bytes - 1) // self.page + 1)

    def new_pages(self, rows: Sequence[int]) -> list[int]:
        """Pages the rows touch that no live row maps yet (sorted, unique)."""
        return sorted({p for r in rows for p in self.pages_of(r) if self.refs[p] == 0})

    def runs(self, pages: Sequence[int]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for p in pages:
            if out and out[-1][0] + out[-1][1] == p:
                out[-1] = (out[-1][0], out[-1][1] + 1)
            else:
                out.append((p, 1))
        return out

    def map_pages(self, pages: Sequence[int]) -> None:
        """Map the pages (each unmapped) in contiguous runs; all or nothing."""
        done: list[tuple[int, int]] = []
        try:
            for first, n in self.runs(pages):
                self.arena.map(first * self.page, n * self.page)
                done.append((first, n))
        except BaseException:
            for first, n in reversed(done):
                self.arena.unmap(first * self.page, n * self.page)
            raise

    def unmap_pages(self, pages: Sequence[int]) -> None:
        for first, n in self.runs(pages):
            self.arena.unmap(first * self.page, n * self.page)

    def incref(self, rows: Sequence[int]) -> None:
        for r in rows:
            for p in self.pages_of(r):
                self.refs[p] += 1

    def decref(self, rows: Sequence[int]) -> list[int]:
        """Drop the rows' references; returns the pages no live row uses any more."""
        freed = set()
        for r in rows:
            for p in self.pages_of(r):
                self.refs[p] -= 1
                if self.refs[p] == 0:
                    freed.add(p)
        return sorted(freed)

    def boundary_pages(self, live_rows: Sequence[int]) -> int:
        """Mapped pages that the live rows cover only partly."""
        covered = [0] * len(self.refs)
        for r in live_rows:
            pr = self.pages_of(r)
            start, end = r * self.row_bytes, (r + 1) * self.row_bytes
            for p in pr:
                covered[p] += min(end, (p + 1) * self.page) - max(start, p * self.page)
        return sum(1 for p, c in enumerate(covered) if self.refs[p] and c < self.page)


class ExpertStore:
    """Base and adapter MoE experts of several layers in virtual memory (see module doc).

    Args:
        layers: MoE layer ids (e.g. `range(1, 27)` when layer 0 is dense) or a layer count.
        num_experts: `M`, routed experts per layer in the base model.
        hidden: `H`; intermediate: `I` (per routed expert).
        max_slots: `S`, adapter expert slots per layer (reserved address space only).
        max_adapters: rows of each expert map (adapters loaded at once).
        dtype: weight dtype.
        device: where weights live when no pool is given: None picks the vmm default backend
            (cuda when usable), "cpu" the host backend, "cuda"/"cuda:N" the cuda backend.
        page_pool: a `vmm.PagePool` to draw pages from (its backend decides the device);
            default: a pool of `capacity_bytes` (default: enough for base + every slot).
        page_size: page size of the default pool (default: the backend's granularity).

    The base experts' pages are mapped at construction; load them with `load_base`.
    """

    def __init__(self, layers: int | Sequence[int], num_experts: int, hidden: int, intermediate: int,
                 max_slots: int, dtype: torch.dtype = torch.bfloat16, device: str | torch.device | None = None,
                 page_pool: vmm.PagePool | None = None, *, max_adapters: int = 16,
                 capacity_bytes: int | None = None, page_size: int | None = None) -> None:
        if isinstance(layers, bool):
            raise TypeError("layers must be an int or a sequence of layer ids")
        layer_ids = list(range(layers)) if isinstance(layers, int) else [int(l) for l in layers]
        if not layer_ids or len(set(layer_ids)) != len(layer_ids) or min(layer_ids) < 0:
            raise ValueError(f"layers must be distinct non-negative ids (or a positive count), got {layers!r}")
        for name, v, lo in (("num_experts", num_experts, 1), ("hidden", hidden, 1),
                            ("intermediate", intermediate, 1), ("max_slots", max_slots, 0),
                            ("max_adapters", max_adapters, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.layers = layer_ids
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        self.max_slots, self.max_adapters, self.dtype = max_slots, max_adapters, dtype
        self.w13_row_bytes = 2 * intermediate * hidden * dtype.itemsize
        self.w2_row_bytes = hidden * intermediate * dtype.itemsize
        self.expert_bytes = self.w13_row_bytes + self.w2_row_bytes
        rows = num_experts + max_slots

        if page_pool is None:
            if device is None:
                backend = vmm.get_backend()
            elif torch.device(device).type == "cpu":
                backend = vmm.get_backend("host")
            else:
                backend = vmm.get_backend("cuda", device)
            ps = page_size or backend.granularity
            if capacity_bytes is None:
                per_layer = sum(-(-rows * b // ps) * ps for b in (self.w13_row_bytes, self.w2_row_bytes))
                capacity_bytes = per_layer * len(layer_ids)
            page_pool = vmm.PagePool(backend, capacity_bytes, page_size=page_size)
        elif not isinstance(page_pool, vmm.PagePool):
            raise TypeError(f"page_pool must be a vmm.PagePool, got {type(page_pool).__name__}")
        self.pool = page_pool
        self.device = page_pool.device
        self.page_size = page_pool.page_size
        self._lock = threading.RLock()

        self._w13: dict[int, _Weight] = {}
        self._w2: dict[int, _Weight] = {}
        try:
            for l in layer_ids:
                self._w13[l] = _Weight(page_pool, rows, (2 * intermediate, hidden), dtype)
                self._w2[l] = _Weight(page_pool, rows, (hidden, intermediate), dtype)
            base_rows = list(range(num_experts))
            for w in self._all_weights():
                w.map_pages(w.new_pages(base_rows))
                w.incref(base_rows)
                w.make_view()
        except BaseException:
            self.close()
            raise
        self._layer_index = {l: i for i, l in enumerate(layer_ids)}
        self._identity = torch.arange(num_experts, dtype=torch.int32)
        self._maps = self._identity.repeat(len(layer_ids), max_adapters, 1).to(self.device)
        self._slot_owner: dict[int, list[str | None]] = {l: [None] * max_slots for l in layer_ids}
        self._adapters: dict[str, AdapterInfo] = {}
        self._rows_free = list(range(max_adapters))
        self._base_loaded = {l: False for l in layer_ids}

    # ---- accessors --------------------------------------------------------------------------
    def _all_weights(self):
        for l in self._w13:
            yield self._w13[l]
            if l in self._w2:
                yield self._w2[l]

    def _check_layer(self, layer: int) -> None:
        if layer not in self._w13:
            raise ValueError(f"layer {layer!r} is not an MoE layer of this store (layers {self.layers})")

    def w13(self, layer: int) -> torch.Tensor:
        """`[M + S, 2I, H]` view; rows of free slots are unmapped and must not be read."""
        self._check_layer(layer)
        return self._w13[layer].tensor

    def w2(self, layer: int) -> torch.Tensor:
        """`[M + S, H, I]` view; rows of free slots are unmapped and must not be read."""
        self._check_layer(layer)
        return self._w2[layer].tensor

    def expert_map(self, layer: int) -> torch.Tensor:
        """`[max_adapters, M] int32` on the store's device, updated in place."""
        self._check_layer(layer)
        return self._maps[self._layer_index[layer]]

    @property
    def num_rows(self) -> int:
        """`M + S`: rows of the extended expert table."""
        return self.num_experts + self.max_slots

    @property
    def adapters(self) -> list[str]:
        with self._lock:
            return list(self._adapters)

    def adapter_id(self, name: str) -> int:
        """The adapter's expert-map row (the id to pass per token to the reroute kernel)."""
        return self._info(name).index

    def adapter_info(self, name: str) -> AdapterInfo:
        info = self._info(name)
        return AdapterInfo(info.name, info.index, {l: dict(s) for l, s in info.slots.items()}, info.exact_bytes)

    def free_slots(self, layer: int) -> int:
        self._check_layer(layer)
        with self._lock:
            return sum(o is None for o in self._slot_owner[layer])

    def mapped_ranges(self, layer: int) -> dict[str, list[tuple[int, int]]]:
        """Mapped byte ranges `(offset, nbytes)` of the layer's w13 and w2 tensors."""
        self._check_layer(layer)
        return {"w13": self._w13[layer].arena.mapped_ranges(), "w2": self._w2[layer].arena.mapped_ranges()}

    def live_rows(self, layer: int) -> list[int]:
        """Rows of the extended table that hold weights: the base experts and occupied slots."""
        self._check_layer(layer)
        with self._lock:
            M = self.num_experts
            return list(range(M)) + [M + s for s, o in enumerate(self._slot_owner[layer]) if o is not None]

    def _info(self, name: str) -> AdapterInfo:
        with self._lock:
            info = self._adapters.get(name)
        if info is None:
            raise UnknownAdapterError(f"no adapter named {name!r} is loaded (loaded: {sorted(self._adapters)})")
        return info

    # ---- base -------------------------------------------------------------------------------
    def load_base(self, layer: int, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Copy the base experts of `layer`: `w13 [M, 2I, H]` (gate rows then up rows), `w2 [M, H, I]`
        (any floating dtype and device; cast to the store's dtype)."""
        self._check_layer(layer)
        M, I, H = self.num_experts, self.intermediate, self.hidden
        _check_weight("w13", w13, (M, 2 * I, H))
        _check_weight("w2", w2, (M, H, I))
        with self._lock:
            self._w13[layer].tensor[:M].copy_(w13)
            self._w2[layer].tensor[:M].copy_(w2)
            self._base_loaded[layer] = True

    def load_base_checkpoint(self, source, layers: Sequence[int] | None = None) -> None:
        """Load the base experts of `layers` (default: all) from a Hugging Face checkpoint
        directory or state dict, per-expert or fused layout (see `experts.esft.load_base_experts`)."""
        from .esft import load_base_experts, read_checkpoint

        if not isinstance(source, Mapping):
            source = read_checkpoint(source)
        for layer in (self.layers if layers is None else layers):
            self._check_layer(layer)
            self.load_base(layer, *load_base_experts(source, layer, self.num_experts))

    def base_loaded(self, layer: int) -> bool:
        self._check_layer(layer)
        return self._base_loaded[layer]

    # ---- adapters ---------------------------------------------------------------------------
    def load_adapter(self, name: str, experts: ExpertWeights) -> int:
        """Load an adapter: `experts[layer][expert_id] = (w13_e [2I, H], w2_e [H, I])`.

        Every layer's experts go to the lowest free slots of that layer; only pages no live slot
        maps yet are mapped. Returns the adapter's expert-map row. Raises (changing nothing)
        DuplicateAdapterError, ValueError/TypeError for bad layers, ids or shapes,
        NoFreeSlotsError when a layer or the expert map is full, StoreOutOfMemoryError when the
        page pool is.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        if not isinstance(experts, Mapping):
            raise TypeError("experts must map layer -> {expert_id: (w13_e, w2_e)}")
        M, I, H = self.num_experts, self.intermediate, self.hidden
        plan: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        for layer, per_layer in experts.items():
            layer = _as_index(layer, "layer id")
            self._check_layer(layer)
            if layer in plan:
                raise ValueError(f"layer {layer} is given twice")
            if not isinstance(per_layer, Mapping):
                raise TypeError(f"experts[{layer}] must map expert_id -> (w13_e, w2_e)")
            items = []
            for e, pair in sorted((_as_index(e, f"layer {layer} expert id"), p) for e, p in per_layer.items()):
                if not 0 <= e < M:
                    raise ValueError(f"layer {layer}: expert id {e} is not in [0, {M})")
                if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                    raise TypeError(f"layer {layer} expert {e}: expected (w13_e, w2_e)")
                _check_weight(f"layer {layer} expert {e} w13", pair[0], (2 * I, H))
                _check_weight(f"layer {layer} expert {e} w2", pair[1], (H, I))
                items.append((e, pair[0], pair[1]))
            if items:
                plan[layer] = items
        with self._lock:
            if name in self._adapters:
                raise DuplicateAdapterError(f"an adapter named {name!r} is already loaded")
            if not self._rows_free:
                raise NoFreeSlotsError(f"all {self.max_adapters} expert-map rows are taken; unload an adapter "
                                       f"or build the store with a larger max_adapters")
            # first fit: the lowest free slots of each layer
            slots: dict[int, dict[int, int]] = {}
            for layer, items in plan.items():
                free = [s for s, o in enumerate(self._slot_owner[layer]) if o is None]
                if len(free) < len(items):
                    raise NoFreeSlotsError(f"layer {layer} has {len(free)} free expert slots of {self.max_slots}; "
                                           f"adapter {name!r} needs {len(items)}")
                slots[layer] = {e: M + s for (e, _, _), s in zip(items, free)}
            self._map_for(name, slots)
            try:
                for layer, items in plan.items():
                    rows = slots[layer]
                    for e, w13_e, w2_e in items:
                        self._w13[layer].tensor[rows[e]].copy_(w13_e)
                        self._w2[layer].tensor[rows[e]].copy_(w2_e)
            except BaseException:
                self._release(slots)
                raise
            for layer, rows in slots.items():
                for r in rows.values():
                    self._slot_owner[layer][r - M] = name
            index = self._rows_free.pop(0)
            info = AdapterInfo(name, index, slots, sum(len(s) for s in slots.values()) * self.expert_bytes)
            # publish the routing only once the weights are in place (same stream: ordered)
            table = self._identity.repeat(len(self.layers), 1)
            for layer, rows in slots.items():
                li = self._layer_index[layer]
                for e, r in rows.items():
                    table[li, e] = r
            self._maps[:, index, :].copy_(table)
            self._adapters[name] = info
            return index

    def _map_for(self, name: str, slots: dict[int, dict[int, int]]) -> None:
        """Map the new pages of every slot and take the page references, or change nothing."""
        todo = []
        for layer, rows in slots.items():
            r = sorted(rows.values())
            for w in (self._w13[layer], self._w2[layer]):
                todo.append((w, r, w.new_pages(r)))
        need = sum(len(p) for _, _, p in todo)
        st = self.pool.stats()
        avail = st["capacity_bytes"] // self.page_size - st["pages_in_use"]
        if need > avail:
            raise StoreOutOfMemoryError(f"adapter {name!r} needs {need} new pages of {self.page_size} bytes; "
                                        f"the page pool has {avail} left")
        done = []
        try:
            for w, r, pages in todo:
                w.map_pages(pages)
                done.append((w, pages))
        except vmm.OutOfMemoryError as err:
            for w, pages in reversed(done):
                w.unmap_pages(pages)
            raise StoreOutOfMemoryError(f"adapter {name!r}: the page pool ran out of pages ({err})") from err
        except BaseException:
            for w, pages in reversed(done):
                w.unmap_pages(pages)
            raise
        for w, r, _ in todo:
            w.incref(r)

    def unload_adapter(self, name: str) -> None:
        """Route the adapter's tokens back to the base, then unmap the pages no live slot uses.
        Synchronises the device before unmapping (vmm does), so kernels in flight finish first."""
        with self._lock:
            info = self._info(name)
            self._maps[:, info.index, :].copy_(self._identity.repeat(len(self.layers), 1))
            self._release(info.slots)
            for layer, rows in info.slots.items():
                for x in rows.values():
                    self._slot_owner[layer][x - self.num_experts] = None
            del self._adapters[name]
            self._rows_free.append(info.index)
            self._rows_free.sort()

    def _release(self, slots: dict[int, dict[int, int]]) -> None:
        """Drop the slots' page references and unmap the pages that leaves unused."""
        for layer, rows in slots.items():
            r = sorted(rows.values())
            for w in (self._w13[layer], self._w2[layer]):
                w.unmap_pages(w.decref(r))

    def load_esft(self, path, name: str | None = None) -> int:
        """Read an ESFT adapter directory (see `experts.esft.load_esft_dir`) and load it;
        the name defaults to the directory's name."""
        from pathlib import Path

        from .esft import load_esft_dir

        adapter = load_esft_dir(path, num_experts=self.num_experts, hidden=self.hidden,
                                intermediate=self.intermediate, layers=self.layers)
        return self.load_adapter(name or Path(path).name, adapter.experts)

    # ---- accounting -------------------------------------------------------------------------
    def memory_report(self) -> dict:
        """Exact and mapped bytes, and what the same adapters would cost otherwise.

        exact_bytes: base + live adapter experts, byte for byte; mapped_bytes: pages mapped in the
        store's arenas; boundary_pages: mapped pages live slots cover only in part (the whole
        overhead: 0 <= mapped - exact < boundary_pages * page_size, and 0 when there are none); merged_copies_bytes: the base
        experts plus one full merged copy of every layer's experts per adapter;
        padded_to_max_bytes: the base plus, per adapter and layer, room for as many experts as the
        largest adapter layer holds (a fixed per-adapter allotment); page_padded_bytes: every
        expert weight rounded up to whole pages.
        """
        with self._lock:
            L, M = len(self.layers), self.num_experts
            base = L * M * self.expert_bytes
            adapter = sum(a.exact_bytes for a in self._adapters.values())
            mapped = sum(w.arena.mapped_bytes for w in self._all_weights())
            boundary = 0
            for layer in self.layers:
                live = self.live_rows(layer)
                boundary += self._w13[layer].boundary_pages(live) + self._w2[layer].boundary_pages(live)
            n = len(self._adapters)
            most = max((len(s) for a in self._adapters.values() for s in a.slots.values()), default=0)
            ps = self.page_size
            padded_row = sum(-(-b // ps) * ps for b in (self.w13_row_bytes, self.w2_row_bytes))
            n_rows = L * M + sum(a.num_experts for a in self._adapters.values())
            return {
                "page_size": ps,
                "layers": L,
                "adapters": n,
                "expert_bytes": self.expert_bytes,          # one expert (w13 + w2 rows)
                "exact_expert_bytes": base + adapter,        # alias of exact_bytes
                "base_bytes": base,
                "adapter_bytes": adapter,
                "exact_bytes": base + adapter,
                "mapped_bytes": mapped,
                "overhead_bytes": mapped - base - adapter,
                "boundary_pages": boundary,
                "reserved_bytes": sum(w.arena.reserved_bytes for w in self._all_weights()),
                "merged_copies_bytes": base * (1 + n),
                "padded_to_max_bytes": base + n * L * most * self.expert_bytes,
                "page_padded_bytes": n_rows * padded_row,
                "per_adapter": {a.name: {"id": a.index, "experts": a.num_experts, "bytes": a.exact_bytes}
                                for a in self._adapters.values()},
            }

    stats = memory_report

    def close(self) -> None:
        """Unmap everything and free the address space (views become invalid)."""
        for w in list(self._w13.values()) + list(self._w2.values()):
            w.arena.close()

    def __repr__(self) -> str:
        return (f"<ExpertStore layers={len(self.layers)} M={self.num_experts} S={self.max_slots} "
                f"H={self.hidden} I={self.intermediate} {self.dtype} on {self.device}, "
                f"{len(self._adapters)} adapters>")


def _as_index(v: object, what: str) -> int:
    """An int from an int-like id (int, numpy or 0-d torch integer), never from a bool."""
    if isinstance(v, bool):
        raise TypeError(f"{what} must be an integer, got {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {v!r}") from None


def _check_weight(what: str, t: object, shape: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{what} must be a floating tensor, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{what} has shape {tuple(t.shape)}, expected {tuple(shape)}")
