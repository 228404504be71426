"""The engine equals transformers (+ peft) on the same tiny random checkpoints, in fp32 on CPU.

Every supported architecture, with and without PEFT LoRA adapters (plain, rsLoRA, shared-A),
through prefill (`score`), step-by-step decode (`generate`, greedy, with its per-step log-probs),
multi-agent sessions and batches of several sessions, and ESFT adapters on the MoE ones against
transformers running a copy of the base with those experts merged in. `non_shared` is the exact
mode, so everything here must match to float32 rounding.
"""
from __future__ import annotations

import pytest
import torch

from hf_fixtures import ALL_ARCHS, DENSE_ARCHS, MOE_ARCHS, hf_greedy, hf_logprobs, random_tokens

from engine import Engine, SamplingParams

ATOL = 1e-4  # log-prob units; transformers' own prefill vs cached decode differ by ~1e-5 here


def _engine(path, **kw):
    return Engine.from_pretrained(str(path), cache_mode="non_shared", device="cpu", **kw)


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=True)


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == torch.float32, f"{what}: dtype {got.dtype}"
    assert torch.isfinite(got).all(), f"{what}: non-finite log-probs"
    err = (got.double() - want.double()).abs().max().item()
    assert err < ATOL, f"{what}: max |Δ log-prob| = {err:.3g}"


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_score_base_matches_transformers(arch, hf_zoo):
    ids = random_tokens(37, seed=hash(arch) % 1000)
    eng = _engine(hf_zoo.checkpoint(arch))
    _close(eng.score(ids), hf_logprobs(hf_zoo.hf(arch), ids), f"{arch} base")


@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("adapter", ["plan", "reflect"])
def test_score_lora_matches_peft(arch, adapter, hf_zoo):
    """plan: r=8 alpha 16 on every projection (attention only on MoE); reflect: r=4 rsLoRA."""
    ids = random_tokens(29, seed=7 + len(arch))
    eng = _engine(hf_zoo.checkpoint(arch))
    eng.add_lora_agent(adapter, str(hf_zoo.lora(arch, adapter)))
    got = eng.score(ids, agent=adapter)
    want = hf_logprobs(hf_zoo.hf(arch, adapter), ids)
    base = hf_logprobs(hf_zoo.hf(arch), ids)
    assert (want - base).abs().max() > 0.1, "test adapter too weak to tell apart from the base"
    _close(got, want, f"{arch} lora {adapter}")


@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("adapter", [None, "act"])
def test_greedy_decode_matches_transformers_generate(arch, adapter, hf_zoo):
    """Prefill then one token per step through the paged cache: same tokens as transformers'
    greedy generate, and the log-probs each step decoded from equal transformers' step logits."""
    prompt = random_tokens(19, seed=3 + len(arch))
    n = 10
    want_tokens, want_lp = hf_greedy(hf_zoo.hf(arch, adapter), prompt, n)
    eng = _engine(hf_zoo.checkpoint(arch))
    if adapter:
        eng.add_lora_agent(adapter, str(hf_zoo.lora(arch, adapter)))
    out = eng.generate(eng.new_session(), agent=adapter, prompt=prompt, params=_greedy(n))
    assert list(out) == want_tokens, f"{arch}/{adapter}: greedy tokens differ"
    assert out.finish_reason == "length"
    assert out.ttft_s is not None and out.ttft_s > 0
    _close(out.logprobs, want_lp, f"{arch}/{adapter} decode step log-probs")
    assert out.token_logprobs == pytest.approx(want_lp[torch.arange(n), want_tokens].tolist(), abs=ATOL)


