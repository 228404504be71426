"""vmm — a virtual-memory allocator for growable, shareable tensors.

Reserve address space once (`VirtualArena`), back it page by page with physical pages from a
`PagePool`, alias pages at second addresses and view any mapped range as a torch tensor without
copying. Two backends with the same semantics: "cuda" (CUDA driver VMM through
cuda.bindings.driver) and "host" (Linux mmap + memfd), picked by `get_backend()`.

    import vmm
    be = vmm.get_backend()
    pool = vmm.PagePool(be, capacity_bytes=64 << 20)
    with vmm.VirtualArena(pool, 1 << 30) as arena:
        arena.map(0, 4 * pool.page_size)
        x = arena.view(0, (4 * pool.page_size // 2,), torch.bfloat16)
"""
from .arena import VirtualArena
from .backend import Backend, get_backend
from .errors import OutOfMemoryError, VmmError
from .pool import PagePool


def align_up(nbytes: int, alignment: int) -> int:
    """`nbytes` rounded up to a multiple of `alignment` (e.g. a pool's page size)."""
    return -(-nbytes // alignment) * alignment


__all__ = ["Backend", "OutOfMemoryError", "PagePool", "VirtualArena", "VmmError", "align_up", "get_backend"]
