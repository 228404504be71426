"""Engine core: continuous batching, preemption, cache modes and their byte accounting."""
from __future__ import annotations

import math

import pytest
import torch
from engine_test_helpers import one_thread  # noqa: F401  (autouse fixture)
from engine_test_helpers import prompt as _prompt

from engine import Engine, SamplingParams
from engine.builtin import builtin_config, save_random_lora

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
MODES = ("non_shared", "base_shared", "base_lr_shared", "full_shared")


@pytest.fixture(scope="module")
def agents(tmp_path_factory):
    """plan/act/reflect: r=8 LoRA on q and v with one shared v_proj A (LRAgent's setting);
    kq: a LoRA on k as well (its own K namespace in shared modes)."""
    root = tmp_path_factory.mktemp("core_adapters")
    c = builtin_config("tiny")
    d = {n: save_random_lora(str(root / n), c, r=8, seed=s, a_seed=100, gain=2.0)
         for n, s in (("plan", 1), ("act", 2), ("reflect", 3))}
    d["kq"] = save_random_lora(str(root / "kq"), c, r=4, targets=("q_proj", "k_proj", "v_proj"),
                               seed=4, a_seed=101, gain=2.0)
    return d


def _engine(mode, agents, names=("plan", "act", "reflect"), **kw):
    eng = Engine.from_pretrained("tiny", cache_mode=mode, device="cpu", **kw)
    for n in names:
        eng.add_lora_agent(n, agents[n])
    return eng


def _trajectory(eng, turns):
    """Run turns [(agent, prompt)] in one session, one after the other; returns the outputs."""
    s = eng.new_session()
    return [list(eng.generate(s, a, p, GREEDY)) for a, p in turns], s


TURNS = [("plan", _prompt(13, 1)), ("act", _prompt(5, 2)), ("reflect", _prompt(9, 3)), ("plan", _prompt(2, 4))]


def _run_batched(eng, jobs, max_steps=500):
    """Submit every session's turns at once (turns of a session queue up) and step to the end."""
    ids = []
    for turns in jobs:
        s = eng.new_session()
        ids.append([eng.add_request(s, a, p, GREEDY) for a, p in turns])
    for _ in range(max_steps):
        if not eng.has_unfinished():
            break
        eng.step()
    assert not eng.has_unfinished()
    return [[list(eng.get_output(r)) for r in rs] for rs in ids]


@pytest.mark.parametrize("mode", MODES)
def test_continuous_batching_equals_one_at_a_time(agents, mode):
    jobs = [TURNS, [("act", _prompt(21, 5)), ("plan", _prompt(3, 6))], [("reflect", _prompt(1, 7))],
            [(None, _prompt(30, 8))]]
    # small prefill chunks so prefills, decodes and chunk boundaries mix within steps
    batched = _run_batched(_engine(mode, agents, max_batched_tokens=10), jobs)
    single = [_trajectory(_engine(mode, agents), turns)[0] for turns in jobs]
    assert batched == single


# budgets that hold the largest session and little more (tiny: 8192 B per KV block, 1024 B per
# r=8 low-rank block): four concurrent sessions must take turns through preemption
BUDGETS = {"non_shared": 8 * 8192, "base_lr_shared": 5 * 9216, "full_shared": 5 * 8192}
JOBS = [TURNS, [("act", _prompt(21, 5)), ("plan", _prompt(3, 6))], [("reflect", _prompt(17, 7))],
        [("plan", _prompt(25, 8))]]


@pytest.mark.parametrize("mode", sorted(BUDGETS))
def test_preemption_under_tiny_budget_gives_same_tokens(agents, mode):
    ref = _run_batched(_engine(mode, agents), JOBS)
    eng = _engine(mode, agents, max_kv_bytes=BUDGETS[mode])
    got = _run_batched(eng, JOBS)
    assert got == ref
    rep = eng.memory_report()
    assert rep["preemptions"] > 0
    assert rep["used_bytes"] <= rep["budget_bytes"]


