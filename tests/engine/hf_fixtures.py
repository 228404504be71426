"""Tiny random Hugging Face checkpoints, PEFT LoRA adapters and ESFT adapters for parity tests.

Everything here is built with `transformers` / `peft` themselves and saved with their own
`save_pretrained`, so the files on disk are exactly what those libraries write (transformers 5
saves MoE experts unfused, one tensor per expert, even though it fuses them in memory; Qwen3-MoE
saves `num_local_experts`; OLMoE's q/k norms span all heads). The engine has to read them as they are.

Weights are re-initialised with a seeded generator at "trained-model" scales rather than
transformers' std-0.02 init: with near-uniform logits greedy decoding would sit on near-ties and
parity of generated tokens would depend on float rounding; router logits get the same treatment
so top-k expert choice is decisive.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

DENSE_ARCHS = ("llama", "qwen2", "qwen3", "mistral")
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
ALL_ARCHS = DENSE_ARCHS + MOE_ARCHS

VOCAB = 97
HIDDEN = 64
_COMMON = dict(
    hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=VOCAB, intermediate_size=96, max_position_embeddings=512,
    # No eos: neither side may stop early, so greedy runs have the same length.
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
)

# Per-architecture knobs chosen to exercise what real checkpoints of that family use.
_ARCH_EXTRA: dict[str, dict] = {
    # Llama-3 RoPE scaling; original_max is small so the scaled band matters at short lengths.
    "llama": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}),
    "qwen2": dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "qwen3": dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "mistral": dict(sliding_window=None),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48),
    "qwen3_moe": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32),
}

# Architectures whose config.json is rewritten in the pre-v5 layout (top-level rope_theta /
# rope_scaling), which is what most checkpoints on disk still look like.
_LEGACY_ROPE_LAYOUT = ("llama",)
# Saved as several shards plus model.safetensors.index.json.
_SHARDED = ("mistral",)

DENSE_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# In transformers 5 the routed experts are fused 3-D parameters, not nn.Linear modules, so PEFT
# LoRA on MoE checkpoints targets attention (plus, on Qwen2-MoE, the shared expert's MLP, which
# the MLP names match).
MOE_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def hf_config(arch: str):
    from transformers import AutoConfig

    if arch not in _ARCH_EXTRA:
        raise ValueError(f"unknown test architecture {arch!r}; known: {ALL_ARCHS}")
    kw = dict(_COMMON)
    kw.update(_ARCH_EXTRA[arch])
    cfg = AutoConfig.for_model(arch, **kw)
    cfg.dtype = torch.float32
    return cfg


def _reinit_(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.startswith("lm_head"):
                p.copy_(2.0 / math.sqrt(p.shape[-1]) * torch.randn(p.shape, generator=g))
            elif name.endswith("mlp.gate.weight") or "router" in name:
                p.copy_(2.0 / math.sqrt(p.shape[-1]) * torch.randn(p.shape, generator=g))
            else:
                # Fused expert tensors are [E, out, in] in transformers 5: fan-in is the last dim.
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def build_checkpoint(arch: str, out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny fp32 checkpoint of `arch` saved with `save_pretrained(safe_serialization=True)`."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_config(hf_config(arch), dtype=torch.float32)
    _reinit_(model, seed)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    kw = {"max_shard_size": "60KB"} if arch in _SHARDED else {}
    model.save_pretrained(out, safe_serialization=True, **kw)
    if arch in _LEGACY_ROPE_LAYOUT:
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        rope = dict(cfg.pop("rope_parameters"))
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = rope
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


def load_hf(model_dir: str | Path, lora_dir: str | Path | None = None):
    """transformers model (+ PEFT adapter) in fp32 eval mode, eager attention for exact math."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                 attn_implementation="eager")
    if lora_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(lora_dir))
    return model.eval()


