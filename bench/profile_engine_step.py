"""The engine's host work per decode step, measured on CPU (no GPU needed).

    PYTHONPATH=. python3 bench/profile_engine_step.py [--layers 32] [--context 256] [--profile]

Builds an Engine on a Llama-3.1-8B-structured model with small hidden sizes (engine/fidelity.py's
SMALL_LLAMA: GQA, 32 layers), three LoRA agents (r=8 on q and v, one shared v_proj A) and a few
sessions, fills each session with a context turn, then times decode-only steps of one round in
which every session decodes with a different agent. Two paths:

- kernel: the engine's kernel path (paged / Flash-LoRA attention, grouped LoRA GEMMs) with every
  kernel replaced by a stand-in that returns an empty tensor of the right shape, so what is left
  is the engine's own host work (what bounds TPOT on a GPU when the engine runs eagerly); the
  stand-ins count the kernel calls a step makes (each a Triton launch or two on a GPU);
- graph: the kernel path as CUDA graphs leave it: the engine's StepGraphs with a replay that
  does not run the forward (on a GPU it is one launch); what is left is the host planning
  around a graph;
- torch: the torch path as is (CPU math included).

Prints the median host time per decode step per (mode, path) and the aten ops one decode step
dispatches (each is a kernel launch or a dispatch on a GPU); with --ops which ops, with --profile
the top of a cProfile of the kernel path's decode steps.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

AGENTS = ("plan", "act", "reflect")


def _empty_like_q(q, *args, **kwargs):
    return torch.empty_like(q)


def _empty_shrink(x, lora_a, *args, **kwargs):
    return torch.empty(x.shape[0], lora_a.shape[-1], dtype=x.dtype, device=x.device)


def _empty_expand(y, lora_b, *args, out=None, **kwargs):
    if out is not None:
        return out
    return torch.empty(y.shape[0], lora_b.shape[-1], dtype=y.dtype, device=y.device)


KERNEL_CALLS: collections.Counter = collections.Counter()  # stand-in calls by kernel name


def _counted(name: str, fn):
    def call(*args, **kwargs):
        KERNEL_CALLS[name] += 1
        return fn(*args, **kwargs)
    return call


@contextlib.contextmanager
def stand_in_kernels():
    """The engine's kernel path with each kernel replaced by a shape-correct stand-in."""
    import kernels
    import kernels.lora as klora

    import engine.engine as eng_mod

    names = ("paged_attention_decode", "paged_attention_prefill", "flash_lora_decode",
             "flash_lora_prefill", "s2_attention_decode", "s2_attention_prefill_paged")
    saved = {n: getattr(kernels, n) for n in names}
    saved_lora = (klora.lora_shrink, klora.lora_expand)
    saved_policy = (eng_mod.use_kernels, eng_mod.kernel_impl)
    try:
        for n in names:
            setattr(kernels, n, _counted(n, _empty_like_q))
        klora.lora_shrink = _counted("lora_shrink", _empty_shrink)
        klora.lora_expand = _counted("lora_expand", _empty_expand)
        eng_mod.use_kernels = lambda t, dtype: True
        eng_mod.kernel_impl = lambda t: "triton"
        yield
    finally:
        for n, f in saved.items():
            setattr(kernels, n, f)
        klora.lora_shrink, klora.lora_expand = saved_lora
        eng_mod.use_kernels, eng_mod.kernel_impl = saved_policy


def build(mode: str, layers: int, tmp: str, sessions: int, context: int, seed: int = 0):
    from engine import Engine, SamplingParams
    from engine.builtin import save_random_lora
    from engine.config import config_from_dict
    from engine.fidelity import SMALL_LLAMA, random_model

    hf = dict(SMALL_LLAMA, num_hidden_layers=layers)
    cfg = config_from_dict(dict(hf))
    model = random_model(hf, "cpu", torch.float32, seed)
    eng = Engine(model, mode, 1 << 28, max_batched_tokens=4096)
    for i, a in enumerate(AGENTS):
        d = os.path.join(tmp, f"{a}-{layers}")
        if not os.path.isdir(d):
            save_random_lora(d, cfg, r=8, targets=("q_proj", "v_proj"), seed=i, a_seed=999, gain=0.2)
        eng.add_lora_agent(a, d)
    g = torch.Generator().manual_seed(seed)
    ss = [eng.new_session() for _ in range(sessions)]
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for i, s in enumerate(ss):
        eng.add_request(s, AGENTS[i % 3], torch.randint(0, cfg.vocab_size, (context,), generator=g).tolist(), params)
    while eng.has_unfinished():
        eng.step()
    return eng, ss, cfg