def _step_spying_frees(eng, jobs, params):
    """Submit every session's turns and step to the end; returns the outputs and the bytes each
    cache freed by the scheduler held. Asserts, at every step, that no session has an empty
    cache entry (a waiting request holds no cache)."""
    freed, free = [], eng.kv.free_session

    def spy(sid):
        freed.append(eng.kv.session_bytes(sid))
        return free(sid)

    eng.kv.free_session = spy
    ids = []
    for turns in jobs:
        s = eng.new_session()
        ids.append([eng.add_request(s, a, p, params) for a, p in turns])
    while eng.has_unfinished():
        eng.step()
        assert all(eng.kv.session_bytes(x) > 0 for x in eng.kv.sessions)
    return [[list(eng.get_output(r)) for r in rs] for rs in ids], freed


@pytest.mark.parametrize("mode", ["non_shared", "base_lr_shared"])
def test_preemptions_count_only_caches_that_held_blocks(agents, mode):
    """Four 37-token prompts, a budget for two sessions: requests waiting for room hold no
    cache, so nothing is "preempted" for them; the sessions that finished are evicted to make
    room (each counted once, each freeing its blocks) and nothing is recomputed."""
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    jobs = [[("plan", _prompt(37, 20 + i))] for i in range(4)]
    ref, _ = _step_spying_frees(_engine(mode, agents), jobs, params)
    eng = _engine(mode, agents, max_kv_bytes=48 * 1024)
    got, freed = _step_spying_frees(eng, jobs, params)
    assert got == ref
    st = eng.stats()
    assert len(freed) == st["preemptions"] + st["evictions"] == st["evictions"] >= 2
    assert min(freed) >= 3 * 8192  # each held its 49 tokens' K/V blocks
    assert st["recomputed_tokens"] == st["preemptions"] == 0


@pytest.mark.parametrize("mode", ["base_lr_shared", "full_shared"])
def test_every_counted_preemption_freed_blocks(agents, mode):
    """Under a budget that makes running requests take turns, each preemption or eviction is a
    cache freed that held blocks, and the preempted requests recompute."""
    ref, _ = _step_spying_frees(_engine(mode, agents), JOBS, GREEDY)
    eng = _engine(mode, agents, max_kv_bytes=BUDGETS[mode])
    got, freed = _step_spying_frees(eng, JOBS, GREEDY)
    assert got == ref
    st = eng.stats()
    assert st["preemptions"] > 0 and st["recomputed_tokens"] > 0
    assert len(freed) == st["preemptions"] + st["evictions"] and min(freed) > 0


def test_non_shared_session_fits_one_agent_at_a_time(agents):
    """A 3-agent non_shared trajectory whose agents' copies do not fit together still runs: the
    other agents' copies of the session are dropped and recomputed when they run again."""
    ref, _ = _trajectory(_engine("non_shared", agents), TURNS)
    eng = _engine("non_shared", agents, max_kv_bytes=4 * 8192)  # one agent's copy: 4 blocks
    got, _ = _trajectory(eng, TURNS)
    assert got == ref
    assert eng.memory_report()["used_bytes"] <= 4 * 8192


@pytest.mark.parametrize("blocks", [2, 3])
def test_too_small_budget_fails_requests_cleanly(agents, blocks):
    """Requests that can never fit end with finish_reason "error" and are taken back out of
    their session; everything produced before that, and every other request, is exactly what an
    unconstrained engine produces on the trajectory without the failed requests (non_shared:
    an agent's turn equals a fresh run of it over the token ids so far)."""
    ref = _engine("non_shared", agents)
    eng = _engine("non_shared", agents, max_kv_bytes=blocks * 8192)
    ids = []
    for turns in JOBS:
        s = eng.new_session()
        ids.append([eng.add_request(s, a, p, GREEDY) for a, p in turns])
    while eng.has_unfinished():
        eng.step()
    errors = done = 0
    for rs, turns in zip(ids, JOBS):
        history = []
        for r, (agent, prompt) in zip(rs, turns):
            out = eng.get_output(r)
            want = list(ref.generate(ref.new_session(), agent, history + prompt, GREEDY))
            if out.finish_reason == "error":
                errors += 1
                assert "max_kv_bytes" in out.error and list(out) == want[: len(out)]
            else:
                done += 1
                assert list(out) == want
                history += prompt + want
        assert eng.sched.sessions[out.session_id].tokens == history
    assert errors > 0 and done > 0
    assert eng.memory_report()["used_bytes"] <= blocks * 8192


