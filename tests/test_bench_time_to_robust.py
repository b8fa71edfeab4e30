"""bench/time_to_robust.py: which checkpoints it evaluates, how it judges the goals, and one end-to-end run on a
finished (tiny) training run with --reuse: AutoAttack on 20 images, the table, the JSON and the PNG."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("time_to_robust", ROOT / "bench" / "time_to_robust.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checkpoints_are_spread_over_the_run_and_include_the_last(bench, tmp_path):
    start = time.time() - 1000
    for epoch in range(10):
        path = tmp_path / f"best-{epoch:03d}-0.5000.ckpt"
        path.write_bytes(b"")
        os.utime(path, (start + 60 * (epoch + 1), start + 60 * (epoch + 1)))
    (tmp_path / "last.ckpt").write_bytes(b"")
    picked = bench.checkpoints_along(tmp_path, start, points=4)
    assert [e for e, _, _ in picked] == [0, 3, 6, 9]
    assert [round(m, 3) for _, m, _ in picked] == [1.0, 4.0, 7.0, 10.0]
    assert len(bench.checkpoints_along(tmp_path, start, points=20)) == 10


def curve(*points):
    return {"curve": [{"minutes": m, "autoattack": a} for m, a in points]}


def test_goals_need_every_seed_in_time_and_count_collapses(bench):
    good = {str(s): curve((2, 0.5), (6, 0.81), (7.5, 0.83)) for s in range(5)}
    results = {"n_fgsm": {"recipe": "n_fgsm", "seeds": good},
               "fgsm_rs": {"recipe": "fgsm_rs", "seeds": {**good, "4": curve((2, 0.6), (5, 0.05))}},
               "pgd_awp": {"recipe": "pgd_awp", "seeds": {"0": curve((20, 0.84), (50, 0.86))}},
               "int2_adv": {"recipe": "int2_adv", "seeds": {"0": curve((30, 0.69), (36, 0.71))}}}
    goals = bench.judge(results)
    n_fgsm = goals["single-step n_fgsm: AA >= 0.8 in <= 8.0 min, 5 seeds without collapse"]
    fgsm_rs = goals["single-step fgsm_rs: AA >= 0.8 in <= 8.0 min, 5 seeds without collapse"]
    assert n_fgsm["met"] and n_fgsm["minutes_to_level"] == [6] * 5 and n_fgsm["collapsed_seeds"] == 0
    assert not fgsm_rs["met"] and fgsm_rs["collapsed_seeds"] == 1
    best = goals["best recipe: AA >= 0.85 within 60.0 min"]
    assert best["met"] and best["recipes"] == {"pgd_awp": 50}
    assert not goals["int2_adv: AA >= 0.7 in <= 34.5 min"]["met"]
    results["n_fgsm"]["seeds"] = {"0": good["0"]}
    assert not bench.judge(results)["single-step n_fgsm: AA >= 0.8 in <= 8.0 min, 5 seeds without collapse"]["met"], \
        "one seed does not show that the recipe never collapses"


def test_a_finished_run_is_evaluated_and_plotted(tmp_path):
    from tests.conftest import quiet_trainer
    from robust_train.data import MNISTData
    from robust_train.methods import NFGSMTraining

    runs = tmp_path / "runs"
    run = runs / "n_fgsm-seed0" / "n_fgsm" / "20261203-000000-abcd"
    run.mkdir(parents=True)
    torch.manual_seed(0)
    data = MNISTData(batch_size=64, val_size=100)
    module = NFGSMTraining(arch="fast_mnist_cnn", noise_ratio=1.0, lr=5e-3)
    trainer = quiet_trainer(tmp_path, max_steps=30, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    start = time.time() - 120
    for epoch in (0, 1):
        trainer.save_checkpoint(run / f"best-{epoch:03d}-0.1000.ckpt")
    trainer.save_checkpoint(run / "last.ckpt")
    (runs / "n_fgsm-seed0" / "timing.txt").write_text(f"{start}\n90\n{run}\n")
    out, png = tmp_path / "ttr.json", tmp_path / "ttr.png"
    done = subprocess.run([sys.executable, "bench/time_to_robust.py", "--recipes", "n_fgsm", "--reuse", "--runs",
                           str(runs), "--n", "20", "--points", "2", "--no-suite", "--out", str(out), "--png", str(png)],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    points = result["recipes"]["n_fgsm"]["seeds"]["0"]["curve"]
    assert [p["epoch"] for p in points] == [0, 1] and all(0 <= p["autoattack"] <= p["clean"] for p in points)
    assert result["n"] == 20 and "NOT MET" in done.stdout and png.stat().st_size > 1000
    assert sum(ln.startswith("n_fgsm ") for ln in done.stdout.splitlines()) == 2, "one table row per checkpoint"


def test_combine_judges_earlier_results_together_without_training(tmp_path):
    for name, recipe, points in (("a", "pgd_awp", [(3, 0.82), (7, 0.87)]), ("b", "int2_adv", [(30, 0.71)])):
        (tmp_path / f"{name}.json").write_text(json.dumps({"recipes": {recipe: {"recipe": recipe, "seeds": {"0": {
            "curve": [{"epoch": i, "minutes": m, "clean": 0.98, "autoattack": a} for i, (m, a) in enumerate(points)]}}}},
            "date": "2026-12-03 19:00"}))
    out = tmp_path / "all.json"
    done = subprocess.run([sys.executable, "bench/time_to_robust.py", "--combine", str(tmp_path / "a.json"),
                           str(tmp_path / "b.json"), "--out", str(out), "--png", str(tmp_path / "all.png")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    goals = json.loads(out.read_text())["goals"]
    assert goals["best recipe: AA >= 0.85 within 60.0 min"] == {"met": True, "recipes": {"pgd_awp": 7}}
    assert goals["int2_adv: AA >= 0.7 in <= 34.5 min"] == {"met": True, "minutes": 30}
