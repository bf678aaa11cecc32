"""The command line demo, the ALPACA data loader and the analysis benchmark's smoke path."""
import csv
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import maskdsl as md
from maskdsl import cli
from maskdsl.data import alpaca_lengths, pack_alpaca

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench_analysis.py"
FILE_TOKENS = 17651


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_analysis", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------

def test_alpaca_lengths_file():
    rows = alpaca_lengths()
    assert len(rows) == 175
    assert sum(p + o for p, o in rows) == FILE_TOKENS
    assert rows[0] == (28, 66)
    assert all(p > 0 and o > 0 for p, o in rows)


@pytest.mark.parametrize("n", [0, 1, 93, 94, 100, 1000, 4096, FILE_TOKENS, FILE_TOKENS + 1, 40000, 100003])
def test_pack_alpaca_fits_in_file_order(n):
    docs, prompts = pack_alpaca(n)
    rows = alpaca_lengths()
    assert len(docs) == len(prompts)
    assert sum(docs) <= n
    for d, (doc, prompt) in enumerate(zip(docs, prompts)):
        p, o = rows[d % len(rows)]  # file order, cycling
        assert (doc, prompt) == (p + o, p)
    # packing stops only at an example that does not fit
    nxt = rows[len(docs) % len(rows)]
    assert sum(docs) + nxt[0] + nxt[1] > n


def test_pack_alpaca_cycles_past_the_file():
    docs, _ = pack_alpaca(3 * FILE_TOKENS + 50)
    assert len(docs) > 2 * 175
    assert docs[:175] == docs[175:350]
    assert sum(docs[:175]) == FILE_TOKENS


def test_pack_alpaca_seeded_shuffle():
    a = pack_alpaca(40000, seed=7)
    assert a == pack_alpaca(40000, seed=7)
    assert a != pack_alpaca(40000, seed=8)
    assert a != pack_alpaca(40000)
    docs, prompts = a
    assert sum(docs) <= 40000
    # the first pass is a permutation of the file
    rows = alpaca_lengths()
    assert sorted(zip(docs[:175], prompts[:175])) == sorted((p + o, p) for p, o in rows)


def test_pack_alpaca_makes_valid_masks():
    n = 5000
    docs, prompts = pack_alpaca(n, seed=1)
    mask = md.Document(docs) & (md.Causal() | md.Prefix(prompts, documents=docs))
    lay = mask.block_layout(n, n, block=(128, 128))
    assert lay.block_matrix.shape == (40, 40)


@pytest.mark.parametrize("bad", [-1, 2.5, "10"])
def test_pack_alpaca_rejects_bad_n(bad):
    with pytest.raises((TypeError, ValueError), match="n"):
        pack_alpaca(bad)


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------

def test_block_map_causal():
    lay = md.Causal().block_layout(512, 512, block=(128, 128))
    assert cli.block_map(lay) == "+...\n#+..\n##+.\n###+"


def test_block_map_downsamples():
    n = 130 * 16
    lay = md.Causal().block_layout(n, n, block=(16, 16))
    rows = cli.block_map(lay).split("\n")
    assert len(rows) <= 64 and all(len(r) == len(rows[0]) <= 64 for r in rows)
    assert rows[0][0] == "+" and rows[0][-1] == "." and rows[-1][0] == "#"


def test_medusa_parents_is_a_forest():
    parents = cli.medusa_parents(500)
    assert len(parents) == 500
    assert all(-1 <= p < x for x, p in enumerate(parents))
    size = 1 + 4 + 12 + 24 + 48  # top-k 4, 3, 2, 2
    assert [x for x, p in enumerate(parents) if p == -1] == list(range(0, 500, size))
    md.Tree(parents).to_dense(500, 500)  # accepted by the DSL


def test_demo_runs(capsys):
    assert cli.main(["demo", "--n", "512"]) == 0
    out = capsys.readouterr().out
    for expected in ["N = 512", "== causal", "Causal()", "Window(256) | Global([", "Dilated(256, 4)",
                     "Document([", "Tree([", "+...\n#+..\n##+.\n###+", "block density", "entry density",
                     "analysis", "max |out - reference|"]:
        assert expected in out, expected
    assert "MISMATCH" not in out
    assert "(ok)" in out


def test_demo_ragged_and_large_repr(capsys):
    assert cli.main(["demo", "--n", "777", "--block", "64"]) == 0
    out = capsys.readouterr().out
    assert "items)" in out  # long data lists are elided in the repr


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["nonsense"])
    assert cli.main(["demo", "--n", "0"]) == 2


