"""kernels._relaunch: a compiled kernel launched again without Triton's argument binding, only
where Triton would have picked that same compiled kernel.

On CPU a stand-in for a JIT function records which way each launch went (through Triton, or
direct) and with which values; on the GPU the attention kernels run through it for real, against
the float64 reference, with the inputs changed in every way Triton specialises on.
"""
from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from kernels import _relaunch as R


class _FakeCompiled:
    def __init__(self, log):
        self.log, self.function, self.packed_metadata = log, "fn", "meta"

    def run(self, g0, g1, g2, stream, function, packed, launch_meta, enter, exit_, *vals):
        self.log.append(("direct", (g0, g1, g2), vals))

    def launch_metadata(self, grid, stream, *vals):
        return None


class _FakeJit:
    """Parameters (A, B, n, BLOCK, FLAG=True): two pointers, an int, two constexprs."""

    def __init__(self):
        self.log = []
        names = ("A", "B", "n", "BLOCK", "FLAG")
        defaults = (inspect.Parameter.empty,) * 4 + (True,)
        self.params = [SimpleNamespace(name=n, default=d) for n, d in zip(names, defaults)]
        self.arg_names = list(names)

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.log.append(("triton", grid, args, meta))
            return _FakeCompiled(self.log)
        return launch


@pytest.fixture
def fake(monkeypatch):
    """A fake JIT function that `relaunch` takes for a real one, on device 0, stream 7."""
    monkeypatch.setattr(R, "_JITFunction", _FakeJit)
    active = SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: 7)
    monkeypatch.setattr(R, "_driver", SimpleNamespace(active=active))
    return _FakeJit()


def test_same_key_launches_directly_with_every_parameter_in_order(fake):
    a, b = torch.randn(37), torch.randn(5)
    cache: dict = {}
    for _ in range(3):
        R.relaunch(fake, (3, 2), (a, b), (11,), {"BLOCK": 64, "num_warps": 4}, cache)
    ways = [e[0] for e in fake.log]
    assert ways == ["triton", "direct", "direct"]
    assert fake.log[0][2] == (a, b, 11) and fake.log[0][3] == {"BLOCK": 64, "num_warps": 4}
    # the grid padded to three dims; constexprs in place, FLAG at its default
    assert fake.log[1][1] == (3, 2, 1)
    vals = fake.log[1][2]
    assert vals[0] is a and vals[1] is b and vals[2:] == (11, 64, True)


def test_what_triton_specialises_on_goes_through_triton(fake):
    """A new dtype, a pointer off 16-byte alignment, an int of another class, another grid or
    device: each a launch through Triton (which may compile another kernel), kept in turn."""
    a, b = torch.randn(64), torch.randn(64)
    cache: dict = {}

    def go(x, y, *, n=5, grid=(4,)):
        R.relaunch(fake, grid, (x, y, n), (), {"BLOCK": 16}, cache)
        return fake.log[-1][0]

    assert go(a, b) == "triton"
    assert go(a, b) == "direct"
    assert go(a.double(), b) == "triton"
    assert go(a[1:], b) == "triton"          # 4 bytes past an aligned start
    assert go(a[4:], b) == "direct"          # 16 bytes past: aligned, the first kernel's key
    assert go(a, b, n=7) == "direct"         # another int of the same class
    assert go(a, b, n=32) == "triton"        # a multiple of 16
    assert go(a, b, n=48) == "direct"
    assert go(a, b, n=1) == "triton"         # 1: a constexpr to Triton
    assert go(a, b, n=1 << 31) == "triton"   # i64
    assert go(a, b, grid=(5,)) == "triton"
    assert go(a, b, n=1.5) == "triton" and go(a, b, n=2.5) == "direct"  # floats: by type only
    R._driver.active.get_current_device = lambda: 1
    assert go(a, b) == "triton"
    assert len(cache) == 9


