"""The engine's per-step host work: what is derived from the adapters is built once and reused
(and rebuilt when the adapter set changes), a decode step's syncs and host->device copies are
bounded and do not grow with the context, and none of it changes results.

The kernel path runs here with the kernels' torch implementations (`impl="torch"`), so every
piece of the engine's kernel-path plumbing (grouping, block tables, stacked LoRA weights,
Flash-LoRA's B stacks) runs at CPU speed; the kernels themselves are checked in tests/kernels.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_test_helpers import one_thread  # noqa: F401  (autouse fixture)
from engine_test_helpers import prompt as _prompt

import engine.engine as engine_mod
from engine import Engine, SamplingParams
from engine.builtin import builtin_config, save_random_lora

GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=True)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Four rank-8 adapters on q and v with one shared v_proj A (base_lr_shared applies), and one
    rank-4 adapter with its own A (base_shared only)."""
    root = tmp_path_factory.mktemp("step_overhead")
    c = builtin_config("tiny")
    dirs = {n: save_random_lora(str(root / n), c, r=8, seed=11 + i, a_seed=100, gain=2.0)
            for i, n in enumerate(("plan", "act", "reflect", "critic"))}
    dirs["own"] = save_random_lora(str(root / "own"), c, r=4, seed=17, a_seed=7, gain=2.0)
    return dirs


@pytest.fixture
def kernel_path(monkeypatch):
    """The engine's kernel path on CPU, each kernel in its torch implementation."""
    monkeypatch.setattr(engine_mod, "use_kernels", lambda t, dtype: True)
    monkeypatch.setattr(engine_mod, "kernel_impl", lambda t: "torch")


def _engine(mode: str, adapters: dict, names, **kw) -> Engine:
    eng = Engine.from_pretrained("tiny", cache_mode=mode, device="cpu", **kw)
    for n in names:
        eng.add_lora_agent(n, adapters[n])
    return eng


def _generate(eng: Engine, agent: str, seed: int, n: int = 9):
    return eng.generate(eng.new_session(), agent, _prompt(n, seed), GREEDY)


def _same(got, ref) -> None:
    assert list(got) == list(ref)
    torch.testing.assert_close(got.logprobs, ref.logprobs, atol=1e-5, rtol=0)


# ---- adapter-derived tensors: built once, rebuilt when the adapter set changes ------------------

@pytest.mark.parametrize("mode", ["base_shared", "full_shared"])
def test_reused_lora_id_gets_the_new_adapters_weights(adapters, kernel_path, mode):
    """Removing the adapter with the highest id and adding another hands the new one the same id:
    the stacked weights of the old one must not survive (they did: stale stacks, wrong tokens)."""
    eng = _engine(mode, adapters, ("plan", "act"))
    _generate(eng, "act", seed=1)  # builds the stacks with act's weights in id 1
    eng.remove_adapter("act")
    eng.add_lora_agent("reflect", adapters["reflect"])
    assert eng.agents["reflect"].lora_id == 1
    got = _generate(eng, "reflect", seed=2)
    _same(got, _generate(_engine(mode, adapters, ("plan", "reflect")), "reflect", seed=2))


def _count_builds(monkeypatch, cls, name: str) -> list:
    """Wrap `cls.name` so each call is recorded; returns the list of recorded calls."""
    calls = []
    real = getattr(cls, name)

    def counted(self, *args):
        calls.append(args)
        return real(self, *args)

    monkeypatch.setattr(cls, name, counted)
    return calls


def test_adapter_stacks_are_built_once_and_rebuilt_when_adapters_change(adapters, kernel_path, monkeypatch):
    """base_shared with two low-rank pools (rank 8 and rank 4): Flash-LoRA's B stacks, the
    stacked low-rank A and the grouped-GEMM stacks are built once per layer, reused by every
    later step, and rebuilt after an agent is added or removed, with results equal to a fresh
    engine's with the same agents."""
    from engine.attention import PagedAttention
    from engine.lora import LoraSet

    b_builds = _count_builds(monkeypatch, PagedAttention, "_stack_lora_b")
    a_builds = _count_builds(monkeypatch, PagedAttention, "_stack_lr_a")
    gemm_builds = _count_builds(monkeypatch, LoraSet, "_build_stack")
    names = ("plan", "own")
    eng = _engine("base_shared", adapters, names)
    layers = eng.config.num_layers
    _generate(eng, "plan", seed=3)
    _generate(eng, "own", seed=4)
    # per layer: one B stack per low-rank pool, one stacked A, one (A, B) stack per LoRA module
    assert sorted((layer, pool.name) for _, layer, pool in b_builds) == \
        sorted((layer, pool) for layer in range(layers) for pool in ("lr4", "lr8"))
    assert len(a_builds) == layers
    first = (len(b_builds), len(a_builds), len(gemm_builds))
    assert first[2] > 0
    _generate(eng, "plan", seed=5, n=23)  # more steps, other lengths: nothing rebuilt
    _generate(eng, "own", seed=6)
    assert (len(b_builds), len(a_builds), len(gemm_builds)) == first

    eng.add_lora_agent("act", adapters["act"])
    got = _generate(eng, "act", seed=7)
    assert len(b_builds) > first[0] and len(a_builds) > first[1] and len(gemm_builds) > first[2]
    _same(got, _generate(_engine("base_shared", adapters, ("plan", "own", "act")), "act", seed=7))

    eng.remove_adapter("own")
    before = len(b_builds)
    got = _generate(eng, "plan", seed=8)
    assert len(b_builds) > before
    _same(got, _generate(_engine("base_shared", adapters, ("plan", "act")), "plan", seed=8))


