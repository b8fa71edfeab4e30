"""bench/eval_speed.py run as a program on the shared small checkpoint: early stopping on and off leave every
example's outcome the same, and the JSON holds one row per (ε, attack) plus the torchattacks comparison."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def checkpoint(one_thread, request):
    """conftest's robustish_checkpoint, trained (unless an earlier test did) with one intra-op thread: a session
    fixture would otherwise be made before the module's one_thread, and on a shared CPU two threads train it
    several times slower."""
    return request.getfixturevalue("robustish_checkpoint")


def run_bench(script, *args):
    """bench/<script> from the repository root, with one intra-op thread: tiny models gain nothing from more, and
    on a shared CPU a descheduled OpenMP thread stalls every parallel region."""
    done = subprocess.run([sys.executable, f"bench/{script}", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_early_stopping_changes_no_outcome(checkpoint, tmp_path):
    out = tmp_path / "eval_speed.json"
    printed = run_bench("eval_speed.py", "--ckpt", f"tiny={checkpoint}", "--n", 24, "--eps", "0,0.1",
                        "--out", out)
    result = json.loads(out.read_text())
    assert result["benchmark"] == "eval_speed" and result["n"] == 24
    assert {"machine", "torch", "date"} <= set(result)
    suite = [r for r in result["rows"] if "seconds_all" in r]
    assert [r["attack"] for r in suite] == ["pgd", "pgd_margin", "pgd_targeted"]  # ε 0 is skipped
    assert all(r["eps"] == 0.1 and r["model"] == "tiny" for r in result["rows"])
    assert all(r["outcomes_differ"] == 0 and r["accuracy_all"] == r["accuracy_early_stop"] for r in suite)
    assert 0 < suite[0]["accuracy_all"] < 1  # the fixture is neither broken nor untouched at ε 0.1
    (ta,) = [r for r in result["rows"] if r["attack"] == "pgd100_constant"]
    assert 0 <= ta["accuracy_ours"] <= 1 and 0 <= ta["accuracy_torchattacks"] <= 1
    assert "early stopping against without" in printed and f"wrote {out}" in printed
    summary = printed.split("outcomes differ\n", 1)[1].splitlines()[0].split()
    assert summary[0] == "tiny" and summary[-1] == "0"
