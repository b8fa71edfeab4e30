"""Every benchmark starts as a program from the repository root: `python bench/<name>.py --help` imports all it
uses, so a renamed or moved package API breaks here rather than at the start of a long run."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("*.py") if p.name != "common.py")


def test_every_script_is_listed():
    assert {"architectures.py", "defences.py", "eval_speed.py", "mnist_pgd.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    done = subprocess.run([sys.executable, f"bench/{script}", "--help"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("usage: ") and "--out" in done.stdout
