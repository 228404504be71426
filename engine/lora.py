"""PEFT LoRA adapters: loading `adapter_config.json` + `adapter_model.safetensors`, and applying
many adapters to one batch of tokens (each token names its adapter).

The LoRA scaling (lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora) is folded into B at
load time, so every consumer — projections, low-rank V caches, Flash-LoRA — sees `x·A·B`.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from safetensors import safe_open

from .config import ModelConfig
from .loader import LoadError

ATTN_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_MODULES = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SHARED_EXPERT_MODULES = tuple(m.replace("mlp.", "mlp.shared_expert.") for m in MLP_MODULES)

_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


def module_dims(c: ModelConfig, module: str, layer: int) -> tuple[int, int] | None:
    """(in_features, out_features) of a LoRA-able module in `layer`, or None if it has none."""
    H = c.hidden_size
    attn = {"self_attn.q_proj": (H, c.q_size), "self_attn.k_proj": (H, c.kv_size),
            "self_attn.v_proj": (H, c.kv_size), "self_attn.o_proj": (c.q_size, H)}
    if module in attn:
        return attn[module]
    if module in MLP_MODULES and not c.is_moe_layer(layer):
        inter = c.intermediate_size
        return {"mlp.gate_proj": (H, inter), "mlp.up_proj": (H, inter), "mlp.down_proj": (inter, H)}[module]
    if module in SHARED_EXPERT_MODULES and c.is_moe_layer(layer) and c.shared_expert_intermediate_size:
        s = c.shared_expert_intermediate_size
        return {"gate_proj": (H, s), "up_proj": (H, s), "down_proj": (s, H)}[module.rsplit(".", 1)[1]]
    return None


@dataclass
class LoraAdapter:
    name: str
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, module) -> (A [r,in], B·s [out,r])
    path: str | None = None
    modules: set[str] = field(default_factory=set)

    def __post_init__(self):
        self.modules = {m for (_, m) in self.weights}

    @property
    def rank(self) -> int:
        return max((a.shape[0] for a, _ in self.weights.values()), default=0)

    def get(self, layer: int, module: str):
        return self.weights.get((layer, module))

    def has(self, module: str) -> bool:
        return module in self.modules

    def v_rank(self) -> int:
        """Rank of the v_proj adapter (0 if none); the low-rank V cache holds this many values per token."""
        ranks = {a.shape[0] for (l, m), (a, _) in self.weights.items() if m == "self_attn.v_proj"}
        if len(ranks) > 1:
            raise LoadError(f"adapter {self.name!r}: v_proj ranks differ across layers {sorted(ranks)}")
        return ranks.pop() if ranks else 0

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def same_v_a(x: LoraAdapter, y: LoraAdapter) -> bool:
    """True when both adapters use the very same A for v_proj in every layer (LRAgent's shared A)."""
    kx = {k for k in x.weights if k[1] == "self_attn.v_proj"}
    ky = {k for k in y.weights if k[1] == "self_attn.v_proj"}
    if not kx or kx != ky:
        return False
    return all(torch.equal(x.weights[k][0], y.weights[k][0]) for k in kx)


def _pattern_value(patterns: dict, full_name: str, default):
    for key, val in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", full_name):
            return val
    return default


def load_peft_adapter(path: str, config: ModelConfig, device, dtype, name: str = "") -> LoraAdapter:
    """Read a PEFT LoRA directory; errors name the file and what is wrong in it."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise LoadError(f"LoRA adapter directory {path!r} does not exist")
    cfg_path = os.path.join(path, "adapter_config.json")
    w_path = os.path.join(path, "adapter_model.safetensors")
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise LoadError(f"LoRA adapter directory {path!r} lacks {os.path.basename(p)}")
    with open(cfg_path) as f:
        try:
            acfg = json.load(f)
        except json.JSONDecodeError as e:
            raise LoadError(f"{cfg_path}: not valid JSON ({e})") from None
    if acfg.get("peft_type", "LORA") != "LORA":
        raise LoadError(f"{cfg_path}: peft_type {acfg.get('peft_type')!r} is not LORA")
    for flag, ok in (("use_dora", False), ("bias", "none")):
        if acfg.get(flag, ok) not in (ok, None):
            raise LoadError(f"{cfg_path}: {flag}={acfg.get(flag)!r} is not supported")
    if acfg.get("modules_to_save"):
        raise LoadError(f"{cfg_path}: modules_to_save is not supported")
    if "r" not in acfg or "lora_alpha" not in acfg:
        raise LoadError(f"{cfg_path}: needs 'r' and 'lora_alpha'")
    alpha_default, rslora = float(acfg["lora_alpha"]), bool(acfg.get("use_rslora", False))

    raw: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    with safe_open(w_path, framework="pt") as f:
        for key in f.keys():
            m = _KEY.search(key)
            if m is None:
                raise LoadError(f"{w_path}: tensor {key!r} is not a LoRA A/B weight of a decoder layer")
            layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
            if not 0 <= layer < config.num_layers:
                raise LoadError(f"{w_path}: {key!r} names layer {layer}; the model has {config.num_layers}")
            if module_dims(config, module, layer) is None:
                raise LoadError(f"{w_path}: LoRA on {module!r} (layer {layer}) is not supported; "
                                "supported: q/k/v/o_proj and dense or shared-expert MLP projections")
            raw.setdefault((layer, module), {})[ab] = f.get_tensor(key)
    if not raw:
        raise LoadError(f"{w_path}: no LoRA weights")
    weights = {}
    for (layer, module), ab in raw.items():
        if set(ab) != {"A", "B"}:
            raise LoadError(f"{w_path}: layer {layer} {module} lacks lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"], ab["B"]
        fin, fout = module_dims(config, module, layer)
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != fin or b.shape != (fout, r):
            raise LoadError(f"{w_path}: layer {layer} {module}: A {tuple(a.shape)} / B {tuple(b.shape)} "
                            f"do not fit in={fin}, out={fout}")
        full = f"model.layers.{layer}.{module}"
        alpha = float(_pattern_value(acfg.get("alpha_pattern"), full, alpha_default))
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        a = a.to(device=device, dtype=dtype).contiguous()
        b = (b.to(torch.float32) * scale).to(device=device, dtype=dtype).contiguous()
        weights[(layer, module)] = (a, b)
    return LoraAdapter(name=name, weights=weights, path=str(path))


class LoraSet:
    """The registered adapters by integer id; applies each token's adapter to a projection.

    Two paths: per-adapter torch matmuls over the rows of each adapter (CPU, fp32 parity), or
    `kernels.lora_shrink` / `lora_expand` (Punica-style grouped GEMMs) over adapters stacked per
    (layer, module), one plan per forward (`impl` set by `prepare`).

    Register and unregister adapters through `add` / `remove`: everything derived from the
    adapters (the stacks above, and what other parts of the engine keep through `memo`) is built
    once and reused by every layer of every forward until the set of adapters changes.
    """

    def __init__(self):
        self._adapters: dict[int, LoraAdapter] = {}
        self._groups: list[tuple[int, torch.Tensor]] = []
        self.impl: str | None = None
        self._memo: dict = {}
        self._stacked_for: tuple[int, ...] = ()
        self._plan = None
        self._plan_key = None  # the host ids (and device) `_plan` was built for
        self._kids = None
        self._slot_of: dict[int, int] = {}  # adapter id -> its row in the stacks

    # ---- the adapter set ---------------------------------------------------------------------
    @property
    def adapters(self) -> Mapping[int, LoraAdapter]:
        """The registered adapters by id (read-only: change the set through `add` / `remove`)."""
        return MappingProxyType(self._adapters)

    def add(self, adapter: LoraAdapter) -> int:
        """Register `adapter`; returns its id (one past the highest id in use)."""
        lora_id = max(self._adapters, default=-1) + 1
        self._adapters[lora_id] = adapter
        self._forget()
        return lora_id

    def remove(self, lora_id: int) -> None:
        """Unregister the adapter with id `lora_id` (KeyError if there is none)."""
        if lora_id not in self._adapters:
            raise KeyError(f"no LoRA adapter with id {lora_id!r}")
        del self._adapters[lora_id]
        self._forget()

    def _forget(self) -> None:
        # an id can come back with another adapter (ids are max + 1), so no derived tensor
        # survives a change of the set
        self._memo = {}
        self._plan_key = None
        self._stacked_for = tuple(sorted(self._adapters))
        self._slot_of = {a: i for i, a in enumerate(self._stacked_for)}

    def memo(self, key, build: Callable[[], object]):
        """`build()` once per `key` while the adapter set stays the same (per-layer tensors derived
        from the adapters, e.g. stacked B matrices, reused by every forward)."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    # ---- per forward -------------------------------------------------------------------------
    def prepare(self, ids: torch.Tensor, impl: str | None = None, host_ids: Sequence[int] | None = None) -> None:
        """Group the batch's tokens by adapter once per forward (not once per layer). `host_ids`:
        the same ids as a host list, which lets the kernel path plan without a device sync
        (without them it reads `ids` back: one sync); the plan is kept while the ids repeat."""
        self.impl = impl if self._adapters else None
        self._groups = []
        if self.impl is None:
            for a in torch.unique(ids).tolist():
                if a >= 0 and a in self._adapters:
                    self._groups.append((a, torch.nonzero(ids == a).squeeze(1)))
            return
        from kernels.lora import lora_plan

        if host_ids is None:
            host_ids = ids.tolist()
        key = (tuple(host_ids), ids.device)
        if key != self._plan_key:  # a steady decode batch has the same ids step after step
            slot = self._slot_of
            kids = np.fromiter((slot.get(a, -1) for a in host_ids), dtype=np.int32, count=len(host_ids))
            # each token's row in the stacks (-1: none), planned on the host and sent in one copy
            self._plan = lora_plan(kids, len(self._stacked_for), device=ids.device)
            self._plan_key = key
        self._kids = self._plan.adapter_ids

    # ---- the per-forward state, for CUDA graphs (engine/graphs.py) ------------------------------
    def step_state(self) -> tuple:
        """What `prepare` set for the current forward; `use_step` puts it back (a captured
        forward runs again with the state of the step it was captured in)."""
        return self.impl, self._groups, self._plan, self._kids

    def use_step(self, state: tuple) -> None:
        self.impl, self._groups, self._plan, self._kids = state

    def graph_inputs(self) -> list[torch.Tensor]:
        """The current forward's device tensors that vary from step to step (the kernel plan)."""
        if self.impl is None:
            return []
        p = self._plan
        return [p.adapter_ids, p.order, p.tiles]

    def graph_key(self) -> tuple | None:
        """What the current forward decided on the host (None: not graphable, the torch path
        groups rows with device index tensors of data-dependent sizes)."""
        if self.impl is None:
            return None if self._groups else ("none",)
        p = self._plan
        return self.impl, self._stacked_for, p.block_m, p.counts

    def _stack(self, layer: int, module: str):
        return self.memo(("stack", layer, module), lambda: self._build_stack(layer, module))

    def _build_stack(self, layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A [n, in, r] and B [n, r, out] of every registered adapter (zero-padded to the highest
        rank, zeros for adapters without this module), or None if none has it."""
        pairs = [self._adapters[s].get(layer, module) for s in self._stacked_for]
        have = [p for p in pairs if p is not None]
        if not have:
            return None
        r = max(a.shape[0] for a, _ in have)
        fin, fout = have[0][0].shape[1], have[0][1].shape[0]
        like = have[0][0]
        A = torch.zeros(len(pairs), fin, r, dtype=like.dtype, device=like.device)
        B = torch.zeros(len(pairs), r, fout, dtype=like.dtype, device=like.device)
        for i, p in enumerate(pairs):
            if p is not None:
                A[i, :, : p[0].shape[0]] = p[0].t()
                B[i, : p[1].shape[1]] = p[1].t()
        return A, B

    def add_to(self, module: str, layer: int, x: torch.Tensor, ids: torch.Tensor,
               base: torch.Tensor) -> torch.Tensor:
        """`base` plus this module's LoRA delta, added in place: `base` is a projection's fresh
        output that the caller owns. On the kernel path the expand adds into it (fp32
        accumulation, one rounding), so the delta is never a tensor of its own."""
        if self.impl is not None:
            st = self._stack(layer, module)
            if st is None:
                return base
            from kernels.lora import lora_expand, lora_shrink

            y = lora_shrink(x, st[0], self._kids, plan=self._plan, impl=self.impl)
            return lora_expand(y, st[1], self._kids, plan=self._plan, out=base, impl=self.impl)
        for a, rows in self._groups:
            ab = self._adapters[a].get(layer, module)
            if ab is not None:
                base.index_add_(0, rows, F_linear(F_linear(x[rows], ab[0]), ab[1]).to(base.dtype))
        return base


def F_linear(x, w):
    return torch.nn.functional.linear(x, w)
