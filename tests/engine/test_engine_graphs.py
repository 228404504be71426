"""CUDA graphs of decode steps (engine/graphs.py).

`StepGraphs` on its own (keys, layouts, capture after the first eager run, replay copies, LRU),
then the engine with graphs against the engine without, on multi-agent batches whose keys change
mid-run (requests finishing, block tables growing past their alignment): the same tokens and
log-probs. On CPU the graphs are emulated (a replay re-runs the captured step's forward on the
captured step's tensors after the copies), which fails exactly where a real graph would go
stale: any per-step value that does not reach the forward through the graph's inputs. On a GPU
the graphs are real (torch.cuda.CUDAGraph) and the kernels compiled.
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import pytest
import torch

from engine import Engine, SamplingParams
from engine.builtin import save_random_esft, save_random_lora, builtin_config
from engine.graphs import StepGraphs, buffer_layout
from engine_test_helpers import one_thread, prompt  # noqa: F401


# ---- StepGraphs alone (emulated) ----------------------------------------------------------------
def _step(buf: torch.Tensor):
    """Inputs (two views of one buffer, like a packed upload) and a forward reading them."""
    a, b = buf[:3], buf[4:9].view(5, 1)
    return [a, b], (lambda: a.sum() * 10 + b.sum())


def test_step_graphs_capture_on_second_run_then_replay_with_copies():
    g = StepGraphs(emulate=True)
    vals = [torch.randn(11, dtype=torch.float64) for _ in range(4)]
    outs = []
    for v in vals:
        inputs, fwd = _step(v.clone())
        outs.append(g.run("k", inputs, fwd))
    for v, o in zip(vals, outs):
        torch.testing.assert_close(o, v[:3].sum() * 10 + v[4:9].sum(), rtol=0, atol=1e-12)
    assert (g.captures, g.replays, len(g)) == (1, 2, 1)


def test_step_graphs_key_and_layout_separate_graphs():
    g = StepGraphs(emulate=True)
    buf = torch.randn(11, dtype=torch.float64)
    for _ in range(3):
        g.run("a", *_step(buf.clone()))
    # same key, another layout (the inputs sit elsewhere in their buffer): its own graph
    other = torch.randn(13, dtype=torch.float64)
    x, y = other[2:5], other[6:11].view(5, 1)
    for _ in range(2):
        got = g.run("a", [x, y], lambda: x.sum() * 10 + y.sum())
    torch.testing.assert_close(got, other[2:5].sum() * 10 + other[6:11].sum(), rtol=0, atol=1e-12)
    g.run("b", *_step(buf.clone()))
    assert g.captures == 2 and len(g) == 2
    g.clear()
    assert len(g) == 0
    g.run("a", *_step(buf.clone()))  # after clear: eager again, no replay
    assert g.replays == 1


def test_step_graphs_when_full_drop_every_graph_before_capturing():
    # destroying a graph may release what graphs captured on one stream share: none may
    # outlive another's destruction, so a full set is dropped whole, not one at a time
    g = StepGraphs(emulate=True, max_graphs=2)
    buf = torch.randn(11, dtype=torch.float64)
    for k in ("a", "b"):
        for _ in range(2):
            g.run(k, *_step(buf.clone()))
    assert len(g) == 2
    for _ in range(2):
        g.run("c", *_step(buf.clone()))
    assert len(g) == 1 and g.captures == 3
    g.run("a", *_step(buf.clone()))  # "a" went with the rest: eager again
    assert g.replays == 0
    inputs, fwd = _step(buf.clone())
    torch.testing.assert_close(g.run("c", inputs, fwd), fwd(), rtol=0, atol=0)
    assert g.replays == 1


def test_buffer_layout_groups_views_by_storage():
    p, q = torch.arange(20), torch.arange(7)
    bufs, (where, sizes) = buffer_layout([p[2:4], q, p[10:20].view(2, 5), p.view(torch.int32)[6:8]])
    assert sizes == (160, 56) and all(b.dtype == torch.uint8 for b in bufs)
    assert bufs[0].data_ptr() == p.data_ptr() and bufs[1].data_ptr() == q.data_ptr()
    assert [w[:3] for w in where] == [(0, 16, (2,)), (1, 0, (7,)), (0, 80, (2, 5)), (0, 24, (2,))]


def test_step_graphs_capture_failure_turns_graphs_off():
    g = StepGraphs(emulate=True)
    buf = torch.randn(11, dtype=torch.float64)
    for _ in range(2):
        g.run("ok", [buf], lambda: buf.sum())
    assert len(g) == 1
    calls = []

    def fwd():
        calls.append(1)
        if len(calls) == 2:  # the capture
            raise RuntimeError("operation not permitted when stream is capturing")
        return buf.sum() * 2

    with pytest.warns(RuntimeWarning, match="capture failed"):
        for _ in range(2):
            got = g.run("k", [buf], fwd)
    torch.testing.assert_close(got, buf.sum() * 2)
    assert "RuntimeError" in g.failed and len(g) == 0
    for _ in range(3):  # every key eager from now on, the one captured before too
        g.run("k", [buf], fwd)
        g.run("ok", [buf], lambda: buf.sum())
    assert (g.captures, g.replays, len(calls)) == (1, 0, 6)


def test_step_graphs_forgets_keys_seen_once(monkeypatch):
    import engine.graphs as eg

    monkeypatch.setattr(eg, "_MAX_SEEN", 8)
    g = StepGraphs(emulate=True)
    buf = torch.randn(11, dtype=torch.float64)
    for i in range(30):
        g.run(("once", i), *_step(buf.clone()))
    assert len(g._seen) <= 8 and g.captures == 0
    for _ in range(3):
        g.run("again", *_step(buf.clone()))
    assert g.captures == 1 and g.replays == 1


def test_step_graphs_rejects_bad_limits():
    with pytest.raises(ValueError):
        StepGraphs(max_graphs=0)
    with pytest.raises(ValueError):
        StepGraphs(capture_after=0)


# ---- the engine, graphs against none -----------------------------------------------------------
@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("graph_adapters")
    c = builtin_config("tiny")
    return {"plan": save_random_lora(str(root / "plan"), c, r=8, seed=1, a_seed=100, gain=2.0),
            "act": save_random_lora(str(root / "act"), c, r=8, seed=2, a_seed=100, gain=2.0)}


def _graphs_for(device: str) -> StepGraphs:
    return StepGraphs(emulate=device == "cpu")


def _decode_run(eng: Engine, agents, lens, max_tokens) -> list:
    """Requests of `agents` on new sessions in one batch; different lengths finish at different
    steps (the batch, so the graph key, changes mid-run)."""
    p = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, logprobs=True) for m in max_tokens]
    ids = [eng.add_request(eng.new_session(), a, prompt(n, 30 + i), pp)
           for i, (a, n, pp) in enumerate(zip(agents, lens, p))]
    while eng.has_unfinished():
        eng.step()
    return [eng.get_output(i) for i in ids]


def _same(ref, got, atol: float) -> None:
    for r, g in zip(ref, got):
        assert list(g) == list(r)
        torch.testing.assert_close(g.logprobs, r.logprobs, atol=atol, rtol=0)


def _kernel_env(device, monkeypatch) -> torch.dtype:
    if device == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            pytest.skip("the kernel path on CPU tensors needs TRITON_INTERPRET=1")
        monkeypatch.setenv("VMWEAVE_KERNELS", "triton")  # graphs serve the kernel path only
        return torch.float32
    return torch.bfloat16


@pytest.mark.parametrize("mode", ["base_lr_shared", "non_shared"])
def test_engine_graphs_equal_eager(mode, loras, device, monkeypatch):
    dtype = _kernel_env(device, monkeypatch)
    agents = ["plan", "act", None]
    # A block table's width (aligned to 16 blocks) grows every 16 blocks: the prompts cross it
    # while decoding. Blocks of 2 tokens on CPU (short prompts for the interpreter), of 16 (the
    # kernels' tested range) on a GPU.
    bs, first = (2, 25) if device == "cpu" else (16, 249)
    lens, max_tokens = [first + 2, first + 4, first], [12, 8, 16]
    outs = []
    for graphs in (None, _graphs_for(device)):
        eng = Engine.from_pretrained("tiny", cache_mode=mode, device=device, dtype=dtype, block_size=bs)
        for a in ("plan", "act"):
            eng.add_lora_agent(a, loras[a])
        eng.graphs = graphs
        outs.append(_decode_run(eng, agents, lens, max_tokens))
        if graphs is not None:
            # keys change as requests finish and as each group's table width grows
            assert graphs.captures >= 3 and eng.stats()["graph_replays"] >= 4
    _same(*outs, atol=1e-6 if device == "cpu" else 1e-2)


def test_engine_graphs_equal_eager_keeping_one_graph(loras, device, monkeypatch):
    """max_graphs=1: every new key drops the graph before it (keys alternate as requests
    finish and tables grow); results still equal the eager engine's."""
    dtype = _kernel_env(device, monkeypatch)
    bs, first = (2, 25) if device == "cpu" else (16, 249)
    outs = []
    for graphs in (None, StepGraphs(emulate=device == "cpu", max_graphs=1)):
        eng = Engine.from_pretrained("tiny", cache_mode="non_shared", device=device, dtype=dtype, block_size=bs)
        eng.add_lora_agent("plan", loras["plan"])
        eng.graphs = graphs
        outs.append(_decode_run(eng, ["plan", None, "plan"], [first + 2, first + 4, first], [12, 8, 16]))
        if graphs is not None:
            assert graphs.captures >= 3 and len(graphs) == 1 and eng.stats()["graph_replays"] >= 4
    _same(*outs, atol=1e-6 if device == "cpu" else 1e-2)


