"""Backend selection: names, environment override, caching, clear errors."""
from __future__ import annotations

import enum

import pytest
import torch

import vmm


def test_host_backend_properties_and_cache():
    be = vmm.get_backend("host")
    assert be.name == "host" and be.device == torch.device("cpu")
    assert be.granularity > 0 and be.granularity & (be.granularity - 1) == 0
    assert vmm.get_backend("HOST") is be and vmm.get_backend("host", device=3) is be


def test_env_overrides_default(monkeypatch):
    monkeypatch.setenv("VMWEAVE_BACKEND", "host")
    assert vmm.get_backend().name == "host"
    monkeypatch.setenv("VMWEAVE_BACKEND", "tpu")
    with pytest.raises(vmm.VmmError, match="VMWEAVE_BACKEND"):
        vmm.get_backend()
    monkeypatch.delenv("VMWEAVE_BACKEND")
    assert vmm.get_backend().name == ("cuda" if torch.cuda.is_available() else "host")


def test_unknown_backend_name():
    with pytest.raises(vmm.VmmError, match="unknown vmm backend"):
        vmm.get_backend("rocm")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")
def test_cuda_without_device_is_a_clear_error(monkeypatch):
    with pytest.raises(vmm.VmmError, match="no CUDA device is usable"):
        vmm.get_backend("cuda")
    monkeypatch.setenv("VMWEAVE_BACKEND", "cuda")
    with pytest.raises(vmm.VmmError, match="no CUDA device is usable"):
        vmm.get_backend()


@pytest.fixture
def cu():
    """cuda-python's driver module (it imports without a driver; no call is made through it)."""
    from vmm._cuda import _driver

    try:
        return _driver()
    except Exception:
        pytest.skip("cuda-python is not installed")


def _bare_backend():
    """A CudaBackend without its __init__ (no device, no context): each test sets the fields
    (driver, status, context) its calls read, a stand-in driver among them."""
    from vmm._cuda import CudaBackend

    return object.__new__(CudaBackend)


def test_cuda_driver_status_checks_without_a_device(cu):
    """The cuda backend's status check (no driver call made): success returns the call's value,
    a failure names the call and the range, out-of-memory is OutOfMemoryError."""
    be = _bare_backend()  # the check alone: no device, no context
    be._cu, be._success = cu, cu.CUresult.CUDA_SUCCESS
    assert be._check("cuMemCreate", (cu.CUresult.CUDA_SUCCESS, 1234)) == 1234
    assert be._check("cuMemMap", (cu.CUresult.CUDA_SUCCESS,), 2 << 20, 0x7F00) is None
    with pytest.raises(vmm.VmmError, match=r"cuMemMap failed \(2097152 bytes at 0x7f00\): .*CUDA_ERROR_INVALID_VALUE"):
        be._check("cuMemMap", (cu.CUresult.CUDA_ERROR_INVALID_VALUE,), 2 << 20, 0x7F00)
    with pytest.raises(vmm.OutOfMemoryError, match=r"cuMemCreate failed \(4096 bytes\)"):
        be._check("cuMemCreate", (cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY, None), 4096)
    with pytest.raises(vmm.VmmError, match=r"cuInit failed: "):
        be._check("cuInit", (cu.CUresult.CUDA_ERROR_NO_DEVICE,))


