"""What the end-to-end benchmark's lockstep scenario makes the engine do, counted (no timing):
no preemption, no recomputation and no torch-path chunk in the shared modes; decode throughput
taken only from decode-only steps; and every measured round preceded by an untimed round of
exactly the same shapes (the GPU table's base_shared / non_shared collapse at 4K was Triton
compiling a new specialisation of the attention kernel inside the measured round, and its ESFT
"base alone" row carried the first compiles)."""
from __future__ import annotations

import math

import statistics

import pytest
import torch

import engine.fidelity as fid
from engine import Engine
from engine_test_helpers import AGENTS, cpu_kernels, one_thread, prompt, shared_a_loras  # noqa: F401


@pytest.fixture(scope="module")
def shared_a_adapters(tmp_path_factory):
    """plan / act / reflect: r=8 on q and v, one shared v_proj A (as in the benchmark)."""
    return shared_a_loras(tmp_path_factory.mktemp("e2e_adapters"), a_seed=77, gain=0.5)


@cpu_kernels
def test_base_shared_lockstep_computes_each_token_once_on_the_kernels(shared_a_adapters, monkeypatch,
                                                                      rng_seed):
    """Two sessions, three agents taking turns in lockstep, then a short round each: base_shared
    (one low-rank V stream per agent) computes every token exactly once (no preemption, no
    recompute, no catch-up), runs every chunk on the Flash-LoRA kernels, and after each round's
    first step only decode-only steps remain. (base_lr_shared differs only in sharing one
    low-rank stream; the interpreter's time is spent on the mode the GPU table flagged.)"""
    monkeypatch.setenv("VMWEAVE_KERNELS", "triton")  # the Triton interpreter on CPU
    eng = Engine.from_pretrained("tiny", cache_mode="base_shared", max_batched_tokens=64)
    for a in AGENTS:
        eng.add_lora_agent(a, shared_a_adapters[a])
    ss = [eng.new_session() for _ in range(2)]
    g = torch.Generator().manual_seed(rng_seed)
    decode = 2
    for length in (21, 4):  # a context turn per agent, then the short round
        for a in AGENTS:
            prompts = [torch.randint(0, 512, (length,), generator=g).tolist() for _ in ss]
            r = fid._timed_round(eng, ss, a, prompts, decode)
            assert all(len(o) == decode for o in r.outputs)
            assert r.decode_steps == decode - 1 and r.decode_tokens == len(ss) * (decode - 1)
    st = eng.stats()
    assert st["preemptions"] == 0 and st["evictions"] == 0
    assert st["recomputed_tokens"] == 0
    assert st["torch_chunks"] == 0 and st["kernel_chunks"] > 0
    # the last sampled token of each session is the only one not yet run through the model
    assert st["computed_tokens"] == sum(len(s) - 1 for s in ss)


def _two_agent_round(async_steps: bool, n: int) -> fid.RoundTiming:
    eng = Engine.from_pretrained("tiny", cache_mode="non_shared", max_batched_tokens=64, async_steps=async_steps)
    eng.add_lora_agent("a", None)
    eng.add_lora_agent("b", None)
    ss = [eng.new_session() for _ in range(2)]
    fid._timed_round(eng, ss, "a", [prompt(30, 1), prompt(30, 2)], 2)  # 32 tokens per session, a covers 31
    r = fid._timed_round(eng, ss, "b", [prompt(18, 3), prompt(18, 4)], n)  # b's pending: all 50
    assert eng.stats()["recomputed_tokens"] == 0
    return r


def _two_agent_shapes(n: int) -> list:
    # step k >= 3 runs s0's token at 48 + k and s1's at 47 + k; s1 ends one step after s0
    return ([((0, 50), (0, 14)), ((50, 51), (14, 50))]  # s0 decodes while s1 ends its prefill
            + [((48 + k, 49 + k), (47 + k, 48 + k)) for k in range(3, n + 1)] + [((48 + n, 49 + n),)])