@pytest.mark.gpu
def test_engine_survives_a_failed_capture(loras, monkeypatch):
    """A forward that does something a capturing stream forbids (here a device sync): the
    capture fails, the engine warns, stays on its own stream and runs every step eagerly with
    the eager engine's results."""
    outs = []
    for graphs in (None, StepGraphs(device="cuda")):
        eng = Engine.from_pretrained("tiny", device="cuda", dtype=torch.bfloat16)
        eng.graphs = graphs
        real = eng.model.forward

        def syncing(*a, real=real, **kw):
            if torch.cuda.is_current_stream_capturing():
                torch.cuda.synchronize()
            return real(*a, **kw)

        eng.model.forward = syncing
        with pytest.warns(RuntimeWarning, match="capture failed") if graphs is not None else nullcontext():
            outs.append(_decode_run(eng, [None, None], [9, 11], [6, 6]))
        assert torch.cuda.current_stream() == torch.cuda.default_stream()
        if graphs is not None:
            assert graphs.failed and graphs.captures == 0 and eng.stats()["graph_replays"] == 0
            # the failed capture left the device's random generator usable (sampling, randperm)
            assert sorted(torch.randperm(7, device="cuda").tolist()) == list(range(7))
            sampled = eng.generate(eng.new_session(), None, prompt(5, 3),
                                   SamplingParams(max_tokens=4, temperature=1.0, ignore_eos=True))
            assert len(sampled) == 4
    _same(*outs, atol=1e-2)