def test_chunked_prefill_matches(hf_zoo):
    """A prompt longer than one batch (max_batched_tokens=16): prefill runs in chunks over the
    paged cache, then decode; transformers sees one pass."""
    arch = "llama"
    prompt = random_tokens(53, seed=5)
    want_tokens, want_lp = hf_greedy(hf_zoo.hf(arch, "plan"), prompt, 6)
    eng = _engine(hf_zoo.checkpoint(arch), max_batched_tokens=16, block_size=8)
    eng.add_lora_agent("plan", str(hf_zoo.lora(arch, "plan")))
    _close(eng.score(prompt, agent="plan"), hf_logprobs(hf_zoo.hf(arch, "plan"), prompt), "chunked score")
    out = eng.generate(eng.new_session(), agent="plan", prompt=prompt, params=_greedy(6))
    assert list(out) == want_tokens
    _close(out.logprobs, want_lp, "chunked prefill decode")


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2_moe"])
def test_multi_agent_session_non_shared(arch, hf_zoo):
    """plan, act (shares plan's v_proj A), reflect and the plain base take turns on one
    trajectory; in non_shared each agent's turn equals its own transformers+peft model run
    greedily on the whole trajectory so far."""
    eng = _engine(hf_zoo.checkpoint(arch))
    for name in ("plan", "act", "reflect"):
        eng.add_lora_agent(name, str(hf_zoo.lora(arch, name)))
    eng.add_lora_agent("critic", None)
    s = eng.new_session()
    trajectory: list[int] = []
    for i, agent in enumerate(["plan", "act", "reflect", "critic", "plan"]):
        prompt = random_tokens(7 + i, seed=100 + i)
        want_tokens, want_lp = hf_greedy(hf_zoo.hf(arch, None if agent == "critic" else agent),
                                         trajectory + prompt, 5)
        out = eng.generate(s, agent=agent, prompt=prompt, params=_greedy(5))
        assert list(out) == want_tokens, f"{arch} turn {i} ({agent}): tokens differ"
        _close(out.logprobs, want_lp, f"{arch} turn {i} ({agent})")
        trajectory += prompt + list(out)
    assert len(s) == len(trajectory)


@pytest.mark.parametrize("mode", ["base_shared", "base_lr_shared", "full_shared"])
def test_one_agent_session_is_exact_in_every_mode(mode, hf_zoo):
    """Sharing only loses accuracy when agents read each other's cache: a session that one agent
    (LoRA on q/k/v/o and the MLP: K in its own namespace, V as base + low-rank) extends over
    several turns must equal transformers+peft in every mode, while other agents are registered."""
    arch = "qwen2"
    eng = Engine.from_pretrained(str(hf_zoo.checkpoint(arch)), cache_mode=mode, device="cpu")
    eng.add_lora_agent("plan", str(hf_zoo.lora(arch, "plan")))
    eng.add_lora_agent("act", str(hf_zoo.lora(arch, "act")))  # same v_proj A as plan
    s = eng.new_session()
    trajectory: list[int] = []
    for i in range(3):
        prompt = random_tokens(6 + 5 * i, seed=500 + i)
        want_tokens, want_lp = hf_greedy(hf_zoo.hf(arch, "plan"), trajectory + prompt, 4)
        out = eng.generate(s, agent="plan", prompt=prompt, params=_greedy(4))
        assert list(out) == want_tokens, f"{mode} turn {i}"
        _close(out.logprobs, want_lp, f"{mode} turn {i}")
        trajectory += prompt + list(out)


@pytest.mark.parametrize("arch", ["mistral", "olmoe"])
def test_continuous_batch_of_sessions_and_agents(arch, hf_zoo):
    """Three sessions of different agents (and the base) decode in the same steps through
    add_request / step; each equals its own transformers run, and streamed tokens add up."""
    eng = _engine(hf_zoo.checkpoint(arch))
    for name in ("plan", "reflect"):
        eng.add_lora_agent(name, str(hf_zoo.lora(arch, name)))
    jobs = {}
    for i, agent in enumerate(["plan", None, "reflect"]):
        prompt = random_tokens(9 + 4 * i, seed=200 + i)
        rid = eng.add_request(eng.new_session(), agent, prompt, _greedy(7))
        jobs[rid] = (agent, prompt)
    streamed: dict[int, list[int]] = {rid: [] for rid in jobs}
    steps = 0
    while eng.has_unfinished():
        for rid, toks in eng.step().items():
            streamed[rid] += toks
        steps += 1
        assert steps < 200, "requests never finish"
    assert steps < 3 * 8, f"{steps} steps for 3 requests of 7 tokens: they were not batched"
    for rid, (agent, prompt) in jobs.items():
        want_tokens, want_lp = hf_greedy(hf_zoo.hf(arch, agent), prompt, 7)
        out = eng.get_output(rid)
        assert list(out) == want_tokens == streamed[rid], f"{arch}/{agent}"
        _close(out.logprobs, want_lp, f"{arch}/{agent} batched")


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_esft_adapter_equals_merged_model(arch, hf_zoo):
    """An ESFT adapter's agent equals transformers on a copy of the base with the adapter's
    experts merged in; the base agent is untouched; the adapter unloads cleanly."""
    ids = random_tokens(31, seed=300 + len(arch))
    merged = hf_zoo.hf(arch, esft_merged=True)
    base = hf_zoo.hf(arch)
    want = hf_logprobs(merged, ids)
    want_base = hf_logprobs(base, ids)
    assert (want - want_base).abs().max() > 0.1, "test ESFT adapter too weak to tell apart"
    eng = _engine(hf_zoo.checkpoint(arch))
    eng.add_esft_adapter("law", str(hf_zoo.esft(arch)))
    _close(eng.score(ids, agent="law"), want, f"{arch} esft score")
    _close(eng.score(ids), want_base, f"{arch} base beside esft")

    # Both in one batch: tokens of the adapter and of the base routed in the same steps.
    prompt = ids[:13]
    r_law = eng.add_request(eng.new_session(), "law", prompt, _greedy(6))
    r_base = eng.add_request(eng.new_session(), None, prompt, _greedy(6))
    while eng.has_unfinished():
        eng.step()
    for rid, model in ((r_law, merged), (r_base, base)):
        want_tokens, want_lp = hf_greedy(model, prompt, 6)
        out = eng.get_output(rid)
        assert list(out) == want_tokens
        _close(out.logprobs, want_lp, f"{arch} esft batched decode")

    eng.remove_adapter("law")
    _close(eng.score(ids), want_base, f"{arch} base after unload")
    with pytest.raises(KeyError):
        eng.score(ids, agent="law")


