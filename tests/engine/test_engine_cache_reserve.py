"""KVManager.reserve is all or nothing across the dense and the head-sharded streams: whichever
part runs out of pages (the budget check passed), what the call took is given back."""
from __future__ import annotations

import pytest

from engine import Engine
from engine.kvcache import CacheFull
from engine_test_helpers import one_thread  # noqa: F401  (autouse fixture)


def _no_pages(*_a, **_k):
    raise CacheFull("page pool exhausted (test)")


def _state(kv, sid):
    dense = {k: list(st.blocks) for k, st in kv.streams(sid, None).items()}
    sharded = sum(kv.s2.nbytes(st) for st in kv.sharded(sid, None).values())
    return dense, kv.budget.used, sharded


@pytest.mark.parametrize("fail", ["sharded", "dense"])
def test_reserve_changes_nothing_when_pages_run_out(monkeypatch, fail):
    eng = Engine.from_pretrained("tiny-s2", cache_mode="non_shared", device="cpu")
    kv = eng.kv
    s = eng.new_session()
    kv.reserve(s.id, None, 37)  # something already held, so "unchanged" is not "empty"
    before = _state(kv, s.id)
    assert any(before[0].values()) and before[2] > 0
    if fail == "sharded":
        monkeypatch.setattr(kv.s2, "reserve", _no_pages)
    else:
        for st in kv.streams(s.id, None).values():
            monkeypatch.setattr(st, "reserve", _no_pages)
    with pytest.raises(CacheFull):
        kv.reserve(s.id, None, 37 + 5 * kv.block_size)
    assert _state(kv, s.id) == before


@pytest.mark.parametrize("mode", ["non_shared", "base_lr_shared"])
def test_scheduler_reserves_only_steps_that_need_blocks(monkeypatch, mode):
    """The scheduler takes the bytes a step needs from making room and calls `reserve` only when
    they are not zero (a decode step inside its last block needs none): every call it makes
    takes blocks, calls happen exactly at block boundaries, and the streams end holding the
    blocks their tokens need, no more, with the budget counting exactly those."""
    from engine import SamplingParams

    eng = Engine.from_pretrained("tiny-s2", cache_mode=mode, device="cpu", block_size=4)
    kv, calls = eng.kv, []
    real = kv.reserve

    def spying(sid, agent, end):
        calls.append((kv.bytes_to_reserve(sid, agent, end), end))
        return real(sid, agent, end)

    monkeypatch.setattr(kv, "reserve", spying)
    s = eng.new_session()
    out = list(eng.generate(s, None, list(range(3, 10)), SamplingParams(max_tokens=11, temperature=0.0,
                                                                         ignore_eos=True)))
    assert len(out) == 11
    assert calls and all(need > 0 for need, _ in calls)
    # prompt 7 tokens (2 blocks of 4), then decode steps end at 8, 9, ...: new blocks at 9, 13, 17
    assert [end for _, end in calls] == [7, 9, 13, 17]
    held = 0
    for st in kv.streams(s.id, None).values():
        assert len(st.blocks) == -(-st.length // 4)
        held += len(st.blocks) * st.pool.block_bytes
    for st in kv.sharded(s.id, None).values():
        held += kv.s2.nbytes(st)
    assert kv.budget.used == held > 0
