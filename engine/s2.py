"""S2-attention layers (a config's Phi-3-small-style `blocksparse_*` keys) for the engine.

The pattern is `kernels.S2Pattern` (per-KV-head strided shards plus a local window, causal in the
diagonal block). Here: the mask rows the torch attention path applies to a chunk of queries.
"""
from __future__ import annotations

import torch

from .config import ModelConfig


class S2Masks:
    def __init__(self, config: ModelConfig):
        from kernels import S2Pattern

        s = config.s2
        self.config = config
        self.pattern = S2Pattern(config.num_heads, s.sparse_block, s.local_blocks, s.vert_stride,
                                 num_kv_heads=config.num_kv_heads, homo_head=s.homo_head)
        self._block_mask = torch.zeros(0, 0, 0, dtype=torch.bool)

    def _blocks(self, nb: int) -> torch.Tensor:
        if self._block_mask.shape[1] < nb:
            # grow geometrically so a long decode does not rebuild the block mask every step
            self._block_mask = self.pattern.block_mask(max(nb, 2 * self._block_mask.shape[1]))
        return self._block_mask[:, :nb, :nb]

    def mask(self, layer: int, start: int, end: int, device) -> torch.Tensor | None:
        """bool [Hq, end - start, end]: which keys each head's queries at positions start..end-1
        may read under the pattern (causality is applied by the caller); None for dense layers."""
        if not self.config.is_s2_layer(layer):
            return None
        sb = self.pattern.sparse_block
        nb = -(-end // sb)
        bm = self._blocks(nb).to(device)  # [Hkv, nb, nb]
        qb = torch.arange(start, end, device=device) // sb
        kb = torch.arange(end, device=device) // sb
        m = bm[:, qb][:, :, kb]  # [Hkv, n, end]
        return m.repeat_interleave(self.pattern.group, dim=0)
