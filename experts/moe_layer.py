"""An MoE block for a batch whose tokens belong to different ESFT adapters.

router logits -> softmax top-k and, in the same kernel, the per-token reroute to the adapter's
expert copies (`kernels.router_topk(..., adapter_ids=, expert_map=)`, equal to
`kernels.reroute_experts`) -> grouped SwiGLU over the extended expert table
(`kernels.fused_moe`) -> plus the shared experts, gated by `sigmoid(x g^T)` where the
architecture has a shared-expert gate (Qwen2-MoE).

Decode batches are host-bound when run op by op (on an H200 host ~0.8 ms of Python and launches
per layer against 0.08-0.4 ms of device work), so `capture_graphs` records the whole block as one
CUDA graph per batch size; calls of a captured size then cost one input copy and a replay. The
graphs stay valid across adapter loads and unloads: the store's tensors never move and its expert
map is updated in place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.moe import fused_moe, router_topk


class _Graph:
    """One captured batch size: static inputs (outside the graph's pool), the graph, its output."""

    def __init__(self, graph: torch.cuda.CUDAGraph, x: torch.Tensor, adapter_ids: torch.Tensor | None,
                 out: torch.Tensor) -> None:
        self.graph, self.x, self.adapter_ids, self.out = graph, x, adapter_ids, out


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
        self._graphs: dict[int, _Graph] = {}

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
                 impl: str | None = None, use_graph: bool = True) -> torch.Tensor:
        """`x [T, H]`, `adapter_ids [T] int32` (-1: base; None: all base) -> `[T, H]` in x's dtype.

        Replays a captured CUDA graph when one exists for T (see `capture_graphs`) unless
        `use_graph=False` or `impl` is given."""
        if x.dim() != 2 or x.shape[1] != self.gate_weight.shape[1]:
            raise ValueError(f"x must be [tokens, {self.gate_weight.shape[1]}], got {tuple(x.shape)}")
        if adapter_ids is not None and (adapter_ids.dim() != 1 or adapter_ids.shape[0] != x.shape[0]):
            raise ValueError(f"adapter_ids must be [{x.shape[0]}], got {tuple(adapter_ids.shape)}")
        graph = self._graphs.get(x.shape[0]) if impl is None and use_graph else None
        if graph is not None and x.dtype == graph.x.dtype and x.device == graph.x.device:
            return self._replay(graph, x, adapter_ids, validate)
        return self._eager(x, adapter_ids, validate=validate, impl=impl)

    forward = __call__

    def _eager(self, x: torch.Tensor, adapter_ids: torch.Tensor | None, *, validate: bool,
               impl: str | None) -> torch.Tensor:
        tw, ids = self.route(x, adapter_ids, validate=validate, impl=impl)
        # the router and the reroute only emit valid ids, so fused_moe need not sync to check
        out = fused_moe(x, self.w13, self.w2, tw, ids, validate=False, impl=impl)
        if self.shared_w13 is not None:
            out = out + self.shared(x)
        return out

    # ---- CUDA graphs -----------------------------------------------------------------------
    def capture_graphs(self, token_counts, *, dtype: torch.dtype | None = None) -> None:
        """Capture the block as one CUDA graph per batch size in `token_counts` (decode buckets).

        Later calls with exactly that many tokens, the captured dtype and device, and `impl=None`
        replay the graph (other calls run op by op, as before). With an expert map the graph
        includes the reroute, and a call without `adapter_ids` replays it with all tokens on the
        base (-1). Captured graphs see later adapter loads/unloads (see the module doc); a tensor
        of the layer that is *replaced* (not updated in place) is not seen: call
        `release_graphs()` and capture again. Memory: each graph keeps its own intermediates
        (~T * k * (2I + 4H) bytes plus the shared experts' activations).

        Args:
            token_counts: positive ints (each captured once; already captured sizes are kept).
            dtype: activation dtype (default: the expert weights' dtype).
        Raises:
            ValueError for a layer not on a CUDA device or bad counts; TypeError for bad types.
        """
        dev = self.w13.device
        if dev.type != "cuda":
            raise ValueError(f"CUDA graphs need the layer's weights on a CUDA device, they are on {dev}")
        counts = list(token_counts) if not isinstance(token_counts, int) else [token_counts]
        for t in counts:
            if isinstance(t, bool) or not isinstance(t, int):
                raise TypeError(f"token counts must be ints, got {type(t).__name__}")
            if t <= 0:
                raise ValueError(f"token counts must be positive, got {t}")
        dtype = self.w13.dtype if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        H = self.gate_weight.shape[1]
        for T in sorted(set(counts) - set(self._graphs)):
            gen = torch.Generator(device=dev).manual_seed(T)
            # capture inputs are random, not zeros: nothing host-side depends on them, but the
            # warm-up runs then exercise real routing
            x = torch.randn(T, H, device=dev, generator=gen).to(dtype)
            aids = None
            if self.expert_map is not None:
                aids = torch.full((T,), -1, dtype=torch.int32, device=dev)
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # compiles kernels and sets up cuBLAS outside the capture
                for _ in range(2):
                    self._eager(x, aids, validate=False, impl=None)
            torch.cuda.current_stream(dev).wait_stream(side)
            torch.cuda.synchronize(dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._eager(x, aids, validate=False, impl=None)
            self._graphs[T] = _Graph(graph, x, aids, out)

    def release_graphs(self) -> None:
        """Drop every captured graph (and its memory)."""
        self._graphs.clear()

    @property
    def graph_token_counts(self) -> list[int]:
        """Batch sizes that replay a captured graph."""
        return sorted(self._graphs)

    def _replay(self, g: _Graph, x: torch.Tensor, adapter_ids: torch.Tensor | None,
                validate: bool) -> torch.Tensor:
        if adapter_ids is not None:
            if self.expert_map is None:
                raise ValueError("adapter_ids given but this layer has no expert_map")
            if adapter_ids.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"adapter_ids must be int32/int64, got {adapter_ids.dtype}")
            if validate:
                lo, hi = torch.stack([adapter_ids.min().long(), adapter_ids.max().long()]).tolist()
                rows = self.expert_map.shape[0]
                if lo < -1 or hi >= rows:
                    raise ValueError(f"adapter_ids must be -1 or in [0, {rows}), got [{lo}, {hi}]")
            g.adapter_ids.copy_(adapter_ids)
        elif g.adapter_ids is not None:
            g.adapter_ids.fill_(-1)
        g.x.copy_(x)
        g.graph.replay()
        # the next replay overwrites g.out: hand out a copy
        return g.out.clone()

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """The shared experts' contribution (zero-free: only call when there are some)."""
        Is = self.shared_w2.shape[1]
        h = F.linear(x, self.shared_w13.to(x.dtype))
        s = F.linear(F.silu(h[:, :Is]) * h[:, Is:], self.shared_w2.to(x.dtype))
        if self.shared_gate is not None:
            s = torch.sigmoid(F.linear(x, self.shared_gate.to(x.dtype))) * s
        return s
