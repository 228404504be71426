"""Requests that cannot get the KV cache they need: the request fails with a clear error, the
tokens it generated before that are kept on its output, and its session is left as it was
before the request (tokens and cache), so the session's later requests run as if it had never
been made."""
from __future__ import annotations

import pytest
from engine_test_helpers import one_thread, shared_a_loras  # noqa: F401  (autouse fixture)
from engine_test_helpers import prompt as _prompt

from engine import CacheCapacityError, Engine, SamplingParams

MODES = ("non_shared", "base_shared", "base_lr_shared", "full_shared")
# tiny, block_size 16: 8192 B per KV block, 1024 B per r=8 low-rank V block
BLOCK = 8192 + 1024


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    return shared_a_loras(tmp_path_factory.mktemp("failure_adapters"), a_seed=100, gain=2.0)


def _engine(mode, loras, blocks=None, async_steps=False):
    eng = Engine.from_pretrained("tiny", cache_mode=mode, device="cpu", block_size=16,
                                 max_kv_bytes=blocks * BLOCK if blocks else None, async_steps=async_steps)
    eng.add_lora_agent("plan", loras["plan"])
    return eng


def _params(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("async_steps", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_generate_refused_for_its_prompt_leaves_the_session_as_before(loras, mode, async_steps):
    eng = _engine(mode, loras, blocks=2, async_steps=async_steps)
    ref = _engine(mode, loras)
    s, rs = eng.new_session(), ref.new_session()
    assert list(eng.generate(s, "plan", _prompt(7, 1), _params(4))) == list(ref.generate(rs, "plan", _prompt(7, 1), _params(4)))
    tokens, procs, used = list(s.tokens), list(s.procs), eng.memory_report()["used_bytes"]
    assert len(tokens) == 11 and used > 0

    with pytest.raises(CacheCapacityError, match="max_kv_bytes") as e:
        eng.generate(s, "plan", _prompt(60, 2), _params(4))
    assert e.value.output.finish_reason == "error" and list(e.value.output) == []
    assert s.tokens == tokens and s.procs == procs
    assert eng.memory_report()["used_bytes"] == used  # the session's cache is still there

    # the session goes on, from its cache, as if the failed call had never been made
    again = eng.generate(s, "plan", [8, 9], _params(4))
    want = ref.generate(rs, "plan", [8, 9], _params(4))
    assert list(again) == list(want) and len(again) == 4
    assert again.recomputed_tokens == 0 and again.finish_reason == "length"
    assert s.tokens == rs.tokens


@pytest.mark.parametrize("async_steps", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_generate_failing_mid_way_keeps_its_partial_output_not_its_tokens(loras, mode, async_steps):
    """Four blocks hold 64 tokens: 9 in the session + 40 prompt leave room for 15 generated
    tokens and the 16th cannot be cached. Those 16 are on the error's output; the session and
    its cache go back to the 9 tokens (their block, written past them, is given back and its 9
    tokens recomputed)."""
    eng = _engine(mode, loras, blocks=4, async_steps=async_steps)
    ref = _engine(mode, loras)
    s, rs = eng.new_session(), ref.new_session()
    eng.generate(s, "plan", _prompt(5, 3), _params(4))
    ref.generate(rs, "plan", _prompt(5, 3), _params(4))
    tokens, procs = list(s.tokens), list(s.procs)

    with pytest.raises(CacheCapacityError, match="max_kv_bytes") as e:
        eng.generate(s, "plan", _prompt(40, 4), _params(60))
    partial = e.value.output
    scratch = ref.new_session()  # what an unconstrained engine generates for that call
    full = ref.generate(scratch, "plan", tokens + _prompt(40, 4), _params(60))
    assert partial.finish_reason == "error" and len(partial) == 16
    assert list(partial) == list(full)[:16]
    assert s.tokens == tokens and s.procs == procs and len(tokens) == 9

    again = eng.generate(s, "plan", [8, 9], _params(4))
    assert list(again) == list(ref.generate(rs, "plan", [8, 9], _params(4)))
    assert again.recomputed_tokens == 9
    assert s.tokens == rs.tokens
    assert eng.memory_report()["used_bytes"] == ref.kv.session_bytes(rs.id) > 0


@pytest.mark.parametrize("mode", ["non_shared", "base_lr_shared"])
def test_failed_request_does_not_poison_the_requests_queued_behind_it(loras, mode):
    """Through add_request/step: the failed request's output says so; the next request of its
    session runs on the session without it, and another session is unaffected."""
    eng = _engine(mode, loras, blocks=2)
    ref = _engine(mode, loras)
    s, other = eng.new_session(), eng.new_session()
    bad = eng.add_request(s, "plan", _prompt(60, 5), _params(4))
    after = eng.add_request(s, "plan", _prompt(6, 6), _params(5))
    side = eng.add_request(other, "plan", _prompt(9, 7), _params(3))
    for _ in range(100):
        if not eng.has_unfinished():
            break
        eng.step()
    assert not eng.has_unfinished()
    out = eng.get_output(bad)
    assert out.finish_reason == "error" and "max_kv_bytes" in out.error
    want = ref.generate(ref.new_session(), "plan", _prompt(6, 6), _params(5))
    assert list(eng.get_output(after)) == list(want) and len(want) == 5
    assert s.tokens == _prompt(6, 6) + list(want)
    assert list(eng.get_output(side)) == list(ref.generate(ref.new_session(), "plan", _prompt(9, 7), _params(3)))


def test_empty_prompt_behind_a_failed_request_fails_instead_of_waiting_forever(loras):
    """An empty prompt may follow a queued request's prompt; if that request fails and is taken
    back out, the session is empty and the empty-prompt request has nothing to run on."""
    eng = _engine("non_shared", loras, blocks=2)
    s = eng.new_session()
    bad = eng.add_request(s, "plan", _prompt(60, 5), _params(4))
    empty = eng.add_request(s, "plan", [], _params(4))
    for _ in range(10):
        if not eng.has_unfinished():
            break
        eng.step()
    assert not eng.has_unfinished()
    assert eng.get_output(bad).finish_reason == "error"
    out = eng.get_output(empty)
    assert out.finish_reason == "error" and "empty" in out.error
    # the session still takes a request with a prompt
    assert len(eng.generate(s, "plan", _prompt(5, 8), _params(3))) == 3


def test_failing_on_an_s2_model_frees_and_recomputes_the_session(monkeypatch):
    """Head-sharded S2 storage cannot be cut back to the session's old length: the failed
    request's session gives its whole cache back and recomputes it on the next request."""
    monkeypatch.setenv("VMWEAVE_KERNELS", "torch")

    def engine(max_kv_bytes):
        return Engine.from_pretrained("tiny-s2", device="cpu", block_size=16, max_kv_bytes=max_kv_bytes)

    eng, ref = engine(4 * 8192), engine(None)
    s, rs = eng.new_session(), ref.new_session()
    eng.generate(s, None, _prompt(9, 9), _params(4))
    ref.generate(rs, None, _prompt(9, 9), _params(4))
    tokens = list(s.tokens)
    with pytest.raises(CacheCapacityError) as e:
        eng.generate(s, None, _prompt(40, 10), _params(60))
    full = ref.generate(ref.new_session(), None, tokens + _prompt(40, 10), _params(60))
    assert len(e.value.output) > 1 and list(e.value.output) == list(full)[:len(e.value.output)]
    assert s.tokens == tokens and eng.memory_report()["used_bytes"] == 0
    again = eng.generate(s, None, [8, 9], _params(4))
    assert list(again) == list(ref.generate(rs, None, [8, 9], _params(4)))
    assert again.recomputed_tokens == len(tokens) == 13


@pytest.mark.parametrize("mode", ["non_shared", "full_shared"])
def test_empty_prompt_after_a_failure_at_a_block_boundary_runs(mode):
    """The failed request began at a block boundary: the cache cut back to it must still leave
    the session's last token to recompute, or a next request with no prompt has no logits."""
    eng = Engine.from_pretrained("tiny", cache_mode=mode, device="cpu", block_size=16,
                                 max_kv_bytes=4 * 8192, async_steps=False)
    p = lambda n: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)  # noqa: E731
    s = eng.new_session()
    eng.generate(s, None, list(range(1, 16)), p(1))  # 16 tokens: one full block
    with pytest.raises(CacheCapacityError):
        eng.generate(s, None, list(range(20, 60)), p(60))
    assert len(s.tokens) == 16
    rid = eng.add_request(s, None, [], p(3))
    for _ in range(20):
        eng.step()
        if eng.get_output(rid).finished:
            break
    out = eng.get_output(rid)
    assert out.finished and out.finish_reason == "length" and len(out) == 3
