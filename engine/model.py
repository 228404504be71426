"""A plain-PyTorch decoder (RMSNorm, RoPE, GQA, SwiGLU MLP or MoE) with pluggable attention.

The model owns the weights and the per-token math; everything that touches a KV cache lives in an
attention backend (engine/attention.py) that the caller passes to `forward`. Every token carries
an adapter id (LoRA agent) and an expert-adapter id (ESFT), so one forward runs a batch that
mixes agents freely.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from .config import ModelConfig


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # statistics in fp32, as HF does, then scale in the weight's dtype; torch.rms_norm is one
    # fused kernel where torch has one (CUDA) and HF's op sequence where it has not
    return w * torch.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


@dataclass
class Rope:
    """Rotary embedding of a batch's positions (HF's rotate-half convention), built once per
    forward: `sin_signed` is sin with its first half negated, so that
    `x·cos + rotate_half(x)·sin == x·cos + roll(x, D/2)·sin_signed` with one roll instead of
    two slices, a negation and a concatenation per call (exactly: only signs move)."""
    cos: torch.Tensor  # [N, 1, D]
    sin_signed: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:  # x [N, H, D]
        return x * self.cos + torch.roll(x, x.shape[-1] // 2, -1) * self.sin_signed


class LoraProvider(Protocol):
    def add_to(self, module: str, layer: int, x: torch.Tensor, ids: torch.Tensor,
               base: torch.Tensor) -> torch.Tensor: ...


class AttentionBackend(Protocol):
    def attend(self, model: "DecoderModel", layer: int, x: torch.Tensor, q: torch.Tensor,
               k: torch.Tensor, v: torch.Tensor, rope: Rope) -> torch.Tensor:
        """q: [N, Hq, D] final queries; k, v: [N, Hkv*D] base projections (no LoRA, no rope).
        Returns the attention output [N, Hq, D]."""
        ...


class MoeProvider(Protocol):
    def experts(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class BatchInputs:
    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    lora_ids: torch.Tensor  # [N] int64, -1 = no LoRA
    expert_ids: torch.Tensor  # [N] int64, -1 = base experts (ESFT adapter slot otherwise)
    logits_rows: torch.Tensor  # [M] int64 rows of the batch whose logits are wanted


class DecoderModel:
    """Weights in canonical names (see engine/loader.py) and the forward pass."""

    def __init__(self, config: ModelConfig, weights: dict, device, dtype):
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.embed = weights["embed"]
        self.norm = weights["norm"]
        self.lm_head = weights["lm_head"]
        self.layers: list[dict] = weights["layers"]
        self.inv_freq = config.rope_inv_freq(self.device)
        self.esft = None  # set by the engine: routes tokens of ESFT adapters to their experts
        self.moe_impl: str | None = None  # set per forward: kernels.fused_moe impl, None = torch

    # ---- pieces the attention backend calls back into --------------------------------------
    def finish_k(self, layer: int, k: torch.Tensor, rope: Rope) -> torch.Tensor:
        """k [N, Hkv*D] (bias and any LoRA included) -> normed, clipped, rotated [N, Hkv, D]."""
        return self._finish_qk(layer, k, rope, "k_norm", self.config.num_kv_heads)

    def finish_v(self, v: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.clip_qkv is not None:
            v = v.clamp(-c.clip_qkv, c.clip_qkv)
        return v.view(-1, c.num_kv_heads, c.head_dim)

    def _finish_q(self, layer: int, q: torch.Tensor, rope: Rope) -> torch.Tensor:
        return self._finish_qk(layer, q, rope, "q_norm", self.config.num_heads)

    def _finish_qk(self, layer: int, t: torch.Tensor, rope: Rope, norm: str, heads: int) -> torch.Tensor:
        """QK-norm over the whole projection (OLMoE) or per head (Qwen3), clip (OLMo), RoPE."""
        c, w = self.config, self.layers[layer]
        if c.qk_norm == "full":
            t = rms_norm(t, w[norm], c.rms_norm_eps)
        if c.clip_qkv is not None:
            t = t.clamp(-c.clip_qkv, c.clip_qkv)
        t = t.view(-1, heads, c.head_dim)
        if c.qk_norm == "head":
            t = rms_norm(t, w[norm], c.rms_norm_eps)
        return rope.apply(t)

    def rope(self, positions: torch.Tensor) -> Rope:
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        cos, sin = freqs.cos(), freqs.sin()
        return Rope(torch.cat((cos, cos), dim=-1).to(self.dtype)[:, None, :],
                    torch.cat((-sin, sin), dim=-1).to(self.dtype)[:, None, :])

    # ---- the forward -----------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, inp: BatchInputs, attn: AttentionBackend, lora: LoraProvider) -> torch.Tensor:
        """Logits [M, vocab] (float32) for `inp.logits_rows`."""
        c = self.config
        h = self.embed[inp.input_ids]
        rope = self.rope(inp.positions)
        for li, w in enumerate(self.layers):
            x = rms_norm(h, w["in_norm"], c.rms_norm_eps)
            q = lora.add_to("self_attn.q_proj", li, x, inp.lora_ids, _lin(x, w["q"], w.get("q_bias")))
            q = self._finish_q(li, q, rope)
            k = _lin(x, w["k"], w.get("k_bias"))
            v = _lin(x, w["v"], w.get("v_bias"))
            o = attn.attend(self, li, x, q, k, v, rope).reshape(x.shape[0], -1)
            h = h + lora.add_to("self_attn.o_proj", li, o, inp.lora_ids, F.linear(o, w["o"]))
            x = rms_norm(h, w["post_norm"], c.rms_norm_eps)
            if c.is_moe_layer(li):
                h = h + self._moe(li, x, inp, lora)
            else:
                h = h + self._mlp(li, "mlp.", x, w["gate"], w["up"], w["down"], inp.lora_ids, lora)
        h = rms_norm(h[inp.logits_rows], self.norm, c.rms_norm_eps)
        return F.linear(h, self.lm_head).float()

    def _mlp(self, li, prefix, x, wg, wu, wd, ids, lora) -> torch.Tensor:
        g = lora.add_to(prefix + "gate_proj", li, x, ids, F.linear(x, wg))
        u = lora.add_to(prefix + "up_proj", li, x, ids, F.linear(x, wu))
        a = F.silu(g) * u
        return lora.add_to(prefix + "down_proj", li, a, ids, F.linear(a, wd))

    def _moe(self, li: int, x: torch.Tensor, inp: BatchInputs, lora) -> torch.Tensor:
        c, w = self.config, self.layers[li]
        logits = F.linear(x, w["router"])
        w13, w2 = w["w13"], w["w2"]
        if self.moe_impl is not None:
            from kernels import router_topk

            # softmax, top-k and renormalisation in one launch (torch takes four), and with
            # ExpertWeave the reroute of each token to its adapter's experts in the same one
            reroute = {}
            if self.esft is not None:
                emap, w13, w2 = self.esft.tables(li)
                reroute = dict(adapter_ids=inp.expert_ids, expert_map=emap)
            topw, topi = router_topk(logits, c.top_k, renormalize=c.norm_topk_prob, validate=False,
                                     impl=self.moe_impl, **reroute)
            topw = topw.to(x.dtype)
        else:
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            topw, topi = torch.topk(probs, c.top_k, dim=-1)
            if c.norm_topk_prob:
                topw = topw / topw.sum(dim=-1, keepdim=True)
            topw = topw.to(x.dtype)
            if self.esft is not None:
                topi, w13, w2 = self.esft.reroute(li, topi, inp.expert_ids, w13, w2)
        if self.moe_impl is not None:
            from kernels import fused_moe

            y = fused_moe(x, w13, w2, topw, topi, validate=False, impl=self.moe_impl)
        else:
            y = moe_experts(x, w13, w2, topw, topi)
        if c.shared_expert_intermediate_size:
            s = self._mlp(li, "mlp.shared_expert.", x, w["sh_gate"], w["sh_up"], w["sh_down"],
                          inp.lora_ids, lora)
            y = y + torch.sigmoid(F.linear(x, w["sh_expert_gate"])) * s
        return y


def _lin(x, w, b=None):
    return F.linear(x, w, b)


def moe_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topw: torch.Tensor,
                topi: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts over an (extended) expert table; w13 [E, 2I, H] (gate rows first), w2 [E, H, I]."""
    out = torch.zeros_like(x)
    inter = w2.shape[-1]
    for e in torch.unique(topi).tolist():
        tok, slot = torch.where(topi == e)
        gu = F.linear(x[tok], w13[e])
        a = F.silu(gu[:, :inter]) * gu[:, inter:]
        y = F.linear(a, w2[e]) * topw[tok, slot, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out
