"""The engine's kernel path (paged attention / Flash-LoRA-Attention from `kernels`) against its
torch path, in every cache mode, on a mixed batch (prefill chunks, decodes, several agents).

On CPU the kernels run in Triton's interpreter (VMWEAVE_KERNELS=triton forces them; the engine
otherwise keeps torch on CPU), in fp32; on a GPU compiled, in bf16 (the dtype the engine uses
them for), held to the torch path's own bf16 noise (see `_check_paths`).
"""
from __future__ import annotations

import os

import pytest
import torch

from engine import Engine, SamplingParams
from engine.builtin import builtin_config, save_random_lora

MODES = [("non_shared", ("plan", "act")), ("base_shared", ("plan", "own")),
         ("base_lr_shared", ("plan", "act")), ("full_shared", ("plan", "act"))]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("kern_adapters")
    c = builtin_config("tiny")
    return {"plan": save_random_lora(str(root / "plan"), c, r=8, seed=1, a_seed=100, gain=2.0),
            "act": save_random_lora(str(root / "act"), c, r=8, seed=2, a_seed=100, gain=2.0),
            "own": save_random_lora(str(root / "own"), c, r=16, seed=5, a_seed=7, gain=2.0)}


def _run(mode, names, adapters, device, dtype):
    eng = Engine.from_pretrained("tiny", cache_mode=mode, device=device, dtype=dtype, max_batched_tokens=12)
    for n in names:
        eng.add_lora_agent(n, adapters[n])
    p = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=True)
    s1, s2 = eng.new_session(), eng.new_session()
    g = torch.Generator().manual_seed(0)
    ids = [eng.add_request(s1, names[0], torch.randint(0, 512, (21,), generator=g).tolist(), p),
           eng.add_request(s2, names[1], torch.randint(0, 512, (7,), generator=g).tolist(), p),
           eng.add_request(s1, names[1], [3, 4], p),
           eng.add_request(eng.new_session(), None, torch.randint(0, 512, (5,), generator=g).tolist(), p)]
    while eng.has_unfinished():
        eng.step()
    return [eng.get_output(i) for i in ids]


def _agree(outs) -> int:
    """Leading steps every output decoded from the same prefix (step 0 always)."""
    n = 1
    while n < min(len(o) for o in outs) and len({o[n - 1] for o in outs}) == 1:
        n += 1
    return n


def _check_paths(device, monkeypatch, run) -> None:
    """run(dtype) -> outputs, under the VMWEAVE_KERNELS set here.

    CPU (interpreter, fp32): the kernel path gives the torch path's tokens and log-probs.
    GPU (bf16, the kernels' dtype): a small random model amplifies one-ulp differences, so the
    kernel path is held to the torch path's own bf16 noise: its distance from the fp32 torch
    result may be at most 3x (+0.05) that of the bf16 torch result, over the steps all decoded
    from one prefix."""
    if device == "cpu":
        monkeypatch.setenv("VMWEAVE_KERNELS", "torch")
        ref = run(torch.float32)
        monkeypatch.setenv("VMWEAVE_KERNELS", "triton")
        got = run(torch.float32)
        for r, g in zip(ref, got):
            assert list(g) == list(r)
            torch.testing.assert_close(g.logprobs, r.logprobs, atol=2e-4, rtol=0)
        return
    monkeypatch.setenv("VMWEAVE_KERNELS", "torch")
    ref, noisy = run(torch.float32), run(torch.bfloat16)
    monkeypatch.setenv("VMWEAVE_KERNELS", "triton")
    got = run(torch.bfloat16)
    for r, t, g in zip(ref, noisy, got):
        n = _agree([r, t, g])
        err_t = (t.logprobs[:n] - r.logprobs[:n]).abs().max().item()
        err_k = (g.logprobs[:n] - r.logprobs[:n]).abs().max().item()
        assert err_k <= 3 * err_t + 0.05, (err_k, err_t)


