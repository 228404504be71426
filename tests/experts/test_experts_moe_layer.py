"""The MoE layer over an ExpertStore with adapters equals, token by token, the same layer over a
copy of the base with that adapter's experts merged in (float64 reference)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from experts import ExpertStore, MoELayer, make_esft_experts
from kernels.moe_ref import fused_moe_ref, router_topk_ref


def moe_ref(x, gate, w13, w2, k, *, renormalize, scaling=1.0, shared=None, shared_gate=None):
    """Float64 MoE block over plain (merged) weights."""
    logits = F.linear(x, gate.to(x.dtype))
    tw, ids = router_topk_ref(logits, k, renormalize=renormalize)
    tw = tw.to(x.device) * scaling
    out = fused_moe_ref(x, w13, w2, tw, ids.to(x.device))
    if shared is not None:
        s13, s2 = (t.double() for t in shared)
        xd = x.double()
        h = xd @ s13.T
        inter = s2.shape[1]
        s = (F.silu(h[:, :inter]) * h[:, inter:]) @ s2.T
        if shared_gate is not None:
            s = torch.sigmoid(xd @ shared_gate.double().T) * s
        out = out + s
    return out


def merged(base, layer, adapter_experts):
    w13, w2 = base[layer][0].clone(), base[layer][1].clone()
    for e, (a, b) in adapter_experts.get(layer, {}).items():
        w13[e], w2[e] = a, b
    return w13, w2


def _setup(device, dtype, M, H, I, S, layers, seed):
    g = torch.Generator().manual_seed(seed)
    gd = torch.Generator(device=device).manual_seed(seed)  # big base weights made where they live
    base = {l: ((torch.randn(M, 2 * I, H, generator=gd, device=device) / H ** 0.5).to(dtype),
                (torch.randn(M, H, I, generator=gd, device=device) / I ** 0.5).to(dtype)) for l in layers}
    store = ExpertStore(layers, M, H, I, S, dtype=dtype, device=device, max_adapters=4)
    for l in layers:
        store.load_base(l, *base[l])
    return g, base, store


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_moe_layer_with_adapters_equals_merged_copies(impl, rng_seed):
    from kernels._dispatch import interpreter_on
    if impl == "triton" and not interpreter_on():  # CPU tensors: triton only through the interpreter
        pytest.skip("the triton path of CPU tensors needs TRITON_INTERPRET=1 (CPU CI runs it)")
    M, H, I, S, k, layer = 7, 40, 24, 9, 2, 4
    g, base, store = _setup("cpu", torch.float32, M, H, I, S, [layer], rng_seed)
    ad_a = make_esft_experts(base, {layer: [0, 3, 6]}, seed=rng_seed + 1, scale=0.5)
    ad_b = make_esft_experts(base, {layer: [1, 3]}, seed=rng_seed + 2, scale=0.5)
    ida = store.load_adapter("a", ad_a)
    idb = store.load_adapter("b", ad_b)
    gate = torch.randn(M, H, generator=g)
    shared = (torch.randn(2 * 16, H, generator=g) / H ** 0.5, torch.randn(H, 16, generator=g) / 4)
    sgate = torch.randn(1, H, generator=g)
    kw = dict(renormalize=True, routed_scaling_factor=1.5)
    layer_mod = MoELayer.from_store(store, layer, gate, k, shared_w13=shared[0], shared_w2=shared[1],
                                    shared_gate=sgate, **kw)
    T = 29
    x = torch.randn(T, H, generator=g)
    aids = torch.tensor([-1, ida, idb] * 10, dtype=torch.int32)[:T]
    aids = aids[torch.randperm(T, generator=g)]
    out = layer_mod(x, aids, impl=impl)
    assert out.shape == (T, H) and torch.isfinite(out).all()
    for aid, experts in ((-1, {}), (ida, ad_a), (idb, ad_b)):
        rows = aids == aid
        w13, w2 = merged(base, layer, experts)
        ref = moe_ref(x[rows], gate, w13, w2, k, renormalize=True, scaling=1.5, shared=shared,
                      shared_gate=sgate)
        torch.testing.assert_close(out[rows].double(), ref, rtol=2e-4, atol=1e-4)
    # adapters really change something for their tokens
    base_out = layer_mod(x, None, impl=impl)
    torch.testing.assert_close(base_out[aids == -1], out[aids == -1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(base_out[aids == ida], out[aids == ida])

    # unload a: its id now routes to the base; b keeps its output; a new adapter takes a's slots
    store.unload_adapter("a")
    out2 = layer_mod(x, aids, impl=impl)
    torch.testing.assert_close(out2[aids == ida], base_out[aids == ida], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out2[aids == idb], out[aids == idb], rtol=1e-5, atol=1e-6)
    ad_c = make_esft_experts(base, {layer: [2, 5]}, seed=rng_seed + 3, scale=0.5)
    idc = store.load_adapter("c", ad_c)
    assert idc == ida
    out3 = layer_mod(x, aids, impl=impl)
    torch.testing.assert_close(out3[aids == idb], out[aids == idb], rtol=1e-5, atol=1e-6)
    w13, w2 = merged(base, layer, ad_c)
    ref = moe_ref(x[aids == idc], gate, w13, w2, k, renormalize=True, scaling=1.5, shared=shared,
                  shared_gate=sgate)
    torch.testing.assert_close(out3[aids == idc].double(), ref, rtol=2e-4, atol=1e-4)
    store.close()


def test_moe_layer_plain_weights_no_shared(device, rng_seed):
    """DeepSeek-style: fp32 router, no renormalisation, plain tensors (no store), bf16."""
    M, H, I, k, T = 9, 48, 24, 3, 17
    w13 = (torch.randn(M, 2 * I, H, device=device) / H ** 0.5).bfloat16()
    w2 = (torch.randn(M, H, I, device=device) / I ** 0.5).bfloat16()
    gate = torch.randn(M, H, device=device)
    x = torch.randn(T, H, device=device).bfloat16()
    mod = MoELayer(gate, w13, w2, k, router_fp32=True)
    out = mod(x)
    logits = F.linear(x.float(), gate)
    tw, ids = router_topk_ref(logits, k)
    ref = fused_moe_ref(x, w13, w2, tw.to(x.device), ids.to(x.device))
    torch.testing.assert_close(out.double(), ref, rtol=5e-2, atol=3e-2)


def test_moe_layer_errors():
    M, H, I = 4, 8, 6
    w13, w2, gate = torch.randn(M, 2 * I, H), torch.randn(M, H, I), torch.randn(M, H)
    with pytest.raises(ValueError):
        MoELayer(gate, w13[:, :, :-1], w2, 2)
    with pytest.raises(ValueError):
        MoELayer(gate, w13, w2, 5)
    with pytest.raises(ValueError):
        MoELayer(gate, w13, w2, 2, shared_w13=torch.randn(4, H))
    with pytest.raises(ValueError):
        MoELayer(gate, w13, w2, 2, expert_map=torch.zeros(2, M, dtype=torch.int64))
    mod = MoELayer(gate, w13, w2, 2)
    with pytest.raises(ValueError, match="expert_map"):
        mod(torch.randn(3, H), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError):
        mod(torch.randn(3, H + 1))


@pytest.mark.gpu
def test_moe_layer_gpu_deepseek_lite_store(rng_seed):
    """DeepSeek-V2-Lite-shaped layer on the cuda vmm backend: 2 MiB pages, experts of 5.5 and
    2.75 pages, two adapters of 7 experts, a mixed batch against merged float64 references."""
    M, H, I, S, k, layer = 64, 2048, 1408, 14, 6, 1
    g, base, store = _setup("cuda", torch.bfloat16, M, H, I, S, [layer], rng_seed)
    assert store.device.type == "cuda" and store.page_size == 2 << 20
    ads = {}
    for name, s in (("a", 1), ("b", 2)):
        ids = torch.randperm(M, generator=g)[:7].tolist()
        ads[name] = make_esft_experts(base, {layer: ids}, seed=rng_seed + s, scale=0.5)
        store.load_adapter(name, ads[name])
    rep = store.memory_report()
    assert rep["adapter_bytes"] == 14 * 3 * H * I * 2
    assert 0 <= rep["mapped_bytes"] - rep["exact_bytes"] < max(rep["boundary_pages"], 1) * store.page_size
    gate = torch.randn(M, H, generator=g).cuda()
    shared = ((torch.randn(2 * 2 * I, H, generator=g) / H ** 0.5).bfloat16().cuda(),
              (torch.randn(H, 2 * I, generator=g) / (2 * I) ** 0.5).bfloat16().cuda())
    mod = MoELayer.from_store(store, layer, gate, k, router_fp32=True, shared_w13=shared[0], shared_w2=shared[1])
    T = 200
    x = torch.randn(T, H, generator=g).bfloat16().cuda()
    aids = torch.randint(-1, 2, (T,), generator=g, dtype=torch.int32).cuda()
    out = mod(x, aids)
    torch.cuda.synchronize()
    for aid, experts in ((-1, {}), (0, ads["a"]), (1, ads["b"])):
        rows = aids == aid
        w13, w2 = merged(base, layer, experts)
        logits = F.linear(x[rows].float(), gate)
        tw, ids = router_topk_ref(logits, k)
        ref = fused_moe_ref(x[rows], w13, w2, tw.cuda(), ids.cuda())
        h = x[rows].double() @ shared[0].double().T
        ref = ref + (F.silu(h[:, :2 * I]) * h[:, 2 * I:]) @ shared[1].double().T
        torch.testing.assert_close(out[rows].double(), ref, rtol=5e-2, atol=5e-2)
    store.unload_adapter("a")
    assert store.memory_report()["adapter_bytes"] == 7 * 3 * H * I * 2
    store.close()


def test_moe_layer_capture_graphs_errors():
    M, H, I = 4, 8, 6
    mod = MoELayer(torch.randn(M, H), torch.randn(M, 2 * I, H), torch.randn(M, H, I), 2)
    with pytest.raises(ValueError, match="CUDA"):
        mod.capture_graphs([1, 2])
    assert mod.graph_token_counts == []
    # nothing captured: calls run op by op and use_graph is accepted
    x = torch.randn(3, H)
    torch.testing.assert_close(mod(x, use_graph=False), mod(x))


@pytest.mark.gpu
def test_moe_layer_cuda_graphs_follow_adapter_loads(rng_seed):
    """Graph replays equal op-by-op calls, before and after an adapter is loaded and unloaded
    behind the captured graphs' backs; replays of other sizes do not touch earlier outputs."""
    M, H, I, S, k, layer = 8, 256, 128, 12, 2, 0
    g, base, store = _setup("cuda", torch.bfloat16, M, H, I, S, [layer], rng_seed)
    ad_a = make_esft_experts(base, {layer: [0, 3, 5]}, seed=rng_seed + 1, scale=0.5)
    ad_b = make_esft_experts(base, {layer: [1, 3, 6, 7]}, seed=rng_seed + 2, scale=0.5)
    ida = store.load_adapter("a", ad_a)
    gate = torch.randn(M, H, generator=g).cuda()
    shared = ((torch.randn(64, H, generator=g) / H ** 0.5).bfloat16().cuda(),
              (torch.randn(H, 32, generator=g) / 32 ** 0.5).bfloat16().cuda())
    mod = MoELayer.from_store(store, layer, gate, k, router_fp32=True, shared_w13=shared[0], shared_w2=shared[1])
    with pytest.raises(ValueError):
        mod.capture_graphs([0])
    with pytest.raises(TypeError):
        mod.capture_graphs([2.0])
    mod.capture_graphs([1, 5, 33])
    assert mod.graph_token_counts == [1, 5, 33]

    def check(T, aids):
        x = torch.randn(T, H, generator=g).bfloat16().cuda()
        out = mod(x, aids)
        ref = mod(x, aids, use_graph=False)
        torch.cuda.synchronize()
        assert torch.isfinite(out.float()).all()
        torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
        return x, out

    x33, out33 = check(33, torch.randint(-1, 1, (33,), generator=g, dtype=torch.int32).cuda())
    keep = out33.clone()
    check(1, torch.tensor([ida], dtype=torch.int32).cuda())
    check(5, None)
    torch.testing.assert_close(out33, keep, rtol=0, atol=0)  # outputs are copies
    idb = store.load_adapter("b", ad_b)  # after capture: the graphs must see it
    aids = torch.tensor([idb, ida, -1, idb, idb], dtype=torch.int32).cuda()
    x5, out5 = check(5, aids)
    base_out = mod(x5, None)
    assert not torch.allclose(base_out[aids == idb].float(), out5[aids == idb].float())
    torch.testing.assert_close(base_out[aids == -1].float(), out5[aids == -1].float(), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="adapter_ids"):
        mod(x5, torch.full((5,), 9, dtype=torch.int32).cuda())
    store.unload_adapter("b")
    x5b, out5b = check(5, aids.clamp(max=ida))
    check(7, None)  # not captured: op by op
    mod.release_graphs()
    assert mod.graph_token_counts == []
    store.close()
