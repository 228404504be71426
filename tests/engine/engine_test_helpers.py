"""Helpers shared by the engine's own test files."""
from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's ops are microseconds; on a shared 2-core box torch's thread pool turns
    each into milliseconds of contention. One thread for these tests, restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


AGENTS = ("plan", "act", "reflect")


def shared_a_loras(root, a_seed: int, gain: float) -> dict[str, str]:
    """PEFT directories under `root` for plan / act / reflect on the built-in tiny model: r=8 on
    q and v, one shared v_proj A (LRAgent's setting, as in the benchmark)."""
    from engine.builtin import builtin_config, save_random_lora

    c = builtin_config("tiny")
    return {a: save_random_lora(str(root / a), c, r=8, seed=i + 1, a_seed=a_seed, gain=gain)
            for i, a in enumerate(AGENTS)}


def prompt(n: int, seed: int) -> list[int]:
    """A reproducible random prompt of `n` token ids below 512."""
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# Tests that drive the engine's kernel path on CPU tensors: Triton's interpreter runs them in
# CPU CI; on a GPU machine (interpreter off) the compiled kernels are covered by the GPU tests.
cpu_kernels = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="the kernel path on CPU tensors needs TRITON_INTERPRET=1 (set by tests/conftest.py without a GPU)")
