"""bench/probes.py refuses a model list it cannot judge before it trains anything."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("models", ["pgd,int2_adv", "standard,madry"])
def test_models_without_the_baseline_or_unknown_are_refused(models, tmp_path):
    out = tmp_path / "probes.json"
    done = subprocess.run([sys.executable, "bench/probes.py", "--data", "mnist", "--models", models,
                           "--runs", str(tmp_path / "runs"), "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 2
    assert "--models" in done.stderr and "standard" in done.stderr
    assert not out.exists() and not (tmp_path / "runs").exists()