@pytest.mark.parametrize("mode,names", MODES)
def test_kernel_path_equals_torch_path(mode, names, adapters, device, monkeypatch):
    if device == "cpu" and mode in ("base_lr_shared", "full_shared"):
        pytest.skip("the interpreter is slow: on CPU the two modes that cover both kernels run")
    calls = []
    import kernels
    import kernels.attention as ka
    import kernels.lora as kl

    def counting(mod, fn, also=None):
        orig = getattr(mod, fn)

        def wrapped(*a, **kw):
            if os.environ.get("VMWEAVE_KERNELS") == "triton":
                calls.append(fn)
            return orig(*a, **kw)
        monkeypatch.setattr(mod, fn, wrapped)
        if also is not None:
            monkeypatch.setattr(also, fn, wrapped, raising=False)

    for fn in ("paged_attention_prefill", "paged_attention_decode", "flash_lora_prefill", "flash_lora_decode"):
        counting(ka, fn, kernels)
    for fn in ("lora_shrink", "lora_expand"):
        counting(kl, fn)
    _check_paths(device, monkeypatch, lambda dtype: _run(mode, names, adapters, device, dtype))
    assert "lora_shrink" in calls and "lora_expand" in calls
    assert any(c.startswith("paged") or c.startswith("flash") for c in calls)
    if mode in ("base_shared", "base_lr_shared"):
        assert any(c.startswith("flash_lora") for c in calls)


def test_moe_kernel_path_equals_torch_path_without_esft(device, monkeypatch):
    """The plain MoE model (no ESFT adapter) on the kernel path routes with kernels.router_topk
    and runs kernels.fused_moe: the torch path's tokens and log-probs."""
    import kernels
    import kernels.moe as km

    calls = []
    for fn in ("router_topk", "fused_moe"):
        orig = getattr(km, fn)

        def wrapped(*a, _orig=orig, _fn=fn, **kw):
            if os.environ.get("VMWEAVE_KERNELS") == "triton":
                calls.append(_fn)
            return _orig(*a, **kw)
        monkeypatch.setattr(km, fn, wrapped)
        monkeypatch.setattr(kernels, fn, wrapped, raising=False)

    def run(dtype):
        eng = Engine.from_pretrained("tiny-moe", cache_mode="non_shared", device=device, dtype=dtype)
        p = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=True)
        g = torch.Generator().manual_seed(3)
        return [eng.generate(eng.new_session(), None, torch.randint(0, 512, (n,), generator=g).tolist(), p)
                for n in (13, 6)]

    _check_paths(device, monkeypatch, run)
    assert "router_topk" in calls and "fused_moe" in calls


@pytest.mark.gpu
def test_cuda_engine_matches_cpu_engine(adapters, tmp_path):
    """The whole engine on the GPU (vmm cuda pages, fp32 torch math, ESFT store on cuda) gives the
    CPU engine's greedy tokens, for a dense multi-agent run, an MoE model with an ESFT adapter
    and an S2 model."""
    from engine.builtin import save_random_esft

    p = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=True)
    esft = save_random_esft(str(tmp_path / "law"), "tiny-moe", {0: [1, 5], 1: [2]}, seed=1)
    outs = {}
    for dev in ("cpu", "cuda"):
        res = []
        eng = Engine.from_pretrained("tiny", cache_mode="base_lr_shared", device=dev)
        eng.add_lora_agent("plan", adapters["plan"])
        eng.add_lora_agent("act", adapters["act"])
        s = eng.new_session()
        res += [eng.generate(s, "plan", list(range(10, 40)), p), eng.generate(s, "act", [5, 6], p)]
        moe = Engine.from_pretrained("tiny-moe", cache_mode="non_shared", device=dev)
        moe.add_esft_adapter("law", esft)
        res.append(moe.generate(moe.new_session(), "law", list(range(50, 71)), p))
        s2 = Engine.from_pretrained("tiny-s2", device=dev)
        res.append(s2.generate(s2.new_session(), None, list(range(100, 190)), p))
        rep = eng.memory_report()
        assert rep["pages_mapped"] > 0 and rep["page_pool"]["backend"] == ("host" if dev == "cpu" else "cuda")
        outs[dev] = res
    for a, b in zip(outs["cpu"], outs["cuda"]):
        assert list(a) == list(b)
        torch.testing.assert_close(b.logprobs.cpu(), a.logprobs, atol=1e-3, rtol=0)


