"""Helpers shared by the engine's own test files."""
from __future__ import annotations

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


def prompt(n: int, seed: int) -> list[int]:
    """A reproducible random prompt of `n` token ids below 512."""
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
