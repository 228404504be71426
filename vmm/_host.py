"""Host backend: the CUDA VMM model on Linux virtual memory.

reserve = anonymous PROT_NONE mapping; physical page = a memfd file of page size; map = MAP_FIXED
MAP_SHARED of that file (so mapping one file twice aliases, exactly like a CUDA handle mapped
twice); unmap = re-reserve the range PROT_NONE; release = close the fd.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import resource
import sys

import numpy as np
import torch

from .backend import Backend
from .errors import OutOfMemoryError, VmmError

# Linux values, identical on x86_64 and aarch64.
_PROT_NONE, _PROT_RW = 0x0, 0x1 | 0x2
_MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED, _MAP_ANONYMOUS, _MAP_NORESERVE = 0x01, 0x02, 0x10, 0x20, 0x4000
_MAP_FAILED = ctypes.c_void_p(-1).value
_RESERVE_FLAGS = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def _raise_errno(call: str, detail: str) -> None:
    err = ctypes.get_errno()
    cls = OutOfMemoryError if err == 12 else VmmError  # ENOMEM
    raise cls(f"{call} failed ({detail}): {os.strerror(err)} (errno {err})")


class _HostBuffer:
    """Exposes a raw address range through the numpy array interface; the numpy array (and the
    torch tensor built on it) keeps this object, hence `owner`, alive."""

    def __init__(self, addr: int, nbytes: int, owner: object) -> None:
        self.owner = owner
        self.__array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (addr, False), "version": 3}


class HostBackend(Backend):
    name = "host"
    unmap_per_mapping = False

    def __init__(self) -> None:
        if not sys.platform.startswith("linux") or not hasattr(os, "memfd_create"):
            raise VmmError("the host vmm backend needs Linux (mmap + memfd_create)")
        self._libc = _libc()
        self.granularity = mmap.PAGESIZE
        self.device = torch.device("cpu")
        _raise_fd_limit()

    def _mmap(self, addr: int, nbytes: int, prot: int, flags: int, fd: int, call: str) -> int:
        got = self._libc.mmap(addr or None, nbytes, prot, flags, fd, 0)
        if got is None or got == _MAP_FAILED:
            _raise_errno(call, f"{nbytes} bytes at {addr:#x}")
        if addr and got != addr:  # MAP_FIXED never moves; anything else is a broken libc
            raise VmmError(f"{call}: mmap placed {nbytes} bytes at {got:#x} instead of {addr:#x}")
        return got

    def reserve(self, nbytes: int, alignment: int) -> int:
        # Over-reserve then trim both ends so the start honours `alignment`.
        extra = max(alignment - self.granularity, 0)
        base = self._mmap(0, nbytes + extra, _PROT_NONE, _RESERVE_FLAGS, -1, "reserve")
        start = -(-base // alignment) * alignment
        if start > base:
            self._libc.munmap(base, start - base)
        tail = base + nbytes + extra - (start + nbytes)
        if tail:
            self._libc.munmap(start + nbytes, tail)
        return start

    def free_reservation(self, addr: int, nbytes: int) -> None:
        if self._libc.munmap(addr, nbytes) != 0:
            _raise_errno("munmap", f"{nbytes} bytes at {addr:#x}")

    def create(self, nbytes: int) -> int:
        try:
            fd = os.memfd_create("vmweave-page", os.MFD_CLOEXEC)
        except OSError as e:
            cls = OutOfMemoryError if e.errno in (12, 24, 23) else VmmError  # ENOMEM, EMFILE, ENFILE
            raise cls(f"memfd_create failed: {e}") from e
        try:
            os.ftruncate(fd, nbytes)
        except OSError as e:
            os.close(fd)
            raise VmmError(f"ftruncate of a page to {nbytes} bytes failed: {e}") from e
        return fd

    def release(self, handle: int) -> None:
        os.close(handle)

    def map(self, addr: int, nbytes: int, handle: int) -> None:
        self._mmap(addr, nbytes, _PROT_RW, _MAP_SHARED | _MAP_FIXED, handle, "map")

    def set_access(self, addr: int, nbytes: int) -> None:
        pass  # the shared mapping is created read-write already

    def unmap(self, addr: int, nbytes: int) -> None:
        self._mmap(addr, nbytes, _PROT_NONE, _RESERVE_FLAGS | _MAP_FIXED, -1, "unmap")

    def tensor(self, addr: int, nbytes: int, owner: object, start_mapped: bool = True) -> torch.Tensor:
        return torch.from_numpy(np.asarray(_HostBuffer(addr, nbytes, owner)))


def _raise_fd_limit() -> None:
    # Every host page is an open fd, so the default soft limit (often 1024) is far too small.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (hard, 1 << 20, 1 << 16):
        if target == resource.RLIM_INFINITY or (soft != resource.RLIM_INFINITY and target <= soft):
            continue
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return
        except (ValueError, OSError):
            continue