# ---- results: the kernel path's plumbing gives the torch path's tokens and log-probs -------------

@pytest.fixture(scope="module")
def keyed_adapter(tmp_path_factory):
    """An adapter on q, k and v (its K lives in its own namespace in the shared modes, which the
    kernels do not read: its chunks take the torch path inside a kernel-path forward)."""
    c = builtin_config("tiny")
    return save_random_lora(str(tmp_path_factory.mktemp("keyed") / "keyed"), c, r=8,
                            targets=("q_proj", "k_proj", "v_proj"), seed=19, a_seed=100, gain=2.0)


def _mixed_run(mode: str, adapters: dict, keyed: str) -> list:
    """Three sessions decoding together with different agents (one with no adapter, one with its
    own K namespace), a prompt that arrives mid-decode and is prefilled in chunks beside them."""
    eng = _engine(mode, adapters, ("plan", "act") + (("own",) if mode == "base_shared" else ()),
                  max_batched_tokens=10)
    eng.add_lora_agent("keyed", keyed)
    ss = [eng.new_session() for _ in range(3)]
    agents = ["plan", "own" if mode == "base_shared" else "act", None]
    ids = [eng.add_request(s, a, _prompt(5 + 4 * i, seed=30 + i), GREEDY) for i, (s, a) in enumerate(zip(ss, agents))]
    for _ in range(3):
        eng.step()
    ids.append(eng.add_request(ss[0], "keyed", _prompt(13, seed=40), GREEDY))
    ids.append(eng.add_request(eng.new_session(), "act", _prompt(17, seed=41), GREEDY))
    while eng.has_unfinished():
        eng.step()
    return [eng.get_output(i) for i in ids]


@pytest.mark.parametrize("mode", ["non_shared", "base_shared", "base_lr_shared", "full_shared"])
def test_kernel_path_gives_the_torch_paths_tokens_and_logprobs(adapters, keyed_adapter, mode, monkeypatch):
    """Whole-batch kernel groups, partial groups (gather/scatter of rows), torch-path chunks
    beside kernel groups, grouped cache writes across sessions and stream kinds: the same tokens
    and log-probs as the torch path (fp32, the kernels' torch implementations)."""
    ref = _mixed_run(mode, adapters, keyed_adapter)
    monkeypatch.setattr(engine_mod, "use_kernels", lambda t, dtype: True)
    monkeypatch.setattr(engine_mod, "kernel_impl", lambda t: "torch")
    got = _mixed_run(mode, adapters, keyed_adapter)
    assert len(got) == len(ref) == 5
    for g, r in zip(got, ref):
        assert list(g) == list(r)
        torch.testing.assert_close(g.logprobs, r.logprobs, atol=2e-4, rtol=0)


def test_lora_plan_is_kept_while_the_batch_ids_repeat(adapters):
    """LoraSet.prepare keeps its plan while a step's per-token adapter ids repeat (a steady
    decode batch) and builds a new one when they change or when the adapter set does: the plan
    of each step groups exactly that step's tokens."""
    from engine.lora import LoraSet, load_peft_adapter

    c = builtin_config("tiny")
    ls = LoraSet()
    ids_of = {n: ls.add(load_peft_adapter(adapters[n], c, "cpu", torch.float32, n)) for n in ("plan", "act")}
    p, a = ids_of["plan"], ids_of["act"]

    def plan(host):
        ls.prepare(torch.tensor(host), "torch", host_ids=host)
        return ls._plan

    first = plan([p, a, -1, p])
    assert plan([p, a, -1, p]) is first
    other = plan([a, a, -1, p])
    assert other is not first and other.adapter_ids.tolist() == [ls._slot_of[a], ls._slot_of[a], -1, ls._slot_of[p]]
    assert plan([p, a, -1, p]) is not first  # only the latest plan is kept
    kept = plan([p, a, -1, p])
    ls.add(load_peft_adapter(adapters["reflect"], c, "cpu", torch.float32, "reflect"))
    assert plan([p, a, -1, p]) is not kept  # a new adapter set plans again


