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
