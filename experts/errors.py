"""Errors of the expert store and the ESFT loader.

Each also derives from the builtin (or vmm) error a caller would naturally catch, so
`except KeyError` for an unknown adapter or `except vmm.OutOfMemoryError` for a full store work.
"""
from __future__ import annotations

import vmm


class ExpertStoreError(RuntimeError):
    """Base class of every error the expert store raises on its own."""


class UnknownAdapterError(ExpertStoreError, KeyError):
    """No adapter of that name is loaded."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class DuplicateAdapterError(ExpertStoreError, ValueError):
    """An adapter of that name is already loaded."""


class NoFreeSlotsError(ExpertStoreError, vmm.OutOfMemoryError):
    """A layer has fewer free adapter slots than the adapter needs, or every adapter row of the
    expert map is taken. The store is unchanged."""


class StoreOutOfMemoryError(ExpertStoreError, vmm.OutOfMemoryError):
    """The page pool could not supply the pages an adapter needs. The store is unchanged."""


class EsftFormatError(ValueError):
    """An ESFT adapter directory (or a checkpoint's expert weights) is malformed; the message
    says which file, key, layer or expert is wrong and how."""
