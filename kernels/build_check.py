"""Compile every Triton kernel for a Hopper GPU (sm_90) without one: ``python -m kernels.build_check``.

``--registers`` adds each kernel's registers and spilled bytes (ptxas -v): a resource report that
costs no GPU time. Both variants of each attention kernel are built, the ragged edge (masked
loads, ``TileConfig.ragged_stages``) and the even loop. Arguments are specialised as Triton's
launcher does for contiguous tensors (head-dim strides 1, the rest multiples of 16): without that
the loads cannot be pipelined and the report is far from what runs (until session 6 it was, and
showed heavy spills at D = 128 that the launched kernels do not have).

The interpreter (TRITON_INTERPRET=1, which the CPU tests use) runs kernels as Python and accepts
code the compiler rejects (a plain module global read inside a kernel, say). This compiles each
kernel, with the tiles of the tuned table, down to sm_90 machine code on any machine, and
checks its shared memory against the H100/H200 limit and that ptxas keeps its tensor-core
instructions asynchronous (a kernel whose wgmma ptxas serialises, info C7515, fails: session 7
found the forward and dQ kernels built that way). Exit status 1 on any failure. Run it
without TRITON_INTERPRET (tests/test_kernel_build.py does, in a subprocess).
"""
from __future__ import annotations

import os
import sys

from .configs import TileConfig

# the largest dynamic shared memory a block may use on an H100 / H200 (227 KiB)
SHARED_LIMIT = 227 * 1024

# Table tiles kept although ptxas serialises their wgmma (info C7515), because they measured faster
# than every unserialised alternative: (pass, head dim, kind, TileConfig). Reported, not failed. The
# D = 64 dense forward's 128 x 128 x 4 x 2 (255 registers, ~100 bytes spilled on the ragged edge, none
# on the even one with TMA loads): 6-13% faster than 64 x 64 x 4 x 3 and 8-14% faster than 128 x 64 x 4
# x 2 (no spill, not serialised) on Full and Causal at N = 16384 (H200, session 21,
# docs/benchmarks/attention_h200_session21.md).
SERIALISED_OK = {("fwd", 64, "dense", TileConfig(128, 128, 4, 2, tma=True))}

_DATA = {"BLOCK_MATRIX": "*i8", "FULL_MATRIX": "*i8", "OFFSET": "*i32", "TOTAL": "*i32", "Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "DO": "*bf16", "DQ": "*bf16", "DK": "*bf16",
         "O_PART": "*fp32", "LSE_PART": "*fp32", "DQ_PART": "*fp32",
         "DV": "*bf16", "M": "*i8", "CLASS": "*i8", "LSE": "*fp32", "LSE2": "*fp32", "DELTA": "*fp32", "qk_scale": "fp32",
         "sm_scale": "fp32", "DS": "*bf16"}
_INT_LISTS = {"META", "FULL_PTR", "FULL_START", "FULL_END", "FULL_IPTR", "FULL_IDX", "PART_PTR", "PART_IDX", "ORDER",
              "WORDS", "DS_PTR", "DS_BEFORE", "TILE_PTR", "TILE_KB", "TILE_ID", "TILE_STRIDE", "TILE_SPAN", "SPAN"}


def _signature(kernel, constexprs: dict) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _DATA:
            sig[name] = _DATA[name]
        elif name in _INT_LISTS or name[2:] in _INT_LISTS:  # mask data, block lists (Q_/K_: of one pass), words
            sig[name] = "*i32"
        else:  # strides and sizes
            sig[name] = "i32"
    return sig


def _predicate():
    """A stand-in for a generated predicate (kernels/ imports nothing of maskdsl): table reads
    of both positions and a comparison, like ``Document(lengths) & Causal()``."""
    import triton
    import triton.language as tl

    @triton.jit
    def document_causal(i, j, meta, PREPARE: tl.constexpr = False):
        if PREPARE:  # the kernels' first call: the data's pointer and its header value (maskdsl.codegen)
            return (meta, tl.load(meta))
        else:
            ids = meta[0] + meta[1]
            return (tl.load(ids + tl.minimum(i, 99)) == tl.load(ids + tl.minimum(j, 99))) & (j <= i)

    return document_causal


def _tma_consts(cfg, d: int, even: bool, pass_name: str = "dkdv") -> dict:
    """A pass's TMA constexpr and descriptor types as launched (``TileConfig.tma``, on the even edge;
    ``launch.TMA_PASSES``: which tensors the pass describes, with tiles of ``launch.tma_rows`` rows), or
    nothing."""
    from . import launch

    if not (cfg.tma and even):
        return {}
    desc = f"tensordesc<bf16[1, 1, {launch.tma_rows(cfg, pass_name)}, {d}]>"
    return dict(TMA=True, **{name: desc for name in launch.TMA_PASSES[pass_name][2]})