@pytest.mark.parametrize("arch", ["qwen3_moe"])
def test_esft_agent_with_lora_on_moe(arch, hf_zoo):
    """LoRA agents and an ESFT adapter on one MoE engine: each still equals its own reference."""
    ids = random_tokens(23, seed=400)
    eng = _engine(hf_zoo.checkpoint(arch))
    eng.add_lora_agent("plan", str(hf_zoo.lora(arch, "plan")))
    eng.add_esft_adapter("law", str(hf_zoo.esft(arch)))
    _close(eng.score(ids, agent="plan"), hf_logprobs(hf_zoo.hf(arch, "plan"), ids), "lora beside esft")
    _close(eng.score(ids, agent="law"), hf_logprobs(hf_zoo.hf(arch, esft_merged=True), ids), "esft beside lora")


def test_dense_archs_cover_the_issue():
    assert set(DENSE_ARCHS) | set(MOE_ARCHS) == {"llama", "qwen2", "qwen3", "mistral", "mixtral",
                                                 "qwen2_moe", "qwen3_moe", "olmoe"}


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_cuda_engine_matches_transformers(arch, hf_zoo):
    """The same parity on the GPU: fp32 (torch math) to fp32 tolerance, greedy tokens identical;
    bf16 (the Triton kernel path) close to the fp32 reference."""
    ids = random_tokens(41, seed=600)
    hf_model = hf_zoo.hf(arch, "plan")
    want = hf_logprobs(hf_model, ids)
    want_tokens, want_lp = hf_greedy(hf_model, ids[:17], 8)
    eng = Engine.from_pretrained(str(hf_zoo.checkpoint(arch)), cache_mode="non_shared", device="cuda")
    eng.add_lora_agent("plan", str(hf_zoo.lora(arch, "plan")))
    got = eng.score(ids, agent="plan")
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert (got.double() - want.double()).abs().max().item() < 5e-4
    out = eng.generate(eng.new_session(), agent="plan", prompt=ids[:17], params=_greedy(8))
    assert list(out) == want_tokens
    assert (out.logprobs.double() - want_lp.double()).abs().max().item() < 5e-4
    # bf16 rounds weights and activations (and can flip a near-tied expert choice), so compare
    # distributions: mean KL(fp32 transformers || bf16 engine). On CPU this is ~0.001 (dense) and
    # ~0.005 (MoE); a wrong adapter scale or a missing module is KL > 1.
    def mean_kl(ref, got):
        ref, got = ref.double(), got.double()
        return (ref.exp() * (ref - got)).sum(-1).mean().item()

    for mode in ("non_shared", "base_lr_shared"):
        e16 = Engine.from_pretrained(str(hf_zoo.checkpoint(arch)), cache_mode=mode, device="cuda",
                                     dtype=torch.bfloat16)
        e16.add_lora_agent("plan", str(hf_zoo.lora(arch, "plan")))
        g16 = e16.score(ids, agent="plan")
        assert torch.isfinite(g16).all()
        assert mean_kl(want, g16) < 0.05, f"bf16 {mode} score"
        o16 = e16.generate(e16.new_session(), agent="plan", prompt=ids[:17], params=_greedy(8))
        assert len(o16) == 8 and torch.isfinite(o16.logprobs).all()
        # the bf16 decode's distributions along its own trajectory vs fp32 transformers
        ref = hf_logprobs(hf_model, ids[:17] + list(o16))[16:-1]
        assert mean_kl(ref, o16.logprobs) < 0.05, f"bf16 {mode} decode"