def build_lora(model_dir: str | Path, out_dir: str | Path, *, r: int = 8, alpha: float = 16,
               targets: tuple[str, ...] = DENSE_LORA_TARGETS, rslora: bool = False, seed: int = 1,
               share_v_a_with: str | Path | None = None, b_scale: float = 1.0) -> Path:
    """A PEFT LoRA adapter with random non-zero A and B saved by peft itself.

    share_v_a_with: another adapter directory whose v_proj lora_A this one copies (LRAgent's
    shared-A agents); it must have the same rank.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora,
                     init_lora_weights=False, lora_dropout=0.0, bias="none")
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    shared = _read_adapter(share_v_a_with) if share_v_a_with is not None else None
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            elif "lora_B" in name:
                # Keep the adapter's change a sizeable fraction of the base projection so a wrong
                # scale (alpha/r vs alpha/sqrt(r)) or a missing module shows in the log-probs.
                p.copy_(b_scale * 0.5 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            if shared is not None and "v_proj.lora_A" in name:
                key = _peft_key(name)
                if key not in shared:
                    raise ValueError(f"{share_v_a_with} has no {key}")
                if shared[key].shape != p.shape:
                    raise ValueError(f"shared A {key}: shape {tuple(shared[key].shape)} != {tuple(p.shape)}")
                p.copy_(shared[key])
    out = Path(out_dir)
    model.save_pretrained(str(out))
    return out


def _peft_key(param_name: str) -> str:
    # In memory: ...q_proj.lora_A.default.weight; on disk: ...q_proj.lora_A.weight
    return param_name.replace(".default.", ".")


def _read_adapter(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


def _read_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _expert_key(arch: str, layer: int, expert: int, proj: str) -> str:
    """Checkpoint key of one expert projection (proj in gate_proj / up_proj / down_proj)."""
    if arch == "mixtral":
        w = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}[proj]
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def build_esft(model_dir: str | Path, out_dir: str | Path, arch: str,
               experts: dict[int, list[int]], seed: int = 2, scale: float = 0.5,
               naming: str = "deepseek") -> Path:
    """An ESFT adapter: `expert_cfg.json` plus the perturbed experts, in DeepSeek naming
    (`model.layers.{l}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight`) or, with
    naming="hf", the checkpoint's own expert names (Mixtral: `block_sparse_moe.experts.{e}.w1`)."""
    if naming not in ("deepseek", "hf"):
        raise ValueError(f"naming must be 'deepseek' or 'hf', got {naming!r}")
    from safetensors.torch import save_file

    base = _read_checkpoint(Path(model_dir))
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer, ids in sorted(experts.items()):
        for e in ids:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                w = base[_expert_key(arch, layer, e, proj)]
                noise = torch.randn(w.shape, generator=g) / math.sqrt(w.shape[-1])
                key = _expert_key(arch, layer, e, proj) if naming == "hf" else \
                    f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
                tensors[key] = (w + scale * noise).contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "expert_weights.safetensors"), metadata={"format": "pt"})
    cfg = {"experts": {str(l): sorted(ids) for l, ids in sorted(experts.items())},
           "shared_experts": False, "non_expert_modules": False}
    (out / "expert_cfg.json").write_text(json.dumps(cfg, indent=2))
    return out


def merge_esft(model_dir: str | Path, esft_dir: str | Path, arch: str, out_dir: str | Path) -> Path:
    """A full copy of the base checkpoint with the adapter's experts written over the base ones:
    the reference an ESFT adapter must equal."""
    from safetensors.torch import load_file, save_file

    model_dir, out = Path(model_dir), Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(model_dir, out)
    weights = _read_checkpoint(model_dir)
    adapter = load_file(str(Path(esft_dir) / "expert_weights.safetensors"))
    mixtral_proj = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
    for key, w in adapter.items():
        parts = key.split(".")  # model.layers.{l}.{mlp|block_sparse_moe}.experts.{e}.{proj}.weight
        layer, expert, proj = int(parts[2]), int(parts[5]), mixtral_proj.get(parts[6], parts[6])
        target = _expert_key(arch, layer, expert, proj)
        if weights[target].shape != w.shape:
            raise ValueError(f"{key}: {tuple(w.shape)} != base {tuple(weights[target].shape)}")
        weights[target] = w
    for f in out.glob("*.safetensors"):
        f.unlink()
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


@torch.no_grad()
def hf_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """[len, vocab] float32 log-softmax of the logits after each token (teacher forcing)."""
    ids = torch.tensor([token_ids], dtype=torch.long)
    logits = model(input_ids=ids).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation through transformers' own `generate` (KV cache, step-by-step decode)
    and the log-probs it decoded each token from: ([n] tokens, [n, vocab] float32)."""
    ids = torch.tensor([prompt], dtype=torch.long)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                         eos_token_id=None, temperature=None, top_p=None, top_k=None)
    tokens = out.sequences[0, len(prompt):].tolist()
    lp = torch.log_softmax(torch.stack([l[0].float() for l in out.logits]), dim=-1)
    return tokens, lp


def random_tokens(n: int, seed: int, vocab: int = VOCAB) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()