@pytest.mark.gpu
def test_cuda_bf16_engine_runs_every_mode(adapters):
    """bf16 on the GPU takes the kernel path in every mode and yields valid distributions."""
    for mode, names in MODES:
        eng = Engine.from_pretrained("tiny", cache_mode=mode, device="cuda", dtype=torch.bfloat16)
        for n in names:
            eng.add_lora_agent(n, adapters[n])
        s = eng.new_session()
        p = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=True)
        # blocks of 128 where decode reads K/V by TMA: the 37-token prompt and its output sit in
        # one partly filled block, read through descriptors
        assert eng.kv.block_size == (128 if torch.cuda.get_device_capability() >= (9, 0) else 16)
        for n in names:
            out = eng.generate(s, n, list(range(3, 40)), p)
            assert len(out) == 8 and torch.isfinite(out.logprobs).all()
            torch.testing.assert_close(out.logprobs.exp().sum(-1), torch.ones(8), atol=1e-3, rtol=0)


def test_default_block_size_follows_the_decode_path(device):
    """Blocks of 128 only where decode takes the kernels on a GPU with TMA; an fp32 model (torch
    math) or the CPU keeps 16; a block size given is always kept."""
    from engine.kernel_policy import default_block_size

    assert Engine.from_pretrained("tiny", device="cpu", max_kv_bytes=1 << 22).kv.block_size == 16
    assert Engine.from_pretrained("tiny", device="cpu", max_kv_bytes=1 << 22, block_size=32).kv.block_size == 32
    assert default_block_size("cpu", torch.bfloat16) == 16
    if device == "cuda":
        assert default_block_size("cuda", torch.float32) == 16
        hopper = torch.cuda.get_device_capability() >= (9, 0)
        assert default_block_size("cuda", torch.bfloat16) == (128 if hopper else 16)


def test_s2_decode_kernel_equals_torch_path(device, monkeypatch):
    """S2 layers: decodes go through kernels.s2_attention_decode on the paged cache."""
    prompt = torch.randint(0, 512, (70,), generator=torch.Generator().manual_seed(3)).tolist()
    import kernels

    calls = []
    orig = kernels.s2_attention_decode

    def counted(*a, **kw):
        calls.append(1)
        return orig(*a, **kw)
    monkeypatch.setattr(kernels, "s2_attention_decode", counted, raising=False)
    p = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=True)

    def run(dtype):
        eng = Engine.from_pretrained("tiny-s2", device=device, dtype=dtype)
        return [eng.generate(eng.new_session(), None, prompt, p)]

    _check_paths(device, monkeypatch, run)
    assert len(calls) == 2  # kernel run only: two decode steps, one S2 layer


def test_moe_kernel_path_with_esft_equals_torch_path(device, monkeypatch, tmp_path):
    """MoE layers on the kernel path: the router kernel reroutes (ExpertWeave: no separate
    reroute launch) and fused_moe runs over the ExpertStore's extended table, tokens of an ESFT
    agent and of the base model in one batch."""
    import kernels
    from engine.builtin import save_random_esft

    esft = save_random_esft(str(tmp_path / "law"), "tiny-moe", {0: [1, 5], 1: [2]}, seed=1)
    p = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, logprobs=True)
    calls, routed = [], []
    orig, orig_router = kernels.fused_moe, kernels.router_topk

    def counted(*a, **kw):
        calls.append(1)
        return orig(*a, **kw)

    def counted_router(*a, **kw):
        routed.append(kw.get("expert_map") is not None)
        return orig_router(*a, **kw)
    monkeypatch.setattr(kernels, "fused_moe", counted, raising=False)
    monkeypatch.setattr(kernels, "router_topk", counted_router, raising=False)

    def run(dtype):
        eng = Engine.from_pretrained("tiny-moe", cache_mode="non_shared", device=device, dtype=dtype)
        eng.add_esft_adapter("law", esft)
        r = [eng.add_request(eng.new_session(), a, list(range(20 + i, 33 + i)), p)
             for i, a in enumerate(("law", None))]
        while eng.has_unfinished():
            eng.step()
        return [eng.get_output(i) for i in r]

    _check_paths(device, monkeypatch, run)
    assert calls and routed and all(routed)


