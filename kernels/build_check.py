"""Compile every Triton kernel for a Hopper GPU (sm_90) without one: ``python -m kernels.build_check``.

The interpreter (TRITON_INTERPRET=1, which the CPU tests use) runs kernels as Python and accepts
code the compiler rejects (a plain module global read inside a kernel, say). This compiles each
kernel, with the tiles of the tuned table, down to sm_90 machine code on any machine, and
checks its shared memory against the H100/H200 limit. Exit status 1 on any failure. Run it
without TRITON_INTERPRET (tests/test_kernel_build.py does, in a subprocess).
"""
from __future__ import annotations

import os
import sys

# the largest dynamic shared memory a block may use on an H100 / H200 (227 KiB)
SHARED_LIMIT = 227 * 1024

_DATA = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "DO": "*bf16", "DQ": "*bf16", "DK": "*bf16",
         "DV": "*bf16", "M": "*i8", "CLASS": "*i8", "LSE": "*fp32", "DELTA": "*fp32", "qk_scale": "fp32",
         "sm_scale": "fp32"}
_INT_LISTS = {"META", "FULL_PTR", "FULL_START", "FULL_END", "FULL_IPTR", "FULL_IDX", "PART_PTR", "PART_IDX", "ORDER",
              "WORDS"}


def _signature(kernel, constexprs: dict) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _DATA:
            sig[name] = _DATA[name]
        elif name in _INT_LISTS:  # mask data, block lists, packed words
            sig[name] = "*i32"
        else:  # strides and sizes
            sig[name] = "i32"
    return sig


def cases():
    """(name, kernel, constexprs, num_warps, num_stages) for every kernel and tuned 2-byte tile."""
    import maskdsl as md

    from . import attention as K
    from . import configs
    from .preprocess import tensor_mask_blocks_kernel

    pred = md.prepare(md.Document([30, 70]) & md.Causal(), 100, 100).predicate.fn
    out = []
    for pass_name, kernel, even in (("fwd", K.attn_fwd_kernel, "EVEN_N"), ("dq", K.attn_bwd_dq_kernel, "EVEN_N"),
                                    ("dkdv", K.attn_bwd_dkdv_kernel, "EVEN_M")):
        for d in (64, 128):
            for kind in ("dense", "sparse"):
                cfg = configs.tile_config(pass_name, 2, d, kind)
                consts = dict(PRED=pred, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, HEAD_D=d, BLOCK_D=d,
                              PREC="tf32")
                consts[even] = False  # the ragged edge: the most code and registers
                out.append((f"{pass_name} d={d} {kind} {cfg}", kernel, consts, cfg.num_warps, cfg.num_stages))
    out.append(("preprocess 128x128", tensor_mask_blocks_kernel, dict(BLOCK_Q=128, BLOCK_K=128), 4, 2))
    return out


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("build_check: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    failures = 0
    for name, kernel, consts, warps, stages in cases():
        try:
            src = ASTSource(kernel, _signature(kernel, consts), constexprs=consts)
            compiled = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
            shared = compiled.metadata.shared
            ok = bool(compiled.asm.get("cubin")) and shared <= SHARED_LIMIT
            note = f"shared {shared} B"
        except Exception as e:  # noqa: BLE001 - report every kernel, then fail
            ok, note = False, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {note}", flush=True)
    print(f"build_check: {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