def _dkdv_loops(cfg, span: bool) -> dict:
    """The dK/dV pass's loop constexprs as launched (``launch.span_loop``, ``launch.run_loop``): the span
    loop where a banded mask's lists have spans (``span``), else the lists' loops with no ``SPAN``; and
    ``GROUP`` 1, which Triton specialises for MHA (the span loop must not then be serialised, C7515)."""
    consts = dict(SPAN_LOOP=span, RUN_LOOP=cfg.run_loop and not span, GROUP=1)
    if not span:
        consts["SPAN"] = None
    return consts


def cases():
    """(name, kernel, constexprs, num_warps, num_stages, sizes specialised as multiples of 16, maxnreg)
    for every kernel and tuned 2-byte tile;
    each attention kernel twice: its ragged edge (masked loads, ``TileConfig.ragged_stages``)
    and its even loop."""
    from . import attention as K
    from . import configs, launch
    from .preprocess import block_rows_kernel, tensor_mask_blocks_kernel

    pred = _predicate()
    out = []
    for pass_name, kernel, even in (("fwd", K.attn_fwd_kernel, "EVEN_N"), ("dq", K.attn_bwd_dq_kernel, "EVEN_N"),
                                    ("dkdv", K.attn_bwd_dkdv_kernel, "EVEN_M")):
        for d in (64, 128):
            for kind, banded in (("dense", False), ("sparse", False), ("sparse", True)):
                cfg = configs.tile_config(pass_name, 2, d, kind, banded)
                if banded and cfg == configs.tile_config(pass_name, 2, d, kind) and not cfg.span_loop:
                    continue  # no tiles of its own for banded masks (nor a loop: TileConfig.span_loop)
                for flag in (False, True):
                    consts = dict(PRED=pred, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, HEAD_D=d, BLOCK_D=d,
                                  PREC="tf32", **{even: flag})
                    if "WIDE" in kernel.arg_names:  # the kernels with an int64-offset variant
                        consts["WIDE"] = False
                    if "STORE_DS" in kernel.arg_names:
                        consts["STORE_DS"] = False
                    if "RUN_LOOP" in kernel.arg_names:  # (banded masks' lists have spans: Lists.span)
                        consts.update(_dkdv_loops(cfg, cfg.span_loop and banded))
                    if "DP_FIRST" in kernel.arg_names:
                        consts["DP_FIRST"] = cfg.dp_first
                    if "TMA" in kernel.arg_names:
                        consts.update(_tma_consts(cfg, d, flag, pass_name))
                    if "SPLIT" in kernel.arg_names:
                        consts["SPLIT"] = False
                    # an even edge has N a multiple of the tile, so of 16: the launcher specialises it so
                    # (aligned lse/delta copies); a ragged edge's N may be anything
                    out.append((f"{pass_name} d={d} {'banded' if banded else kind} {cfg}{' even' if flag else ''}",
                                kernel, consts, cfg.num_warps, cfg.stages(flag), ("N_Q", "N_K") if flag else (),
                                cfg.maxnreg))
    # the int64-offset variant (``WIDE``, for tensors whose in-head offsets could overflow int32)
    for pass_name, kernel in (("fwd", K.attn_fwd_kernel), ("dq", K.attn_bwd_dq_kernel)):
        cfg = configs.tile_config(pass_name, 2, 64, "sparse")
        consts = dict(PRED=pred, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, HEAD_D=64, BLOCK_D=64, PREC="tf32",
                      EVEN_N=False, WIDE=True)
        if "SPLIT" in kernel.arg_names:
            consts["SPLIT"] = False
        out.append((f"{pass_name} d=64 sparse {cfg} int64 offsets", kernel, consts, cfg.num_warps, cfg.stages(False),
                    (), cfg.maxnreg))
    # the forward split along the keys (``configs.kv_splits``), with the tiles it takes, and its merge
    for d in (64, 128):
        few = configs.few_rows_forward(2, d, "dense")
        cfg = few[0] if few is not None else configs.tile_config("fwd", 2, d, "dense")
        for flag, pack in ((False, 1), (True, 1), (True, 4)):  # and GQA packing (4 heads per tile)
            consts = dict(PRED=pred, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, HEAD_D=d, BLOCK_D=d, PREC="tf32",
                          EVEN_N=flag, WIDE=False, SPLIT=True, PACK=pack)
            out.append((f"fwd split d={d} {cfg}{' even' if flag else ''}{f' pack {pack}' if pack > 1 else ''}",
                        K.attn_fwd_kernel, consts, cfg.num_warps, cfg.stages(flag), ("N_Q", "N_K") if flag else (),
                        cfg.maxnreg))
        small = configs.decode_forward(2, d)  # decoding's tiles, 4 heads per tile
        if small is not None:
            consts = dict(PRED=pred, BLOCK_M=small.BLOCK_M, BLOCK_N=small.BLOCK_N, HEAD_D=d, BLOCK_D=d, PREC="tf32",
                          EVEN_N=False, WIDE=False, SPLIT=True, PACK=4)
            out.append((f"fwd split d={d} {small} pack 4 (decoding)", K.attn_fwd_kernel, consts, small.num_warps,
                        small.stages(False), (), small.maxnreg))
        shares = launch.COMBINE_SHARES
        out.append((f"fwd combine d={d}", K.attn_fwd_combine_kernel,
                    dict(HEAD_D=d, BLOCK_D=d, BLOCK_M=launch.combine_rows(shares, d), BLOCK_S=shares), 4, 1, (), None))
    # the dQ pass split along the keys (few rows against many keys), with the tiles it takes (its own,
    # configs.FEW_ROWS_DQ, or the table's of either kind; a ragged edge: a context of any length),
    # and the kernel adding its shares
    for d in (64, 128):
        tiles = {configs.few_rows_dq(2, d) or configs.tile_config("dq", 2, d, kind, banded)
                 for kind, banded in (("dense", False), ("sparse", False), ("sparse", True))}
        for cfg in sorted(tiles, key=str):
            consts = dict(PRED=pred, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, HEAD_D=d, BLOCK_D=d, PREC="tf32",
                          EVEN_N=False, WIDE=False, SPLIT=True)
            out.append((f"dq split d={d} {cfg}", K.attn_bwd_dq_kernel, consts, cfg.num_warps, cfg.stages(False),
                        (), cfg.maxnreg))
        out.append((f"dq combine d={d}", K.attn_bwd_dq_combine_kernel,
                    dict(HEAD_D=d, BLOCK_D=d, BLOCK_M=launch.combine_rows(1, d)), 4, 1, (), None))
    # the backward with stored dS where the table uses it: the dK/dV pass that stores dS^T and the dQ pass
    for d in (64, 128):
        for kind in ("dense", "sparse"):
            if not configs.stored_ds(2, d, kind):
                continue
            cfg = configs.tile_config("dkdv", 2, d, kind)
            for flag in (False, True):
                for span in (False, True) if cfg.span_loop else (False,):  # (banded masks: Lists.span)
                    consts = dict(PRED=pred, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, HEAD_D=d, BLOCK_D=d, PREC="tf32",
                                  EVEN_M=flag, STORE_DS=True, WIDE=False, DP_FIRST=cfg.dp_first,
                                  **_dkdv_loops(cfg, span), **_tma_consts(cfg, d, flag))
                    out.append((f"dkdv storing dS d={d} {kind}{' banded' if span else ''} {cfg}{' even' if flag else ''}",
                                K.attn_bwd_dkdv_kernel, consts, cfg.num_warps, cfg.stages(flag),
                                ("N_Q", "N_K") if flag else (), cfg.maxnreg))
                for strided_rows in (False, True):  # without and with the loop of rows with no index loads
                    rows = configs.stored_ds_row_tiles(cfg, banded=strided_rows)
                    consts = dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, ROW_TILES=rows, HEAD_D=d, BLOCK_D=d,
                                  EVEN_N=flag, PREC="tf32", WIDE=False, STRIDED_ROWS=strided_rows)
                    out.append((f"dq from stored dS d={d} {kind} {rows} x {cfg.BLOCK_M}x{cfg.BLOCK_N}"
                                f"{' even' if flag else ''}{' strided rows' if strided_rows else ''}",
                                K.attn_bwd_dq_ds_kernel, consts, launch.STORED_DS_WARPS, launch.STORED_DS_STAGES,
                                ("N_Q", "N_K") if flag else (), None))
    # the one-launch backward where the table uses it, both edges, and its delta pre-pass
    for d in (64, 128):
        for kind in ("dense", "sparse"):
            stages = configs.fused_stages(2, d, kind)
            if stages is None:
                continue
            dq, kv = configs.tile_config("dq", 2, d, kind), configs.tile_config("dkdv", 2, d, kind)
            for flag in (False, True):
                consts = dict(PRED=pred, DQ_BLOCK_M=dq.BLOCK_M, DQ_BLOCK_N=dq.BLOCK_N, KV_BLOCK_M=kv.BLOCK_M,
                              KV_BLOCK_N=kv.BLOCK_N, HEAD_D=d, BLOCK_D=d, EVEN_N=flag, EVEN_M=flag, PREC="tf32",
                              WIDE=False)
                out.append((f"bwd (one launch) d={d} {kind} dq {dq} dkdv {kv} stages {stages}"
                            f"{' even' if flag else ''}", K.attn_bwd_kernel, consts, dq.num_warps, stages,
                            ("N_Q", "N_K") if flag else (), configs.fused_maxnreg(dq, kv)))
    out.append(("bwd delta pre-pass d=128", K.attn_bwd_delta_kernel, dict(HEAD_D=128, BLOCK_D=128, BLOCK_M=64), 4, 1,
                (), None))
    for pack in (True, False):
        out.append((f"preprocess 128x128 words={pack}", tensor_mask_blocks_kernel,
                    dict(BLOCK_Q=128, BLOCK_K=128, PACK=pack), 4, 2, (), None))
    out.append(("run arrays 128 columns", block_rows_kernel, dict(BLOCK=128), 4, 2, (), None))
    return out