# ---------------------------------------------------------------------------
# benchmark smoke path (a benchmark, not a test: only that it runs and agrees)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["causal", "window_global", "doc_causal", "doc_bidir"])
@pytest.mark.parametrize("n", [300, 1024])
def test_bench_brute_force_matches_layout(name, n):
    bench = _load_bench()
    mask = bench.build_mask(name, n)
    bm, fm = bench.brute_force(mask, n)
    lay = mask.block_layout(n, n, block=(128, 128))
    assert torch.equal(bm, lay.block_matrix)
    assert torch.equal(fm, lay.full_matrix)


def test_bench_script_runs(tmp_path):
    out = tmp_path / "analysis.md"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--sizes", "300", "--masks", "doc_bidir", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "equal=True" in proc.stdout
    text = out.read_text()
    assert "| mask | N |" in text
    assert "Prefix(prompts, documents=alpaca)" in text
    assert "not measured in this run" in text  # the acceptance sizes were not run
    assert "--sizes 300" in text  # the exact command is recorded


def _load_script(name):
    """A benchmarks/ script as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _load_ab():
    return _load_script("ab_attention")


def test_ab_attention_variants():
    from kernels.configs import TileConfig

    ab = _load_ab()
    assert ab.parse_variant("base") == {}
    assert ab.parse_variant("unfused") == {"fused": None}
    assert ab.parse_variant("fused:3+ov:dq=128x64x8x3;dkdv=64x128x8x2") == {
        "fused": 3, "dq": TileConfig(128, 64, 8, 3), "dkdv": TileConfig(64, 128, 8, 2)}
    assert ab.parse_variant("ov:dq=64x16x4x2x128") == {"dq": TileConfig(64, 16, 4, 2, maxnreg=128)}
    assert ab.parse_variant("nods") == {"stored_ds": False}
    assert ab.parse_variant("ds:2x4x3") == {"stored_ds": True, "ds_rows": 2, "ds_warps": 4, "ds_stages": 3}
    assert ab.parse_variant("set:run_loop=0+set:x=-2") == {"run_loop": 0, "x": -2}
    for bad in ("fused:0", "fused:x", "ov:bwd=64x64x4x3", "ov:dq=64x64x4", "ov:dq=64x64x4x2x1x1", "turbo",
                "ds:2x4", "ds:ax4x3", "set:run_loop", "set:run_loop=on"):
        with pytest.raises(ValueError, match="variant"):
            ab.parse_variant(bad)


@pytest.mark.parametrize("script, argv, message", [
    ("ab_attention", ["--sustained", "-1"], "--sustained: expected seconds >= 0, got -1.0"),
    ("kernel_energy", ["--seconds", "1"], "--seconds: expected 2 or more, got 1.0"),
    ("verify_attention", ["--variants", "1,0"], "--variants: expected S[@MxNxWxS[xR]][/P] such as 8@64x64x4x2 or 2/1, got '0'"),
    ("verify_attention", ["--variants", "a/0"], "got 'a/0' (P must be a positive integer, got '0')"),
    ("verify_attention", ["--variants", "4@64x64"], "got '4@64x64' (expected BLOCK_MxBLOCK_NxWARPSxSTAGES"),
    ("decode_attention", ["--variants", "a,0"], "--variants: expected a, nominal or S[@MxNxWxS[xR]][/P] such as 8@16x64x2x3/4, got '0'"),
    ("decode_attention", ["--variants", "8/0"], "got '8/0' (P must be a positive integer, got '0')"),
    ("decode_attention", ["--shapes", "4,1,8192"], "--shapes: expected B,T,P,D (positive, P >= 0) such as 4,1,8192,128, got '4,1,8192'"),
    ("chunk_backward", ["--shapes", "1,0,64,64"], "--shapes: expected B,T,P,D (positive, P >= 0) such as 1,64,65536,128, got '1,0,64,64'"),
    ("chunk_backward", ["--hkv", "5"], "--hkv must divide the 32 query heads, got 5"),
    ("chunk_backward", ["--variants", "a,fast"], "--variants: expected a, unsplit, two, S (shares, a positive integer) or dq=MxNxWxS[xR], got 'fast'"),
    ("chunk_backward", ["--variants", "dq=64x32"], "expected BLOCK_MxBLOCK_NxWARPSxSTAGES"),
])
def test_benchmark_scripts_reject_bad_durations(capsys, script, argv, message):
    with pytest.raises(SystemExit) as exc:
        _load_script(script).main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err



def test_forward_overrides_spelling():
    """``configs.forward_overrides``: the benchmark scripts' S[@MxNxWxS[xR]][/P] as OVERRIDE entries."""
    from kernels.configs import TileConfig, forward_overrides

    assert forward_overrides("8") == {"splits": 8}
    assert forward_overrides("a") == {}
    assert forward_overrides("a/4") == {"pack": 4}
    assert forward_overrides("16@16x64x2x3/4") == {"splits": 16, "fwd": TileConfig(16, 64, 2, 3), "pack": 4}
    for bad, message in [("0", "S must be a positive integer or a, got '0'"), ("x", "got 'x'"),
                         ("2/0", "P must be a positive integer, got '0'"), ("2/", "got ''"),
                         ("2@64x64", "expected BLOCK_MxBLOCK_NxWARPSxSTAGES")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            forward_overrides(bad)


def test_launches_of_lists_the_launchers_launches(monkeypatch):
    """``bench.launches_of``: (kernel, grid) of each launch, the launchers deciding (replay off, then
    restored), here a split forward under the interpreter: its kernel then the merge."""
    import importlib

    from kernels import configs, launch
    from maskdsl import bench

    attention_module = importlib.import_module("maskdsl.attention")
    monkeypatch.setitem(configs.OVERRIDE, "splits", 3)
    monkeypatch.setitem(configs.OVERRIDE, "fwd", configs.TileConfig(16, 16, 4, 1))
    q, k = torch.randn(1, 2, 20, 16), torch.randn(1, 2, 50, 16)
    before = launch.REPLAY, launch._launch
    got = bench.launches_of(lambda: attention_module._attention(q, k, k, md.Causal(30), backend="triton"))
    rows = launch.combine_rows(launch.COMBINE_SHARES, 16)  # merged per program
    # 1 batch x 2 heads x 2 query blocks of 16, 3 shares each; the merge: 2 heads x its row blocks
    assert got == [("attn_fwd_kernel", (1 * 2 * 2 * 3,)), ("attn_fwd_combine_kernel", (2, -(-20 // rows)))]
    assert (launch.REPLAY, launch._launch) == before

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
@pytest.mark.parametrize("script, argv", [("ab_attention", ["--variants", "base,unfused"]),
                                          ("kernel_energy", ["--workload", "lf_window"]),
                                          ("host_phases", ["--workloads", "alpaca_seq"]),
                                          ("verify_attention", ["--d", "64", "--variants", "1,4"]),
                                          ("decode_attention", ["--shapes", "1,1,64,64", "--variants", "a,2/4"]),
                                          ("chunk_backward", ["--shapes", "1,64,4096,64", "--variants", "a,unsplit,4,dq=64x32x4x2"])])
def test_benchmark_scripts_need_a_gpu(capsys, script, argv):
    assert _load_script(script).main(argv) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_host_phases_sync_every_must_count_steps(capsys):
    with pytest.raises(SystemExit):
        _load_script("host_phases").main(["--sync-every", "0"])
    assert "--sync-every: expected a step count >= 1, got 0" in capsys.readouterr().err


def test_ab_attention_smi_summary():
    ab = _load_ab()
    load = ["1800, 690.00, 0x0000000000000004", "1700, 700.00, 0x0000000000000004", "1980, 650.00, 0x0000000000000000",
            "1800, 680.00, 0x0000000000000004"] * 4
    idle = ["345, 120.00, 0x0000000000000001"] * 2
    header = "clocks.current.sm [MHz], power.draw [W], clocks_event_reasons.active"
    # 20 samples: the first two and the last two (10% at each end) go; a header and [N/A] do not parse
    lines = [header] + idle + load + ["[N/A], [N/A], [N/A]"] + idle
    assert ab.smi_summary(lines, 2.0) == ", SM 1800 MHz, 680 W, 1360 mJ/step, reasons 0x0000000000000000/0x0000000000000004"
    # fewer than 10 samples: all of them
    assert ab.smi_summary(["1000, 100.00, 0xA", "2000, 300.00, 0xA", "1500, 200.00, 0xB"], 2.0) == \
        ", SM 1500 MHz, 200 W, 400 mJ/step, reasons 0xA/0xB"
    assert ab.smi_summary([header, "[N/A], [N/A], [N/A]"], 2.0) == ", no clock/power samples"


def test_packed_steps_script(capsys, monkeypatch):
    """benchmarks/packed_steps.py's parts on the CPU: per-step packings, the FlexAttention mask_mod
    against the maskdsl mask it stands for, the model's steps with each maskdsl provider (the plan
    made ahead is the one the next step finds), and its argument errors."""
    import maskdsl.plan as plan_module

    script = _load_script("packed_steps")
    monkeypatch.setattr(plan_module, "COPY_NON_BLOCKING", True)  # restored after the blocking provider's steps
    steps = script.packings(200, 2, 3, first_seed=5)
    assert len(steps) == 3 and all(len(s) == 2 and sum(s[0]) <= 200 for s in steps) and steps[0] != steps[1]
    doc, pos = script.doc_ids(steps[1], 200), torch.arange(200)
    mod = script.doc_causal_mod(doc)
    allowed = torch.stack([mod(torch.tensor(b), 0, pos[:, None], pos[None, :]) for b in range(2)])
    assert torch.equal(allowed, (md.Document(steps[1]) & md.Causal()).to_dense(200, 200).reshape(2, 200, 200))
    model = script.Model(1, 2, 16, "cpu")
    x = torch.randn(2, 200, 32, dtype=torch.bfloat16)
    losses = {}
    for provider in ("maskdsl", "maskdsl_ahead", "maskdsl_blocking"):
        plan_module._CACHE.clear()
        prepare, ahead = script.step_fns(provider, 200, 2, steps, torch.device("cpu"))
        assert (ahead is not None) == (provider == "maskdsl_ahead")
        prepare(0)(*(x.view(2, 200, 2, 16).transpose(1, 2),) * 3)
        if ahead is not None:
            ahead(1)
            made = len(plan_module._CACHE)
            losses[provider] = model(x, prepare(1)).float().mean().detach()
            assert len(plan_module._CACHE) == made  # step 1 found the plan made ahead
        else:
            losses[provider] = model(x, prepare(1)).float().mean().detach()
    assert plan_module.COPY_NON_BLOCKING is False  # the last provider's, maskdsl_blocking
    assert len({float(v) for v in losses.values()}) == 1  # the same masks, the same model
    for argv, message in ((["--steps", "0"], "--steps: expected 1 or more"),
                          (["--providers", "maskdsl,nope"], "unknown nope")):
        with pytest.raises(SystemExit) as exc:
            script.main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_prepare_time_script(tmp_path, capsys):
    """benchmarks/prepare_time.py on the CPU: md.prepare of fresh masks, warmed for a head dim,
    one row per workload and size (a tree once, at its own size), written to the CSV."""
    out = tmp_path / "prepare.csv"
    script = _load_script("prepare_time")
    assert script.main(["--workloads", "lf_window,alpaca_seq,medusa_5x5", "--n", "256,512", "--device", "cpu",
                        "--repeats", "1", "--warm", "64", "--no-flex", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["workload"], r["n"]) for r in rows][:4] == [("lf_window", "256"), ("lf_window", "512"),
                                                          ("alpaca_seq", "256"), ("alpaca_seq", "512")]
    assert [r["workload"] for r in rows[4:]] == ["medusa_5x5"]
    assert all(float(r["maskdsl_ms"]) > 0 and r["flex_ms"] == "" and r["batch"] == "1" for r in rows)
    assert "lf_window" in capsys.readouterr().out
    # per-batch packings: one mask with B length lists; the FlexAttention mask_mod agrees with it
    assert script.main(["--workloads", "alpaca_bidir", "--n", "256", "--device", "cpu", "--repeats", "1",
                        "--no-flex", "--batch", "3", "--csv", str(out)]) == 0
    assert [(r["workload"], r["batch"]) for r in csv.DictReader(out.open())] == [("alpaca_bidir", "3")]
    mask, mask_mod = script.packed("alpaca_bidir", 256, 3)
    assert mask.batch_shape == (3, 1)
    mod, pos = mask_mod("cpu"), torch.arange(256)
    allowed = torch.stack([mod(torch.tensor(b), 0, pos[:, None], pos[None, :]) for b in range(3)])
    assert torch.equal(allowed, mask.to_dense(256, 256).reshape(3, 256, 256))
    with pytest.raises(ValueError, match="--batch"):
        script.packed("lf_window", 256, 2)
    for argv, message in ((["--batch", "2"], "drop lf_dilated,lf_global,lf_window,medusa_8x3 from --workloads"),
                          (["--repeats", "0"], "expected 1 or more")):
        with pytest.raises(SystemExit) as exc:
            script.main(argv + ["--device", "cpu", "--no-flex"])
        assert exc.value.code == 2 and message in capsys.readouterr().err