def test_non_shared_equals_independent_runs(agents):
    """Each agent in non_shared keeps its own full K/V: its turn equals a fresh run of that agent
    over the whole trajectory so far."""
    eng = _engine("non_shared", agents)
    outs, s = _trajectory(eng, TURNS)
    history = []
    for (agent, prompt), out in zip(TURNS, outs):
        history += prompt
        fresh = Engine.from_pretrained("tiny", cache_mode="non_shared", device="cpu")
        fresh.add_lora_agent(agent, agents[agent])
        assert list(fresh.generate(fresh.new_session(), agent, history, GREEDY)) == out
        history += out
    assert s.tokens == history


def _lp_trajectory(eng, turns):
    s = eng.new_session()
    p = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=True)
    return [eng.generate(s, a, pr, p) for a, pr in turns]


def test_single_agent_shared_modes_equal_non_shared(agents):
    """One agent with LoRA on q and v: V = V_base + x·A·B exactly, so the base/low-rank split of
    base_shared and base_lr_shared (and full_shared) must reproduce non_shared."""
    turns = [("plan", _prompt(20, 9)), ("plan", _prompt(4, 10))]
    ref = _lp_trajectory(_engine("non_shared", agents, ("plan",)), turns)
    for mode in ("base_shared", "base_lr_shared", "full_shared"):
        got = _lp_trajectory(_engine(mode, agents, ("plan",)), turns)
        for r, g in zip(ref, got):
            assert list(r) == list(g), mode
            torch.testing.assert_close(g.logprobs, r.logprobs, atol=2e-4, rtol=0)


def test_base_lr_shared_equals_base_shared_with_shared_a(agents):
    a = _lp_trajectory(_engine("base_shared", agents), TURNS)
    b = _lp_trajectory(_engine("base_lr_shared", agents), TURNS)
    for x, y in zip(a, b):
        assert list(x) == list(y)
        torch.testing.assert_close(x.logprobs, y.logprobs, atol=2e-4, rtol=0)


@pytest.mark.parametrize("mode", ["base_shared", "full_shared", "base_lr_shared"])
def test_shared_modes_give_valid_distributions_and_differ_from_non_shared(agents, mode):
    ref = _lp_trajectory(_engine("non_shared", agents), TURNS)
    got = _lp_trajectory(_engine(mode, agents), TURNS)
    for g in got:
        assert torch.isfinite(g.logprobs).all()
        torch.testing.assert_close(g.logprobs.exp().sum(-1), torch.ones(len(g)), atol=1e-5, rtol=0)
    # the first turn has seen no other agent's tokens: identical in every mode
    torch.testing.assert_close(got[0].logprobs, ref[0].logprobs, atol=2e-4, rtol=0)
    # later turns read K/V another agent processed: an approximation, and a visible one
    assert max((g.logprobs - r.logprobs).abs().max().item() for g, r in zip(got[1:], ref[1:])) > 1e-3


def _blocks(n, bs=16):
    return math.ceil(n / bs)


