"""Compile the attention kernels with maskdsl's generated predicates for sm_90 (no GPU needed).

Run by tests/test_kernel_build.py in a subprocess without TRITON_INTERPRET: kernels.build_check
compiles the kernels with a stand-in predicate; this compiles them with the code maskdsl
generates for every kind of table read (1-D tables, packed 16 x 32 tiles of a TensorMask,
Euler-tour times, scalars, lifted constants, a power-of-two modulus), the one-launch backward
included, and checks that ptxas keeps their tensor-core instructions asynchronous. Prints "ok <name>" per mask and exits 1 on any failure.
"""
from __future__ import annotations

import os
import sys

import torch

import maskdsl as md
from kernels import attention as K
from kernels.build_check import compile_sm90, ptxas_report


def main() -> int:
    masks = {
        "tensor": md.TensorMask(torch.rand(100, 100) < 0.3),
        "prefix|tensor": md.Prefix(20) | md.TensorMask(torch.rand(100, 100) < 0.3),
        "doc&(causal|prefix)": md.Document([40, 60]) & (md.Causal() | md.Prefix([10, 5], documents=[40, 60])),
        "window|global": md.Window(16) | md.Global([0, 50]),
        "tree": md.Tree([-1] + [x // 2 for x in range(99)]),
        "dilated": md.Dilated(16, 4) & md.Causal(),
    }
    masks["tensor, rows format"] = "rows"  # MASKDSL_TENSOR_FORMAT=rows, the other layout of TensorMask data
    failures = 0
    for name, mask in masks.items():
        if mask == "rows":
            os.environ["MASKDSL_TENSOR_FORMAT"] = "rows"
            mask = md.TensorMask(torch.rand(100, 100) < 0.3)
        pred = md.prepare(mask, 100, 100, reorder=None).predicate.fn
        try:
            # the forward twice: whole rows, and rows split along the keys (decoding, tree verification)
            for kernel, even, split in ((K.attn_fwd_kernel, "EVEN_N", False), (K.attn_fwd_kernel, "EVEN_N", True),
                                        (K.attn_bwd_dq_kernel, "EVEN_N", None), (K.attn_bwd_dkdv_kernel, "EVEN_M", None)):
                consts = dict(PRED=pred, BLOCK_M=64, BLOCK_N=64, HEAD_D=64, BLOCK_D=64, PREC="tf32")
                consts[even] = False
                if split is not None:
                    consts["SPLIT"] = split
                if "WIDE" in kernel.arg_names:  # the kernels with an int64-offset variant
                    consts["WIDE"] = False
                if "STORE_DS" in kernel.arg_names:  # dK/dV storing dS^T (its other body is the one launch's)
                    consts["STORE_DS"] = True
                compiled = compile_sm90(kernel, consts, 4, 3)
                assert compiled.asm.get("cubin")
                # a predicate's code must not make ptxas serialise the kernel's wgmma (C7515)
                assert not ptxas_report(compiled.asm["ptx"])[1], f"ptxas serialises {kernel.__name__}'s wgmma"
            # the one-launch backward runs the same dQ and dK/dV bodies behind a branch on the program
            consts = dict(PRED=pred, DQ_BLOCK_M=64, DQ_BLOCK_N=64, KV_BLOCK_M=64, KV_BLOCK_N=64, HEAD_D=64,
                          BLOCK_D=64, EVEN_N=False, EVEN_M=False, PREC="tf32", WIDE=False)
            compiled = compile_sm90(K.attn_bwd_kernel, consts, 4, 2)
            assert compiled.asm.get("cubin")
            assert not ptxas_report(compiled.asm["ptx"])[1], "ptxas serialises attn_bwd_kernel's wgmma"
            print(f"ok {name}", flush=True)
        except Exception as e:  # noqa: BLE001 - report every mask, then fail
            failures += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
