"""Overlapped steps (`Engine(async_steps=True)`): a step's draws stay on the device, the next
step's forward reads them there and the host reads them back one `step()` later.

Every test runs the same requests through an engine with overlapped steps and one without
and asserts the same tokens, log-probs, sessions and cache use: multi-agent rounds in every
cache mode (requests of different lengths, max_tokens=1, seeded sampling, log-prob rows),
a stop token that arrives while the next step is already running, preemption under a tight
KV budget, scoring and agent changes between steps, and the kernel path with (emulated on
CPU) CUDA graphs.
"""
from __future__ import annotations

import os

import pytest
import torch

from engine import Engine, SamplingParams
from engine.builtin import builtin_config, save_random_lora
from engine.graphs import StepGraphs
from engine.sequence import PLACEHOLDER
from engine_test_helpers import AGENTS, one_thread, prompt, shared_a_loras  # noqa: F401

MODES = ["non_shared", "base_shared", "base_lr_shared", "full_shared"]


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    return shared_a_loras(tmp_path_factory.mktemp("async_adapters"), a_seed=100, gain=2.0)


def _engine(device, mode, loras, async_steps, **kw) -> Engine:
    eng = Engine.from_pretrained("tiny", cache_mode=mode, device=device, async_steps=async_steps, **kw)
    for a in AGENTS:
        eng.add_lora_agent(a, loras[a])
    return eng


def _drive(eng: Engine, ids: list[int], seen: dict) -> None:
    """Step until every request finishes; `seen[id]` collects what step() streamed, and
    `seen["inflight"]` counts the steps that left draws in flight."""
    while eng.has_unfinished():
        for rid, toks in eng.step().items():
            seen.setdefault(rid, []).extend(toks)
        seen["inflight"] = seen.get("inflight", 0) + (eng._inflight is not None)
    for rid in ids:
        assert seen.get(rid, []) == list(eng.get_output(rid)), "streamed tokens differ from the output"


def _rounds(eng: Engine, rounds: int = 2) -> tuple[list, list, dict]:
    """`rounds` rounds over three sessions, each request by a different agent, lengths
    differing (one of max_tokens=1), one seeded sampled request; returns the outputs, the
    sessions' tokens and what was streamed."""
    ss = [eng.new_session() for _ in range(3)]
    outs, seen = [], {}
    for r in range(rounds):
        ids = []
        for i, s in enumerate(ss):
            greedy = (r + i) % 3 != 2
            p = SamplingParams(max_tokens=(5, 9, 1)[(r + i) % 3], temperature=0.0 if greedy else 0.9,
                               seed=None if greedy else 7 + i, ignore_eos=True, logprobs=True)
            ids.append(eng.add_request(s, AGENTS[(r + i) % 3], prompt(7 + 4 * i + r, 50 + 10 * r + i), p))
        _drive(eng, ids, seen)
        outs += [eng.get_output(x) for x in ids]
    return outs, [list(s.tokens) for s in ss], seen


def _same_outputs(ref, got, atol: float) -> None:
    assert len(ref) == len(got)
    for r, g in zip(ref, got):
        assert list(g) == list(r)
        assert g.finish_reason == r.finish_reason
        torch.testing.assert_close(torch.tensor(g.token_logprobs), torch.tensor(r.token_logprobs),
                                   atol=atol, rtol=0)
        if r.logprobs is not None:
            torch.testing.assert_close(g.logprobs, r.logprobs, atol=atol, rtol=0)


def _atol(device) -> float:
    return 1e-6 if device == "cpu" else 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_async_steps_equal_sync_multi_agent_rounds(mode, loras, device):
    runs = []
    for async_steps in (False, True):
        eng = _engine(device, mode, loras, async_steps)
        outs, sessions, seen = _rounds(eng)
        runs.append((outs, sessions, eng.memory_report()["used_bytes"], seen))
        assert eng._inflight is None and not eng.has_unfinished()
        assert all(PLACEHOLDER not in t for t in sessions)
    (ro, rs, ru, rseen), (go, gs, gu, gseen) = runs
    assert rseen["inflight"] == 0 and gseen["inflight"] > 4  # the overlapped path did run
    _same_outputs(ro, go, _atol(device))
    assert gs == rs
    assert gu == ru