def test_cuda_hot_path_calls_raise_named_errors_without_a_device(cu):
    """map, set_access and unmap compare the driver's status inline: a failed call still raises
    `_check`'s named error (out-of-memory as OutOfMemoryError), a successful one returns None.
    The driver is stood in for by one that answers every call with a chosen status."""

    class Driver:
        status = cu.CUresult.CUDA_ERROR_INVALID_VALUE
        CUresult = cu.CUresult
        cuGetErrorName = staticmethod(lambda err: (cu.CUresult.CUDA_SUCCESS, err.name.encode()))

        def __getattr__(self, name):
            return lambda *args: (self.status,)

    be = _bare_backend()
    be._cu, be._success, be._access, be._ptrs = Driver(), cu.CUresult.CUDA_SUCCESS, [], {}
    with pytest.raises(vmm.VmmError, match=r"cuMemMap failed \(2097152 bytes at 0x200000\): CUDA_ERROR_INVALID_VALUE"):
        be.map(0x200000, 2 << 20, None)
    with pytest.raises(vmm.VmmError, match=r"cuMemSetAccess failed \(4194304 bytes at 0x400000\): CUDA_ERROR_INV"):
        be.set_access(0x400000, 4 << 20)
    with pytest.raises(vmm.VmmError, match=r"cuMemUnmap failed \(2097152 bytes at 0x600000\): CUDA_ERROR_INV"):
        be.unmap(0x600000, 2 << 20)
    be._cu.status = cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY
    with pytest.raises(vmm.OutOfMemoryError, match=r"cuMemMap failed .*CUDA_ERROR_OUT_OF_MEMORY"):
        be.map(0x200000, 2 << 20, None)
    be._cu.status = cu.CUresult.CUDA_SUCCESS
    assert be.map(0x200000, 2 << 20, None) is None
    assert be.set_access(0x200000, 2 << 20) is None
    assert be.unmap(0x200000, 2 << 20) is None


def test_cuda_page_addresses_are_built_once_per_reservation(cu):
    """map, set_access and unmap hand the driver a CUdeviceptr built once for each page address
    (the binding would build a new one from an int on every call) and kept until the
    reservation holding it is freed; other reservations' addresses stay. Stand-in driver."""
    ok = cu.CUresult.CUDA_SUCCESS
    seen = []

    class Driver:
        CUresult = cu.CUresult
        CUdeviceptr = cu.CUdeviceptr

        def cuMemMap(self, ptr, nbytes, offset, handle, flags):
            seen.append(ptr)
            return (ok,)

        def cuMemSetAccess(self, ptr, nbytes, desc, count):
            seen.append(ptr)
            return (ok,)

        def cuMemUnmap(self, ptr, nbytes):
            seen.append(ptr)
            return (ok,)

        def cuMemAddressFree(self, ptr, nbytes):
            return (ok,)

    page, a, b = 2 << 20, 0x7F00_0000_0000, 0x7E00_0000_0000
    be = _bare_backend()
    be._cu, be._success, be._access, be._ptrs = Driver(), ok, [], {}
    for _ in range(3):
        be.map(a + page, page, None)
        be.set_access(a + page, page)
        be.unmap(a + page, page)
    be.map(b, page, None)
    assert all(type(p) is cu.CUdeviceptr for p in seen)
    assert [int(p) for p in seen] == [a + page] * 9 + [b]
    assert all(p is seen[0] for p in seen[:9])  # one object for the address, built once
    be.free_reservation(a, 4 * page)
    assert list(be._ptrs) == [b]  # the freed reservation's addresses are dropped, not b's
    be.map(a + page, page, None)
    assert int(seen[-1]) == a + page and seen[-1] is not seen[0]


