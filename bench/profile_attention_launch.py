"""Host (Python) cost per call of the attention entry points, on CPU, with the kernel launches
stubbed out: what a call costs before Triton's own launch.

    python bench/profile_attention_launch.py                  # µs per call, each entry point
    python bench/profile_attention_launch.py paged_decode     # and a cProfile of that one
    python bench/profile_attention_launch.py --keep-interpreter-check

`_attn_fwd` / `_split_reduce` become no-op launchers, `choose_impl` answers "triton" and the
SM count is an H200's (132), so the split-KV path and its workspace run as on the GPU. By default
`interpreter_on` is stubbed too (as the measurement in the task that introduced the launch plans
did); `--keep-interpreter-check` leaves the real one in place.
Shapes: bf16, q [1, 32, 128], caches [256, 16, 8, 128], table [1, 256] int32, one 4000-token
sequence; prefill: 7 new tokens with max_seqlen_q given; S2: stride 8, 4 local blocks of 64.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

import kernels  # noqa: E402
from common import host_us_per_call  # noqa: E402
import kernels.attention as A  # noqa: E402
from kernels.s2 import S2Pattern, s2_attention_decode  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_launches(keep_interpreter_check: bool) -> None:
    A._attn_fwd = _NoLaunch()
    A._split_reduce = _NoLaunch()
    A.choose_impl = lambda q, impl: "triton"
    A._num_sms = lambda device: 132
    if not keep_interpreter_check:
        A.interpreter_on = lambda: False


def cases() -> dict:
    torch.manual_seed(0)
    dt, scale = torch.bfloat16, 128 ** -0.5
    q = torch.randn(1, 32, 128, dtype=dt)
    k = torch.randn(256, 16, 8, 128, dtype=dt)
    v = torch.randn_like(k)
    table = torch.arange(256, dtype=torch.int32)[None]
    seq_lens = torch.tensor([4000], dtype=torch.int32)
    lr = torch.randn(256, 16, 8, dtype=dt)
    lora_b = torch.randn(2, 8, 8, 128, dtype=dt)
    aid = torch.tensor([1], dtype=torch.int32)
    qp = torch.randn(7, 32, 128, dtype=dt)
    cq = torch.tensor([0, 7], dtype=torch.int32)
    pattern = S2Pattern(32, 64, 4, 8, num_kv_heads=8)
    kh = torch.randn(2048, 16, 1, 128, dtype=dt)
    vh = torch.randn_like(kh)
    per_head = torch.arange(2048, dtype=torch.int32).view(1, 8, 256)
    return {
        "paged_decode": lambda: kernels.paged_attention_decode(q, k, v, table, seq_lens, scale,
                                                               validate=False),
        "flash_lora_decode": lambda: kernels.flash_lora_decode(q, k, v, lr, table, lora_b, aid, table,
                                                               seq_lens, scale, validate=False),
        "paged_prefill": lambda: kernels.paged_attention_prefill(qp, k, v, table, cq, seq_lens, scale,
                                                                 max_seqlen_q=7, validate=False),
        "s2_decode": lambda: s2_attention_decode(q, k, v, table, seq_lens, pattern, scale,
                                                 validate=False),
        "s2_decode_per_head": lambda: s2_attention_decode(q, kh, vh, per_head, seq_lens, pattern,
                                                          scale, validate=False),
    }


def us_per_call(fn, calls: int = 20000, repeats: int = 5) -> float:
    """Best of `repeats` timings (the least disturbed by other work on the machine)."""
    return host_us_per_call(fn, calls=calls, rounds=repeats, warmup=500)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", nargs="?", help="entry point to run under cProfile afterwards")
    ap.add_argument("--keep-interpreter-check", action="store_true")
    args = ap.parse_args()
    stub_launches(args.keep_interpreter_check)
    fns = cases()
    for name, fn in fns.items():
        print(f"{name:20s} {us_per_call(fn):6.2f} us/call")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20000):
            fns[args.profile]()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
