"""Float64 references for the multi-LoRA projections in `kernels.lora`.

Deliberately naive (one gathered weight per token): they define what the kernels must compute
and are only used by tests, on small inputs. All return float64 CPU tensors.
"""
from __future__ import annotations

import torch


def _per_token_weights(w: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`w` [A, K, N] (or [K, N], shared) gathered to one [K, N] per token, and the live mask."""
    ids = ids.detach().cpu().to(torch.int64)
    live = ids >= 0
    w = w.detach().cpu().double()
    if w.dim() == 2:
        return w.unsqueeze(0).expand(ids.numel(), *w.shape), live
    return w[ids.clamp(min=0)], live


def lora_shrink_ref(x: torch.Tensor, lora_a: torch.Tensor, adapter_ids: torch.Tensor, *,
                    scale: float = 1.0) -> torch.Tensor:
    """`y[t] = scale * x[t] @ A[adapter_ids[t]]`, zeros where `adapter_ids[t] == -1`."""
    w, live = _per_token_weights(lora_a, adapter_ids)
    y = torch.einsum("th,thr->tr", x.detach().cpu().double(), w) * scale
    return torch.where(live[:, None], y, torch.zeros((), dtype=torch.float64))


def lora_expand_ref(y: torch.Tensor, lora_b: torch.Tensor, adapter_ids: torch.Tensor, *,
                    out: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """`out[t] (+)= scale * y[t] @ B[adapter_ids[t]]`; rows with id -1 get nothing added
    (zeros without `out`)."""
    w, live = _per_token_weights(lora_b, adapter_ids)
    d = torch.einsum("tr,trn->tn", y.detach().cpu().double(), w) * scale
    d = torch.where(live[:, None], d, torch.zeros((), dtype=torch.float64))
    return d if out is None else out.detach().cpu().double() + d


def lora_shrink_all_ref(x: torch.Tensor, lora_a: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
    """Every token against every adapter's A: `[A, T, r]`."""
    return torch.einsum("th,ahr->atr", x.detach().cpu().double(), lora_a.detach().cpu().double()) * scale