def test_decode_throughput_leaves_out_steps_that_carry_a_prefill():
    """non_shared: agent b first catches up on a session a built, 50 tokens per session with 64
    tokens per step, so session 0's second token shares a step with session 1's prefill. That
    step is not a decode step; the decode-only ones are counted exactly."""
    n = 6
    r = _two_agent_round(False, n)
    assert r.shapes == _two_agent_shapes(n)
    assert [len(o) for o in r.outputs] == [n, n]
    assert r.decode_steps == n - 1  # steps 3 .. n + 1
    assert r.decode_tokens == 2 * n - 3  # all but the two first tokens and s0's second
    assert r.decode_s > 0 and r.decode_s == pytest.approx(sum(r.step_s))


def test_decode_throughput_with_overlapped_steps():
    """The same round with overlapped steps: the same forwards (a token in flight counts as a
    session token), then one step that only reads the last draws back. Timed: the decode-only
    steps but the first (which waits for the prefill step before it), plus that last wait."""
    n = 6
    r = _two_agent_round(True, n)
    assert r.shapes == _two_agent_shapes(n) + [()]
    assert [len(o) for o in r.outputs] == [n, n]
    assert r.decode_steps == n - 2  # steps 4 .. n + 1
    assert r.decode_tokens == 2 * n - 5  # step 3's two tokens are left out too
    assert len(r.step_s) == r.decode_steps and r.decode_s > sum(r.step_s) > 0


