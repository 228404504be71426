"""ExpertStore invariants on the host vmm backend: small experts that straddle 4 KiB pages.

After any sequence of loads and unloads (hypothesis): the mapped pages are exactly the pages live
slots touch; mapped bytes = exact expert bytes + the uncovered part of boundary pages; no two live
slots overlap; base and every live adapter's weights are bit-identical to what was loaded; the
expert maps say exactly where each adapter's experts are; the tensors never move.
"""
from __future__ import annotations

import mmap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vmm
from experts import (DuplicateAdapterError, ExpertStore, NoFreeSlotsError, StoreOutOfMemoryError,
                     UnknownAdapterError)

LAYERS = [1, 3]          # non-contiguous MoE layer ids, as with a leading dense layer
M, H, I, S = 5, 24, 20, 7  # fp32: w13 row 3840 B, w2 row 1920 B -> rows straddle 4 KiB pages
PAGE = mmap.PAGESIZE


def make_store(**kw) -> ExpertStore:
    kw.setdefault("max_adapters", 4)
    return ExpertStore(LAYERS, M, H, I, S, dtype=torch.float32, device="cpu", **kw)


def rand_expert(g: torch.Generator):
    return (torch.randn(2 * I, H, generator=g), torch.randn(H, I, generator=g))


def base_weights(g: torch.Generator):
    return {l: (torch.randn(M, 2 * I, H, generator=g), torch.randn(M, H, I, generator=g)) for l in LAYERS}


