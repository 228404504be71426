"""Making room in the KV budget: a request that can never fit fails without freeing any other
session's cache, the room it may make counts prefix-shared blocks once (and not at all when a
cache outside the freed ones still holds them), and a request whose session is wholly cached
(an overlapped step ran the token its previous request stopped on) still gets logits."""
from __future__ import annotations

import pytest
from engine_test_helpers import one_thread, shared_a_loras  # noqa: F401  (autouse fixture)
from engine_test_helpers import prompt as _prompt

from engine import CacheCapacityError, Engine, SamplingParams

MODES = ("non_shared", "base_shared", "base_lr_shared", "full_shared")
BLOCK = 8192  # tiny, block_size 16, no low-rank V: bytes of one KV block


def _engine(mode: str, blocks: int | None = None, async_steps: bool = False) -> Engine:
    return Engine.from_pretrained("tiny", cache_mode=mode, device="cpu", block_size=16,
                                  max_kv_bytes=blocks * BLOCK if blocks else None, async_steps=async_steps)


def _params(n: int, stop: tuple[int, ...] = ()) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, stop_token_ids=list(stop))


def _counts(eng: Engine) -> tuple[int, int]:
    return eng.sched.evictions, eng.sched.preemptions


@pytest.mark.parametrize("mode", MODES)
def test_request_that_can_never_fit_frees_no_other_cache(mode):
    eng = _engine(mode, blocks=4)
    a, b = eng.new_session(), eng.new_session()
    eng.generate(a, None, _prompt(29, 1), _params(2))
    held, counts = eng.kv.session_bytes(a.id), _counts(eng)
    assert held == 2 * BLOCK

    with pytest.raises(CacheCapacityError, match="max_kv_bytes"):
        eng.generate(b, None, _prompt(199, 2), _params(2))
    assert eng.kv.session_bytes(a.id) == held and _counts(eng) == counts

    again = eng.generate(a, None, [8, 9], _params(4))  # runs on from its cache
    assert again.recomputed_tokens == 0 and len(again) == 4
    fresh = eng.generate(eng.new_session(), None, a.tokens[:20], _params(2))
    assert fresh.cached_tokens == 16  # a's first block is still findable by content


@pytest.mark.parametrize("mode", ["non_shared", "full_shared"])
def test_blocks_the_request_itself_shares_are_not_room(mode):
    """b attaches a's 3 full prefix blocks and needs 6 more; 4 are free and evicting a would
    give back only its private last block (b holds the other 3): no room, so a is kept."""
    eng = _engine(mode, blocks=8)
    a, b = eng.new_session(), eng.new_session()
    eng.generate(a, None, _prompt(50, 3), _params(2))
    held, counts = eng.kv.session_bytes(a.id), _counts(eng)
    assert held == 4 * BLOCK

    with pytest.raises(CacheCapacityError) as e:
        eng.generate(b, None, a.tokens[:48] + _prompt(92, 4), _params(2))
    assert e.value.output.cached_tokens == 48  # the shared blocks were really attached
    assert eng.kv.session_bytes(a.id) == held and _counts(eng) == counts
    assert eng.memory_report()["used_bytes"] == held
    assert eng.generate(a, None, [8, 9], _params(3)).recomputed_tokens == 0


@pytest.mark.parametrize("mode", ["non_shared", "full_shared"])
def test_blocks_shared_among_the_freed_caches_count_once_and_in_full(mode):
    """a and c share 3 blocks: neither alone frees them, both together do. A request that needs
    the whole budget runs by evicting both."""
    eng = _engine(mode, blocks=8)
    a, c = eng.new_session(), eng.new_session()
    eng.generate(a, None, _prompt(50, 5), _params(2))
    assert eng.generate(c, None, a.tokens[:48] + [7, 7, 7, 7, 7], _params(2)).cached_tokens == 48
    assert eng.memory_report()["used_bytes"] == 5 * BLOCK

    out = eng.generate(eng.new_session(), None, _prompt(127, 6), _params(1))  # 8 blocks
    assert len(out) == 1 and eng.sched.evictions == 2
    assert eng.kv.session_bytes(a.id) == eng.kv.session_bytes(c.id) == 0


def test_non_shared_frees_the_other_agents_copies_of_the_session_as_a_last_resort():
    eng = _engine("non_shared", blocks=6)
    eng.add_lora_agent("plan")
    s = eng.new_session()
    eng.generate(s, "plan", _prompt(50, 7), _params(2))  # plan's copy: 4 blocks
    out = eng.generate(s, None, [1, 2], _params(2))  # the base model's copy needs 4 more
    assert len(out) == 2 and eng.sched.preemptions == 1
    assert eng.kv.coverage(s.id, "plan") == 0


def _stop_then_empty(eng: Engine, agent: str | None, first: list[int], k: int) -> tuple[list[int], list[int]]:
    """Generate on a new session with the greedy output's token k as a stop token (so the
    request stops on its (k+1)-th token), then run an empty-prompt request on it (at most 50
    steps: the bug left it waiting forever). Returns (the session's tokens before the
    empty-prompt request, its output)."""
    free = eng.generate(eng.new_session(), agent, first, _params(k + 3))
    assert free[k] not in free[:k]
    s = eng.new_session()
    out = eng.generate(s, agent, first, _params(k + 3, stop=(free[k],)))
    assert out.finish_reason == "stop" and len(out) == k + 1
    before = list(s.tokens)
    if eng.async_steps:  # the overlapped step ran the stop token: the whole session is cached
        assert eng.kv.coverage(s.id, agent) == len(before)
    rid = eng.add_request(s, agent, [], _params(3))
    for _ in range(50):
        if eng.get_output(rid).finished:
            break
        eng.step()
    out = eng.get_output(rid)
    assert out.finished, "the empty-prompt request was never given work"
    assert out.finish_reason == "length"
    return before, list(out)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    return shared_a_loras(tmp_path_factory.mktemp("room_adapters"), a_seed=100, gain=2.0)


@pytest.mark.parametrize("length", [6, 16], ids=["partial_block", "full_block"])
@pytest.mark.parametrize("async_steps", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_empty_prompt_after_a_stop_token_gets_logits(loras, mode, async_steps, length):
    """The session ends mid-block (its last token's K/V are rewritten in place) or on a block
    boundary (the full, findable block is given back and recomputed); either way the follow-up
    continues exactly as a fresh run over the same tokens does."""
    eng = _engine(mode, async_steps=async_steps)
    eng.add_lora_agent("plan", loras["plan"])
    k = 2
    before, got = _stop_then_empty(eng, "plan", _prompt(length - k - 1, 11), k)
    assert len(before) == length

    ref = _engine(mode)
    ref.add_lora_agent("plan", loras["plan"])
    assert got == list(ref.generate(ref.new_session(), "plan", before, _params(3)))
