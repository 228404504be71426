"""One `ModelConfig` for every supported Hugging Face decoder, read from `config.json`.

Supported `model_type`s: llama, qwen2, qwen3, mistral (dense); mixtral, qwen2_moe, qwen3_moe,
olmoe (MoE). transformers 5 renamed `rope_scaling` (+ top-level `rope_theta`) to
`rope_parameters`; both spellings are read. Optional S2-attention layers are declared the way
Phi-3-small does it (`blocksparse_*` keys, `dense_attention_every_n_layers`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace

import torch


class ConfigError(ValueError):
    """A config.json the engine cannot run: unknown architecture, missing or bad keys."""


DENSE_TYPES = ("llama", "qwen2", "qwen3", "mistral")
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
SUPPORTED_TYPES = DENSE_TYPES + MOE_TYPES

# architectures[0] names in config.json -> model_type, for configs that lack model_type
_ARCH_TO_TYPE = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
}


@dataclass(frozen=True)
class S2Config:
    """The S2-attention pattern of the sparse layers (kernels.S2Pattern's arguments)."""

    sparse_block: int
    local_blocks: int
    vert_stride: int
    homo_head: bool = False


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3"|"linear", ...}; None = default
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections
    qk_norm: str = "none"  # "none" | "head" (Qwen3: per head) | "full" (OLMoE: whole projection)
    clip_qkv: float | None = None
    sliding_window: int | None = None
    # MoE (num_experts == 0: dense)
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: a shared expert with a sigmoid gate
    moe_layers: tuple[bool, ...] = ()
    # S2-attention: which layers are sparse, and the pattern
    s2: S2Config | None = None
    s2_layers: tuple[bool, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self.moe_layers[layer]) if self.moe_layers else False

    def is_s2_layer(self, layer: int) -> bool:
        return bool(self.s2_layers[layer]) if self.s2_layers else False

    def with_(self, **kw) -> "ModelConfig":
        return replace(self, **kw)

    def rope_inv_freq(self, device=None) -> torch.Tensor:
        """Inverse RoPE frequencies [head_dim // 2] (float32), scaling applied."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        sc = self.rope_scaling
        if sc is not None:
            kind = sc["rope_type"]
            if kind == "linear":
                inv = inv / float(sc["factor"])
            elif kind == "llama3":
                inv = _llama3_inv_freq(inv, sc, self.max_position_embeddings)
        return inv.to(device) if device is not None else inv


def _llama3_inv_freq(inv: torch.Tensor, sc: dict, max_pos: int) -> torch.Tensor:
    factor = float(sc["factor"])
    low = float(sc["low_freq_factor"])
    high = float(sc["high_freq_factor"])
    old_len = float(sc.get("original_max_position_embeddings") or max_pos)
    low_wavelen = old_len / low
    high_wavelen = old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _need(d: dict, key: str, where: str):
    if key not in d or d[key] is None:
        raise ConfigError(f"{where}: config.json lacks required key {key!r}")
    return d[key]


def _rope(d: dict, where: str) -> tuple[float, dict | None]:
    params = d.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"{where}: per-layer-type rope_parameters are not supported")
    params = dict(params or {})
    old = d.get("rope_scaling")
    if isinstance(old, dict):
        params = {**old, **params}
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return float(theta), None
    if kind == "linear":
        return float(theta), {"rope_type": "linear", "factor": float(_need(params, "factor", where))}
    if kind == "llama3":
        sc = {"rope_type": "llama3"}
        for k in ("factor", "low_freq_factor", "high_freq_factor"):
            sc[k] = float(_need(params, k, where + " rope_parameters"))
        sc["original_max_position_embeddings"] = params.get("original_max_position_embeddings")
        return float(theta), sc
    raise ConfigError(f"{where}: rope_type {kind!r} is not supported (default, linear, llama3)")


def _moe_layers(d: dict, model_type: str, n_layers: int) -> tuple[bool, ...]:
    if model_type in ("mixtral", "olmoe"):
        return (True,) * n_layers
    step = int(d.get("decoder_sparse_step", 1) or 1)
    dense_only = set(d.get("mlp_only_layers") or [])
    return tuple((i not in dense_only) and (i + 1) % step == 0 for i in range(n_layers))


def _s2(d: dict, n_layers: int, num_heads: int, where: str):
    if "blocksparse_block_size" not in d:
        return None, ()
    s2 = S2Config(
        sparse_block=int(d["blocksparse_block_size"]),
        local_blocks=int(_need(d, "blocksparse_num_local_blocks", where)),
        vert_stride=int(_need(d, "blocksparse_vert_stride", where)),
        homo_head=bool(d.get("blocksparse_homo_head_pattern", False)),
    )
    if s2.sparse_block < 16 or s2.sparse_block & (s2.sparse_block - 1):
        raise ConfigError(f"{where}: blocksparse_block_size must be a power of two >= 16")
    if s2.local_blocks < 1 or s2.vert_stride < 1:
        raise ConfigError(f"{where}: blocksparse_num_local_blocks and _vert_stride must be >= 1")
    every = d.get("dense_attention_every_n_layers")
    # Phi-3-small: layer i is dense when (i + 1) % n == 0, sparse otherwise
    layers = tuple(not (every and (i + 1) % int(every) == 0) for i in range(n_layers))
    return s2, layers


def config_from_dict(d: dict, where: str = "config") -> ModelConfig:
    """Build a ModelConfig from the parsed contents of a HF config.json."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: config must be a JSON object")
    model_type = d.get("model_type")
    if model_type is None:
        archs = d.get("architectures") or []
        model_type = _ARCH_TO_TYPE.get(archs[0]) if archs else None
    if model_type not in SUPPORTED_TYPES:
        raise ConfigError(
            f"{where}: unsupported architecture (model_type={d.get('model_type')!r}, "
            f"architectures={d.get('architectures')!r}); supported: {', '.join(SUPPORTED_TYPES)}"
        )
    hidden = int(_need(d, "hidden_size", where))
    heads = int(_need(d, "num_attention_heads", where))
    n_layers = int(_need(d, "num_hidden_layers", where))
    kv_heads = int(d.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ConfigError(f"{where}: num_attention_heads {heads} not a multiple of num_key_value_heads {kv_heads}")
    head_dim = d.get("head_dim") or hidden // heads
    theta, scaling = _rope(d, where)
    eos = d.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    vocab = int(_need(d, "vocab_size", where))
    eos_ids = tuple(int(e) for e in eos_ids if 0 <= int(e) < vocab)

    kw: dict = {}
    if model_type in MOE_TYPES:
        n_exp = d.get("num_local_experts") if model_type == "mixtral" else None
        n_exp = n_exp or d.get("num_experts") or d.get("num_local_experts")
        if not n_exp:
            raise ConfigError(f"{where}: MoE config lacks num_experts / num_local_experts")
        kw.update(
            num_experts=int(n_exp),
            top_k=int(_need(d, "num_experts_per_tok", where)),
            moe_layers=_moe_layers(d, model_type, n_layers),
            norm_topk_prob=True if model_type == "mixtral" else bool(d.get("norm_topk_prob", False)),
        )
        if model_type in ("qwen2_moe", "qwen3_moe"):
            kw["moe_intermediate_size"] = int(_need(d, "moe_intermediate_size", where))
        else:
            kw["moe_intermediate_size"] = int(_need(d, "intermediate_size", where))
        if model_type == "qwen2_moe":
            kw["shared_expert_intermediate_size"] = int(d.get("shared_expert_intermediate_size") or 0)

    sliding = None
    if model_type == "mistral" or d.get("use_sliding_window"):
        sliding = d.get("sliding_window") or None
    s2, s2_layers = _s2(d, n_layers, heads, where)
    return ModelConfig(
        model_type=model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(d.get("intermediate_size") or 0),
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=True if model_type in ("qwen2", "qwen2_moe") else bool(d.get("attention_bias", False)),
        qk_norm={"qwen3": "head", "qwen3_moe": "head", "olmoe": "full"}.get(model_type, "none"),
        clip_qkv=d.get("clip_qkv"),
        sliding_window=int(sliding) if sliding else None,
        s2=s2,
        s2_layers=s2_layers,
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos_ids,
        extra={k: v for k, v in d.items()},
        **kw,
    )


def load_config(model_dir: str) -> ModelConfig:
    """Read `<model_dir>/config.json` (a clear ConfigError when the directory or file is bad)."""
    if not os.path.isdir(model_dir):
        raise ConfigError(f"model directory {model_dir!r} does not exist")
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{model_dir!r} has no config.json")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return config_from_dict(d, where=path)
