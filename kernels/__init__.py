"""Triton kernels, each with a float64 torch reference beside it (one of them, Hopper's paged
decode in `attention_ring`, unsplit and split, written in Gluon, Triton's explicit-layout dialect).

Kernels are pure functions of tensors and import nothing else of vmweave. Names are resolved
lazily so that importing `kernels` does not import triton until a kernel is used.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    # paged attention and Flash-LoRA-Attention (kernels/attention.py)
    "paged_attention_decode": "attention",
    "paged_attention_prefill": "attention",
    "flash_lora_decode": "attention",
    "flash_lora_prefill": "attention",
    # S2-attention (kernels/s2.py)
    "S2Pattern": "s2",
    "s2_attention_prefill": "s2",
    "s2_attention_prefill_paged": "s2",
    "s2_attention_decode": "s2",
    # multi-LoRA projections (kernels/lora.py)
    "lora_shrink": "lora",
    "lora_expand": "lora",
    "lora_shrink_all": "lora",
    "lora_plan": "lora",
    "LoraPlan": "lora",
    "shares_one_a": "lora",
    # ExpertWeave: reroute, router top-k, fused MoE (kernels/moe.py)
    "reroute_experts": "moe",
    "fused_moe": "moe",
    "router_topk": "moe",
    # writing new tokens into paged caches (kernels/cache_write.py)
    "write_kv": "cache_write",
    "write_lowrank": "cache_write",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"kernels.{mod}"), name)
    globals()[name] = value
    return value