def test_byte_accounting_per_mode(agents):
    """3 agents on one trajectory: used bytes equal the closed form, per namespace."""
    c = builtin_config("tiny")
    kv_block = 2 * c.num_layers * c.kv_size * 4 * 16  # fp32, block 16
    lr_block = c.num_layers * 8 * 4 * 16  # r=8 rank-vectors per token
    used = {}
    for mode in MODES:
        eng = _engine(mode, agents)
        outs, s = _trajectory(eng, TURNS)
        rep = eng.memory_report()
        T = len(s.tokens) - 1  # the last generated token is not processed yet
        if mode == "non_shared":
            # each agent cached the trajectory up to the end of its own last turn
            ends, n = {}, 0
            for (a, p), o in zip(TURNS, outs):
                n += len(p) + len(o)
                ends[a] = n - 1
            expect = {f"kv:{a}": _blocks(e) * kv_block for a, e in ends.items()}
        elif mode == "full_shared":
            expect = {"kv:shared": _blocks(T) * kv_block}
        elif mode == "base_lr_shared":
            expect = {"kv:base": _blocks(T) * kv_block, "lowrank:shared": _blocks(T) * lr_block}
        else:
            expect = {"kv:base": _blocks(T) * kv_block}
            expect.update({f"lowrank:{a}": _blocks(T) * lr_block for a in ("plan", "act", "reflect")})
        assert rep["namespaces"] == expect, mode
        assert rep["used_bytes"] == sum(expect.values())
        used[mode] = rep["used_bytes"]
        per_tok = rep["per_token_bytes_by_mode"]
        assert per_tok["non_shared"] == 3 * kv_block // 16
        assert per_tok["base_lr_shared"] == (kv_block + lr_block) // 16
    assert used["base_lr_shared"] < used["base_shared"] < used["non_shared"]
    assert used["full_shared"] < used["base_lr_shared"]


def test_k_lora_agent_keeps_its_own_k_namespace(agents):
    eng = _engine("base_shared", agents, ("plan", "kq"))
    outs, s = _trajectory(eng, [("plan", _prompt(18, 11)), ("kq", _prompt(4, 12)), ("plan", _prompt(3, 13))])
    rep = eng.memory_report()
    assert rep["k_namespace_agents"] == ["kq"]
    assert "own namespace" in rep["note"]
    T = len(s.tokens) - 1
    c = builtin_config("tiny")
    assert rep["namespaces"]["k:kq"] == _blocks(T) * c.num_layers * c.kv_size * 4 * 16
    # kq alone in base_shared equals kq in non_shared (its K is exact in its own namespace)
    one = _lp_trajectory(_engine("base_shared", agents, ("kq",)), [("kq", _prompt(15, 14))])
    ref = _lp_trajectory(_engine("non_shared", agents, ("kq",)), [("kq", _prompt(15, 14))])
    torch.testing.assert_close(one[0].logprobs, ref[0].logprobs, atol=2e-4, rtol=0)


@pytest.mark.parametrize("mode", ["base_shared", "base_lr_shared"])
def test_agent_added_mid_session_replays_to_the_same_cache(agents, mode):
    """Registering an agent that needs new streams rebuilds every session's cache by replaying its
    tokens with the agents that processed them: later turns equal those of an engine where all
    agents were registered from the start."""
    first = [("plan", _prompt(14, 15)), ("act", _prompt(3, 16))]
    later = [("reflect", _prompt(6, 17)), ("plan", _prompt(2, 18))]
    ref = _lp_trajectory(_engine(mode, agents), first + later)
    eng = _engine(mode, agents, ("plan", "act"))
    s = eng.new_session()
    p = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=True)
    for a, pr in first:
        eng.generate(s, a, pr, p)
    eng.add_lora_agent("reflect", agents["reflect"])
    got = [eng.generate(s, a, pr, p) for a, pr in later]
    for g, r in zip(got, ref[2:]):
        assert list(g) == list(r)
        torch.testing.assert_close(g.logprobs, r.logprobs, atol=2e-4, rtol=0)


