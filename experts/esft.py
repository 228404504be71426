"""ESFT adapters on disk: read, validate, build and save them; read base experts from checkpoints.

An ESFT adapter directory holds `expert_cfg.json`

    {"experts": {"<layer>": [expert ids]}, "shared_experts": false, "non_expert_modules": false}

and one or more `*.safetensors` files with exactly those experts' weights. Expert tensor names may
use any of these conventions (an optional prefix before `layers.` is allowed):

    model.layers.{l}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight     DeepSeek, Qwen2/3-MoE, OLMoE
    model.layers.{l}.block_sparse_moe.experts.{e}.{w1,w3,w2}.weight           Mixtral (w1 gate, w3 up, w2 down)
    model.layers.{l}.{mlp|block_sparse_moe}.experts.{gate_up_proj,down_proj}  fused [E, 2I, H] / [E, H, I]
                                                                              (recent transformers)

In memory an expert is `(w13_e [2I, H], w2_e [H, I])` with the gate rows before the up rows.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch

from .errors import EsftFormatError

CFG_NAME = "expert_cfg.json"
WEIGHTS_NAME = "expert_weights.safetensors"

_PER_EXPERT = re.compile(
    r"^(?:.*\.)?layers\.(\d+)\.(mlp|block_sparse_moe)\.experts\.(\d+)\."
    r"(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
_FUSED = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)(?:\.weight)?$")
_PROJ = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}

_MIXTRAL = {"gate": "w1", "up": "w3", "down": "w2"}

Experts = dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class EsftAdapter(Mapping):
    """A read ESFT adapter: `experts[layer][expert] = (w13_e [2I, H], w2_e [H, I])`. It is itself
    that mapping (layer -> experts), so `store.load_adapter(name, adapter)` works."""
    name: str
    experts: Experts
    config: dict
    path: Path | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # non-expert tensors, if allowed

    @property
    def num_experts(self) -> int:
        return sum(len(v) for v in self.experts.values())

    def __getitem__(self, layer: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return self.experts[layer]

    def __iter__(self):
        return iter(self.experts)

    def __len__(self) -> int:
        return len(self.experts)

    __hash__ = None  # mutable; Mapping would otherwise compare by content


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def read_expert_cfg(path: str | Path, *, num_experts: int | None = None,
                    layers: Iterable[int] | None = None) -> dict:
    """Parse and validate `expert_cfg.json` (a file or the directory holding it).

    Returns the config with `experts` as `{int layer: sorted [int ids]}`."""
    p = Path(path)
    f = p / CFG_NAME if p.is_dir() else p
    if not f.is_file():
        raise EsftFormatError(f"{f}: missing (an ESFT adapter directory needs {CFG_NAME})")
    try:
        raw = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EsftFormatError(f"{f}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise EsftFormatError(f"{f}: must hold a JSON object, got {type(raw).__name__}")
    if "experts" not in raw:
        raise EsftFormatError(f"{f}: no \"experts\" key (want {{\"experts\": {{\"<layer>\": [ids]}}}})")
    if not isinstance(raw["experts"], dict):
        raise EsftFormatError(f"{f}: \"experts\" must map layer -> list of expert ids, got {type(raw['experts']).__name__}")
    allowed = None if layers is None else set(layers)
    experts: dict[int, list[int]] = {}
    for key, ids in raw["experts"].items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise EsftFormatError(f"{f}: layer key {key!r} is not an integer") from None
        if layer < 0:
            raise EsftFormatError(f"{f}: layer {layer} is negative")
        if allowed is not None and layer not in allowed:
            raise EsftFormatError(f"{f}: layer {layer} is not an MoE layer of the model (MoE layers: {sorted(allowed)})")
        if not isinstance(ids, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in ids):
            raise EsftFormatError(f"{f}: layer {layer}: experts must be a list of integers, got {ids!r}")
        if len(set(ids)) != len(ids):
            dup = sorted({e for e in ids if ids.count(e) > 1})
            raise EsftFormatError(f"{f}: layer {layer}: expert ids {dup} are listed twice")
        bad = [e for e in ids if e < 0 or (num_experts is not None and e >= num_experts)]
        if bad:
            rng = f"[0, {num_experts})" if num_experts is not None else ">= 0"
            raise EsftFormatError(f"{f}: layer {layer}: expert ids {bad} are out of range {rng}")
        if layer in experts:
            raise EsftFormatError(f"{f}: layer {layer} is listed twice")
        experts[layer] = sorted(ids)
    for flag in ("shared_experts", "non_expert_modules"):
        if flag in raw and not isinstance(raw[flag], bool):
            raise EsftFormatError(f"{f}: \"{flag}\" must be true or false, got {raw[flag]!r}")
    out = dict(raw)
    out["experts"] = experts
    out.setdefault("shared_experts", False)
    out.setdefault("non_expert_modules", False)
    return out


# ---------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------
def _read_safetensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise EsftFormatError(f"{d}: no *.safetensors file")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as err:
            raise EsftFormatError(f"{f}: not a readable safetensors file ({err})") from err
        for k, v in part.items():
            if k in out:
                raise EsftFormatError(f"{f}: tensor {k} also appears in another file")
            out[k] = v
    return out


def split_expert_tensors(state: Mapping[str, torch.Tensor], *, where: str = "state dict"
                         ) -> tuple[dict[tuple[int, int], dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Group expert tensors by (layer, expert) as {"gate", "up", "down"} (fused tensors are split
    per expert); returns (experts, every other tensor)."""
    experts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}

    def put(layer, e, part, t, key):
        slot = experts.setdefault((layer, e), {})
        if part in slot:
            raise EsftFormatError(f"{where}: layer {layer} expert {e} {part} weight appears twice (again in {key})")
        slot[part] = t

    for key, t in state.items():
        m = _PER_EXPERT.match(key)
        if m:
            put(int(m.group(1)), int(m.group(3)), _PROJ[m.group(4)], t, key)
            continue
        m = _FUSED.match(key)
        if m:
            layer, kind = int(m.group(1)), m.group(3)
            if t.dim() != 3:
                raise EsftFormatError(f"{where}: {key} must be 3-D [experts, ...], got shape {tuple(t.shape)}")
            for e in range(t.shape[0]):
                if kind == "gate_up_proj":
                    if t.shape[1] % 2:
                        raise EsftFormatError(f"{where}: {key} has an odd row count {t.shape[1]} (want 2 * intermediate)")
                    half = t.shape[1] // 2
                    put(layer, e, "gate", t[e, :half], key)
                    put(layer, e, "up", t[e, half:], key)
                else:
                    put(layer, e, "down", t[e], key)
            continue
        other[key] = t
    return experts, other


