"""Every example runs on the CPU at its small size (examples/, README "Examples")."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMES = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))


def test_the_examples_are_there():
    assert NAMES == ["longformer.py", "packed_finetune.py", "quickstart.py", "tensor_mask_reorder.py",
                     "tree_verification.py"]


@pytest.mark.parametrize("name", NAMES)
def test_example_runs_small(name):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(EXAMPLES / name), "--small"], cwd=EXAMPLES.parent, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip(), "the example printed nothing"