def test_moe_model_batches_and_preempts_the_same():
    jobs = [[(None, _prompt(19, 20))], [(None, _prompt(7, 21)), (None, _prompt(2, 22))], [(None, _prompt(33, 23))]]
    ref = [_trajectory(Engine.from_pretrained("tiny-moe", cache_mode="non_shared", device="cpu"), t)[0] for t in jobs]
    eng = Engine.from_pretrained("tiny-moe", cache_mode="non_shared", device="cpu",
                                 max_kv_bytes=5 * 8192, max_batched_tokens=12)
    assert _run_batched(eng, jobs) == ref


# ---- ESFT expert adapters (MoE) ----------------------------------------------------------------

@pytest.fixture(scope="module")
def esft_dirs(tmp_path_factory):
    from engine.builtin import save_random_esft

    root = tmp_path_factory.mktemp("core_esft")
    return {"law": save_random_esft(str(root / "law"), "tiny-moe", {0: [1, 5], 1: [0, 2, 7]}, seed=1),
            "med": save_random_esft(str(root / "med"), "tiny-moe", {1: [3]}, seed=2)}


def test_esft_agents_mixed_batch_equal_merged_and_sequential(esft_dirs):
    from experts import load_esft_dir

    toks = _prompt(23, 30)
    eng = Engine.from_pretrained("tiny-moe", cache_mode="non_shared", device="cpu", max_batched_tokens=16)
    base_lp = eng.score(toks)
    eng.add_esft_adapter("law", esft_dirs["law"])
    eng.add_esft_adapter("med", esft_dirs["med"])
    # reference: a plain engine whose base experts are overwritten with law's (a merged copy)
    merged = Engine.from_pretrained("tiny-moe", cache_mode="non_shared", device="cpu")
    for layer, per in load_esft_dir(esft_dirs["law"]).experts.items():
        for e, (w13, w2) in per.items():
            merged.model.layers[layer]["w13"][e] = w13
            merged.model.layers[layer]["w2"][e] = w2
    law_lp = eng.score(toks, agent="law")
    torch.testing.assert_close(law_lp, merged.score(toks), atol=2e-5, rtol=0)
    torch.testing.assert_close(eng.score(toks), base_lp, atol=2e-5, rtol=0)
    assert (law_lp - base_lp).abs().max() > 1e-2
    jobs = [[("law", _prompt(9, 31))], [("med", _prompt(14, 32)), ("law", _prompt(2, 33))],
            [(None, _prompt(5, 34))]]
    batched = _run_batched(eng, jobs)
    assert batched == [_trajectory(eng, t)[0] for t in jobs]
    rep = eng.memory_report()["experts"]
    assert rep["adapters"] == 2 and rep["adapter_bytes"] == 6 * rep["expert_bytes"]
    eng.remove_adapter("law")
    assert eng.memory_report()["experts"]["adapter_bytes"] == 1 * rep["expert_bytes"]
    torch.testing.assert_close(eng.score(toks), base_lp, atol=2e-5, rtol=0)
    with pytest.raises(KeyError):
        eng.score(toks, agent="law")


def test_esft_bad_directory_is_a_clear_error(tmp_path):
    from engine import LoadError

    eng = Engine.from_pretrained("tiny-moe", device="cpu")
    with pytest.raises(LoadError, match="ESFT adapter"):
        eng.add_esft_adapter("law", str(tmp_path))
    assert eng.list_agents() == []


# ---- S2-attention layers -----------------------------------------------------------------------

def test_s2_mask_rows_match_the_pattern():
    from engine.builtin import builtin_config
    from engine.s2 import S2Masks

    c = builtin_config("tiny-s2")
    m = S2Masks(c)
    full = m.pattern.mask(83)  # [Hq, 83, 83], causal included
    for start, end in ((0, 83), (40, 41), (17, 60), (82, 83)):
        rows = m.mask(0, start, end, "cpu")
        causal = torch.ones(end, end, dtype=torch.bool).tril()[start:end]
        assert torch.equal(rows & causal, full[:, start:end, :end])
    assert m.mask(1, 0, 10, "cpu") is None  # layer 1 is dense (dense_attention_every_n_layers=2)


