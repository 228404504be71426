"""ExpertWeave on vmm: MoE expert weights of a base model and many ESFT adapters in one virtual
tensor per layer and weight, expert maps for rerouting, ESFT adapter I/O and an MoE layer.

    store = experts.ExpertStore(layers, num_experts, hidden, intermediate, max_slots, dtype=...)
    store.load_base(layer, w13, w2)
    aid = store.load_adapter("math", {layer: {expert_id: (w13_e, w2_e)}})   # or store.load_esft(dir)
    layer = experts.MoELayer.from_store(store, layer, gate_weight, top_k)
    y = layer(x, adapter_ids)                                              # -1 = base

Names are resolved lazily so `import experts` stays cheap (no triton until a kernel is used).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ExpertStore": "store",
    "AdapterInfo": "store",
    "MoELayer": "moe_layer",
    "EsftAdapter": "esft",
    "load_esft_dir": "esft",
    "read_expert_cfg": "esft",
    "save_esft_adapter": "esft",
    "make_esft_experts": "esft",
    "build_esft_adapter": "esft",
    "load_base_experts": "esft",
    "read_checkpoint": "esft",
    "split_expert_tensors": "esft",
    "ExpertStoreError": "errors",
    "UnknownAdapterError": "errors",
    "DuplicateAdapterError": "errors",
    "NoFreeSlotsError": "errors",
    "StoreOutOfMemoryError": "errors",
    "EsftFormatError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'experts' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"experts.{mod}"), name)
    globals()[name] = value
    return value
