"""S2-attention layers on head-sharded storage (engine/s2.py ShardedKV) in the engine.

The kernel path (kernels.s2_attention_prefill_paged / s2_attention_decode over per-KV-head block
tables; on CPU through Triton's interpreter, VMWEAVE_KERNELS=triton) must give the torch path's
tokens and log-probs, while each KV head holds exactly the blocks some later query reads —
counted here from the pattern's own key lists — and everything is freed on preemption and close.
"""
from __future__ import annotations

import pytest
import torch

from engine import Engine, SamplingParams
from engine.builtin import builtin_config, save_random_lora
from engine_test_helpers import one_thread  # noqa: F401  (autouse fixture)
from engine_test_helpers import cpu_kernels, prompt

CONFIG = builtin_config("tiny-s2")  # layer 0 is S2 (sparse_block 16, 2 local blocks, stride 2), layer 1 dense
S2_LAYERS = [layer for layer in range(CONFIG.num_layers) if CONFIG.is_s2_layer(layer)]
TOKEN_BLOCK = 16  # the engine's default block size (= sparse_block here)
ELT = 4  # float32
HEAD_BLOCK_BYTES = 2 * len(S2_LAYERS) * TOKEN_BLOCK * CONFIG.head_dim * ELT  # K+V of one KV head's block
LOGPROB_TOL = 2e-4  # fp32 kernel (interpreter) vs fp32 torch math


def pattern():
    from kernels import S2Pattern

    s = CONFIG.s2
    return S2Pattern(CONFIG.num_heads, s.sparse_block, s.local_blocks, s.vert_stride,
                     num_kv_heads=CONFIG.num_kv_heads, homo_head=s.homo_head)