def test_cuda_synchronize_waits_on_its_own_device(monkeypatch, cu):
    """The backend's wait where the driver has no wait for a named context: the driver's
    cuCtxSynchronize when the thread's current context is the backend's primary context, else
    the public torch.cuda.synchronize(device), which makes it current around the wait (another
    device current, a thread without a context, a handle that could not be read at start). A
    failed driver wait raises the named error. The driver and torch's wait are stood in for: no
    device needed."""
    ok = cu.CUresult.CUDA_SUCCESS
    calls = []

    class Driver:
        CUresult = cu.CUresult
        current = (ok, 0x5A0)
        sync_status = ok
        cuGetErrorName = staticmethod(lambda err: (ok, err.name.encode()))

        def cuCtxGetCurrent(self):
            return self.current

        def cuCtxSynchronize(self):
            calls.append("driver")
            return (self.sync_status,)

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("public", device)))
    be = _bare_backend()
    drv = Driver()
    be._cu, be._success, be._ctx, be._ctx_sync = drv, ok, 0x5A0, None
    be.index, be.device = 1, torch.device("cuda", 1)
    public = ("public", torch.device("cuda", 1))
    be.synchronize()
    assert calls == ["driver"]
    for current in ((ok, 0x7B0), (ok, 0), (cu.CUresult.CUDA_ERROR_NOT_INITIALIZED, 0x5A0)):
        calls.clear()
        drv.current = current
        be.synchronize()
        assert calls == [public], current
    calls.clear()
    drv.current, be._ctx = (ok, 0), 0  # the handle unread: never the driver's wait
    be.synchronize()
    assert calls == [public]
    calls.clear()
    drv.current, be._ctx, drv.sync_status = (ok, 0x5A0), 0x5A0, cu.CUresult.CUDA_ERROR_ILLEGAL_ADDRESS
    with pytest.raises(vmm.VmmError, match=r"cuCtxSynchronize failed: CUDA_ERROR_ILLEGAL_ADDRESS"):
        be.synchronize()
    assert calls == ["driver"]


def test_cuda_synchronize_names_its_context(monkeypatch, cu):
    """Where the driver has cuCtxSynchronize_v2, the backend waits for its primary context by
    name: one call, whatever the thread has current, never torch's wait nor a query of the
    current context. It is taken only if it answers at start; a binding without it, a driver
    without it (the binding raises) or a failed first call leave the fallback. A failed wait
    raises the named error. Driver and torch stood in for: no device needed."""
    ok = cu.CUresult.CUDA_SUCCESS
    calls = []
    handle = object()  # the CUcontext read at start, passed back as it came

    class Driver:
        CUresult = cu.CUresult
        status = ok
        cuGetErrorName = staticmethod(lambda err: (ok, err.name.encode()))

        def cuCtxSynchronize_v2(self, ctx):
            calls.append(("named", ctx))
            return (self.status,)

        def cuCtxGetCurrent(self):
            raise AssertionError("the named wait needs no query of the current context")

        def cuCtxSynchronize(self):
            raise AssertionError("the named wait is not the current context's")

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("public", device)))
    be = _bare_backend()
    drv = Driver()
    be._cu, be._success, be._ctx, be._ctx_handle = drv, ok, 0x5A0, handle
    be.index, be.device = 0, torch.device("cuda", 0)
    be._ctx_sync = be._context_wait()
    assert be._ctx_sync is not None and calls == [("named", handle)]  # the probe at start
    calls.clear()
    be.synchronize()
    be.synchronize()
    assert calls == [("named", handle)] * 2
    drv.status = cu.CUresult.CUDA_ERROR_ILLEGAL_ADDRESS
    with pytest.raises(vmm.VmmError, match=r"cuCtxSynchronize_v2 failed: CUDA_ERROR_ILLEGAL_ADDRESS"):
        be.synchronize()

    # The fallback is kept where the named wait is missing or does not answer at start.
    assert be._context_wait() is None  # its first call fails
    drv.status = ok
    be._ctx_handle = None
    assert be._context_wait() is None  # the context's handle was not read
    be._ctx_handle = handle

    def missing(ctx):
        raise RuntimeError('Function "cuCtxSynchronize_v2" not found')

    monkeypatch.setattr(drv, "cuCtxSynchronize_v2", missing)
    assert be._context_wait() is None
    monkeypatch.delattr(Driver, "cuCtxSynchronize_v2")
    monkeypatch.delattr(drv, "cuCtxSynchronize_v2")
    assert be._context_wait() is None


@pytest.mark.gpu
def test_cuda_backend_properties():
    be = vmm.get_backend("cuda")
    assert be.name == "cuda" and be.device.type == "cuda"
    assert be.granularity >= 2 << 20 and be.granularity % (2 << 20) == 0
    assert vmm.get_backend("cuda", device=be.device) is be
    with pytest.raises(vmm.VmmError, match="does not exist"):
        vmm.get_backend("cuda", device=torch.cuda.device_count())