class OpCounter:
    """Counts the aten ops torch runs (on a GPU each is a kernel launch or at least a dispatch:
    the host work per op the engine pays when it runs eagerly)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        self.ops: dict[str, int] = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func.overloadpacket)
                counter.ops[name] = counter.ops.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.kernels: dict[str, int] = {}  # our kernels' calls (kernel path), each a Triton launch or more

    def total(self) -> int:
        return sum(self.ops.values())


def count_ops(eng, ss, cfg) -> OpCounter:
    """Aten ops of one decode-only step."""
    from engine import SamplingParams

    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    for i, s in enumerate(ss):
        eng.add_request(s, AGENTS[(i + 1) % 3], [1, 2, 3], params)
    eng.step()  # the prompts' prefill
    eng.step()  # a decode step: warm anything built on first use
    counter = OpCounter()
    KERNEL_CALLS.clear()
    with counter.mode:
        eng.step()
    counter.kernels = dict(KERNEL_CALLS)
    assert eng.last_step.decode_only
    while eng.has_unfinished():
        eng.step()
    return counter


def decode_round(eng, ss, cfg, tokens: int, profiler=None) -> list[float]:
    """One round (a short prompt, then `tokens` greedy tokens) on every session with a different
    agent each; returns the wall time of each decode-only step."""
    from engine import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    for i, s in enumerate(ss):
        eng.add_request(s, AGENTS[(i + 1) % 3], [1, 2, 3], params)
    times = []
    while eng.has_unfinished():
        if profiler is not None:
            profiler.enable()
        t0 = time.perf_counter()
        eng.step()
        dt = time.perf_counter() - t0
        if profiler is not None:
            profiler.disable()
        if eng.last_step.decode_only:
            times.append(dt)
    return times


def replay_stand_in():
    """The engine's StepGraphs with a replay that does not run the forward: what a CUDA-graph
    replay leaves on the host (graph key, input layout, the copies into the captured inputs)
    stays the engine's own code; the captured forward's output is handed back as a replay's."""
    from engine.graphs import StepGraphs, _Captured

    class ReplayStandIn(StepGraphs):
        def _capture(self, roots, forward):
            out = forward()
            return _Captured(roots, lambda: out.clone()), out.clone()

    return ReplayStandIn()


def measure(mode: str, path: str, args, tmp: str) -> tuple[float, OpCounter]:
    ctx = stand_in_kernels() if path in ("kernel", "graph") else contextlib.nullcontext()
    with ctx:
        eng, ss, cfg = build(mode, args.layers, tmp, args.sessions, args.context)
        if path == "graph":
            eng.graphs = replay_stand_in()
        decode_round(eng, ss, cfg, 4)  # warm
        ops = count_ops(eng, ss, cfg)
        prof = cProfile.Profile() if args.profile and path in ("kernel", "graph") else None
        times = decode_round(eng, ss, cfg, args.tokens, prof)
    if prof is not None:
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.sort_stats("cumulative").print_stats(45)
        stats.sort_stats("tottime").print_stats(30)
        print(buf.getvalue())
    if args.ops:
        top = sorted(ops.ops.items(), key=lambda kv: -kv[1])[:25]
        print("  aten ops per decode step:", ", ".join(f"{n} {c}" for n, c in top))
    return statistics.median(times), ops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--modes", default="base_lr_shared,base_shared")
    ap.add_argument("--paths", default="kernel,torch")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--ops", action="store_true", help="list the aten ops of one decode step")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="vmweave-step-") as tmp:
        for mode in args.modes.split(","):
            for path in args.paths.split(","):
                med, ops = measure(mode, path, args, tmp)
                print(f"{mode:<16} {path:<7} layers={args.layers} sessions={args.sessions} "
                      f"context={args.context}: {1e3 * med:.2f} ms / decode step "
                      f"({1e3 * med / args.layers:.3f} ms / layer), {ops.total()} aten ops / step"
                      + (f", {sum(ops.kernels.values())} kernel calls / step "
                         f"({', '.join(f'{n} {c}' for n, c in sorted(ops.kernels.items()))})"
                         if path != "torch" else ""), flush=True)


if __name__ == "__main__":
    main()