# ---- what a decode step asks of the device: syncs, uploads, ops ---------------------------------

# ops that make the host wait for the device on a GPU: reading a value (`.item()`, `int()`,
# `float()`, `bool()` of a tensor) or an output whose size depends on the data
_SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten._unique2", "aten.unique_dim",
             "aten.unique_consecutive", "aten.masked_select"}


class DeviceTraffic:
    """Counts, while active, device->host syncs (the ops above and `.tolist()`, which on CPU
    tensors does not go through torch's dispatcher), tensors made from host data (`torch.tensor`,
    `torch.frombuffer`: a host->device copy each on a GPU) and every aten op dispatched."""

    def __init__(self, monkeypatch):
        from torch.utils._python_dispatch import TorchDispatchMode

        self.syncs = self.uploads = self.ops = 0
        self.active = False
        traffic = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func.overloadpacket)
                traffic.ops += 1
                traffic.syncs += name in _SYNC_OPS
                traffic.uploads += name == "aten.lift_fresh"
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        real_tolist = torch.Tensor.tolist

        def tolist(t):
            traffic.syncs += traffic.active
            return real_tolist(t)

        monkeypatch.setattr(torch.Tensor, "tolist", tolist)
        real_frombuffer = torch.frombuffer

        def frombuffer(*args, **kwargs):
            traffic.uploads += traffic.active
            return real_frombuffer(*args, **kwargs)

        monkeypatch.setattr(torch, "frombuffer", frombuffer)

    def __enter__(self):
        self.active = True
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        self.active = False


@pytest.fixture
def stand_in_kernels(monkeypatch):
    """The engine's kernel path with each kernel replaced by a shape-correct stand-in (zeros), so
    what is counted is the engine's own work: on a GPU the kernels launch, they do not sync."""
    import kernels
    import kernels.lora as klora

    def attention(q, *args, **kwargs):
        return torch.zeros_like(q)

    for name in ("paged_attention_decode", "paged_attention_prefill", "flash_lora_decode",
                 "flash_lora_prefill"):
        monkeypatch.setattr(kernels, name, attention, raising=False)
    monkeypatch.setattr(klora, "lora_shrink", lambda x, a, *args, **kw: x.new_zeros(x.shape[0], a.shape[-1]))
    monkeypatch.setattr(klora, "lora_expand", lambda y, b, *args, out=None, **kw:
                        y.new_zeros(y.shape[0], b.shape[-1]) if out is None else out)
    monkeypatch.setattr(engine_mod, "use_kernels", lambda t, dtype: True)
    monkeypatch.setattr(engine_mod, "kernel_impl", lambda t: "triton")


def _small_llama_engine(mode: str, layers: int, root, async_steps: bool = False) -> Engine:
    """Llama-3.1-8B's structure (GQA, LoRA on q and v, three agents with one shared v_proj A) at
    small sizes, `layers` deep."""
    from engine.config import config_from_dict
    from engine.fidelity import SMALL_LLAMA, random_model

    hf = dict(SMALL_LLAMA, num_hidden_layers=layers)
    cfg = config_from_dict(dict(hf))
    eng = Engine(random_model(hf, "cpu", torch.float32, seed=1), mode, 1 << 26, async_steps=async_steps)
    for i, name in enumerate(("plan", "act", "reflect")):
        d = root / f"{name}-{layers}"
        if not d.exists():
            save_random_lora(str(d), cfg, r=8, targets=("q_proj", "v_proj"), seed=50 + i, a_seed=60, gain=0.5)
        eng.add_lora_agent(name, str(d))
    return eng


def _decode_step_traffic(eng: Engine, monkeypatch, context: int) -> DeviceTraffic:
    """Two sessions x three agents' turns decoding in one batch, `context` tokens in; the traffic
    of one decode-only step there (not at a block boundary)."""
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    ss = [eng.new_session() for _ in range(2)]
    for i, s in enumerate(ss):
        eng.add_request(s, ("plan", "act")[i], [t % eng.config.vocab_size for t in _prompt(context - 2, seed=70 + i)],
                        params)
    eng.step()  # prefill
    eng.step()  # first decode: anything built on first use
    traffic = DeviceTraffic(monkeypatch)
    with traffic:
        eng.step()
    assert eng.last_step.decode_only and eng.last_step.sampled == 2
    assert {(b - 1) % eng.kv.block_size for _, _, b in eng.last_step.chunks} != {0}
    while eng.has_unfinished():
        eng.step()
    for s in ss:
        eng.close_session(s)
    return traffic