@pytest.mark.gpu
@pytest.mark.parametrize("wait", ["named context", "fallback"])
@pytest.mark.parametrize("thread", ["the caller's", "a new one"])
def test_cuda_unmap_waits_for_queued_work(monkeypatch, thread, wait):
    """unmap returns only once the device has finished the work queued before it, from the
    caller's thread and from a thread that never touched CUDA (no current context there): by
    the driver's wait for the named primary context, and by the fallback for drivers without it
    (the driver's wait where the primary context is current, torch's elsewhere). The queued
    work (a ~10 ms spin kernel) does not touch the page, so a missing wait shows as an
    unfinished event, not a fault."""
    import threading

    be = vmm.get_backend("cuda")
    if wait == "fallback":
        monkeypatch.setattr(be, "_ctx_sync", None)
    elif be._ctx_sync is None:
        pytest.skip("this driver has no cuCtxSynchronize_v2")
    pool = vmm.PagePool(be, capacity_bytes=be.granularity, page_size=be.granularity)
    arena = vmm.VirtualArena(pool, be.granularity)
    try:
        arena.map(0, be.granularity)
        assert be._ctx != 0  # the primary context's handle was read at start
        done = torch.cuda.Event()
        torch.cuda._sleep(20_000_000)
        done.record()
        assert not done.query()  # still spinning: the wait below has something to wait for
        errors = []

        def unmap():
            try:
                arena.unmap(0, be.granularity)
            except BaseException as e:
                errors.append(e)

        if thread == "a new one":
            t = threading.Thread(target=unmap)
            t.start()
            t.join()
        else:
            unmap()
        assert not errors, errors
        assert done.query(), "unmap returned before the queued work finished"
        assert arena.mapped_bytes == 0
    finally:
        arena.close()
        pool.close()


def test_pool_argument_errors():
    be = vmm.get_backend("host")
    g = be.granularity
    with pytest.raises(ValueError, match="not a multiple"):
        vmm.PagePool(be, 16 * g, page_size=g + 1)
    with pytest.raises(ValueError, match="less than one page"):
        vmm.PagePool(be, g - 1)
    with pytest.raises(ValueError, match="exceeds the capacity"):
        vmm.PagePool(be, 2 * g, prealloc_pages=3)
    with pytest.raises(TypeError):
        vmm.PagePool(be, 2.0 * g)
    with pytest.raises(TypeError):
        vmm.PagePool("host", 2 * g)
    pool = vmm.PagePool(be, 10 * g + 5, page_size=2 * g)
    assert pool.capacity_bytes == 10 * g and pool.page_size == 2 * g
    with pytest.raises(ValueError):
        vmm.VirtualArena(pool, 0)
    with pytest.raises(TypeError):
        vmm.VirtualArena(be, g)
    arena = vmm.VirtualArena(pool, 3 * g)
    assert arena.reserved_bytes == 4 * g  # rounded up to whole pages
    with pytest.raises(TypeError):
        arena.map(0.0, 2 * g)
    with pytest.raises(TypeError):
        arena.map(0, True)
    # int subclasses are ints: a valid range through the checked (slow) path maps and unmaps
    class Off(enum.IntEnum):
        SECOND_PAGE = 2 * g
    arena.map(Off.SECOND_PAGE, Off.SECOND_PAGE)
    assert arena.mapped_ranges() == [(2 * g, 2 * g)]
    arena.unmap(Off.SECOND_PAGE, 2 * g)
    assert arena.mapped_ranges() == []
    with pytest.raises(TypeError):
        arena.view(0, (4,), "float32")
    with pytest.raises(ValueError):
        arena.view(0, (-1,), torch.float32, require_mapped=False)
    arena.close()


def test_align_up():
    assert vmm.align_up(0, 4096) == 0 and vmm.align_up(1, 4096) == 4096 and vmm.align_up(8192, 4096) == 8192
