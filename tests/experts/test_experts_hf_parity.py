"""MoELayer reproduces transformers' own MoE blocks (router convention, SwiGLU experts, shared
experts and their gate) for Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V2, with the
experts read from an ExpertStore that also holds an adapter (used by no token)."""
from __future__ import annotations

import pytest
import torch

from kernels._dispatch import interpreter_on

from experts import ExpertStore, MoELayer, make_esft_experts
from kernels.moe import ROUTER_RENORMALIZE

H, I, E, K, SHARED_I = 32, 16, 6, 2, 24


def _block(arch: str, norm: bool):
    if arch == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        return MixtralSparseMoeBlock(MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                                                   num_experts_per_tok=K))
    if arch == "qwen2_moe":
        from transformers import Qwen2MoeConfig
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
        return Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                                                     num_experts_per_tok=K, norm_topk_prob=norm,
                                                     shared_expert_intermediate_size=SHARED_I))
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
        return Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                                                     num_experts_per_tok=K, norm_topk_prob=norm))
    if arch == "olmoe":
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
        return OlmoeSparseMoeBlock(OlmoeConfig(hidden_size=H, intermediate_size=I, num_experts=E,
                                               num_experts_per_tok=K, norm_topk_prob=norm))
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
    return DeepseekV2Moe(DeepseekV2Config(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E,
                                          num_experts_per_tok=K, n_shared_experts=2, topk_method="greedy",
                                          routed_scaling_factor=1.7, n_group=1, topk_group=1))


@pytest.mark.parametrize("arch,norm", [("mixtral", True), ("qwen2_moe", False), ("qwen2_moe", True),
                                       ("qwen3_moe", True), ("olmoe", False), ("deepseek_v2", False)])
def test_moe_layer_matches_transformers_block(arch, norm, rng_seed):
    block = _block(arch, norm).eval()
    g = torch.Generator().manual_seed(rng_seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    sd = dict(block.state_dict())
    w13, w2 = sd["experts.gate_up_proj"], sd["experts.down_proj"]
    kw: dict = dict(renormalize=norm)
    if arch == "mixtral":
        assert ROUTER_RENORMALIZE["mixtral"]
    if arch == "qwen2_moe":
        s = "shared_expert."
        kw.update(shared_w13=torch.cat([sd[s + "gate_proj.weight"], sd[s + "up_proj.weight"]]),
                  shared_w2=sd[s + "down_proj.weight"], shared_gate=sd["shared_expert_gate.weight"])
    if arch == "deepseek_v2":
        s = "shared_experts."
        kw.update(shared_w13=torch.cat([sd[s + "gate_proj.weight"], sd[s + "up_proj.weight"]]),
                  shared_w2=sd[s + "down_proj.weight"], router_fp32=True, routed_scaling_factor=1.7)
    store = ExpertStore([0], E, H, I, 4, torch.float32, "cpu")
    store.load_base(0, w13, w2)
    store.load_adapter("idle", make_esft_experts({0: (w13, w2)}, {0: [1, 4]}, seed=1, scale=1.0))
    layer = MoELayer.from_store(store, 0, sd["gate.weight"], K, **kw)
    x = torch.randn(1, 13, H, generator=g)
    with torch.no_grad():
        want = block(x)[0].double()
    aids = torch.full((13,), -1, dtype=torch.int32)
    # The store lives on the CPU: Triton runs there only through the interpreter (CI); on a
    # CUDA machine the interpreter is off and the torch path alone applies to CPU tensors.
    impls = ("triton", "torch") if interpreter_on() else ("torch",)
    for impl in impls:
        got = layer(x[0], aids, impl=impl)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    store.close()