@pytest.mark.parametrize("async_steps", [False, True], ids=["sync", "overlapped"])
@pytest.mark.parametrize("mode", ["base_lr_shared", "base_shared"])
def test_decode_step_syncs_and_uploads_are_bounded_and_do_not_grow(stand_in_kernels, monkeypatch,
                                                                   tmp_path, mode, async_steps):
    """A decode step of the kernel path makes one device->host sync — sampling, one for every
    request together (the LoRA plan is built from the ids on the host; overlapped, the sync reads
    the previous step's draws) — and one host->device copy (the batch inputs with the attention
    plan's index arrays and write slots; the LoRA plan of the step before serves again, the same
    agents decoding), however long the context and however many layers; its op count does not
    depend on the context length."""
    shallow = _small_llama_engine(mode, 2, tmp_path, async_steps)
    deep = _small_llama_engine(mode, 5, tmp_path, async_steps)
    short = _decode_step_traffic(shallow, monkeypatch, context=21)
    long = _decode_step_traffic(shallow, monkeypatch, context=150)
    deeper = _decode_step_traffic(deep, monkeypatch, context=150)
    for t in (short, long, deeper):
        assert (t.syncs, t.uploads) == (1, 1)
    assert long.ops == short.ops
    assert deeper.ops > long.ops  # the counter sees the layers' work


# ---- the pieces ---------------------------------------------------------------------------------

def test_sample_rows_draws_what_sample_draws_row_by_row(monkeypatch):
    """Greedy and sampled rows (temperature, top-k, top-p, seeded) in one batch: the same tokens
    as `sample` per row with identically seeded generators, each token's log-prob and row equal
    to the row's log-softmax, with one device->host transfer for the batch."""
    from engine.sampling import make_generator, sample, sample_rows

    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=1),
              SamplingParams(temperature=1.3, top_k=5, seed=2), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0, top_p=0.8, seed=3),
              SamplingParams(temperature=0.9, top_k=7, top_p=0.6, seed=4)]
    logits = 3 * torch.randn(len(params), 37, generator=torch.Generator().manual_seed(5))
    want = [sample(logits[i], p, make_generator(p, "cpu")) for i, p in enumerate(params)]
    gens = [make_generator(p, "cpu") for p in params]
    traffic = DeviceTraffic(monkeypatch)
    with traffic:
        got = sample_rows(logits, params, gens)
    assert got.tokens == want
    assert traffic.syncs == 1 and traffic.uploads == 0
    for i, tok in enumerate(want):
        row = torch.log_softmax(logits[i], -1)
        assert torch.equal(got.rows[i], row)
        assert got.logprobs[i] == float(row[tok])
    with pytest.raises(ValueError, match="M params"):
        sample_rows(logits, params[:-1], gens[:-1])


def test_to_device_packed_keeps_values_and_alignment(monkeypatch):
    """Parts of odd lengths (one empty) and mixed dtypes come back equal, in their dtypes, as
    views into one buffer made by one host->device copy, each starting PACK_ALIGN-byte aligned;
    a dtype it cannot pack is a clear error."""
    from engine.attention import PACK_ALIGN, to_device_packed

    g = torch.Generator().manual_seed(9)
    lengths = (7, 0, 33, 1, 16, 5)
    dtypes = (torch.int64, torch.int32, torch.int32, torch.int64, torch.int32, torch.int64)
    parts = [(torch.randint(-5, 1 << 30, (n,), generator=g).tolist(), dt) for n, dt in zip(lengths, dtypes)]
    parts[0][0][0] = 1 << 40  # needs int64
    traffic = DeviceTraffic(monkeypatch)
    with traffic:
        out = to_device_packed(parts, "cpu")
    assert traffic.uploads == 1
    base = out[0].untyped_storage().data_ptr()
    for t, (values, dtype) in zip(out, parts):
        assert t.dtype == dtype and t.tolist() == values
        assert t.untyped_storage().data_ptr() == base
        assert (t.storage_offset() * t.element_size()) % PACK_ALIGN == 0
    assert to_device_packed([], "cpu") == []
    # numpy arrays pack as they are (block tables come as int32 arrays)
    arr = np.arange(-3, 38, dtype=np.int32)
    got = to_device_packed([([5], torch.int64), (arr, torch.int32)], "cpu")
    assert got[1].tolist() == arr.tolist() and got[0].tolist() == [5]
    with pytest.raises(OverflowError):  # an id that does not fit int32 is an error, not a wrap
        to_device_packed([([1 << 40], torch.int32)], "cpu")
    with pytest.raises(TypeError, match="int32 / int64"):
        to_device_packed([([1, 2], torch.float32)], "cpu")
