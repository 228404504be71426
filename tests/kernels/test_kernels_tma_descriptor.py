"""kernels._tma.descriptor: a descriptor from a checked template equals the one Triton's class
builds, still refuses what the class refuses, and keeps no tensor alive."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels import _tma


def fields(d) -> dict:
    return {k: (v.data_ptr(), v.shape) if isinstance(v, torch.Tensor) else v for k, v in vars(d).items()}


@pytest.fixture(autouse=True)
def no_templates(monkeypatch):
    monkeypatch.setattr(_tma, "_TEMPLATES", {})


def test_descriptor_equals_the_class_own_on_every_new_base():
    for _ in range(3):  # the first through the class, the rest from its template
        base = torch.randn(7, 48, 64).to(torch.bfloat16)
        d = _tma.descriptor(TensorDescriptor, base, (7, 48, 64), (48 * 64, 64, 1), (1, 16, 64))
        ref = TensorDescriptor(base, [7, 48, 64], [48 * 64, 64, 1], [1, 16, 64])
        assert type(d) is TensorDescriptor and d.base is base
        assert fields(d) == fields(ref)
    assert len(_tma._TEMPLATES) == 1


def test_descriptor_refuses_what_the_class_refuses():
    base = torch.randn(7 * 48 * 64 + 8).to(torch.bfloat16)
    good = base[:7 * 48 * 64].view(7, 48, 64)
    _tma.descriptor(TensorDescriptor, good, (7, 48, 64), (48 * 64, 64, 1), (1, 16, 64))
    off = base[1:1 + 7 * 48 * 64].view(7, 48, 64)  # 2 bytes off: the template's fields, a bad base
    with pytest.raises(AssertionError, match="16-byte aligned"):
        _tma.descriptor(TensorDescriptor, off, (7, 48, 64), (48 * 64, 64, 1), (1, 16, 64))
    with pytest.raises(AssertionError, match="16-byte aligned"):  # a row pitch of 6 bytes
        _tma.descriptor(TensorDescriptor, good, (7, 48, 3), (48 * 3, 3, 1), (1, 16, 16))


def test_templates_hold_no_tensor():
    base = torch.randn(5, 16, 32)
    ref = weakref.ref(base)
    d = _tma.descriptor(TensorDescriptor, base, (5, 16, 32), (16 * 32, 32, 1), (1, 16, 32))
    del base, d
    gc.collect()
    assert ref() is None
    assert all(t.base is None for t in _tma._TEMPLATES.values())
