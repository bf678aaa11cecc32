"""The attention benchmark's CPU smoke path, and its FlexAttention masks against maskdsl's."""
import csv
import importlib.util
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

import maskdsl as md

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench_attention.py"


from maskdsl import bench  # noqa: E402  (benchmarks/bench_attention.py runs its main)


def _flex_dense(wl):
    """The mask_mod evaluated the way create_block_mask does (vmap over all pairs), [N, N]."""
    return create_mask(wl.mask_mod("cpu"), None, None, wl.n, wl.n, device="cpu")[0, 0]


# ---------------------------------------------------------------------------
# the peers compute the same mask
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [300, 1000])
@pytest.mark.parametrize("name", [w for w in bench.WORKLOADS if w not in bench.TREES])
def test_mask_mod_equals_to_dense(name, n):
    wl = bench.WORKLOADS[name](n)
    assert wl.n == n
    assert torch.equal(_flex_dense(wl), wl.mask.to_dense(n, n))


@pytest.mark.parametrize("heads,candidates", [(3, 3), (2, 4), (5, 5)], ids=["3x3", "2x4", "5x5"])
def test_medusa_mask_mod_equals_to_dense(heads, candidates):
    wl = bench.medusa(heads, candidates)
    assert wl.n == sum(candidates ** d for d in range(1, heads + 1))
    assert torch.equal(_flex_dense(wl), wl.mask.to_dense(wl.n, wl.n))


def test_tree_mask_mod_on_random_trees():
    rng = random.Random(0)
    for n in (1, 2, 17, 200):
        parents = [rng.randrange(-1, i) for i in range(n)]  # parents[i] < i, several roots
        wl = bench.tree(parents)
        assert torch.equal(_flex_dense(wl), md.Tree(parents).to_dense(n, n)), parents


def test_medusa_trees_of_the_paper():
    for name, nodes in (("medusa_5x5", 3905), ("medusa_8x3", 9840)):
        heads, candidates = bench.TREES[name]
        parents = bench.medusa_parents(heads, candidates)
        assert len(parents) == nodes
        assert parents[:candidates] == [-1] * candidates  # roots first, then BFS
        assert parents == sorted(parents) and all(p < i for i, p in enumerate(parents))
        assert bench.WORKLOADS[name](4096).n == nodes  # --n does not apply


def test_varlen_api_matches_this_torch():
    _, causal = bench.varlen_api(True, None, backward=True)
    _, window = bench.varlen_api(False, bench.WINDOW, backward=True)
    assert "(-1, 0)" in causal or "is_causal" in causal or "aten" in causal
    assert str(bench.WINDOW) in window


# ---------------------------------------------------------------------------
# the report's checks
# ---------------------------------------------------------------------------