def test_async_steps_stop_token_while_next_step_runs(loras, device):
    """A request that draws its stop token: the step after it (already on the device when the
    token comes back) computed one token too many for it, which is dropped; the session then
    ends in the stop token, and the next agent's turn on it reads a correct cache."""
    ref = _engine(device, "base_lr_shared", loras, False)
    s = ref.new_session()
    free = ref.generate(s, "plan", prompt(11, 3), SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    cut = next(i for i in range(2, len(free)) if free[i] not in free[:i])  # first occurrence, not first token
    stop = (free[cut],)
    runs = []
    for async_steps in (False, True):
        eng = _engine(device, "base_lr_shared", loras, async_steps)
        a, b = eng.new_session(), eng.new_session()
        ids = [eng.add_request(a, "plan", prompt(11, 3), SamplingParams(max_tokens=12, temperature=0.0,
                                                                        stop_token_ids=stop, logprobs=True)),
               eng.add_request(b, "act", prompt(6, 4), SamplingParams(max_tokens=14, temperature=0.0,
                                                                      ignore_eos=True, logprobs=True))]
        seen = {}
        _drive(eng, ids, seen)
        first = [eng.get_output(x) for x in ids]
        assert first[0].finish_reason == "stop" and list(first[0]) == list(free[:cut + 1])
        nxt = eng.generate(a, "reflect", prompt(5, 5), SamplingParams(max_tokens=6, temperature=0.0,
                                                                       ignore_eos=True, logprobs=True))
        runs.append((first + [nxt], list(a.tokens), list(b.tokens), seen.get("inflight", 0)))
    (ro, ra, rb, _), (go, ga, gb, n_inflight) = runs
    assert n_inflight > 2
    # the step after the stop still carries the stopped request, so the other request's rows
    # come from a batch one row larger than the synchronous engine's: the same math in another
    # batch shape (fp32 GEMMs tile differently), hence a looser tolerance than elsewhere
    _same_outputs(ro, go, 1e-4 if device == "cpu" else 1e-2)
    assert (ga, gb) == (ra, rb)


def test_async_steps_preempting_under_a_tight_budget(loras, device):
    """A KV budget that holds about two of four sessions: requests are preempted (their caches
    freed while a draw of theirs may be in flight) and recomputed; the tokens equal those of
    an engine with room for all."""
    probe = _engine(device, "non_shared", loras, False)
    per_token = probe.memory_report()["per_token_bytes_by_mode"]["non_shared"] // len(AGENTS)
    outs = {}
    for async_steps, budget in ((False, None), (True, per_token * 16 * 9)):
        eng = _engine(device, "non_shared", loras, async_steps, max_kv_bytes=budget, block_size=16)
        ss = [eng.new_session() for _ in range(4)]
        p = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=True)
        ids = [eng.add_request(s, AGENTS[i % 3], prompt(30 + i, 70 + i), p) for i, s in enumerate(ss)]
        _drive(eng, ids, {})
        outs[async_steps] = [eng.get_output(x) for x in ids]
        if budget is not None:
            assert eng.stats()["preemptions"] > 0
    # recomputed K/V come from prefill-shaped GEMMs, the roomy run's from decode-shaped ones
    _same_outputs(outs[False], outs[True], 1e-4 if device == "cpu" else 1e-2)


def test_async_steps_drain_before_score_and_agent_changes(loras, device, tmp_path):
    """score(), add_lora_agent and remove_adapter between steps, with draws in flight: the
    in-flight tokens are read back first and nothing is lost or changed."""
    extra = save_random_lora(str(tmp_path / "extra"), builtin_config("tiny"), r=8, seed=9, a_seed=100)
    runs = []
    for async_steps in (False, True):
        eng = _engine(device, "base_lr_shared", loras, async_steps)
        s = eng.new_session()
        p = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        rid = eng.add_request(s, "plan", prompt(9, 8), p)
        for _ in range(3):
            eng.step()
        assert (eng._inflight is not None) == async_steps
        lp = eng.score(prompt(13, 9), agent="act")
        assert eng._inflight is None and PLACEHOLDER not in s.tokens
        eng.add_lora_agent("extra", extra)
        eng.step()
        eng.remove_adapter("reflect")
        while eng.has_unfinished():
            eng.step()
        nxt = eng.generate(s, "extra", prompt(4, 10), SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
        runs.append((list(eng.get_output(rid)), lp, list(nxt), list(s.tokens)))
    (r_out, r_lp, r_nxt, r_s), (g_out, g_lp, g_nxt, g_s) = runs
    assert g_out == r_out and g_nxt == r_nxt and g_s == r_s
    torch.testing.assert_close(g_lp, r_lp, atol=_atol(device), rtol=0)


def test_async_steps_with_graphs_on_the_kernel_path(loras, device, monkeypatch):
    """The kernel path with CUDA graphs (emulated on CPU: a replay re-runs the captured forward
    on the captured tensors, so an input id that does not reach the graph's input buffer would
    show): draws read on the device into the replayed steps."""
    if device == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            pytest.skip("the kernel path on CPU tensors needs TRITON_INTERPRET=1")
        monkeypatch.setenv("VMWEAVE_KERNELS", "triton")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    runs = []
    for async_steps in (False, True):
        eng = _engine(device, "base_lr_shared", loras, async_steps, dtype=dtype, block_size=4)
        eng.graphs = StepGraphs(emulate=device == "cpu")
        ss = [eng.new_session() for _ in range(3)]
        ids = [eng.add_request(s, AGENTS[i], prompt(9 + 3 * i, 20 + i),
                               SamplingParams(max_tokens=(7, 10, 4)[i], temperature=0.0, ignore_eos=True,
                                              logprobs=True)) for i, s in enumerate(ss)]
        seen = {}
        _drive(eng, ids, seen)
        assert eng.stats()["graph_replays"] >= 3
        runs.append(([eng.get_output(x) for x in ids], seen.get("inflight", 0)))
    assert runs[1][1] > 3
    _same_outputs(runs[0][0], runs[1][0], 1e-6 if device == "cpu" else 1e-2)


def test_async_steps_default_follows_device_and_environment(monkeypatch):
    monkeypatch.delenv("VMWEAVE_ASYNC_STEPS", raising=False)
    assert Engine.from_pretrained("tiny", device="cpu").async_steps is False
    monkeypatch.setenv("VMWEAVE_ASYNC_STEPS", "1")
    assert Engine.from_pretrained("tiny", device="cpu").async_steps is True
    monkeypatch.setenv("VMWEAVE_ASYNC_STEPS", "0")
    assert Engine.from_pretrained("tiny", device="cpu", async_steps=True).async_steps is True
    assert Engine.from_pretrained("tiny", device="cpu").async_steps is False
