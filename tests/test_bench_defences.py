"""bench/defences.py run as a program, without training: the shared small checkpoint stands in for every target and
for the black-box source, so every row is the same model's."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("standard", "distillation", "ensemble_adv", "pgd")


@pytest.fixture
def checkpoint(one_thread, request):
    """conftest's robustish_checkpoint, trained (unless an earlier test did) with one intra-op thread: a session
    fixture would otherwise be made before the module's one_thread, and on a shared CPU two threads train it
    several times slower."""
    return request.getfixturevalue("robustish_checkpoint")


def run_bench(script, *args, check=True):
    """bench/<script> from the repository root, with one intra-op thread: tiny models gain nothing from more, and
    on a shared CPU a descheduled OpenMP thread stalls every parallel region."""
    done = subprocess.run([sys.executable, f"bench/{script}", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_one_checkpoint_as_every_target(checkpoint, tmp_path):
    ckpt, out = checkpoint, tmp_path / "defences.json"
    printed = run_bench("defences.py", "--n", 12, "--eps", 0.1, "--checks-n", 12, "--source-ckpt", ckpt,
                        "--out", out, *[f"--ckpt={name}={ckpt}" for name in TARGETS]).stdout
    result = json.loads(out.read_text())
    assert list(result["rows"]) == list(TARGETS) and result["trained_minutes"] == {}
    assert result["attacks"] == ["fgsm", "pgd", "pgd_margin", "autoattack"]
    for name, r in result["rows"].items():
        attacks = [r[a] for a in result["attacks"]]
        assert r["worst"] <= min(attacks) and max(attacks) <= r["clean"], name
        # Source and target are one model: the "black-box" examples are its own white-box PGD ones, no weaker
        # than its worst case over the suite.
        assert r["black_box"] >= r["worst"], name
    assert 0 < result["rows"]["pgd"]["worst"] < 1
    assert len({json.dumps(r, sort_keys=True) for r in result["rows"].values()}) == 1  # one model, one row

    # Identical rows: ensemble_adv's black box is not above standard's, and is as high as PGD-AT's.
    found = result["findings"]
    assert not found["ensemble_black_box_above_standard"]["holds"]
    assert found["ensemble_black_box_vs_pgd_at"]["holds"]
    d = found["distillation_masking_exposed"]
    assert d["holds"] == (d["ce_pgd"] - d["margin_or_autoattack"] >= 0.2 and bool(d["failed_checks"]))
    p = result["rows"]["pgd"]
    assert found["no_masking_flagged_on_pgd_at"]["holds"] == (not p["masking_suspected"])

    assert "| target | clean | FGSM |" in printed and "| ensemble_adv |" in printed
    assert "ensemble_black_box_above_standard: DOES NOT HOLD" in printed and f"wrote {out}" in printed


def test_bad_ckpt_argument_names_the_choices():
    done = run_bench("defences.py", "--ckpt", "teacher=/x.ckpt", check=False)
    assert done.returncode != 0 and "NAME one of standard" in done.stderr
