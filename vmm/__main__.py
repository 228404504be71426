"""`python -m vmm [--backend cuda|host]`: map, alias and unmap a few pages and print what happened."""
from __future__ import annotations

import argparse

import torch

from . import PagePool, VirtualArena, VmmError, get_backend


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmm", description=__doc__)
    ap.add_argument("--backend", choices=["cuda", "host"], default=None,
                    help="default: cuda when usable, else host (env VMWEAVE_BACKEND overrides)")
    ap.add_argument("--pages", type=int, default=4, help="pages to map (default 4)")
    args = ap.parse_args(argv)
    if args.pages < 2:
        ap.error("--pages must be at least 2")

    try:
        be = get_backend(args.backend)
    except VmmError as e:
        print(f"error: {e}")
        return 2
    page = be.granularity if be.name == "cuda" else 16 * be.granularity
    print(f"backend: {be.name} on {be.device}, granularity {be.granularity} B, page size {page} B")
    with PagePool(be, capacity_bytes=(args.pages + 2) * page, page_size=page) as pool, \
            VirtualArena(pool, 4 * args.pages * page) as arena:
        print(f"reserved {arena.reserved_bytes} B of address space at {arena.base_address:#x}")
        arena.map(0, args.pages * page)
        x = arena.view(0, (args.pages * page // 2,), torch.bfloat16)
        x.copy_(torch.arange(x.numel(), device=x.device).to(torch.bfloat16))
        print(f"mapped {args.pages} pages at offset 0; viewed as {tuple(x.shape)} {x.dtype} on {x.device}")

        dst = 2 * args.pages * page
        arena.alias(0, dst, 2 * page)
        y = arena.view(dst, (page,), torch.bfloat16)
        y[0] = 42.0
        print(f"aliased 2 pages at offset {dst}: a write there reads back at offset 0 as {x[0].item():g}")
        print(f"mapped ranges (offset, bytes): {arena.mapped_ranges()}")
        print("pool:", _fmt(pool.stats()))

        arena.unmap(0, 2 * page)
        print(f"unmapped offset 0 (+2 pages); the alias keeps them alive, still reads {y[0].item():g}")
        arena.unmap(dst, 2 * page)
        arena.map(dst, 2 * page)
        print("unmapped the alias, mapped 2 pages again: recycled from the free list")
        print("pool:", _fmt(pool.stats()))
    print("closed: every page and address range released; pool:", _fmt(pool.stats()))
    return 0


def _fmt(stats: dict) -> str:
    keys = ("pages_total", "pages_free", "pages_in_use", "bytes_in_use", "bytes_mapped",
            "driver_creates", "driver_releases", "driver_maps", "driver_unmaps", "driver_set_access")
    return ", ".join(f"{k}={stats[k]}" for k in keys)


if __name__ == "__main__":
    raise SystemExit(main())
