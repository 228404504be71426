"""Float64 references for the multi-LoRA projections in `kernels.lora`.

Deliberately plain (one float64 matmul per adapter present): they define what the kernels must
compute and are only used by tests. They compute on the inputs' device (so GPU tests at real
sizes stay fast) and return float64 CPU tensors.
"""
from __future__ import annotations

import torch


def _grouped_ref(inp: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, scale: float) -> torch.Tensor:
    """`scale * inp[t] @ w[ids[t]]` in float64 (w [A, K, N], or [K, N] shared), zero rows where
    `ids[t] == -1`; one float64 matmul per adapter present, on the inputs' device."""
    inp = inp.detach().double()
    w = w.detach().double().to(inp.device)  # inp may be an earlier reference, already on the CPU
    ids = ids.detach().to(device=inp.device, dtype=torch.int64)
    out = torch.zeros(inp.shape[0], w.shape[-1], dtype=torch.float64, device=inp.device)
    for a in torch.unique(ids).tolist():
        if a < 0:
            continue
        rows = (ids == a).nonzero().flatten()
        out[rows] = inp[rows] @ (w if w.dim() == 2 else w[a])
    return (out * scale).cpu()


def lora_shrink_ref(x: torch.Tensor, lora_a: torch.Tensor, adapter_ids: torch.Tensor, *,
                    scale: float = 1.0) -> torch.Tensor:
    """`y[t] = scale * x[t] @ A[adapter_ids[t]]`, zeros where `adapter_ids[t] == -1`."""
    return _grouped_ref(x, lora_a, adapter_ids, scale)


def lora_expand_ref(y: torch.Tensor, lora_b: torch.Tensor, adapter_ids: torch.Tensor, *,
                    out: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """`out[t] (+)= scale * y[t] @ B[adapter_ids[t]]`; rows with id -1 get nothing added
    (zeros without `out`)."""
    d = _grouped_ref(y, lora_b, adapter_ids, scale)
    return d if out is None else out.detach().cpu().double() + d


def lora_shrink_all_ref(x: torch.Tensor, lora_a: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
    """Every token against every adapter's A: `[A, T, r]`."""
    return (torch.einsum("th,ahr->atr", x.detach().double(), lora_a.detach().double()) * scale).cpu()
