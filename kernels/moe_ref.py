"""Float64 references for the ExpertWeave kernels in `kernels.moe`.

Deliberately naive (gathers, loops): they define what the kernels must compute and are only
used by tests, on small inputs.
"""
from __future__ import annotations

import torch


def reroute_experts_ref(topk_ids: torch.Tensor, adapter_ids: torch.Tensor,
                        expert_map: torch.Tensor) -> torch.Tensor:
    """`out[t, j] = expert_map[adapter_ids[t], topk_ids[t, j]]`, or `topk_ids[t, j]` when the
    token's adapter id is -1 (the base model)."""
    out = topk_ids.detach().cpu().to(torch.int64).clone()
    ids = adapter_ids.detach().cpu().tolist()
    emap = expert_map.detach().cpu().to(torch.int64)
    for t, a in enumerate(ids):
        if a >= 0:
            out[t] = emap[a, out[t]]
    return out.to(torch.int32)


def router_topk_ref(router_logits: torch.Tensor, top_k: int, *, renormalize: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax in float64 over experts, top-k, optional renormalisation of the chosen weights."""
    p = torch.softmax(router_logits.detach().cpu().double(), dim=-1)
    w, i = torch.topk(p, top_k, dim=-1)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, i.to(torch.int32)


def expert_mlp_ref(x: torch.Tensor, w13_e: torch.Tensor, w2_e: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert in float64: `(silu(x Wg^T) * (x Wu^T)) W2^T`, `w13_e = [Wg; Wu]`."""
    x, w13_e, w2_e = x.double(), w13_e.double(), w2_e.double()
    inter = w13_e.shape[0] // 2
    g = x @ w13_e[:inter].T
    u = x @ w13_e[inter:].T
    return (torch.nn.functional.silu(g) * u) @ w2_e.T


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """`out[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t])`, in float64 on x's device."""
    x = x.detach().double()
    tw = topk_weights.detach().double()
    ids = topk_ids.detach().to(torch.int64)
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64, device=x.device)
    for e in ids.unique().tolist():
        rows, cols = (ids == e).nonzero(as_tuple=True)
        y = expert_mlp_ref(x[rows], w13[e], w2[e])
        out.index_add_(0, rows, y * tw[rows, cols][:, None])
    return out
