"""Shared by the examples: the device, the size (small on the CPU, full on a GPU) and a timer."""
from __future__ import annotations

import argparse
import time

import torch


def setup(description: str) -> tuple[str, bool, argparse.Namespace]:
    """(device, small, args): ``--small`` / ``--full`` override the default (full on a GPU)."""
    p = argparse.ArgumentParser(description=description)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--small", action="store_true", help="small sizes (the default without a GPU)")
    g.add_argument("--full", action="store_true", help="full sizes (the default on a GPU)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    small = args.small or (device == "cpu" and not args.full)
    return device, small, args


def timed(fn, device: str, repeat: int = 5) -> float:
    """Median milliseconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]
