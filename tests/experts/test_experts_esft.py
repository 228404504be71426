"""ESFT adapter directories: build/save/load round trips, checkpoint layouts, and bad directories
that must fail with a message naming what is wrong."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from experts import (EsftFormatError, ExpertStore, build_esft_adapter, load_base_experts, load_esft_dir,
                     make_esft_experts, read_expert_cfg, save_esft_adapter)

M, H, I = 6, 16, 12
LAYERS = [1, 2]


@pytest.fixture
def base():
    g = torch.Generator().manual_seed(1)
    return {l: (torch.randn(M, 2 * I, H, generator=g), torch.randn(M, H, I, generator=g)) for l in LAYERS}


@pytest.mark.parametrize("naming", ["deepseek", "mixtral"])
def test_round_trip(tmp_path, base, naming):
    chosen = {1: [0, 4], 2: [5]}
    experts = make_esft_experts(base, chosen, seed=3, scale=0.2)
    d = save_esft_adapter(tmp_path / "math", experts, naming=naming)
    cfg = json.loads((d / "expert_cfg.json").read_text())
    assert cfg == {"experts": {"1": [0, 4], "2": [5]}, "shared_experts": False, "non_expert_modules": False}
    ad = load_esft_dir(d, num_experts=M, hidden=H, intermediate=I, layers=LAYERS)
    assert ad.name == "math" and ad.num_experts == 3
    for l, ids in chosen.items():
        assert sorted(ad.experts[l]) == ids
        for e in ids:
            assert torch.equal(ad.experts[l][e][0], experts[l][e][0])
            assert torch.equal(ad.experts[l][e][1], experts[l][e][1])
            # fine-tune-like: close to the base expert, but not equal
            assert not torch.equal(experts[l][e][0], base[l][0][e])
            assert (experts[l][e][0] - base[l][0][e]).abs().mean() < 0.5 * base[l][0][e].abs().mean()
    # straight into a store, named after the directory
    store = ExpertStore(LAYERS, M, H, I, 4, dtype=torch.float32, device="cpu")
    for l in LAYERS:
        store.load_base(l, *base[l])
    aid = store.load_esft(d)
    assert store.adapters == ["math"] and store.adapter_id("math") == aid
    row = store.adapter_info("math").slots[1][4]
    assert torch.equal(store.w13(1)[row], experts[1][4][0])
    store.load_adapter("again", ad)  # an EsftAdapter is the layer -> experts mapping itself
    assert store.adapter_info("again").num_experts == 3
    store.close()


def test_build_by_count_and_keys(tmp_path, base):
    d = build_esft_adapter(tmp_path / "a", base, 2, seed=9)
    keys = load_file(str(d / "expert_weights.safetensors")).keys()
    assert all(k.startswith("model.layers.") and ".mlp.experts." in k for k in keys)
    assert len(keys) == len(LAYERS) * 2 * 3
    cfg = read_expert_cfg(d)
    assert all(len(v) == 2 for v in cfg["experts"].values())


def test_base_experts_per_expert_and_fused_layouts(tmp_path, base):
    w13, w2 = base[1]
    per, fused, mixtral = {}, {}, {}
    for e in range(M):
        for name, t in (("gate_proj", w13[e, :I]), ("up_proj", w13[e, I:]), ("down_proj", w2[e])):
            per[f"model.layers.1.mlp.experts.{e}.{name}.weight"] = t.contiguous()
        for name, t in (("w1", w13[e, :I]), ("w3", w13[e, I:]), ("w2", w2[e])):
            mixtral[f"model.layers.1.block_sparse_moe.experts.{e}.{name}.weight"] = t.contiguous()
    fused["model.layers.1.mlp.experts.gate_up_proj"] = w13.contiguous()
    fused["model.layers.1.mlp.experts.down_proj"] = w2.contiguous()
    fused["model.layers.1.mlp.gate.weight"] = torch.randn(M, H)  # other tensors are ignored
    for sd in (per, fused, mixtral):
        a, b = load_base_experts(sd, 1, M)
        assert torch.equal(a, w13) and torch.equal(b, w2)
    save_file(fused, str(tmp_path / "model.safetensors"))
    a, b = load_base_experts(tmp_path, 1, M, dtype=torch.bfloat16)
    assert a.dtype == torch.bfloat16 and torch.equal(a, w13.bfloat16())
    with pytest.raises(EsftFormatError, match="missing"):
        load_base_experts(per, 1, M + 1)


# --------------------------------------------------------------------- bad directories
def _good(tmp_path, base):
    experts = make_esft_experts(base, {1: [0, 4], 2: [5]}, seed=3)
    return save_esft_adapter(tmp_path / "ad", experts)


def _edit_cfg(d, fn):
    cfg = json.loads((d / "expert_cfg.json").read_text())
    fn(cfg)
    (d / "expert_cfg.json").write_text(json.dumps(cfg))


def _edit_weights(d, fn):
    f = d / "expert_weights.safetensors"
    t = load_file(str(f))
    fn(t)
    save_file(t, str(f))


K0 = "model.layers.1.mlp.experts.0."


@pytest.mark.parametrize("case,match", [
    ("no_dir", "not a directory"),
    ("no_cfg", "expert_cfg.json: missing"),
    ("bad_json", "not valid JSON"),
    ("no_experts_key", "no \"experts\" key"),
    ("layer_not_int", "layer key 'x' is not an integer"),
    ("ids_not_list", "must be a list of integers"),
    ("dup_ids", r"expert ids \[4\] are listed twice"),
    ("id_range", r"expert ids \[6\] are out of range \[0, 6\)"),
    ("not_moe_layer", "layer 7 is not an MoE layer"),
    ("shared_true", "\"shared_experts\" is true"),
    ("flag_not_bool", "must be true or false"),
    ("missing_tensor", "layer 1 expert 0 has no up weight"),
    ("unlisted_expert", "layer 1 expert 3, which expert_cfg.json does not list"),
    ("listed_no_weights", "lists layer 2 expert 1, but no safetensors file holds its weights"),
    ("other_tensor", "not routed-expert weights"),
    ("bad_shape", r"do not fit together"),
    ("wrong_hidden", r"the model's experts are \[intermediate=12, hidden=16\]"),
    ("no_safetensors", "no \\*.safetensors file"),
    ("corrupt", "not a readable safetensors file"),
    ("dup_across_files", "also appears in another file"),
])
def test_bad_directory_errors(tmp_path, base, case, match):
    d = _good(tmp_path, base)
    if case == "no_dir":
        d = tmp_path / "nope"
    elif case == "no_cfg":
        (d / "expert_cfg.json").unlink()
    elif case == "bad_json":
        (d / "expert_cfg.json").write_text("{experts: ")
    elif case == "no_experts_key":
        _edit_cfg(d, lambda c: c.pop("experts"))
    elif case == "layer_not_int":
        _edit_cfg(d, lambda c: c["experts"].update({"x": [1]}))
    elif case == "ids_not_list":
        _edit_cfg(d, lambda c: c["experts"].update({"1": 3}))
    elif case == "dup_ids":
        _edit_cfg(d, lambda c: c["experts"].update({"1": [0, 4, 4]}))
    elif case == "id_range":
        _edit_cfg(d, lambda c: c["experts"].update({"1": [0, 4, 6]}))
    elif case == "not_moe_layer":
        _edit_cfg(d, lambda c: c["experts"].update({"7": [0]}))
    elif case == "shared_true":
        _edit_cfg(d, lambda c: c.update(shared_experts=True))
    elif case == "flag_not_bool":
        _edit_cfg(d, lambda c: c.update(non_expert_modules="no"))
    elif case == "missing_tensor":
        _edit_weights(d, lambda t: t.pop(K0 + "up_proj.weight"))
    elif case == "unlisted_expert":
        _edit_weights(d, lambda t: t.update({"model.layers.1.mlp.experts.3.down_proj.weight": torch.randn(H, I)}))
    elif case == "listed_no_weights":
        _edit_cfg(d, lambda c: c["experts"].update({"2": [1, 5]}))
    elif case == "other_tensor":
        _edit_weights(d, lambda t: t.update({"model.layers.1.self_attn.q_proj.weight": torch.randn(H, H)}))
    elif case == "bad_shape":
        _edit_weights(d, lambda t: t.update({K0 + "down_proj.weight": torch.randn(H, I + 1)}))
    elif case == "wrong_hidden":
        g = {n: torch.randn(I, H + 2) for n in ("gate_proj", "up_proj")}
        _edit_weights(d, lambda t: t.update({K0 + f"{n}.weight": v for n, v in g.items()}
                                            | {K0 + "down_proj.weight": torch.randn(H + 2, I)}))
    elif case == "no_safetensors":
        (d / "expert_weights.safetensors").unlink()
    elif case == "corrupt":
        (d / "expert_weights.safetensors").write_bytes(b"\x00\x01garbage")
    elif case == "dup_across_files":
        t = load_file(str(d / "expert_weights.safetensors"))
        save_file({K0 + "gate_proj.weight": t[K0 + "gate_proj.weight"]}, str(d / "extra.safetensors"))
    with pytest.raises(EsftFormatError, match=match):
        load_esft_dir(d, num_experts=M, hidden=H, intermediate=I, layers=LAYERS)


def test_extra_modules_allowed_on_request(tmp_path, base):
    d = _good(tmp_path, base)
    _edit_cfg(d, lambda c: c.update(non_expert_modules=True))
    _edit_weights(d, lambda t: t.update({"model.layers.1.self_attn.q_proj.weight": torch.randn(H, H)}))
    ad = load_esft_dir(d, allow_extra_modules=True)
    assert list(ad.extra) == ["model.layers.1.self_attn.q_proj.weight"]
    assert ad.num_experts == 3
