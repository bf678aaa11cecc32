"""Every Triton kernel compiles to sm_90 (Hopper) machine code on this CPU-only machine.

The CPU kernel tests run under the interpreter, which accepts code the compiler rejects (a
plain module global inside a kernel got through that way once and failed on the GPU):
``python -m kernels.build_check`` compiles each kernel with the tuned tiles, in a subprocess
without TRITON_INTERPRET.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "kernels.build_check"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    report = run.stdout + run.stderr[-3000:]
    assert run.returncode == 0, report
    assert "build_check: 0 failures" in run.stdout, report
    # 3 attention passes x 2 head dims x 2 kinds x (ragged edge, even loop), the D = 64 banded entries
    # (the dK/dV pass with its loop for rows of one run, the dQ pass's tiles: both edges; and the dQ
    # tiles split along the keys), the D = 128 dK/dV pass of banded masks (its one loop per key block,
    # TileConfig.span_loop: both edges, without and with stored dS), the int64-offset
    # forward and dQ, the one-launch backward (D = 64 dense, both edges; D = 128 takes two launches since
    # session 29) and its delta
    # pre-pass, the backward with stored dS (D = 128 sparse: its dK/dV and dQ passes, both edges),
    # the preprocessing kernel with and without packed rows, the run-arrays kernel, the forward split
    # along the keys (D = 64 and 128, both edges, and with GQA heads packed) and its merge (D = 64 and 128),
    # the decoding tiles' split forward (D = 64 and 128), and the dQ pass split along the keys (D = 64 and
    # 128: the tiles it takes, both of the table's at D = 64, its own at 128) with the kernel adding its
    # shares (D = 64 and 128)
    assert run.stdout.count("\nok ") + run.stdout.startswith("ok ") == 64, report


def test_generated_predicates_compile_for_sm90():
    """The kernels with maskdsl's generated predicates (TensorMask tiles, tables, trees, constants)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "generated_predicates_build.py")], cwd=ROOT,
                         env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=900)
    report = run.stdout + run.stderr[-3000:]
    assert run.returncode == 0, report
    assert run.stdout.count("ok ") == 7, report