def _row(w, n, d, mode, prov, ms, note=""):
    return {"workload": w, "n": str(n), "d": str(d), "b": "4", "h": "32", "dtype": "bfloat16", "mode": mode,
            "provider": prov, "ms": "" if ms is None else str(ms), "ms_p20": "", "ms_p80": "", "tflops": "",
            "note": note, "prepare_ms": "", "block_density": "0.5", "allowed": str(n * n // 2), "device": "GPU",
            "torch": "2.11", "triton": "3.6", "commit": "abc", "date": "2026-01-01 00:00 UTC", "command": "cmd"}


def test_targets_from_numbers():
    rows = [
        _row("alpaca_seq", 4096, 64, "fwdbwd", "maskdsl", 1.0), _row("alpaca_seq", 4096, 64, "fwdbwd", "flex", 2.0),
        _row("lf_window", 4096, 64, "fwdbwd", "maskdsl", 0.9), _row("lf_window", 4096, 64, "fwdbwd", "flex", 1.0),
        _row("causal", 4096, 128, "fwd", "maskdsl", 1.0), _row("causal", 4096, 128, "fwd", "flex", None, "n/a (x)"),
        _row("lf_global", 16384, 64, "fwdbwd", "maskdsl", 3.0), _row("lf_global", 16384, 64, "fwdbwd", "ideal", 2.5),
    ]
    lines = bench.targets(bench.index_rows(rows))
    text = "\n".join(lines)
    assert any("`alpaca_seq` N=4096 D=64" in ln and "**met**" in ln for ln in lines)
    assert any("`lf_window` N=4096 D=64" in ln and "NOT MET" in ln for ln in lines)
    assert any("`causal` N=4096 D=128 forward:" in ln and "cannot check" in ln for ln in lines)
    assert any("`lf_global` N=16384 D=64" in ln and "ideal" in ln and "**met**" in ln for ln in lines)
    assert "`medusa_8x3` D=128 forward+backward: maskdsl <= 0.8 x flex: not measured" in text
    report = bench.report(rows)
    assert "| alpaca_seq | 1.000 | 2.000 |" in report and "0.50" in report


def test_best_flex_is_derived_from_both_option_sets():
    """A run of flex_default and flex_64 (no "flex" provider) is judged against the faster one."""
    rows = [
        _row("lf_window", 4096, 64, "fwdbwd", "maskdsl", 1.0), _row("lf_window", 4096, 64, "fwdbwd", "flex_default", 1.3),
        _row("lf_window", 4096, 64, "fwdbwd", "flex_64", 1.1),
        _row("causal", 4096, 64, "fwdbwd", "maskdsl", 1.0), _row("causal", 4096, 64, "fwdbwd", "flex_default", 2.0),
        _row("causal", 4096, 64, "fwdbwd", "flex_64", None, "n/a (out of memory)"),
    ]
    got = bench.index_rows(bench.with_best_flex(rows))
    assert got[("lf_window", 4096, 64, "fwdbwd", "flex")]["ms"] == rows[2]["ms"]
    assert got[("causal", 4096, 64, "fwdbwd", "flex")]["ms"] == rows[4]["ms"]
    lines = bench.targets(got)
    assert any("`lf_window` N=4096 D=64" in ln and "ratio 0.91" in ln and "NOT MET" in ln for ln in lines)
    # a recorded "flex" row is kept as it is
    kept = bench.with_best_flex(rows + [_row("lf_window", 4096, 64, "fwdbwd", "flex", 0.5)])
    assert bench.index_rows(kept)[("lf_window", 4096, 64, "fwdbwd", "flex")]["ms"] == "0.5"


# ---------------------------------------------------------------------------
# the CPU smoke run
# ---------------------------------------------------------------------------

def test_dry_run_writes_csv_and_report(tmp_path):
    out_csv, out_md, again = tmp_path / "bench.csv", tmp_path / "bench.md", tmp_path / "again.md"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, str(BENCH), "--dry-run", "--csv", str(out_csv), "--report", str(out_md)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with out_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == set(bench.CSV_FIELDS)
    for name in bench.WORKLOADS:
        for mode in bench.MODES:
            got = [r for r in rows if r["workload"] == name and r["mode"] == mode and r["provider"] == "maskdsl"]
            assert len(got) == 1, (name, mode)
            ms = float(got[0]["ms"])
            assert math.isfinite(ms) and ms > 0, got[0]
            assert float(got[0]["tflops"]) > 0
            flex = [r for r in rows if r["workload"] == name and r["mode"] == mode and r["provider"] == "flex_default"]
            assert flex and flex[0]["ms"] == "" and flex[0]["note"] == "n/a (no cuda)"
    text = out_md.read_text()
    assert "## N = 256, D = 32, forward" in text and "## Targets" in text
    assert all(f"| {name} |" in text for name in bench.WORKLOADS)
    # the report regenerates from the CSV alone, without running anything
    assert bench.main(["--report", str(again), "--from-csv", str(out_csv)]) == 0
    assert again.read_text() == text


def test_dry_run_without_md_prepare_passes_the_mask(tmp_path, monkeypatch):
    monkeypatch.delattr(md, "prepare", raising=False)
    out_csv = tmp_path / "bench.csv"
    assert bench.main(["--dry-run", "--workloads", "alpaca_bidir", "--modes", "fwd", "--providers", "maskdsl",
                       "--csv", str(out_csv)]) == 0
    with out_csv.open(newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["provider"] == "maskdsl" and float(row["ms"]) > 0
    assert "md.prepare missing" in row["note"] and row["prepare_ms"] == ""


def test_gpu_timing_warms_up_once_per_process(monkeypatch):
    """The first GPU timing of a process runs untimed calls first; later ones do not."""
    import triton.testing

    calls = []

    def fake_do_bench(fn, warmup, rep, grad_to_none=None, quantiles=None):
        calls.append((rep, quantiles))
        return [1.0, 0.9, 1.1] if quantiles else 1.0

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(bench, "_GPU_WARM", False)
    assert bench._time_gpu(lambda: None, []) == (1.0, 0.9, 1.1)
    assert calls == [(500, None), (100, [0.5, 0.2, 0.8])]
    assert bench._time_gpu(lambda: None, []) == (1.0, 0.9, 1.1)
    assert calls[2:] == [(100, [0.5, 0.2, 0.8])]


def test_board_state_names_the_board_and_the_host(monkeypatch):
    """The run log's board line: nvidia-smi's power limits, clocks and temperature for the GPU asked
    for, then the host's CPU; the host alone where nvidia-smi is missing, fails or answers otherwise."""
    calls = []

    def answer(stdout, returncode=0):
        def run(cmd, **kw):
            calls.append(cmd)
            return subprocess.CompletedProcess(cmd, returncode, stdout=stdout, stderr="")
        return run

    host = f"host CPU {bench.cpu_name()} x {os.cpu_count()}"
    monkeypatch.setattr(bench.subprocess, "run", answer("700.00 W, 650.00 W, 1980 MHz, 1755 MHz, 41\n"))
    line = bench.board_state("GPU-1234")
    assert line == ("board: power limit 700.00 W (enforced 650.00 W), SM clock 1755 MHz (max 1980 MHz), 41 C; "
                    + host)
    assert "--id=GPU-1234" in calls[-1]
    for run in (answer("", returncode=6), answer("700.00 W, [N/A]\n")):
        monkeypatch.setattr(bench.subprocess, "run", run)
        assert bench.board_state("0") == host

    def missing(cmd, **kw):
        raise FileNotFoundError("nvidia-smi")
    monkeypatch.setattr(bench.subprocess, "run", missing)
    assert bench.board_state() == host
    # the current CUDA device, named by its uuid, or by its index where torch has none
    monkeypatch.setattr(bench.subprocess, "run", answer("", returncode=6))
    monkeypatch.setattr(bench.torch.cuda, "current_device", lambda: 1)
    for props, expected in ((type("P", (), {"uuid": "ab-12"})(), "--id=GPU-ab-12"), (object(), "--id=1")):
        monkeypatch.setattr(bench.torch.cuda, "get_device_properties", lambda index, props=props: props)
        assert bench.current_board() == host and expected in calls[-1]
