"""Shared test setup.

Without a usable CUDA device every Triton kernel runs through Triton's interpreter on CPU
tensors, so TRITON_INTERPRET must be set before anything imports triton.
"""
from __future__ import annotations

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> str:
    """The device kernels are tested on: cuda when usable, else cpu (Triton interpreter)."""
    return DEVICE


@pytest.fixture
def rng_seed(request) -> int:
    """A fresh seed per test run (printed on failure) so inputs are never the same twice."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    return seed