def _record_rounds(monkeypatch) -> list[fid.RoundTiming]:
    seen: list[fid.RoundTiming] = []
    real = fid._timed_round

    def recording(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(fid, "_timed_round", recording)
    return seen


def test_e2e_bench_measures_each_mode_after_an_identical_warmup_pass(monkeypatch):
    monkeypatch.setenv("VMWEAVE_ASYNC_STEPS", "0")  # counts of synchronous steps (overlapped: above)
    rounds = _record_rounds(monkeypatch)
    modes = ("non_shared", "base_shared")
    rows = fid.e2e_bench([61], layers=1, decode_tokens=3, sessions=2, modes=modes, small=True)
    per_pass = 3 * len(AGENTS)  # context turns, the measured round, then the catch-up turns
    assert len(rounds) == 2 * len(modes) * per_pass
    for i, row in enumerate(rows):  # every mode's warm pass first, then the measured ones
        warm = rounds[i * per_pass:(i + 1) * per_pass]
        timed = rounds[(len(modes) + i) * per_pass:(len(modes) + i + 1) * per_pass]
        assert [r.shapes for r in warm] == [r.shapes for r in timed]
        probe = timed[len(AGENTS):2 * len(AGENTS)]
        catch_up = timed[2 * len(AGENTS):]
        assert all(len(o) == 1 for r in catch_up for o in r.outputs)
        steps = sum(r.decode_steps for r in probe)
        assert steps > 0
        assert row.tpot_ms == pytest.approx(1e3 * sum(r.decode_s for r in probe) / steps)
        step_s = [t for r in probe for t in r.step_s]
        assert len(step_s) == steps and sum(step_s) == pytest.approx(sum(r.decode_s for r in probe))
        assert row.tpot_median_ms == pytest.approx(1e3 * statistics.median(step_s))
        assert min(step_s) * 1e3 <= row.tpot_median_ms <= row.tpot_max_ms == pytest.approx(1e3 * max(step_s))
        assert row.preemptions == 0 and row.recomputed_tokens == 0
    # non_shared agents re-run the turns they missed before their catch-up token; the shared
    # modes only add the catch-up turns' few tokens
    ns, bs = rows
    assert ns.kv_bytes_all_agents > ns.kv_bytes
    assert bs.kv_bytes <= bs.kv_bytes_all_agents < ns.kv_bytes_all_agents


def test_e2e_bench_repeats_interleave_the_modes_and_keep_each_ones_median_pass(monkeypatch):
    """repeats=3: after one warm pass per mode, three rounds of measured passes, every other one
    in reverse mode order; each mode's row is its pass of median throughput, rows in mode order."""
    modes = ("non_shared", "base_shared", "full_shared")
    calls: list[str] = []
    speeds = {"non_shared": [5.0, 9.0, 7.0], "base_shared": [3.0, 1.0, 2.0], "full_shared": [4.0, 4.5, 8.0]}
    monkeypatch.setattr(fid, "_e2e_pass", lambda model, mode, *a, **k: calls.append(mode) or mode)

    def row(length, mode, sessions, run):
        done = sum(1 for c in calls[len(modes):] if c == mode)  # measured passes of mode so far
        return fid.E2ERow(length, length, mode, sessions, speeds[mode][done - 1], 1.0, 1.0, 1, 0.0)

    monkeypatch.setattr(fid, "_e2e_row", row)
    rows = fid.e2e_bench([40], layers=1, decode_tokens=2, sessions=2, modes=modes, small=True, repeats=3)
    assert calls == list(modes) + list(modes) + list(modes[::-1]) + list(modes)
    assert [r.mode for r in rows] == list(modes)
    assert [r.decode_tok_s for r in rows] == [7.0, 2.0, 4.5]
    with pytest.raises(ValueError, match="repeats"):
        fid.e2e_bench([40], layers=1, small=True, repeats=0)


def test_esft_bench_measures_every_row_after_an_identical_warmup_round(monkeypatch):
    monkeypatch.setenv("VMWEAVE_ASYNC_STEPS", "0")  # counts of synchronous steps
    rounds = _record_rounds(monkeypatch)
    rows = fid.esft_bench((1, 2), sessions=3, prompt_len=11, decode_tokens=4, small=True)
    assert [r.adapters for r in rows] == [0, 1, 2]  # the base alone first, as before
    # after the base row, the merged-copies baseline: base-model rounds at each copy's session
    # count (3 sessions over 1 adapter: one copy of 3; over 2: copies of 2 and 1), warm too
    sizes = [1, 2, 3]
    assert len(rounds) == 2 * (len(rows) + len(sizes))
    copies = {k: rounds[3 + 2 * i] for i, k in enumerate(sizes)}
    for k, warm, timed in zip(sizes, rounds[2:8:2], rounds[3:8:2]):
        assert warm.shapes == timed.shapes and timed.shapes[0] == ((0, 11),) * k
    assert math.isnan(rows[0].merged_decode_tok_s)
    for row, parts in ((rows[1], [3]), (rows[2], [2, 1])):
        want = sum(copies[k].decode_tokens for k in parts) / sum(copies[k].decode_s for k in parts)
        assert row.merged_decode_tok_s == pytest.approx(want)
    main = [rounds[0], rounds[1], *rounds[8:]]
    for row, warm, timed in zip(rows, main[::2], main[1::2]):
        assert warm.shapes == timed.shapes
        assert timed.shapes[0] == ((0, 11),) * 3  # the whole prompt, nothing shared with warm-up
        assert row.tpot_ms == pytest.approx(1e3 * timed.tpot_s)
        assert row.decode_tok_s == pytest.approx(timed.decode_tok_s)
        assert len(timed.step_s) == timed.decode_steps and sum(timed.step_s) == pytest.approx(timed.decode_s)
        assert row.tpot_median_ms == pytest.approx(1e3 * timed.median_step_s)
        assert row.tpot_max_ms == pytest.approx(1e3 * max(timed.step_s))


def test_merged_copy_sizes_spread_sessions_round_robin():
    assert fid._merged_copy_sizes(16, 5) == [4, 3, 3, 3, 3]
    assert fid._merged_copy_sizes(16, 20) == [1] * 16  # copies with no session are not served
    assert fid._merged_copy_sizes(3, 2) == [2, 1] and fid._merged_copy_sizes(7, 1) == [7]
