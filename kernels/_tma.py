"""TMA tensor descriptors built at the host cost of a copy.

Triton's descriptor classes (`triton.tools.tensor_descriptor.TensorDescriptor`, Gluon's
`TensorDescriptor`) check every field on construction: 6-7 us a descriptor on a CPU of the CI
kind, two or three of them a decode call. Between calls only the base tensor changes (a cache
has one shape, strides and box for its whole life), so `descriptor` checks each (class, dtype,
shape, strides, box, layout) once, through the class itself, keeps the checked fields without a
base tensor (it holds no memory alive), and for a later base copies them and checks only what
depends on the base: its 16-byte alignment.
"""
from __future__ import annotations

import torch

__all__ = ["descriptor"]

_MAX_TEMPLATES = 256
_TEMPLATES: dict = {}


def descriptor(cls, base: torch.Tensor, shape, strides, block_shape, *layout):
    """``cls(base, shape, strides, block_shape, *layout)``, checked by `cls` the first time its
    other fields occur. Raises as `cls` would for a base off 16-byte alignment."""
    key = (cls, base.dtype, tuple(shape), tuple(strides), tuple(block_shape), *layout)
    try:
        template = _TEMPLATES.get(key)
    except TypeError:  # an unhashable layout (some Triton): no template
        return cls(base, list(shape), list(strides), list(block_shape), *layout)
    if template is None:
        desc = cls(base, list(shape), list(strides), list(block_shape), *layout)
        template = cls.__new__(cls)
        template.__dict__.update(desc.__dict__, base=None)
        if len(_TEMPLATES) >= _MAX_TEMPLATES:
            _TEMPLATES.clear()
        _TEMPLATES[key] = template
        return desc
    if base.data_ptr() & 15:
        raise AssertionError("base must be 16-byte aligned")  # (as Triton's own check raises)
    desc = cls.__new__(cls)
    desc.__dict__.update(template.__dict__, base=base)
    return desc