def test_int_classes_are_tritons():
    """Two ints share a key only where Triton specialises them alike (this Triton's own
    specialisation, on a host of any kind: no GPU needed to ask it)."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend
    except ImportError:
        pytest.skip("this Triton specialises elsewhere")
    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    values = [0, 1, 2, 15, 16, 17, 31, 32, 4096, 4097, -1, -16, -17, (1 << 31) - 1, 1 << 31, -(1 << 31),
              -(1 << 31) - 1, (1 << 31) + 16, (1 << 63) - 1, 1 << 63, (1 << 63) + 16, (1 << 64) - 1]
    for x in values:
        for y in values:
            if R._arg_key(x) == R._arg_key(y):
                assert native_specialize_impl(backend, x, False, True, True) == \
                    native_specialize_impl(backend, y, False, True, True), (x, y)


def test_launch_keeps_a_cache_per_constexpr_set(fake, monkeypatch):
    monkeypatch.setattr(R, "_CACHES", {})
    a, b = torch.randn(8), torch.randn(8)
    for block in (16, 32, 16, 32):
        R.launch(fake, (2,), (a, b, 5), {"BLOCK": block})
    assert [e[0] for e in fake.log] == ["triton", "triton", "direct", "direct"]
    assert fake.log[3][2][3] == 32 and len(R._CACHES) == 2


def test_unknown_arguments_and_stand_ins_always_go_through_triton(fake):
    cache: dict = {}
    for _ in range(2):
        R.relaunch(fake, (1,), (torch.randn(3), object(), 1), (), {"BLOCK": 16}, cache)
    assert [e[0] for e in fake.log] == ["triton", "triton"] and not cache

    class Recorder:  # not a JIT function (a test's launch recorder, the interpreter's kernels)
        calls = 0

        def __getitem__(self, grid):
            def launch(*args, **meta):
                Recorder.calls += 1
                return _FakeCompiled([])
            return launch

    for _ in range(3):
        R.relaunch(Recorder(), (1,), (torch.randn(3),), (), {}, cache)
    assert Recorder.calls == 3 and not cache


def test_a_full_cache_starts_afresh(fake, monkeypatch):
    monkeypatch.setattr(R, "_MAX_ENTRIES", 3)
    cache: dict = {}
    for n in (0, 1, 2, 1 << 31, (1 << 31) + 1):  # five classes of int: five keys
        R.relaunch(fake, (1,), (torch.randn(2), torch.randn(2), n), (), {"BLOCK": 16}, cache)
    assert len(cache) == 2  # cleared at the fourth key: the fourth and fifth kept


# ---------------------------------------------------------------- GPU: the attention kernels
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bs, lora", [(128, False), (16, False), (128, True)])
def test_gpu_attention_relaunch_matches_reference(rng_seed, monkeypatch, bs, lora):
    """Repeated decode calls of one launch plan go direct after the first (one launch through
    Triton's binding per distinct specialisation), and every call matches the reference: fresh
    data, q off 16-byte alignment, fp16 after bf16 (the same plan: its key holds the element
    size only). Blocks of 128 (TMA descriptors), 16 (per-thread loads or the ring kernel) and
    Flash-LoRA."""
    from triton.runtime.jit import JITFunction

    from kernels import attention as A
    from kernels.attention import flash_lora_decode, paged_attention_decode
    from kernels.attention_ref import flash_lora_decode_ref, paged_attention_decode_ref

    through_triton = []
    real_run = JITFunction.run

    def counting_run(self, *args, **kwargs):
        through_triton.append(self)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "run", counting_run)
    A._launch_plan.cache_clear()
    hq, hkv, d, lens = 32, 8, 128, [1000, 517, 1]
    width = -(-max(lens) // bs)
    nb = len(lens) * width + 3
    table = torch.randperm(nb, device="cuda")[:len(lens) * width].view(len(lens), width).int()
    sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
    ids = torch.tensor([0, -1, 1], dtype=torch.int32, device="cuda")
    runs = []
    for dtype, offset in ((torch.bfloat16, 0), (torch.bfloat16, 0), (torch.bfloat16, 1), (torch.bfloat16, 0),
                          (torch.float16, 0), (torch.float16, 0)):
        k = torch.randn(nb, bs, hkv, d, device="cuda").to(dtype)
        v = torch.randn_like(k)
        flat = torch.randn(len(lens) * hq * d + 8, device="cuda").to(dtype)
        q = flat[offset:offset + len(lens) * hq * d].view(len(lens), hq, d)  # offset 1: 2 bytes off
        out = torch.full_like(q, float("nan"))
        before = len(through_triton)
        if lora:
            lr = torch.randn(nb, bs, 16, device="cuda").to(dtype)
            lb = (torch.randn(2, hkv, 16, d, device="cuda") / 4).to(dtype)
            flash_lora_decode(q, k, v, lr, table, lb, ids, table, sl, 0.09, out=out, validate=False)
            ref = flash_lora_decode_ref(q, k, v, lr, table, lb, ids, table, sl, 0.09)
        else:
            paged_attention_decode(q, k, v, table, sl, 0.09, out=out, validate=False)
            ref = paged_attention_decode_ref(q, k, v, table, sl, 0.09)
        torch.cuda.synchronize()
        assert not out.isnan().any()
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < 1.5e-2, (dtype, offset, err)
        runs.append(len(through_triton) - before)
    # through Triton: the first call, q misaligned, fp16's first; directly: every repeat
    assert runs[0] >= 1 and runs[2] >= 1 and runs[4] >= 1, runs
    assert runs[1] == runs[3] == runs[5] == 0, runs
