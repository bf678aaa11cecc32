"""``maskdsl show`` and ``maskdsl check``, and the safe mask-expression parser behind ``show``."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings

import maskdsl as md
from kernels import launch
from maskdsl import cli, selfcheck
from maskdsl.expr import MaskSyntaxError, parse_mask

from .strategies import mask_tree
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------

def _has_tensor(mask) -> bool:
    return any(isinstance(leaf, md.TensorMask) for leaf in mask._leaves())


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 60).flatmap(lambda n: mask_tree(n, n).map(lambda m: (m, n))))
def test_repr_parses_back_to_the_same_mask(case):
    mask, n = case
    if _has_tensor(mask):  # a tensor has no text form
        return
    again = parse_mask(repr(mask))
    # the same text and the same entries (a & b & c may group differently from the original tree)
    assert repr(again) == repr(mask)
    assert (again.to_dense(n, n) == mask.to_dense(n, n)).all()


@pytest.mark.parametrize("text,expected", [
    ("Window(256) | Global([0, 4096])", md.Window(256) | md.Global([0, 4096])),
    ("Document([3, 4]) & (Causal() | Prefix([1, 2], documents=[3, 4]))",
     md.Document([3, 4]) & (md.Causal() | md.Prefix([1, 2], documents=[3, 4]))),
    ("~Causal(-5)", ~md.Causal(-5)),
    ("Global(range(0, 64, 16))", md.Global([0, 16, 32, 48])),
    ("Tree([-1, 0, 0, 1])", md.Tree([-1, 0, 0, 1])),
    ("  Dilated(4,\n 2)  ", md.Dilated(4, 2)),
])
def test_expressions(text, expected):
    assert parse_mask(text) == expected


@pytest.mark.parametrize("text,marked,message", [
    ("Window(256) | Globl([0])", "Globl", "unknown primitive 'Globl'"),
    ("__import__('os').system('true')", "__import__('os').system", "only the primitives can be called"),
    ("Window(256) + Causal()", "Window(256) + Causal()", "combine with |"),
    ("Window(-1)", "Window(-1)", "left must be >= 0"),
    ("Window(x=3)", "x=3", "takes no argument 'x'"),
    ("Window(1, 2, 3)", "Window(1, 2, 3)", "at most 2 argument"),
    ("Window('a')", "'a'", "integers, lists of integers or range"),
    ("Window(2 * 3)", "2 * 3", "integers, lists of integers or range"),
    ("Causal", "Causal", "call the primitive"),
    ("Causal().a", "Causal().a", "expected a mask"),
    ("Window(", None, "not a valid expression"),
    ("", None, "empty"),
    ("Global(range(0, 10, 0))", "range(0, 10, 0)", "step must not be zero"),
])
def test_bad_expressions_point_at_the_problem(text, marked, message):
    with pytest.raises(MaskSyntaxError) as info:
        parse_mask(text)
    err = info.value
    assert message in str(err)
    if marked is not None:
        assert text[err.start:err.end] == marked
        first, caret = str(err).splitlines()[:2]
        assert caret.index("^") == first.index(text) + text.index(marked)  # the caret sits under the part


# ---------------------------------------------------------------------------
# maskdsl show
# ---------------------------------------------------------------------------

def test_show_prints_the_layout_statistics(capsys):
    assert cli.main(["show", "Document([100, 200]) & Causal()", "--n", "300", "--block", "32"]) == 0
    out = capsys.readouterr().out
    mask = md.Document([100, 200]) & md.Causal()
    s = mask.block_layout(300, 300, block=(32, 32)).stats()
    density = float(mask.to_dense(300, 300).float().mean())
    assert f"entry density   {density:.4f}" in out
    assert f"block density   {s['block_density']:.4f} of {s['blocks']} blocks: full {s['full']}, " \
           f"partial {s['partial']}, empty {s['empty']}" in out
    assert f"{s['list_bytes']} bytes of compact lists" in out
    lines = out.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("block map")))
    assert len(lines[start + 1]) == 10  # one character per block: ceil(300 / 32)


def test_show_rejects_bad_input(capsys):
    assert cli.main(["show", "Windw(3)"]) == 2
    assert "unknown primitive 'Windw'" in capsys.readouterr().err
    assert cli.main(["show", "Global([500])", "--n", "100"]) == 2
    assert "must be < max(n_q, n_k) = 100" in capsys.readouterr().err
    assert cli.main(["show", "Causal()", "--n", "0"]) == 2
    assert "n_q" in capsys.readouterr().err


def test_show_saves_a_picture(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "mask.png"
    assert cli.main(["show", "Window(64) | Global([0, 900])", "--n", "1000", "--nk", "1200", "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert f"picture         {png}" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# maskdsl check
# ---------------------------------------------------------------------------

def test_check_passes_on_this_machine():
    # the console entry point, as a user runs it (on the CPU: the kernels under the interpreter)
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-m", "maskdsl.cli", "check"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    n = len(selfcheck.cases(small=True))
    assert f"{n} of {n} passed" in run.stdout
    assert run.stdout.count("  ok   ") == n


def test_check_reports_a_wrong_kernel(monkeypatch, capsys):
    if "TRITON_INTERPRET" not in os.environ:
        pytest.skip("runs the check in this process under the interpreter")
    real = launch.forward

    def off_by_a_bit(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        return out * 1.01, lse

    monkeypatch.setattr(launch, "forward", off_by_a_bit)
    monkeypatch.setattr(launch, "POISON", False)
    assert selfcheck.run(interpreted=True) == 1
    out = capsys.readouterr().out
    assert "FAIL causal" in out and "passed; see the FAIL lines above" in out


# ---------------------------------------------------------------------------
# maskdsl bench (on the CPU: the smoke sizes; on a GPU: --quick)
# ---------------------------------------------------------------------------

def test_bench_writes_tables_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    if "TRITON_INTERPRET" in os.environ and __import__("torch").cuda.is_available():
        pytest.skip("CPU variant")
    out = tmp_path / "bench"
    (out).mkdir()
    (out / "attention.csv").write_text("stale\n")  # a previous run's table is replaced, not appended to
    gpu = __import__("torch").cuda.is_available()  # --quick there: N = 4096, D = 64, forward+backward
    assert cli.main(["bench", "--workloads", "causal,lf_global", "--out", str(out)] + ["--quick"] * gpu) == 0
    printed = capsys.readouterr()
    rows = (out / "attention.csv").read_text().splitlines()
    assert rows[0].startswith("workload,") and "stale" not in rows
    assert {r.split(",")[0] for r in rows[1:]} == {"causal", "lf_global"}
    assert "lf_global" in (out / "attention.md").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == (["attention_d64_fwdbwd.png"] if gpu else ["attention_d32_fwd.png", "attention_d32_fwdbwd.png"])
    assert all((out / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
    assert "[####################]" in printed.err  # the progress bar reached the end


def test_bench_redraws_from_csv(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    csv = ROOT / "docs" / "benchmarks" / "data" / "attention_h100_n16384_d64_sparse.csv"
    assert cli.main(["bench", "--from-csv", str(csv), "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["attention_d64_fwd.png", "attention_d64_fwdbwd.png"]
    assert "lf_dilated" in (tmp_path / "attention.md").read_text()
    assert "plot: " in capsys.readouterr().out


def test_show_counts_every_batch_pattern(capsys):
    mask = md.Document([[10, 20], [30]])  # one document list per batch element
    assert cli.main(["show", "Document([[10, 20], [30]])", "--n", "40", "--block", "8"]) == 0
    density = float(mask.to_dense(40, 40).float().mean())
    assert f"entry density   {density:.4f}" in capsys.readouterr().out