def expected_head_blocks(n: int) -> int:
    """Blocks, summed over KV heads, that some query at position >= n reads among the n cached
    tokens: from `key_blocks` of the query blocks ahead (the shard repeats every vert_stride)."""
    p = pattern()
    first = n // p.sparse_block
    ahead = range(first, first + p.vert_stride + p.local_blocks + 1)
    total = 0
    for h in range(p.num_kv_heads):
        read = {j for i in ahead for j in p.key_blocks(h, i)}
        total += sum(1 for b in range(-(-n // TOKEN_BLOCK)) if b * TOKEN_BLOCK // p.sparse_block in read)
    return total


def full_head_blocks(n: int) -> int:
    return -(-n // TOKEN_BLOCK) * CONFIG.num_kv_heads


def check_sharded_bytes(eng, sessions) -> None:
    """The S2 layers hold exactly what later queries read, less than full storage once the
    window has moved."""
    covered = [eng.kv.coverage(s.id, None) for s in sessions]
    rep = eng.memory_report()["s2"]
    assert rep["used_bytes"] == sum(expected_head_blocks(n) for n in covered) * HEAD_BLOCK_BYTES
    assert rep["full_bytes"] == sum(full_head_blocks(n) for n in covered) * HEAD_BLOCK_BYTES


def count_calls(monkeypatch, names):
    """Wrap kernels.<name> for each name; returns {name: [per-head table?, ...]}."""
    import kernels

    calls = {n: [] for n in names}
    for n in names:
        orig = getattr(kernels, n)

        def wrapped(*a, _orig=orig, _n=n, **kw):
            calls[_n].append(a[3].dim() == 3)  # block_tables: [B, Hkv, W] per KV head
            return _orig(*a, **kw)
        monkeypatch.setattr(kernels, n, wrapped, raising=False)
    return calls


def run_two_sessions(monkeypatch, kernels_env: str, check_memory: bool):
    """Two sessions of different lengths prefilled in 24-token chunks (so later chunks sit on a
    cached prefix) and decoded together step by step past a sparse-block boundary."""
    monkeypatch.setenv("VMWEAVE_KERNELS", kernels_env)
    eng = Engine.from_pretrained("tiny-s2", device="cpu", max_batched_tokens=24)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=True)
    sessions = [eng.new_session(), eng.new_session()]
    ids = [eng.add_request(s, None, prompt(n, 60 + n), params) for s, n in zip(sessions, (75, 37))]
    while eng.has_unfinished():
        eng.step()
        if check_memory:
            check_sharded_bytes(eng, sessions)
    return eng, sessions, [eng.get_output(i) for i in ids]


@cpu_kernels
def test_kernel_path_equals_torch_path_on_sharded_storage(monkeypatch):
    calls = count_calls(monkeypatch, ["s2_attention_prefill_paged", "s2_attention_decode"])
    _, _, ref = run_two_sessions(monkeypatch, "torch", check_memory=True)
    assert not any(calls.values())  # the torch path calls no S2 kernel
    eng, sessions, got = run_two_sessions(monkeypatch, "triton", check_memory=True)
    for g, r in zip(got, ref):
        assert list(g) == list(r)
        torch.testing.assert_close(g.logprobs, r.logprobs, atol=LOGPROB_TOL, rtol=0)
    # prefill chunks and decodes both ran on the kernels, over per-KV-head tables
    assert calls["s2_attention_prefill_paged"] and calls["s2_attention_decode"]
    assert all(calls["s2_attention_prefill_paged"]) and all(calls["s2_attention_decode"])
    n = eng.kv.coverage(sessions[0].id, None)
    assert n == 75 + 6 - 1 and expected_head_blocks(n) < full_head_blocks(n)  # the window moved


@cpu_kernels
def test_score_kernel_path_equals_torch_path(monkeypatch):
    toks = prompt(83, 70)
    out = {}
    for env in ("torch", "triton"):
        monkeypatch.setenv("VMWEAVE_KERNELS", env)
        eng = Engine.from_pretrained("tiny-s2", device="cpu", max_batched_tokens=24)
        out[env] = eng.score(toks)
        assert eng.memory_report()["used_bytes"] == 0  # the scoring session is freed
    torch.testing.assert_close(out["triton"], out["torch"], atol=LOGPROB_TOL, rtol=0)


def test_memory_report_counts_s2_layers_sharded():
    eng = Engine.from_pretrained("tiny-s2", device="cpu")
    s = eng.new_session()
    eng.generate(s, None, prompt(100, 71), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    n = eng.kv.coverage(s.id, None)
    rep = eng.memory_report()
    s2 = rep["s2"]
    assert s2["layers"] == S2_LAYERS and s2["block_bytes"] == HEAD_BLOCK_BYTES
    assert s2["used_bytes"] == expected_head_blocks(n) * HEAD_BLOCK_BYTES
    assert s2["used_bytes"] < s2["full_bytes"] == full_head_blocks(n) * HEAD_BLOCK_BYTES
    # the kv pool stores the dense layers only; both count in the one byte budget
    dense = CONFIG.num_layers - len(S2_LAYERS)
    kv = rep["pools"]["kv"]
    assert kv["token_bytes"] == 2 * dense * CONFIG.kv_size * ELT
    assert rep["used_bytes"] == kv["used_bytes"] + s2["used_bytes"]
    assert kv["used_bytes"] == -(-n // TOKEN_BLOCK) * TOKEN_BLOCK * kv["token_bytes"]
    eng.close_session(s)
    rep = eng.memory_report()
    assert rep["used_bytes"] == 0 and rep["s2"]["used_bytes"] == 0 and rep["s2"]["mapped_bytes"] == 0


@pytest.mark.parametrize("kernels_env", ["torch", pytest.param("triton", marks=cpu_kernels)])
def test_preemption_and_close_free_the_sharded_blocks(monkeypatch, kernels_env):
    """A budget too small for three sessions at once: sessions are preempted (their sharded
    blocks freed) and recomputed; the outputs equal an unconstrained run and closing every
    session gives every byte back."""
    monkeypatch.setenv("VMWEAVE_KERNELS", kernels_env)
    jobs = [prompt(40, 80), prompt(35, 81), prompt(38, 82)]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)

    def run(max_kv_bytes):
        eng = Engine.from_pretrained("tiny-s2", device="cpu", max_kv_bytes=max_kv_bytes, max_batched_tokens=64)
        sessions = [eng.new_session() for _ in jobs]
        ids = [eng.add_request(s, None, p, params) for s, p in zip(sessions, jobs)]
        while eng.has_unfinished():
            eng.step()
            assert eng.memory_report()["used_bytes"] <= (max_kv_bytes or 1 << 62)
        outs = [eng.get_output(i) for i in ids]
        assert all(o.finish_reason == "length" for o in outs)
        return eng, sessions, [list(o) for o in outs]

    _, _, ref = run(None)
    eng, sessions, got = run(32 * 1024)  # one session's dense + sharded blocks, not three
    assert got == ref
    assert eng.memory_report()["preemptions"] + eng.memory_report()["evictions"] > 0
    for s in sessions:
        eng.close_session(s)
    rep = eng.memory_report()
    assert rep["used_bytes"] == 0 and rep["s2"]["blocks_in_use"] == 0 and rep["sessions"] == 0


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2_adapters")
    return {"plan": save_random_lora(str(root / "plan"), CONFIG, r=8, seed=1, gain=2.0),
            "own": save_random_lora(str(root / "own"), CONFIG, r=8, targets=("k_proj", "v_proj"), seed=2,
                                    gain=2.0)}


@cpu_kernels
@pytest.mark.parametrize("mode", ["base_shared", "non_shared"])
def test_lora_agents_in_s2_layers(monkeypatch, adapters, mode):
    """Agents with LoRA on sharded storage: in base_shared their S2 layers take the torch path
    (no Flash-LoRA S2 kernel), the base model's chunks the kernels; in non_shared every agent's
    own K/V is sharded. Kernel path == torch path; dropping an agent frees its sharded blocks."""
    def run(env):
        monkeypatch.setenv("VMWEAVE_KERNELS", env)
        eng = Engine.from_pretrained("tiny-s2", cache_mode=mode, device="cpu", max_batched_tokens=32)
        for name, path in adapters.items():
            eng.add_lora_agent(name, path)
        p = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=True)
        s = eng.new_session()
        outs = [eng.generate(s, a, q, p) for a, q in (("plan", prompt(50, 90)), (None, prompt(6, 91)),
                                                      ("own", prompt(4, 92)))]
        return eng, outs

    _, ref = run("torch")
    eng, got = run("triton")
    for g, r in zip(got, ref):
        assert list(g) == list(r)
        torch.testing.assert_close(g.logprobs, r.logprobs, atol=LOGPROB_TOL, rtol=0)
    before = eng.memory_report()["s2"]["used_bytes"]
    assert before > 0
    eng.remove_adapter("plan")
    after = eng.memory_report()["s2"]["used_bytes"]
    assert (after < before) if mode == "non_shared" else (after == before)  # shared: base K/V stay


def test_sharded_reserve_is_all_or_nothing_and_trim_keeps_what_is_read():
    """ShardedKV alone: a reservation over the budget raises CacheFull and changes nothing;
    trimming keeps exactly the blocks later queries read; slots of given-back blocks are refused."""
    import vmm
    from engine.kvcache import ByteBudget, CacheFull
    from engine.s2 import ShardedKV

    budget = ByteBudget(9 * HEAD_BLOCK_BYTES)
    store = ShardedKV(pattern(), S2_LAYERS, CONFIG.head_dim, TOKEN_BLOCK, torch.float32, budget,
                      vmm.PagePool(vmm.get_backend("host"), 1 << 22))
    s = store.new_stream()
    store.reserve(s, 61)  # 4 blocks x 2 heads
    assert budget.used == 8 * HEAD_BLOCK_BYTES
    with pytest.raises(CacheFull):
        store.reserve(s, 65)  # 2 more head blocks, 1 fits
    assert budget.used == 8 * HEAD_BLOCK_BYTES and s.num_blocks == 4
    store.trim(s, 61)
    assert len(s.held()) == expected_head_blocks(61)
    assert budget.used == expected_head_blocks(61) * HEAD_BLOCK_BYTES
    store.reserve(s, 65)  # room again after the trim
    with pytest.raises(ValueError, match="given back"):
        store.slots(s, 0, 65)
    assert store.slots(s, 61, 65).shape == (4, CONFIG.num_kv_heads)
    assert store.release(s) > 0 and budget.used == 0 and store.allocator.num_allocated == 0
    store.close()
