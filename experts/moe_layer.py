"""An MoE block for a batch whose tokens belong to different ESFT adapters.

router logits -> softmax top-k and, in the same kernel, the per-token reroute to the adapter's
expert copies (`kernels.router_topk(..., adapter_ids=, expert_map=)`, equal to
`kernels.reroute_experts`) -> grouped SwiGLU over the extended expert table
(`kernels.fused_moe`) -> plus the shared experts, gated by `sigmoid(x g^T)` where the
architecture has a shared-expert gate (Qwen2-MoE).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.moe import fused_moe, router_topk


class MoELayer:
    """One MoE block over an extended expert table.

    Args:
        gate_weight: router `[M, H]`.
        w13: `[E_ext, 2I, H]`, w2: `[E_ext, H, I]` (e.g. `store.w13(layer)`, `store.w2(layer)`).
        top_k: experts per token.
        expert_map: `[max_adapters, M] int32` (e.g. `store.expert_map(layer)`); None: base only.
        renormalize: renormalise the top-k weights (see `kernels.moe.ROUTER_RENORMALIZE`).
        routed_scaling_factor: multiplies the routed output weights (DeepSeek-V2; 1.0 elsewhere).
        router_fp32: compute the router logits in fp32 (DeepSeek-V2 does; HF Qwen/Mixtral use
            the model dtype).
        shared_w13: `[2Is, H]` and shared_w2: `[H, Is]`: the shared experts as one SwiGLU MLP
            (DeepSeek's n shared experts are one MLP of n * I), or None.
        shared_gate: `[1, H]` shared-expert gate (Qwen2-MoE), or None.
    """

    def __init__(self, gate_weight: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int, *,
                 expert_map: torch.Tensor | None = None, renormalize: bool = False,
                 routed_scaling_factor: float = 1.0, router_fp32: bool = False,
                 shared_w13: torch.Tensor | None = None, shared_w2: torch.Tensor | None = None,
                 shared_gate: torch.Tensor | None = None) -> None:
        if gate_weight.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
            raise ValueError("gate_weight must be [M, H], w13 [E, 2I, H], w2 [E, H, I]")
        M, H = gate_weight.shape
        if w13.shape[2] != H or w2.shape[1] != H:
            raise ValueError(f"hidden sizes differ: gate {H}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
        if w13.shape[0] < M:
            raise ValueError(f"the expert table has {w13.shape[0]} rows, fewer than the router's {M} experts")
        if expert_map is not None and (expert_map.dim() != 2 or expert_map.shape[1] != M
                                       or expert_map.dtype != torch.int32):
            raise ValueError(f"expert_map must be [adapters, {M}] int32, got {tuple(expert_map.shape)} {expert_map.dtype}")
        if (shared_w13 is None) != (shared_w2 is None):
            raise ValueError("give both shared_w13 and shared_w2, or neither")
        if shared_w13 is not None:
            if shared_w13.dim() != 2 or shared_w13.shape[1] != H or shared_w13.shape[0] % 2 \
                    or tuple(shared_w2.shape) != (H, shared_w13.shape[0] // 2):
                raise ValueError(f"shared experts must be [2Is, {H}] and [{H}, Is], got "
                                 f"{tuple(shared_w13.shape)} and {tuple(shared_w2.shape)}")
        if shared_gate is not None and tuple(shared_gate.shape) != (1, H):
            raise ValueError(f"shared_gate must be [1, {H}], got {tuple(shared_gate.shape)}")
        if shared_gate is not None and shared_w13 is None:
            raise ValueError("shared_gate needs shared experts")
        if not 1 <= top_k <= M:
            raise ValueError(f"top_k must be in [1, {M}], got {top_k}")
        self.gate_weight, self.w13, self.w2, self.top_k = gate_weight, w13, w2, top_k
        self.expert_map = expert_map
        self.renormalize, self.routed_scaling_factor = bool(renormalize), float(routed_scaling_factor)
        self.router_fp32 = router_fp32
        self.shared_w13, self.shared_w2, self.shared_gate = shared_w13, shared_w2, shared_gate

    @classmethod
    def from_store(cls, store, layer: int, gate_weight: torch.Tensor, top_k: int, **kwargs) -> "MoELayer":
        """A layer over `store`'s tensors for `layer` (they never move, so this stays valid
        across adapter loads and unloads)."""
        return cls(gate_weight, store.w13(layer), store.w2(layer), top_k,
                   expert_map=store.expert_map(layer), **kwargs)

    def route(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None, *, validate: bool = True,
              impl: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(topk_weights fp32 [T, k], extended topk_ids int32 [T, k]) for the batch."""
        if self.router_fp32:
            logits = F.linear(x.float(), self.gate_weight.float())
        else:
            logits = F.linear(x, self.gate_weight.to(x.dtype))
        if adapter_ids is not None and self.expert_map is None:
            raise ValueError("adapter_ids given but this layer has no expert_map")
        # the reroute runs inside the router kernel: no launch beyond what the base model does
        emap = self.expert_map if adapter_ids is not None else None
        tw, ids = router_topk(logits, self.top_k, renormalize=self.renormalize, adapter_ids=adapter_ids,
                              expert_map=emap, validate=validate, impl=impl)
        if self.routed_scaling_factor != 1.0:
            tw = tw * self.routed_scaling_factor
        return tw, ids

    def __call__(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None, *, validate: bool = True,
                 impl: str | None = None) -> torch.Tensor:
        """`x [T, H]`, `adapter_ids [T] int32` (-1: base; None: all base) -> `[T, H]` in x's dtype."""
        if x.dim() != 2 or x.shape[1] != self.gate_weight.shape[1]:
            raise ValueError(f"x must be [tokens, {self.gate_weight.shape[1]}], got {tuple(x.shape)}")
        if adapter_ids is not None and (adapter_ids.dim() != 1 or adapter_ids.shape[0] != x.shape[0]):
            raise ValueError(f"adapter_ids must be [{x.shape[0]}], got {tuple(adapter_ids.shape)}")
        tw, ids = self.route(x, adapter_ids, validate=validate, impl=impl)
        # the router and the reroute only emit valid ids, so fused_moe need not sync to check
        out = fused_moe(x, self.w13, self.w2, tw, ids, validate=False, impl=impl)
        if self.shared_w13 is not None:
            out = out + self.shared(x)
        return out

    forward = __call__

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """The shared experts' contribution (zero-free: only call when there are some)."""
        Is = self.shared_w2.shape[1]
        h = F.linear(x, self.shared_w13.to(x.dtype))
        s = F.linear(F.silu(h[:, :Is]) * h[:, Is:], self.shared_w2.to(x.dtype))
        if self.shared_gate is not None:
            s = torch.sigmoid(F.linear(x, self.shared_gate.to(x.dtype))) * s
        return s