def test_engine_graphs_equal_eager_moe_esft_and_s2(device, monkeypatch, tmp_path):
    """An MoE model with an ESFT agent beside base-model tokens (the router kernel's reroute
    inside the graph), and an S2 model (head-sharded slots and tables as graph inputs)."""
    dtype = _kernel_env(device, monkeypatch)
    esft = save_random_esft(str(tmp_path / "law"), "tiny-moe", {0: [1, 5], 1: [2]}, seed=1)
    for model in ("tiny-moe", "tiny-s2"):
        outs = []
        for graphs in (None, _graphs_for(device)):
            eng = Engine.from_pretrained(model, cache_mode="non_shared", device=device, dtype=dtype,
                                         block_size=4 if device == "cpu" else 16)
            agents = [None, None]
            if model == "tiny-moe":
                eng.add_esft_adapter("law", esft)
                agents = ["law", None]
            eng.graphs = graphs
            outs.append(_decode_run(eng, agents, [21, 70], [8, 7]))
            if graphs is not None:
                assert eng.stats()["graph_replays"] >= 2
        _same(*outs, atol=1e-6 if device == "cpu" else 1e-2)


def test_engine_graphs_forget_on_adapter_change(loras, device, monkeypatch):
    """Adding or removing an agent drops every graph (they hold adapter-derived tensors); the
    runs after it match a fresh engine's."""
    dtype = _kernel_env(device, monkeypatch)
    eng = Engine.from_pretrained("tiny", cache_mode="base_lr_shared", device=device, dtype=dtype)
    eng.graphs = _graphs_for(device)
    eng.add_lora_agent("plan", loras["plan"])
    _decode_run(eng, ["plan", None], [9, 11], [5, 5])
    assert len(eng.graphs) > 0
    eng.add_lora_agent("act", loras["act"])
    assert len(eng.graphs) == 0
    got = _decode_run(eng, ["act", "plan"], [9, 11], [5, 5])
    eng.remove_adapter("plan")
    assert len(eng.graphs) == 0
    ref_eng = Engine.from_pretrained("tiny", cache_mode="base_lr_shared", device=device, dtype=dtype)
    ref_eng.graphs = None
    for a in ("plan", "act"):
        ref_eng.add_lora_agent(a, loras[a])
    _same(_decode_run(ref_eng, ["act", "plan"], [9, 11], [5, 5]), got, atol=1e-6 if device == "cpu" else 1e-2)


@pytest.mark.gpu
def test_engine_cuda_graphs_on_by_default_on_gpu(loras, monkeypatch):
    monkeypatch.delenv("VMWEAVE_CUDA_GRAPHS", raising=False)
    eng = Engine.from_pretrained("tiny", device="cuda", dtype=torch.bfloat16)
    assert isinstance(eng.graphs, StepGraphs) and not eng.graphs.emulate
    _decode_run(eng, [None, None], [9, 11], [6, 6])
    assert eng.stats()["graph_replays"] >= 3
    assert Engine.from_pretrained("tiny", device="cuda", cuda_graphs=False).graphs is None
    monkeypatch.setenv("VMWEAVE_CUDA_GRAPHS", "0")
    assert Engine.from_pretrained("tiny", device="cuda", dtype=torch.bfloat16).graphs is None
    assert Engine.from_pretrained("tiny", device="cuda", cuda_graphs=True).graphs is not None


def test_engine_has_no_graphs_on_cpu():
    assert Engine.from_pretrained("tiny", device="cpu", cuda_graphs=True).graphs is None
