"""Errors raised by the allocator.

Every bad request raises before any state changes, so callers may catch these and go on.
"""
from __future__ import annotations


class VmmError(Exception):
    """A request the allocator cannot honour (bad range, unmapped view, closed object) or a
    driver call that failed; the message names what was wrong."""


class OutOfMemoryError(VmmError):
    """The page pool cannot supply the pages a request needs (its capacity is reached, or the
    driver itself is out of memory). Arena and pool are left exactly as they were."""
