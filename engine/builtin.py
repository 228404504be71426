"""Built-in tiny models with seeded random weights (no download), and random PEFT LoRA adapters.

`BUILTIN` names: "tiny" (Llama-like, dense), "tiny-moe" (Qwen2-MoE-like: 8 experts, top-2, a
shared expert), "tiny-s2" (Llama-like with Phi-3-small-style S2-attention layers). The weights
are generated under Hugging Face names and go through the same loader as real checkpoints;
`save_builtin` writes one out as a HF directory (config.json + model.safetensors) so that
transformers can load the very same model.
"""
from __future__ import annotations

import json
import os

import torch

from .config import ModelConfig, config_from_dict
from .loader import map_weights

_BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
             rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
             eos_token_id=2, torch_dtype="float32")

BUILTIN: dict[str, dict] = {
    "tiny": dict(_BASE, model_type="llama", architectures=["LlamaForCausalLM"]),
    "tiny-moe": dict(_BASE, model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"],
                     num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                     shared_expert_intermediate_size=64, norm_topk_prob=False, decoder_sparse_step=1,
                     mlp_only_layers=[]),
    "tiny-s2": dict(_BASE, model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=2,
                    blocksparse_block_size=16, blocksparse_num_local_blocks=2, blocksparse_vert_stride=2,
                    blocksparse_homo_head_pattern=False, dense_attention_every_n_layers=2),
}


def builtin_config(name: str) -> ModelConfig:
    return config_from_dict(dict(BUILTIN[name]), where=f"builtin {name!r}")


def _hf_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights under Hugging Face names. The scale makes next-token distributions
    peaked (not near-uniform), so greedy decoding is stable against float noise."""
    c = builtin_config(name)
    g = torch.Generator().manual_seed(seed)

    def mat(o, i, gain=1.0):
        return torch.randn(o, i, generator=g) * (gain / i ** 0.5)

    def norm(n):
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    H, Q, KV = c.hidden_size, c.q_size, c.kv_size
    sd = {"model.embed_tokens.weight": torch.randn(c.vocab_size, H, generator=g),
          "lm_head.weight": mat(c.vocab_size, H, 4.0), "model.norm.weight": norm(H)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": norm(H), p + "post_attention_layernorm.weight": norm(H),
                   p + "self_attn.q_proj.weight": mat(Q, H, 2.0), p + "self_attn.k_proj.weight": mat(KV, H, 2.0),
                   p + "self_attn.v_proj.weight": mat(KV, H), p + "self_attn.o_proj.weight": mat(H, Q)})
        if c.attention_bias:
            for n, size in (("q", Q), ("k", KV), ("v", KV)):
                sd[p + f"self_attn.{n}_proj.bias"] = 0.1 * torch.randn(size, generator=g)
        if c.is_moe_layer(i):
            I = c.moe_intermediate_size
            sd[p + "mlp.gate.weight"] = mat(c.num_experts, H, 2.0)
            for e in range(c.num_experts):
                ep = p + f"mlp.experts.{e}."
                sd.update({ep + "gate_proj.weight": mat(I, H), ep + "up_proj.weight": mat(I, H),
                           ep + "down_proj.weight": mat(H, I)})
            if c.shared_expert_intermediate_size:
                S = c.shared_expert_intermediate_size
                sd.update({p + "mlp.shared_expert.gate_proj.weight": mat(S, H),
                           p + "mlp.shared_expert.up_proj.weight": mat(S, H),
                           p + "mlp.shared_expert.down_proj.weight": mat(H, S),
                           p + "mlp.shared_expert_gate.weight": mat(1, H)})
        else:
            I = c.intermediate_size
            sd.update({p + "mlp.gate_proj.weight": mat(I, H), p + "mlp.up_proj.weight": mat(I, H),
                       p + "mlp.down_proj.weight": mat(H, I)})
    return sd


class _DictReader:
    def __init__(self, sd, device, dtype):
        self.sd, self.device, self.dtype = sd, device, dtype

    def has(self, name):
        return name in self.sd

    def get(self, name, shape=None):
        t = self.sd[name]
        assert shape is None or tuple(t.shape) == tuple(shape), (name, t.shape, shape)
        return t.to(device=self.device, dtype=self.dtype).contiguous()


def builtin_weights(name: str, device, dtype, seed: int = 0) -> tuple[ModelConfig, dict]:
    c = builtin_config(name)
    return c, map_weights(_DictReader(_hf_state_dict(name, seed), device, dtype), c)


def save_builtin(name: str, path: str, seed: int = 0) -> str:
    """Write built-in model `name` as a Hugging Face checkpoint directory; returns `path`."""
    from safetensors.torch import save_file

    if name not in BUILTIN:
        raise ValueError(f"unknown built-in model {name!r}; choose from {sorted(BUILTIN)}")
    os.makedirs(path, exist_ok=True)
    cfg = dict(BUILTIN[name])
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    save_file({k: v.contiguous() for k, v in _hf_state_dict(name, seed).items()},
              os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


def save_random_lora(path: str, config: ModelConfig, r: int = 8, targets=("q_proj", "v_proj"),
                     seed: int = 0, a_seed: int | None = None, lora_alpha: float | None = None,
                     use_rslora: bool = False, gain: float = 1.0) -> str:
    """Write a PEFT-format LoRA directory with random A and B (B is not zero, unlike a fresh PEFT
    init, so the adapter changes the model). Adapters written with the same `a_seed` share
    their v_proj A (LRAgent's shared-A setting)."""
    from safetensors.torch import save_file

    from .lora import module_dims

    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    ga = torch.Generator().manual_seed(a_seed) if a_seed is not None else None
    full = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
            "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
            "down_proj": "mlp.down_proj"}
    sd = {}
    for layer in range(config.num_layers):
        for t in targets:
            module = full[t]
            dims = module_dims(config, module, layer)
            if dims is None:
                continue
            fin, fout = dims
            gen = ga if (ga is not None and t == "v_proj") else g
            a = torch.randn(r, fin, generator=gen) / fin ** 0.5
            b = torch.randn(fout, r, generator=g) * (gain / r ** 0.5)
            key = f"base_model.model.model.layers.{layer}.{module}"
            sd[key + ".lora_A.weight"], sd[key + ".lora_B.weight"] = a, b
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": lora_alpha if lora_alpha is not None else r,
           "target_modules": list(targets), "use_rslora": use_rslora, "bias": "none",
           "lora_dropout": 0.0, "fan_in_fan_out": False, "task_type": "CAUSAL_LM"}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    save_file(sd, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    return path


def save_random_esft(path: str, name: str, experts: dict[int, list[int]] | int, seed: int = 0,
                     scale: float = 0.5) -> str:
    """Write an ESFT adapter for built-in MoE model `name`: fine-tune-like perturbed copies of the
    chosen experts (`{layer: [expert ids]}`, or a count per layer) in DeepSeek naming."""
    from experts import build_esft_adapter

    c, w = builtin_weights(name, "cpu", torch.float32)
    if not c.is_moe:
        raise ValueError(f"built-in model {name!r} is not an MoE model")
    base = {i: (w["layers"][i]["w13"], w["layers"][i]["w2"]) for i in range(c.num_layers) if c.is_moe_layer(i)}
    return str(build_esft_adapter(path, base, experts, seed=seed, scale=scale))
