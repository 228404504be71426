"""CUDA backend: the driver's virtual memory management through cuda.bindings.driver.

Every driver call's CUresult is checked; a failure raises VmmError (OutOfMemoryError for
CUDA_ERROR_OUT_OF_MEMORY) naming the call and the error.
"""
from __future__ import annotations

from typing import Any

import torch

from .backend import Backend
from .errors import OutOfMemoryError, VmmError


def _driver():
    try:
        from cuda.bindings import driver as cu
    except ImportError as e:  # pragma: no cover - cuda-python is a hard dependency
        raise VmmError(f"the cuda vmm backend needs cuda-python (cuda.bindings): {e}") from e
    return cu


class _CudaBuffer:
    """Exposes a device address range through __cuda_array_interface__; torch keeps this object,
    hence `owner`, alive for as long as the tensor built from it."""

    def __init__(self, addr: int, nbytes: int, owner: object) -> None:
        self.owner = owner
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (addr, False), "version": 3, "strides": None,
        }


class CudaBackend(Backend):
    name = "cuda"
    # cuMemUnmap must cover exactly what one cuMemMap mapped, so pages are unmapped singly.
    unmap_per_mapping = True

    def __init__(self, index: int) -> None:
        cu = _driver()
        self._cu = cu
        self._success = cu.CUresult.CUDA_SUCCESS
        self.index = index
        self.device = torch.device("cuda", index)
        # torch creates (and makes current) the primary context we then share.
        with torch.cuda.device(index):
            torch.zeros(1, device=self.device)
            err, ctx = cu.cuCtxGetCurrent()
        # The primary context's handle, to recognise it as the thread's current one (synchronize);
        # 0 if it could not be read (the wait then always goes through torch).
        self._ctx = int(ctx) if err == self._success else 0
        self._ctx_handle = ctx if self._ctx else None
        try:
            self._check("cuInit", cu.cuInit(0))
        except VmmError:
            raise
        except Exception as e:
            raise VmmError(f"cuInit failed: {e}") from e
        self._ctx_sync = self._context_wait()
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = index
        self._prop = prop
        desc = cu.CUmemAccessDesc()
        desc.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        desc.location.id = index
        desc.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = [desc]
        # Page address -> its CUdeviceptr, for the pages of live reservations: the binding builds
        # a CUdeviceptr from an int on every call given one, three a page mapped and unmapped
        # (0.34-0.40 us of the allocator's ~3 us over the raw calls on an H200 host of the pool,
        # bench/RESULTS.md Run AJ); a dict lookup costs a third of a build.
        self._ptrs: dict[int, Any] = {}
        gran = self._check("cuMemGetAllocationGranularity", cu.cuMemGetAllocationGranularity(
            prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED))
        self.granularity = int(gran)

    def _context_wait(self) -> Any:
        """The driver's wait for one named context, `cuCtxSynchronize_v2` (CUDA 12.9+ drivers),
        if it answers for ours here (a wait for whatever is queued, harmless at start); else
        None."""
        wait = getattr(self._cu, "cuCtxSynchronize_v2", None)
        if wait is None or self._ctx_handle is None:
            return None
        try:
            ok = wait(self._ctx_handle)[0] == self._success
        except Exception:  # the binding has it, the driver does not
            return None
        return wait if ok else None

    def _check(self, call: str, result: Any, nbytes: int | None = None, addr: int | None = None) -> Any:
        """The call's value(s), or its error raised. Success is compared with a cached value and
        the error text (`nbytes`, `addr`) formatted only on failure: map, set_access and unmap
        run it a few times a page mapped, on the allocator's hot path."""
        err = result[0] if isinstance(result, tuple) else result
        if err != self._success:
            cu = self._cu
            detail = "" if nbytes is None else f"{nbytes} bytes" + ("" if addr is None else f" at {addr:#x}")
            try:
                name = cu.cuGetErrorName(err)[1].decode()
            except Exception:
                name = str(err)
            cls = OutOfMemoryError if err == cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY else VmmError
            raise cls(f"{call} failed{' (' + detail + ')' if detail else ''}: {name}")
        if isinstance(result, tuple):
            return result[1] if len(result) == 2 else result[1:] if len(result) > 2 else None
        return None

    def reserve(self, nbytes: int, alignment: int) -> int:
        ptr = self._check("cuMemAddressReserve", self._cu.cuMemAddressReserve(nbytes, alignment, 0, 0), nbytes)
        return int(ptr)

    def free_reservation(self, addr: int, nbytes: int) -> None:
        self._check("cuMemAddressFree", self._cu.cuMemAddressFree(addr, nbytes), nbytes, addr)
        ptrs = self._ptrs
        # list() copies the keys in one step: pools in other threads may add theirs meanwhile.
        for a in [a for a in list(ptrs) if addr <= a < addr + nbytes]:
            ptrs.pop(a, None)

    def _ptr(self, addr: int) -> Any:
        """The CUdeviceptr of a page address, built once while its reservation lives (dropped
        with it only to bound the dict: the object is the address's value, never stale)."""
        ptr = self._ptrs[addr] = self._cu.CUdeviceptr(addr)
        return ptr

    def create(self, nbytes: int) -> Any:
        return self._check("cuMemCreate", self._cu.cuMemCreate(nbytes, self._prop, 0), nbytes)

    def release(self, handle: Any) -> None:
        self._check("cuMemRelease", self._cu.cuMemRelease(handle))

    # map, set_access, unmap and synchronize run on the allocator's hot path (a few times a
    # page mapped): each compares its CUresult inline and leaves the message to `_check`.
    def map(self, addr: int, nbytes: int, handle: Any) -> None:
        ptr = self._ptrs.get(addr) or self._ptr(addr)
        result = self._cu.cuMemMap(ptr, nbytes, 0, handle, 0)
        if result[0] != self._success:
            self._check("cuMemMap", result, nbytes, addr)

    def set_access(self, addr: int, nbytes: int) -> None:
        ptr = self._ptrs.get(addr) or self._ptr(addr)
        result = self._cu.cuMemSetAccess(ptr, nbytes, self._access, 1)
        if result[0] != self._success:
            self._check("cuMemSetAccess", result, nbytes, addr)

    def unmap(self, addr: int, nbytes: int) -> None:
        ptr = self._ptrs.get(addr) or self._ptr(addr)
        result = self._cu.cuMemUnmap(ptr, nbytes)
        if result[0] != self._success:
            self._check("cuMemUnmap", result, nbytes, addr)

    def synchronize(self) -> None:
        # The driver's wait for our primary context by name (`cuCtxSynchronize_v2`): one call,
        # right whatever context the calling thread has current, or none. Where the driver lacks
        # it, cuCtxSynchronize when our context is the thread's current one (read back with
        # cuCtxGetCurrent), else torch.cuda.synchronize(device), which swaps ours in around the
        # wait. Host us on an H200 host of the pool, idle device, in turn: the named wait 1.07,
        # cuCtxSynchronize 0.99 + the query 0.34, torch's wait 5.29 (bench/RESULTS.md, Run AJ);
        # unmap waits once a page.
        wait = self._ctx_sync
        if wait is not None:
            result = wait(self._ctx_handle)
            if result[0] != self._success:
                self._check("cuCtxSynchronize_v2", result)
            return
        cu = self._cu
        err, ctx = cu.cuCtxGetCurrent()
        if self._ctx and err == self._success and int(ctx) == self._ctx:
            result = cu.cuCtxSynchronize()
            if result[0] != self._success:
                self._check("cuCtxSynchronize", result)
        else:
            torch.cuda.synchronize(self.device)

    def tensor(self, addr: int, nbytes: int, owner: object, start_mapped: bool = True) -> torch.Tensor:
        if start_mapped:
            return torch.as_tensor(_CudaBuffer(addr, nbytes, owner), device=self.device)
        # torch resolves the device of an array-interface pointer with cudaPointerGetAttributes,
        # which does not know a reserved but unmapped address; a storage built with the device
        # given skips that lookup. Such a storage holds no reference to `owner`.
        storage = torch._C._construct_storage_from_data_pointer(addr, self.device, nbytes)
        return torch.empty(0, dtype=torch.uint8, device=self.device).set_(storage, 0, (nbytes,), (1,))
