"""The engine's per-step host work: what is derived from the adapters is built once and reused
(and rebuilt when the adapter set changes), a decode step's syncs and host->device copies are
bounded and do not grow with the context, and none of it changes results.

The kernel path runs here with the kernels' torch implementations (`impl="torch"`), so every
piece of the engine's kernel-path plumbing (grouping, block tables, stacked LoRA weights,
Flash-LoRA's B stacks) runs at CPU speed; the kernels themselves are checked in tests/kernels.
"""
from __future__ import annotations

import pytest
import torch

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


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


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
