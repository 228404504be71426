"""Errors raised by cachepool."""
from __future__ import annotations


class CachePoolError(Exception):
    """Base class of every error cachepool raises on purpose."""


class CacheFullError(CachePoolError, MemoryError):
    """Not enough blocks (or not enough physical pages behind them) for a request.

    Raised before anything changes: blocks already handed out keep their contents, and the
    request can be retried after other sequences are freed. Schedulers should ask
    `can_allocate` / `can_append` first and treat this as a bug-free "no".
    """