def test_s2_model_equals_dense_inside_the_window_and_differs_beyond():
    toks = _prompt(90, 40)
    s2 = Engine.from_pretrained("tiny-s2", device="cpu", max_batched_tokens=24)
    dense = Engine.from_pretrained("tiny", device="cpu")  # the same seeded weights, no S2 layers
    a, b = s2.score(toks), dense.score(toks)
    window = 2 * 16  # local_blocks * sparse_block: every key is still local
    torch.testing.assert_close(a[:window], b[:window], atol=2e-5, rtol=0)
    assert (a[window + 16:] - b[window + 16:]).abs().max() > 1e-3
    jobs = [[(None, _prompt(70, 41))], [(None, _prompt(45, 42)), (None, _prompt(3, 43))]]
    ref = [_trajectory(Engine.from_pretrained("tiny-s2", device="cpu"), t)[0] for t in jobs]
    assert _run_batched(Engine.from_pretrained("tiny-s2", device="cpu", max_batched_tokens=16), jobs) == ref


# ---- prefix sharing between sessions -----------------------------------------------------------

@pytest.mark.parametrize("mode", ["non_shared", "base_lr_shared", "full_shared"])
def test_sessions_share_identical_prefix_blocks(agents, mode):
    system = _prompt(40, 50)  # two full blocks of 16 are shareable (one token is always computed)
    turns = [("plan", system + [7]), ("plan", system + [8, 9]), ("act", system + [7])]
    ref_eng = _engine(mode, agents, prefix_caching=False)
    ref = [ref_eng.generate(ref_eng.new_session(), a, p, GREEDY) for a, p in turns]
    eng = _engine(mode, agents)
    sessions = [eng.new_session() for _ in turns]
    outs = [eng.generate(s, a, p, GREEDY) for s, (a, p) in zip(sessions, turns)]
    assert [list(o) for o in outs] == [list(r) for r in ref]
    assert outs[0].cached_tokens == 0 and outs[1].cached_tokens == 32
    # another agent's pass gives other K/V, except where each agent keeps its own cache anyway
    assert outs[2].cached_tokens == 0
    rep, ref_rep = eng.memory_report(), ref_eng.memory_report()
    assert rep["shared_blocks"] == 2 * (2 if mode == "base_lr_shared" else 1)  # + the low-rank stream's
    kv_block = ref_rep["pools"]["kv"]["block_bytes"]
    assert ref_rep["pools"]["kv"]["used_bytes"] - rep["pools"]["kv"]["used_bytes"] == 2 * kv_block
    # the shared blocks outlive the session that wrote them, and go with the last user
    eng.close_session(sessions[0])
    assert eng.memory_report()["shared_blocks"] == 0
    out = eng.generate(sessions[1], "plan", [11], GREEDY)
    ref_out = ref_eng.generate(ref_eng.new_session(), "plan", system + [8, 9] + list(ref[1]) + [11], GREEDY)
    assert list(out) == list(ref_out)
    for s in sessions[1:]:
        eng.close_session(s)
    assert eng.memory_report()["used_bytes"] == 0


def test_preempted_session_reattaches_shared_prefix(agents):
    system = _prompt(48, 51)
    jobs = [[("plan", system + _prompt(3, 52))], [("plan", system + _prompt(5, 53))],
            [("plan", system + _prompt(2, 54))]]
    ref = _run_batched(_engine("non_shared", agents, prefix_caching=False), jobs)
    eng = _engine("non_shared", agents, max_kv_bytes=5 * 8192, max_batched_tokens=20)
    assert _run_batched(eng, jobs) == ref
    outs = [eng.get_output(r) for r in range(len(jobs))]
    assert sum(o.cached_tokens for o in outs) >= 32  # later sessions reused the first one's blocks
    assert eng.memory_report()["preemptions"] > 0
