"""Safetensors checkpoints (single file or sharded with model.safetensors.index.json) -> weights.

Hugging Face names are mapped to the canonical per-layer names DecoderModel uses. MoE experts are
accepted per expert (`mlp.experts.{e}.gate_proj`, Mixtral's `block_sparse_moe.experts.{e}.w1/w3/w2`,
which is what transformers 5 writes with save_pretrained) or fused 3-D (`mlp.experts.gate_up_proj
[E, 2I, H]`, `mlp.experts.down_proj [E, H, I]`, transformers 5's in-memory layout).
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

from .config import ModelConfig


class LoadError(ValueError):
    """A checkpoint directory the engine cannot load (missing files, keys or bad shapes)."""


def _open_all(model_dir: str) -> dict[str, str]:
    """Map every tensor name to the safetensors file that holds it."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            wmap = json.load(f).get("weight_map")
        if not isinstance(wmap, dict) or not wmap:
            raise LoadError(f"{index}: no weight_map")
        files = {os.path.join(model_dir, v) for v in wmap.values()}
        missing = sorted(p for p in files if not os.path.isfile(p))
        if missing:
            raise LoadError(f"{index} names shards that are missing: {missing}")
        return {k: os.path.join(model_dir, v) for k, v in wmap.items()}
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise LoadError(f"{model_dir!r} holds no *.safetensors weights (and no index)")
    out = {}
    for fn in files:
        p = os.path.join(model_dir, fn)
        with safe_open(p, framework="pt") as f:
            for k in f.keys():
                out[k] = p
    return out


class _Reader:
    def __init__(self, where: dict[str, str], device, dtype):
        self.where, self.device, self.dtype = where, device, dtype
        self._handles: dict[str, object] = {}
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, shape: tuple | None = None) -> torch.Tensor:
        if name not in self.where:
            raise LoadError(f"checkpoint lacks tensor {name!r}")
        p = self.where[name]
        if p not in self._handles:
            self._handles[p] = safe_open(p, framework="pt")
        t = self._handles[p].get_tensor(name)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise LoadError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        self.used.add(name)
        return t.to(device=self.device, dtype=self.dtype).contiguous()


def load_weights(model_dir: str, config: ModelConfig, device, dtype) -> dict:
    """Read a checkpoint into canonical weights (see DecoderModel)."""
    r = _Reader(_open_all(model_dir), device, dtype)
    return map_weights(r, config)


def map_weights(r, c: ModelConfig) -> dict:
    H, Q, KV = c.hidden_size, c.q_size, c.kv_size
    pre = "model." if r.has("model.embed_tokens.weight") else ""
    embed = r.get(pre + "embed_tokens.weight", (c.vocab_size, H))
    if r.has("lm_head.weight"):
        lm_head = r.get("lm_head.weight", (c.vocab_size, H))
    elif c.tie_word_embeddings:
        lm_head = embed
    else:
        raise LoadError("checkpoint lacks 'lm_head.weight' and tie_word_embeddings is false")
    layers = []
    for i in range(c.num_layers):
        p = f"{pre}layers.{i}."
        w = {
            "in_norm": r.get(p + "input_layernorm.weight", (H,)),
            "post_norm": r.get(p + "post_attention_layernorm.weight", (H,)),
            "q": r.get(p + "self_attn.q_proj.weight", (Q, H)),
            "k": r.get(p + "self_attn.k_proj.weight", (KV, H)),
            "v": r.get(p + "self_attn.v_proj.weight", (KV, H)),
            "o": r.get(p + "self_attn.o_proj.weight", (H, Q)),
        }
        if c.attention_bias:
            for n, size in (("q", Q), ("k", KV), ("v", KV)):
                w[n + "_bias"] = r.get(p + f"self_attn.{n}_proj.bias", (size,))
        if c.qk_norm != "none":
            full = c.qk_norm == "full"
            w["q_norm"] = r.get(p + "self_attn.q_norm.weight", (Q if full else c.head_dim,))
            w["k_norm"] = r.get(p + "self_attn.k_norm.weight", (KV if full else c.head_dim,))
        if c.is_moe_layer(i):
            w.update(_moe_weights(r, p, c))
        else:
            inter = c.intermediate_size
            w["gate"] = r.get(p + "mlp.gate_proj.weight", (inter, H))
            w["up"] = r.get(p + "mlp.up_proj.weight", (inter, H))
            w["down"] = r.get(p + "mlp.down_proj.weight", (H, inter))
        layers.append(w)
    norm = r.get(pre + "norm.weight", (H,))
    return {"embed": embed, "lm_head": lm_head, "norm": norm, "layers": layers}


def _moe_weights(r, p: str, c: ModelConfig) -> dict:
    H, I, E = c.hidden_size, c.moe_intermediate_size, c.num_experts
    mix = p + "block_sparse_moe."
    base = mix if r.has(mix + "gate.weight") else p + "mlp."
    out = {"router": r.get(base + "gate.weight", (E, H))}
    if r.has(base + "experts.gate_up_proj"):
        gu = r.get(base + "experts.gate_up_proj")
        dn = r.get(base + "experts.down_proj")
        if tuple(gu.shape) == (E, H, 2 * I) and (E, 2 * I, H) != (E, H, 2 * I):
            gu = gu.transpose(1, 2).contiguous()
        if tuple(dn.shape) == (E, I, H) and I != H:
            dn = dn.transpose(1, 2).contiguous()
        if tuple(gu.shape) != (E, 2 * I, H) or tuple(dn.shape) != (E, H, I):
            raise LoadError(f"{base}experts: fused shapes {tuple(gu.shape)}, {tuple(dn.shape)} do not "
                            f"match E={E}, I={I}, H={H}")
        out["w13"], out["w2"] = gu, dn
    else:
        names = ("w1", "w3", "w2") if base == mix else ("gate_proj", "up_proj", "down_proj")
        g, u, d = [], [], []
        for e in range(E):
            ep = f"{base}experts.{e}."
            g.append(r.get(ep + names[0] + ".weight", (I, H)))
            u.append(r.get(ep + names[1] + ".weight", (I, H)))
            d.append(r.get(ep + names[2] + ".weight", (H, I)))
        out["w13"] = torch.cat([torch.stack(g), torch.stack(u)], dim=1).contiguous()
        out["w2"] = torch.stack(d).contiguous()
    if c.shared_expert_intermediate_size:
        S = c.shared_expert_intermediate_size
        out["sh_gate"] = r.get(p + "mlp.shared_expert.gate_proj.weight", (S, H))
        out["sh_up"] = r.get(p + "mlp.shared_expert.up_proj.weight", (S, H))
        out["sh_down"] = r.get(p + "mlp.shared_expert.down_proj.weight", (H, S))
        out["sh_expert_gate"] = r.get(p + "mlp.shared_expert_gate.weight", (1, H))
    return out
