"""Cross-compile the multi-LoRA kernel for sm_90 (H100) on a machine without a GPU.

Catches what the interpreter cannot: Triton GPU compile errors, register spills, lost software
pipelining. Off by default (each build takes seconds of CPU); run with
`VMWEAVE_CROSS_COMPILE=1 python -m pytest -q tests/kernels/test_kernels_lora_sm90.py`.
The arguments are specialised the way the JIT does at launch (pointers and ints divisible by 16
get `tt.divisibility`, ints equal to 1 become constants). Each build runs in a child process
because the test session turns on the Triton interpreter, which replaces `@triton.jit` kernels.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("VMWEAVE_CROSS_COMPILE", "0") in ("", "0"),
                                reason="set VMWEAVE_CROSS_COMPILE=1 to cross-compile for sm_90")

H, T = 4096, 256


def _build(tmp_path, consts: dict, ints: dict, *, num_warps=4, num_stages=3):
    """(ptx, shared bytes, ptxas -v report) of one build, from a child process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    arg = json.dumps(dict(consts=consts, ints=ints, num_warps=num_warps, num_stages=num_stages,
                          out=str(tmp_path)))
    subprocess.run([sys.executable, __file__, arg], env=env, check=True, cwd=root)
    res = json.loads((tmp_path / "result.json").read_text())
    return res["ptx"], res["shared"], res["report"]


def _child(consts: dict, ints: dict, num_warps: int, num_stages: int, out: str, dtype="bf16"):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia import compiler as nvc
    from triton.compiler import ASTSource

    from kernels.lora import _sgmv_kernel

    sig, cons, attrs = {}, {}, {}
    for i, name in enumerate(_sgmv_kernel.arg_names):
        if name in consts:
            sig[name], cons[(i,)] = "constexpr", consts[name]
        elif name.endswith("_ptr"):
            sig[name] = "*i32" if name in ("ids_ptr", "tiles_ptr", "order_ptr") else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "scale":
            sig[name] = "fp32"
        elif ints[name] == 1:
            sig[name], cons[(i,)] = "constexpr", 1
        else:
            sig[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn=_sgmv_kernel, signature=sig, constexprs=cons, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = Path(out) / "k.ptx"
    ptx.write_text(k.asm["ptx"])
    ptxas = os.path.join(os.path.dirname(nvc.__file__), "bin", "ptxas")
    r = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(ptx), "-o", os.devnull],
                       capture_output=True, text=True, check=True)
    (Path(out) / "result.json").write_text(json.dumps(
        dict(ptx=k.asm["ptx"], shared=k.metadata.shared, report=r.stderr)))


def _flags(seg, ids, add, bm, bn, bk):
    return dict(SEGMENTED=seg, HAS_IDS=ids, ADD_INPUTS=add, DOT_F32=False,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)


@pytest.mark.parametrize("seg,bm,bn,bk,r", [(True, 16, 16, 128, 16), (True, 64, 64, 64, 64),
                                            (True, 64, 128, 64, 128), (False, 64, 16, 64, 16)])
def test_sm90_shrink_pipelined_without_spills(tmp_path, seg, bm, bn, bk, r):
    ints = dict(M=T, N=r, K=H, R=r, k_per_split=512, s_im=H, s_ik=1, s_wa=H * r, s_wk=r, s_wn=1,
                s_os=T * r, s_oa=0, s_om=r, s_on=1)
    ptx, _, report = _build(tmp_path, _flags(seg, not seg, False, bm, bn, bk), ints)
    assert " 0 bytes spill stores" in report, report
    assert "cp.async" in ptx, "the K loop lost its software pipelining"


@pytest.mark.parametrize("bm,bk,r", [(16, 16, 16), (64, 128, 128)])
def test_sm90_expand_without_spills(tmp_path, bm, bk, r):
    N = 4096
    ints = dict(M=T, N=N, K=r, R=N, k_per_split=bk, s_im=r, s_ik=1, s_wa=r * N, s_wk=N, s_wn=1,
                s_os=0, s_oa=0, s_om=N, s_on=1)
    _, shared, report = _build(tmp_path, _flags(True, False, True, bm, 128, bk), ints, num_stages=1)
    assert " 0 bytes spill stores" in report, report
    assert shared <= 64 * 1024


if __name__ == "__main__":
    _child(**json.loads(sys.argv[1]))