def pages_of(row: int, row_bytes: int, page: int) -> set[int]:
    a, b = row * row_bytes, (row + 1) * row_bytes
    return set(range(a // page, (b - 1) // page + 1))


def check_invariants(store: ExpertStore, base, live: dict, ptrs: dict) -> None:
    page = store.page_size
    rep = store.memory_report()
    n_adapter_experts = 0
    total_mapped = 0
    boundary = 0
    for l in LAYERS:
        w13, w2 = store.w13(l), store.w2(l)
        assert (w13.data_ptr(), w2.data_ptr()) == ptrs[l]  # never moves
        assert torch.equal(w13[:M], base[l][0]) and torch.equal(w2[:M], base[l][1])
        rows_seen: dict[int, str] = {}
        emap = store.expert_map(l).cpu()
        used_rows = set()
        for name, layers in live.items():
            info = store.adapter_info(name)
            expect = torch.arange(M, dtype=torch.int32)
            for e, (a, b) in layers.get(l, {}).items():
                row = info.slots[l][e]
                assert M <= row < M + S
                assert row not in rows_seen, f"slot {row} held by {rows_seen.get(row)} and {name}"
                rows_seen[row] = name
                assert torch.equal(w13[row], a) and torch.equal(w2[row], b)
                expect[e] = row
                n_adapter_experts += 1
            assert set(info.slots.get(l, {})) == set(layers.get(l, {}))
            assert torch.equal(emap[info.index], expect)
            used_rows.add(info.index)
        for r in set(range(store.max_adapters)) - used_rows:
            assert torch.equal(emap[r], torch.arange(M, dtype=torch.int32))
        live_rows = sorted(list(range(M)) + list(rows_seen))
        assert store.live_rows(l) == live_rows
        ranges = store.mapped_ranges(l)
        for which, row_bytes in (("w13", store.w13_row_bytes), ("w2", store.w2_row_bytes)):
            want = set().union(*(pages_of(r, row_bytes, page) for r in live_rows))
            got = {p for off, n in ranges[which] for p in range(off // page, (off + n) // page)}
            assert got == want
            total_mapped += len(got) * page
            # boundary pages: partly covered; each sits at the edge of a run of live rows
            cover = {p: 0 for p in got}
            for r in live_rows:
                a, b = r * row_bytes, (r + 1) * row_bytes
                for p in pages_of(r, row_bytes, page):
                    cover[p] += min(b, (p + 1) * page) - max(a, p * page)
            partial = sum(1 for c in cover.values() if c < page)
            runs = sum(1 for i, r in enumerate(live_rows) if i == 0 or live_rows[i - 1] != r - 1)
            assert partial <= 2 * runs
            boundary += partial
    exact = (len(LAYERS) * M + n_adapter_experts) * store.expert_bytes
    assert rep["exact_bytes"] == exact
    assert rep["mapped_bytes"] == total_mapped
    assert rep["boundary_pages"] == boundary
    assert 0 <= rep["mapped_bytes"] - exact < max(boundary, 1) * page
    assert store.pool.stats()["bytes_in_use"] == total_mapped
    assert sorted(store.adapters) == sorted(live)


op = st.one_of(
    st.tuples(st.just("load"), st.dictionaries(st.sampled_from(LAYERS),
                                               st.sets(st.integers(0, M - 1), max_size=4), max_size=2)),
    st.tuples(st.just("unload"), st.integers(0, 50)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, max_size=14), seed=st.integers(0, 2 ** 31 - 1))
def test_store_invariants_random_sequences(ops, seed):
    g = torch.Generator().manual_seed(seed)
    store = make_store()
    base = base_weights(g)
    for l in LAYERS:
        store.load_base(l, *base[l])
    ptrs = {l: (store.w13(l).data_ptr(), store.w2(l).data_ptr()) for l in LAYERS}
    live: dict[str, dict] = {}
    counter = 0
    try:
        for kind, arg in ops:
            if kind == "load":
                counter += 1
                name = f"a{counter}"
                weights = {l: {e: rand_expert(g) for e in sorted(ids)} for l, ids in arg.items()}
                need = {l: len(w) for l, w in weights.items()}
                fits = len(live) < store.max_adapters and all(n <= store.free_slots(l) for l, n in need.items())
                if fits:
                    store.load_adapter(name, weights)
                    live[name] = {l: w for l, w in weights.items() if w}
                else:
                    with pytest.raises(NoFreeSlotsError):
                        store.load_adapter(name, weights)
            elif live:
                name = sorted(live)[arg % len(live)]
                store.unload_adapter(name)
                del live[name]
            check_invariants(store, base, live, ptrs)
    finally:
        store.close()


def test_first_fit_reuses_holes_and_shares_boundary_pages():
    g = torch.Generator().manual_seed(7)
    store = make_store()
    base = base_weights(g)
    for l in LAYERS:
        store.load_base(l, *base[l])
    ptrs = {l: (store.w13(l).data_ptr(), store.w2(l).data_ptr()) for l in LAYERS}
    wa = {1: {0: rand_expert(g), 2: rand_expert(g), 4: rand_expert(g)}}
    wb = {1: {1: rand_expert(g), 3: rand_expert(g)}, 3: {0: rand_expert(g)}}
    store.load_adapter("a", wa)
    store.load_adapter("b", wb)
    assert store.adapter_info("a").slots[1] == {0: M, 2: M + 1, 4: M + 2}
    assert store.adapter_info("b").slots[1] == {1: M + 3, 3: M + 4}
    # a's last w13 row and b's first share a page; unloading a must keep it for b
    row_bytes = 2 * I * H * 4
    shared = pages_of(M + 2, row_bytes, PAGE) & pages_of(M + 3, row_bytes, PAGE)
    assert shared
    before = store.memory_report()["mapped_bytes"]
    store.unload_adapter("a")
    assert store.memory_report()["mapped_bytes"] < before
    check_invariants(store, base, {"b": wb}, ptrs)
    wc = {1: {2: rand_expert(g), 3: rand_expert(g)}}
    store.load_adapter("c", wc)
    assert store.adapter_info("c").slots[1] == {2: M, 3: M + 1}  # lowest free slots: the hole
    assert store.adapter_id("c") == 0  # a's expert-map row is reused too
    check_invariants(store, base, {"b": wb, "c": wc}, ptrs)
    store.close()


def test_adapter_costs_exact_bytes_plus_at_most_a_page_per_weight():
    g = torch.Generator().manual_seed(3)
    store = make_store()
    for l, (a, b) in base_weights(g).items():
        store.load_base(l, a, b)
    r0 = store.memory_report()
    store.load_adapter("x", {1: {e: rand_expert(g) for e in range(4)}})
    r1 = store.memory_report()
    grown = r1["mapped_bytes"] - r0["mapped_bytes"]
    exact = 4 * store.expert_bytes
    assert r1["adapter_bytes"] == exact
    # one contiguous run right after the base: each weight's first page is shared with the base
    assert exact - 2 * PAGE < grown < exact + 2 * PAGE
    assert r1["merged_copies_bytes"] == 2 * r1["base_bytes"]
    assert r1["padded_to_max_bytes"] == r1["base_bytes"] + len(LAYERS) * 4 * store.expert_bytes
    assert r1["per_adapter"]["x"] == {"id": 0, "experts": 4, "bytes": exact}
    store.close()


def test_errors_leave_the_store_unchanged():
    g = torch.Generator().manual_seed(11)
    store = make_store(max_adapters=3)
    base = base_weights(g)
    for l in LAYERS:
        store.load_base(l, *base[l])
    ptrs = {l: (store.w13(l).data_ptr(), store.w2(l).data_ptr()) for l in LAYERS}
    wa = {3: {1: rand_expert(g), 2: rand_expert(g), 4: rand_expert(g)}}
    store.load_adapter("a", wa)
    live = {"a": wa}
    bad = [
        (DuplicateAdapterError, "a", {1: {0: rand_expert(g)}}),
        (ValueError, "b", {2: {0: rand_expert(g)}}),                        # not an MoE layer
        (ValueError, "b", {1: {M: rand_expert(g)}}),                        # expert id out of range
        (ValueError, "b", {1: {0: (torch.randn(2 * I, H + 1), torch.randn(H, I))}}),
        (TypeError, "b", {1: {0: (torch.randn(2 * I, H), "w2")}}),
        (TypeError, "b", {1: {0: (torch.randint(0, 3, (2 * I, H)), torch.randn(H, I))}}),
        # layer 3 has S - 3 = 4 free slots; 5 experts do not fit (layer 1's would)
        (NoFreeSlotsError, "b", {1: {0: rand_expert(g)}, 3: {e: rand_expert(g) for e in range(M)}}),
        (ValueError, "", {1: {0: rand_expert(g)}}),
    ]
    for exc, name, w in bad:
        with pytest.raises(exc):
            store.load_adapter(name, w)
        check_invariants(store, base, live, ptrs)
    for name in ("b", "c"):
        store.load_adapter(name, {})
        live[name] = {}
    with pytest.raises(NoFreeSlotsError, match="rows"):
        store.load_adapter("d", {1: {0: rand_expert(g)}})
    with pytest.raises(UnknownAdapterError):
        store.unload_adapter("nope")
    with pytest.raises(KeyError):
        store.adapter_id("nope")
    check_invariants(store, base, live, ptrs)
    store.close()


def test_pool_exhaustion_changes_nothing():
    g = torch.Generator().manual_seed(5)
    probe = make_store()
    base_pages = probe.pool.stats()["pages_in_use"]
    probe.close()
    backend = vmm.get_backend("host")
    pool = vmm.PagePool(backend, (base_pages + 3) * PAGE)
    store = make_store(page_pool=pool)
    base = base_weights(g)
    for l in LAYERS:
        store.load_base(l, *base[l])
    ptrs = {l: (store.w13(l).data_ptr(), store.w2(l).data_ptr()) for l in LAYERS}
    with pytest.raises(StoreOutOfMemoryError):
        store.load_adapter("big", {1: {e: rand_expert(g) for e in range(4)}, 3: {0: rand_expert(g)}})
    with pytest.raises(vmm.OutOfMemoryError):  # the same error is a vmm OOM too
        store.load_adapter("big", {1: {e: rand_expert(g) for e in range(4)}})
    check_invariants(store, base, {}, ptrs)
    small = {1: {2: rand_expert(g)}}
    store.load_adapter("small", small)
    check_invariants(store, base, {"small": small}, ptrs)
    store.close()


def test_constructor_validation():
    with pytest.raises(ValueError):
        ExpertStore([], M, H, I, S, device="cpu")
    with pytest.raises(ValueError):
        ExpertStore([1, 1], M, H, I, S, device="cpu")
    with pytest.raises(ValueError):
        ExpertStore(2, 0, H, I, S, device="cpu")
    with pytest.raises(TypeError):
        ExpertStore(2, M, H, I, S, dtype=torch.int32, device="cpu")
    positional = ExpertStore(1, M, H, I, S, torch.float32, "cpu")  # dtype, device positional too
    assert positional.w13(0).dtype == torch.float32 and positional.device.type == "cpu"
    assert positional.stats()["exact_bytes"] == M * positional.expert_bytes
    positional.close()
    store = make_store()
    with pytest.raises(ValueError):
        store.w13(0)
    with pytest.raises(ValueError):
        store.load_base(1, torch.randn(M, 2 * I, H), torch.randn(M, H, I + 1))
    assert not store.base_loaded(1)
    store.close()


def test_bf16_store_and_checkpoint_loading():
    """bf16 rows of odd byte size; base from a fused-layout state dict for one layer and a
    per-expert one for the other."""
    g = torch.Generator().manual_seed(2)
    store = ExpertStore(LAYERS, M, H, I, S, torch.bfloat16, "cpu")
    w = {l: (torch.randn(M, 2 * I, H, generator=g).bfloat16(), torch.randn(M, H, I, generator=g).bfloat16())
         for l in LAYERS}
    sd = {f"model.layers.{LAYERS[0]}.mlp.experts.gate_up_proj": w[LAYERS[0]][0],
          f"model.layers.{LAYERS[0]}.mlp.experts.down_proj": w[LAYERS[0]][1]}
    for e in range(M):
        for name, t in (("gate_proj", w[LAYERS[1]][0][e, :I]), ("up_proj", w[LAYERS[1]][0][e, I:]),
                        ("down_proj", w[LAYERS[1]][1][e])):
            sd[f"model.layers.{LAYERS[1]}.mlp.experts.{e}.{name}.weight"] = t
    store.load_base_checkpoint(sd)
    assert all(store.base_loaded(l) for l in LAYERS)
    ptrs = {l: (store.w13(l).data_ptr(), store.w2(l).data_ptr()) for l in LAYERS}
    ad = {LAYERS[1]: {e: (torch.randn(2 * I, H, generator=g).bfloat16(), torch.randn(H, I, generator=g).bfloat16())
                      for e in (0, 4)}}
    store.load_adapter("x", ad)
    check_invariants(store, w, {"x": ad}, ptrs)
    store.unload_adapter("x")
    check_invariants(store, w, {}, ptrs)
    store.close()
