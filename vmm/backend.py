"""Backend selection and the interface both backends implement.

A backend is a thin, stateless-ish wrapper over the platform's virtual-memory calls; all
bookkeeping (refcounts, free lists, rollback) lives in `PagePool` / `VirtualArena`, so the two
backends share every rule and the host backend tests the real allocator logic.
"""
from __future__ import annotations

import os
import threading
from typing import Any

import torch

from .errors import VmmError

BACKEND_NAMES = ("cuda", "host")
ENV_VAR = "VMWEAVE_BACKEND"


class Backend:
    """Driver-level operations on one device. Handles are opaque to callers.

    Attributes:
        name: "cuda" or "host".
        granularity: the smallest mappable unit in bytes; page sizes must be multiples of it.
        device: the torch device views live on (cuda:N or cpu).
        unmap_per_mapping: True when the driver can only unmap whole single mappings (CUDA), so
            ranges of several pages are unmapped one page at a time.
    """

    name: str
    granularity: int
    device: torch.device
    unmap_per_mapping: bool = False

    def reserve(self, nbytes: int, alignment: int) -> int:
        raise NotImplementedError

    def free_reservation(self, addr: int, nbytes: int) -> None:
        raise NotImplementedError

    def create(self, nbytes: int) -> Any:
        raise NotImplementedError

    def release(self, handle: Any) -> None:
        raise NotImplementedError

    def map(self, addr: int, nbytes: int, handle: Any) -> None:
        raise NotImplementedError

    def set_access(self, addr: int, nbytes: int) -> None:
        raise NotImplementedError

    def unmap(self, addr: int, nbytes: int) -> None:
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait for all work that may touch mapped memory (before it is unmapped)."""

    def tensor(self, addr: int, nbytes: int, owner: object, start_mapped: bool = True) -> torch.Tensor:
        """A zero-copy uint8 tensor of `nbytes` at `addr` that keeps `owner` alive (on cuda only
        when `start_mapped`: the first byte is mapped memory)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<vmm {self.name} backend on {self.device}, granularity {self.granularity}>"


_CACHE: dict[tuple[str, int], Backend] = {}
_CACHE_LOCK = threading.Lock()


def _cuda_usable() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # a broken driver install must fall back to host, not crash the import
        return False


def get_backend(name: str | None = None, device: int | str | torch.device | None = None) -> Backend:
    """The backend `name` ("cuda" or "host") for `device`, created once and cached.

    With `name=None` the environment variable VMWEAVE_BACKEND decides if set, else "cuda" when a
    CUDA device is usable and "host" otherwise. `device` picks the CUDA device (index, "cuda:N"
    or torch.device; default: torch's current device) and is ignored by the host backend.

    Raises:
        VmmError: unknown name, or "cuda" asked for where no CUDA device is usable.
    """
    if name is None:
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env:
            if env not in BACKEND_NAMES:
                raise VmmError(f"{ENV_VAR}={env!r} is not a backend; use one of {BACKEND_NAMES}")
            name = env
        else:
            name = "cuda" if _cuda_usable() else "host"
    if not isinstance(name, str) or name.lower() not in BACKEND_NAMES:
        raise VmmError(f"unknown vmm backend {name!r}; use one of {BACKEND_NAMES}")
    name = name.lower()
    if name == "host":
        index = -1
    else:
        if not _cuda_usable():
            raise VmmError("the cuda vmm backend was requested but no CUDA device is usable "
                           "(torch.cuda.is_available() is False); use the host backend "
                           f"(get_backend('host') or {ENV_VAR}=host)")
        index = _cuda_index(device)
    with _CACHE_LOCK:
        be = _CACHE.get((name, index))
        if be is None:
            if name == "host":
                from ._host import HostBackend
                be = HostBackend()
            else:
                from ._cuda import CudaBackend
                be = CudaBackend(index)
            _CACHE[(name, index)] = be
        return be


def _cuda_index(device: int | str | torch.device | None) -> int:
    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        index = device
    else:
        dev = torch.device(device)
        if dev.type != "cuda":
            raise VmmError(f"the cuda backend needs a cuda device, got {dev}")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
    if not 0 <= index < torch.cuda.device_count():
        raise VmmError(f"cuda device {index} does not exist ({torch.cuda.device_count()} visible)")
    return index