def compile_sm90(kernel, constexprs: dict, num_warps: int, num_stages: int, divisible: tuple = (),
                 maxnreg: int | None = None):
    """Compile one kernel with these constexprs for sm_90 (no GPU needed); the CompiledKernel.
    ``divisible``: integer arguments (sizes) to specialise as multiples of 16, as Triton's launcher
    does for such values (N_Q and N_K on an even edge); ``maxnreg``: the register cap, as launched."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # what Triton's launcher specialises on a real call with contiguous [B, H, N, D] tensors: the
    # head-dim strides (1) become constants, pointers and the other strides are multiples of 16
    # (and constexpr arguments left out take their defaults, as in a launch)
    defaults = {p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}
    # tensor descriptor arguments (``*_DESC``): None unless given their type ("tensordesc<...>")
    descs = {name: constexprs.get(name) for name in kernel.arg_names if name.endswith("_DESC")}
    constexprs = {**defaults, **{name: 1 for name in kernel.arg_names if name.startswith("stride_") and name.endswith("d")},
                  **{name: None for name, ty in descs.items() if ty is None},
                  **{k: v for k, v in constexprs.items() if not (k in descs and v is not None)}}
    sig = {**_signature(kernel, constexprs), **{name: ty for name, ty in descs.items() if ty is not None}}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
               if sig[name] != "constexpr" and (sig[name].startswith("*") or name.startswith("stride_")
                                                or name in divisible)}
    src = ASTSource(kernel, sig, constexprs=constexprs, attrs=aligned)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def ptxas_report(ptx: str) -> tuple[str, bool]:
    """(``"R registers, S bytes spilled"``, serialised) from ptxas -v for sm_90a (the ptxas binaries
    Triton ships; the first that accepts the PTX version), or ("", False) when none runs here.
    *serialised*: ptxas made every wgmma wait for the previous one (its info C7515), which it does
    for a whole kernel when, e.g., two loops on either side of an if/else update one accumulator."""
    import glob
    import re
    import subprocess
    import tempfile

    import triton

    tools = sorted(glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas*")),
                   reverse=True)  # ptxas-blackwell (newer) first
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        for tool in tools:
            run = subprocess.run([tool, "-arch=sm_90a", "-v", path, "-o", os.devnull], capture_output=True, text=True)
            regs = re.search(r"Used (\d+) registers", run.stderr)
            if run.returncode == 0 and regs:
                spill = re.search(r"(\d+) bytes spill stores", run.stderr)
                serialised = "C7515" in run.stderr or "wgmma.mma_async instructions are serialized" in run.stderr
                return f"{regs.group(1)} registers, {spill.group(1) if spill else 0} bytes spilled", serialised
    return "", False


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--registers", action="store_true",
                    help="also report registers and spills (ptxas -v)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("build_check: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    failures = 0
    for name, kernel, consts, warps, stages, divisible, maxnreg in cases():
        try:
            compiled = compile_sm90(kernel, consts, warps, stages, divisible, maxnreg)
            shared = compiled.metadata.shared
            ok = bool(compiled.asm.get("cubin")) and shared <= SHARED_LIMIT
            note = f"shared {shared} B"
            ptx = compiled.asm["ptx"]
            report, serialised = ptxas_report(ptx) if args.registers or "wgmma" in ptx else ("", False)
            if args.registers:
                note += "; " + (report or "no ptxas report")
            if serialised:
                accepted = name.removesuffix(" even") in {f"{p} d={d} {k} {c}" for p, d, k, c in SERIALISED_OK}
                ok = ok and accepted
                note += "; ptxas serialises its wgmma instructions (C7515)" + (
                    ", measured faster than the alternatives (SERIALISED_OK)" if accepted else "")
        except Exception as e:  # noqa: BLE001 - report every kernel, then fail
            ok, note = False, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {note}", flush=True)
    print(f"build_check: {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