def _assemble(where: str, layer: int, e: int, parts: Mapping[str, torch.Tensor],
              hidden: int | None, intermediate: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    missing = [p for p in ("gate", "up", "down") if p not in parts]
    if missing:
        raise EsftFormatError(f"{where}: layer {layer} expert {e} has no {'/'.join(missing)} weight "
                              f"(e.g. model.layers.{layer}.mlp.experts.{e}.{missing[0]}_proj.weight)")
    g, u, d = parts["gate"], parts["up"], parts["down"]
    for nm, t in (("gate", g), ("up", u), ("down", d)):
        if t.dim() != 2 or not t.is_floating_point():
            raise EsftFormatError(f"{where}: layer {layer} expert {e} {nm} weight must be a 2-D float "
                                  f"tensor, got {tuple(t.shape)} {t.dtype}")
    I, H = g.shape
    if tuple(u.shape) != (I, H) or tuple(d.shape) != (H, I):
        raise EsftFormatError(f"{where}: layer {layer} expert {e}: gate {tuple(g.shape)}, up {tuple(u.shape)}, "
                              f"down {tuple(d.shape)} do not fit together (want [I, H], [I, H], [H, I])")
    if (hidden is not None and H != hidden) or (intermediate is not None and I != intermediate):
        raise EsftFormatError(f"{where}: layer {layer} expert {e}: gate is {tuple(g.shape)} but the model's "
                              f"experts are [intermediate={intermediate}, hidden={hidden}]")
    return torch.cat([g, u], dim=0), d


def load_esft_dir(path: str | Path, *, num_experts: int | None = None, hidden: int | None = None,
                  intermediate: int | None = None, layers: Iterable[int] | None = None,
                  dtype: torch.dtype | None = None, allow_extra_modules: bool = False) -> EsftAdapter:
    """Read and validate an ESFT adapter directory.

    Checks (each failure an EsftFormatError naming the file, layer, expert or key): the config
    parses; layers are MoE layers (`layers`) and ids in `[0, num_experts)`; every listed expert has
    gate, up and down weights of one consistent shape (`hidden`/`intermediate` when given); no
    tensor holds an expert the config does not list; and, unless `allow_extra_modules`, the
    adapter trains nothing but routed experts (`shared_experts`/`non_expert_modules` false and no
    other tensors) — with it, other tensors come back in `EsftAdapter.extra`.
    """
    d = Path(path)
    if not d.is_dir():
        raise EsftFormatError(f"{d}: not a directory")
    layer_list = None if layers is None else list(layers)
    cfg = read_expert_cfg(d, num_experts=num_experts, layers=layer_list)
    if not allow_extra_modules:
        for flag in ("shared_experts", "non_expert_modules"):
            if cfg[flag]:
                raise EsftFormatError(f"{d / CFG_NAME}: \"{flag}\" is true: this adapter also trains modules "
                                      f"outside the routed experts, which an expert store cannot hold "
                                      f"(pass allow_extra_modules=True to get them in .extra)")
    state = _read_safetensors(d)
    found, other = split_expert_tensors(state, where=str(d))
    if other and not allow_extra_modules:
        names = sorted(other)
        raise EsftFormatError(f"{d}: tensors that are not routed-expert weights: {names[:5]}"
                              f"{' ...' if len(names) > 5 else ''}")
    listed = {(l, e) for l, ids in cfg["experts"].items() for e in ids}
    extra_experts = sorted(set(found) - listed)
    if extra_experts:
        l, e = extra_experts[0]
        raise EsftFormatError(f"{d}: the weights hold layer {l} expert {e}, which {CFG_NAME} does not list "
                              f"({len(extra_experts)} such experts)")
    experts: Experts = {}
    shape = None
    for l, ids in sorted(cfg["experts"].items()):
        for e in ids:
            if (l, e) not in found:
                raise EsftFormatError(f"{d}: {CFG_NAME} lists layer {l} expert {e}, but no safetensors file "
                                      f"holds its weights (model.layers.{l}.mlp.experts.{e}.gate_proj.weight ...)")
            w13, w2 = _assemble(str(d), l, e, found[(l, e)], hidden, intermediate)
            if shape is None:
                shape = (w13.shape, w2.shape)
            elif (w13.shape, w2.shape) != shape:
                raise EsftFormatError(f"{d}: layer {l} expert {e} is {tuple(w13.shape[::-1])} but earlier experts "
                                      f"are {tuple(shape[0][::-1])} ([hidden, 2*intermediate])")
            if dtype is not None:
                w13, w2 = w13.to(dtype), w2.to(dtype)
            experts.setdefault(l, {})[e] = (w13.contiguous(), w2.contiguous())
    return EsftAdapter(d.name, experts, cfg, d, other if allow_extra_modules else {})


# ---------------------------------------------------------------------------------------------
# building and saving
# ---------------------------------------------------------------------------------------------
def save_esft_adapter(path: str | Path, experts: Mapping[int, Mapping[int, tuple[torch.Tensor, torch.Tensor]]], *,
                      naming: str = "deepseek", shared_experts: bool = False,
                      non_expert_modules: bool = False) -> Path:
    """Write an ESFT adapter directory (`expert_cfg.json` + `expert_weights.safetensors`).

    `experts[layer][e] = (w13_e [2I, H], w2_e [H, I])`; `naming` "deepseek" (also Qwen2/3-MoE,
    OLMoE) or "mixtral" picks the tensor names."""
    from safetensors.torch import save_file

    if naming not in ("deepseek", "mixtral"):
        raise ValueError(f"naming must be 'deepseek' or 'mixtral', got {naming!r}")
    out = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for l, per in sorted(experts.items()):
        for e, (w13, w2) in sorted(per.items()):
            if w13.dim() != 2 or w2.dim() != 2 or w13.shape[0] % 2 or tuple(w2.shape) != (w13.shape[1], w13.shape[0] // 2):
                raise ValueError(f"layer {l} expert {e}: w13 {tuple(w13.shape)} / w2 {tuple(w2.shape)} are not "
                                 f"[2I, H] / [H, I]")
            I = w13.shape[0] // 2
            parts = {"gate": w13[:I], "up": w13[I:], "down": w2}
            for part, t in parts.items():
                if naming == "mixtral":
                    key = f"model.layers.{l}.block_sparse_moe.experts.{e}.{_MIXTRAL[part]}.weight"
                else:
                    key = f"model.layers.{l}.mlp.experts.{e}.{part}_proj.weight"
                tensors[key] = t.detach().cpu().contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    cfg = {"experts": {str(l): sorted(int(e) for e in per) for l, per in sorted(experts.items())},
           "shared_experts": bool(shared_experts), "non_expert_modules": bool(non_expert_modules)}
    (out / CFG_NAME).write_text(json.dumps(cfg, indent=2))
    return out


def make_esft_experts(base: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
                      experts: Mapping[int, Iterable[int]] | int, *, seed: int = 0,
                      scale: float = 0.1) -> Experts:
    """Fine-tune-like copies of chosen base experts: `w + scale * std(w) * noise`.

    Args:
        base: `{layer: (w13 [M, 2I, H], w2 [M, H, I])}`.
        experts: `{layer: ids}`, or a count per layer (ids drawn at random with `seed`).
    """
    g = torch.Generator().manual_seed(seed)
    out: Experts = {}
    for l, (w13, w2) in sorted(base.items()):
        M = w13.shape[0]
        if isinstance(experts, int):
            if not 0 <= experts <= M:
                raise ValueError(f"cannot pick {experts} of {M} experts")
            ids = sorted(torch.randperm(M, generator=g)[:experts].tolist())
        else:
            if l not in experts:
                continue
            ids = sorted(set(int(e) for e in experts[l]))
            if any(not 0 <= e < M for e in ids):
                raise ValueError(f"layer {l}: expert ids {ids} out of range [0, {M})")
        per = {}
        for e in ids:
            pair = []
            for w in (w13[e], w2[e]):
                wf = w.detach().float().cpu()
                noise = torch.randn(wf.shape, generator=g)
                pair.append((wf + scale * wf.std() * noise).to(w.dtype).to(w.device))
            per[e] = (pair[0], pair[1])
        if per:
            out[l] = per
    if not isinstance(experts, int):
        unknown = sorted(set(experts) - set(base))
        if unknown:
            raise ValueError(f"layers {unknown} are not in the base weights (layers {sorted(base)})")
    return out


def build_esft_adapter(path: str | Path, base: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
                       experts: Mapping[int, Iterable[int]] | int, *, seed: int = 0, scale: float = 0.1,
                       naming: str = "deepseek") -> Path:
    """Pick experts of a base model, perturb them fine-tune-like and save an ESFT directory."""
    return save_esft_adapter(path, make_esft_experts(base, experts, seed=seed, scale=scale), naming=naming)


# ---------------------------------------------------------------------------------------------
# base experts from a checkpoint
# ---------------------------------------------------------------------------------------------
def read_checkpoint(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the `*.safetensors` files of a Hugging Face checkpoint directory."""
    return _read_safetensors(Path(model_dir))


def load_base_experts(state: Mapping[str, torch.Tensor] | str | Path, layer: int, num_experts: int, *,
                      dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack one layer's routed experts from a checkpoint (directory or state dict) in any of the
    layouts above: returns `(w13 [M, 2I, H], w2 [M, H, I])`."""
    if not isinstance(state, Mapping):
        state = read_checkpoint(state)
    prefix = re.compile(rf"^(?:.*\.)?layers\.{int(layer)}\.(mlp|block_sparse_moe)\.experts\.")
    found, _ = split_expert_tensors({k: v for k, v in state.items() if prefix.match(k)}, where=f"layer {layer}")
    ids = sorted(e for (l, e) in found)
    if ids != list(range(num_experts)):
        missing = sorted(set(range(num_experts)) - set(ids))
        extra = sorted(set(ids) - set(range(num_experts)))
        raise EsftFormatError(f"layer {layer}: expected experts 0..{num_experts - 1}; missing {missing[:8]}, "
                              f"unexpected {extra[:8]}")
    pairs = [_assemble(f"layer {layer}", layer, e, found[(layer, e)], None, None) for e in ids]
    if len({(a.shape, b.shape) for a, b in pairs}) != 1:
        raise EsftFormatError(f"layer {layer}: experts have different shapes")
    w13 = torch.stack([a for a, _ in pairs])
    w2 = torch.stack([b for _, b in pairs])
    if dtype is not None:
        w13, w2 = w13.to(dtype), w2.to(dtype)
    return w13, w2
