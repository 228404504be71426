"""ESFT expert adapters through `experts` (ExpertWeave): one ExpertStore per model holds, per MoE
layer, the base experts and every loaded adapter's experts in one virtual table; the model's
tokens of an ESFT agent are rerouted to their adapter's copies.

The store is created when the first adapter is loaded: the base experts are copied into it and
the model's own expert tensors are replaced by the store's views (one copy of the base, in
virtual memory, from then on).
"""
from __future__ import annotations

import torch

from .kernel_policy import kernel_impl
from .loader import LoadError


class EsftManager:
    def __init__(self, model, max_slots: int | None = None, max_adapters: int = 64):
        from experts import ExpertStore

        c = model.config
        self.model = model
        self.layers = [i for i in range(c.num_layers) if c.is_moe_layer(i)]
        self.store = ExpertStore(self.layers, c.num_experts, c.hidden_size, c.moe_intermediate_size,
                                 max_slots if max_slots is not None else 4 * c.num_experts,
                                 dtype=model.dtype, device=model.device, max_adapters=max_adapters)
        E = c.num_experts
        for li in self.layers:
            w = model.layers[li]
            self.store.load_base(li, w["w13"], w["w2"])
            # the model reads its base experts from the store from now on (no second copy)
            w["w13"], w["w2"] = self.store.w13(li)[:E], self.store.w2(li)[:E]

    def load(self, name: str, path) -> int:
        """Load the ESFT directory `path` as adapter `name`; returns its expert-map row."""
        from experts import EsftFormatError, ExpertStoreError, load_esft_dir

        c = self.model.config
        try:
            adapter = load_esft_dir(path, num_experts=c.num_experts, hidden=c.hidden_size,
                                    intermediate=c.moe_intermediate_size, layers=self.layers,
                                    dtype=self.model.dtype)
            return self.store.load_adapter(name, adapter.experts)
        except EsftFormatError as e:
            raise LoadError(f"ESFT adapter {path!s}: {e}") from None
        except ExpertStoreError as e:
            raise ValueError(f"cannot load ESFT adapter {name!r}: {e}") from None

    def unload(self, name: str) -> None:
        self.store.unload_adapter(name)

    def tables(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`layer`'s expert map and the extended w13 / w2 tables it indexes (for
        `kernels.router_topk(..., expert_map=)`, which reroutes inside the router kernel)."""
        return self.store.expert_map(layer), self.store.w13(layer), self.store.w2(layer)

    def reroute(self, layer: int, topk_ids: torch.Tensor, expert_ids: torch.Tensor, w13, w2):
        """Extended expert ids for a batch of tokens of mixed adapters (-1: base) and the
        extended tables they index."""
        from kernels import reroute_experts

        ext = reroute_experts(topk_ids, expert_ids, self.store.expert_map(layer), validate=False,
                              impl=kernel_impl(topk_ids))
        return ext.long(), self.store.w13(layer), self.store.w2(layer)

    def report(self) -> dict:
        return self.store.memory_report()