@pytest.mark.parametrize("mode", ["base_lr_shared", "base_shared"])
def test_s2_layers_run_flash_lora_in_the_s2_kernels(mode, device, monkeypatch, tmp_path):
    """Shared modes on an S2 model: agents with low-rank V attend in the S2 layers through the S2
    kernels with their low-rank cache (no torch-path chunk), and give the torch path's result."""
    import kernels

    c = builtin_config("tiny-s2")
    dirs = {"plan": save_random_lora(str(tmp_path / "plan"), c, r=8, seed=1, a_seed=100, gain=2.0),
            "act": save_random_lora(str(tmp_path / "act"), c, r=8, seed=2, a_seed=100, gain=2.0)}
    calls = []
    for fn in ("s2_attention_decode", "s2_attention_prefill_paged"):
        orig = getattr(kernels, fn)

        def counted(*a, _orig=orig, _fn=fn, **kw):
            if os.environ.get("VMWEAVE_KERNELS") == "triton":
                calls.append((_fn, kw.get("lr_cache") is not None))
            return _orig(*a, **kw)
        monkeypatch.setattr(kernels, fn, counted, raising=False)
    p = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=True)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (53, 9)]
    torch_chunks = []

    def run(dtype):
        eng = Engine.from_pretrained("tiny-s2", cache_mode=mode, device=device, dtype=dtype)
        for n, d in dirs.items():
            eng.add_lora_agent(n, d)
        s = eng.new_session()
        outs = [eng.generate(s, "plan", prompts[0], p), eng.generate(s, "act", prompts[1], p)]
        torch_chunks.append(eng.stats()["torch_chunks"])
        return outs

    _check_paths(device, monkeypatch, run)
    assert ("s2_attention_decode", True) in calls and ("s2_attention_prefill_paged", True) in calls
    assert torch_chunks[-1] == 0  # the kernel run: nothing fell back to torch


def test_low_rank_stream_shares_the_kv_table_only_when_block_ids_match(adapters, device, monkeypatch):
    """base_lr_shared: the kv and low-rank V streams get the same block ids (reserved and freed
    together), so a forward plans one table and one set of write slots for both. With the
    low-rank pool's ids shifted by a block taken beforehand, each forward sees they differ and
    sends the low-rank stream's own; the tokens and log-probs are the same either way."""
    from engine.attention import PagedAttention

    if device == "cpu":
        monkeypatch.setenv("VMWEAVE_KERNELS", "triton")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    seen = []
    real = PagedAttention.__init__

    def spying(self, *a, **kw):
        real(self, *a, **kw)
        seen.append((any(w.twin for w in self.writes.values()),
                     any(g.get("lr_twin") for g in self.groups.values())))

    monkeypatch.setattr(PagedAttention, "__init__", spying)
    outs = {}
    for shifted in (False, True):
        eng = Engine.from_pretrained("tiny", cache_mode="base_lr_shared", device=device, dtype=dtype,
                                     block_size=4)
        for n in ("plan", "act"):
            eng.add_lora_agent(n, adapters[n])
        if shifted:
            eng.kv.pool("lr", 8).allocate(1)
        seen.clear()
        p = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=True)
        ids = [eng.add_request(eng.new_session(), a, list(range(3 + 5 * i, 14 + 6 * i)), p)
               for i, a in enumerate(("plan", "act"))]
        while eng.has_unfinished():
            eng.step()
        outs[shifted] = [eng.get_output(i) for i in ids]
        assert seen and all(s == (not shifted, not shifted) for s in seen), seen
    for r, g in zip(outs[False], outs[True]):
        assert list(g) == list(r)
        torch.testing.assert_close(g.logprobs, r.logprobs, atol=1e-6 if device == "cpu" else 1e-2, rtol=0)
