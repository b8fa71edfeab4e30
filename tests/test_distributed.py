"""DDP on the CPU with two gloo processes: a short `fit`, and `validate` and `evaluate` whose numbers must equal a
single process's on the same examples."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from robust_train.distributed import Split, batch_seed
from tests.test_cli import run

TWO_PROCESSES = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
SMALL_RUN = ["--data.init_args.val_size", "101", "--data.init_args.batch_size", "32",
             "--attack_accuracy.attack", "fgsm", "--map_stability.every_n_epochs", "0"]
THREADS = {"OMP_NUM_THREADS": "1"}


class FakeRank(Split):
    def __init__(self, rank: int, world: int):
        self.fabric, self.rank, self.world = None, rank, world


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_every_batch_goes_to_exactly_one_rank(world):
    n, batch = 103, 10
    taken = [b for r in range(world) for b, _ in FakeRank(r, world).batches(n, batch)]
    assert sorted(taken) == list(range(11))
    rows = sorted(i for r in range(world) for _, part in FakeRank(r, world).batches(n, batch)
                  for i in range(n)[part])
    assert rows == list(range(n))
    assert sum(FakeRank(r, world).count(n, batch) for r in range(world)) == 11


def test_batch_seeds_are_fixed_and_distinct():
    assert batch_seed(0, 1, 2) == batch_seed(0, 1, 2)
    seeds = {batch_seed(s, e, a, b) for s in range(2) for e in range(3) for a in range(3) for b in range(20)}
    assert len(seeds) == 2 * 3 * 3 * 20
    assert all(0 <= s < 2 ** 63 for s in seeds)


def without_timings(report: dict) -> dict:
    drop = {"seconds", "date", "processes", "device"}
    if isinstance(report, dict):
        return {k: without_timings(v) for k, v in report.items() if k not in drop and k != "out"}
    if isinstance(report, list):
        return [without_timings(v) for v in report]
    return report


def test_distributed_evaluate_equals_one_process(robustish_checkpoint, tmp_path):
    # 5 batches of 12 (the last one short): rank 0 takes batches 0, 2, 4 and rank 1 batches 1, 3. PGD and AAI
    # start at random points, so equality also says every random draw is tied to the batch, not the process.
    common = ["evaluate", "--ckpt", str(robustish_checkpoint), "--n", "56", "--batch-size", "12", "--eps", "0,0.1",
              "--attacks", "fgsm,pgd,pgd_margin", "--steps", "5", "--stability-n", "30", "--stability-steps", "5",
              "--checks-n", "24", "--no-pictures"]
    one = run(*common, "--out", str(tmp_path / "one"), env=THREADS)
    two = run(*common, "--out", str(tmp_path / "two"), "--devices", "2", "--accelerator", "cpu", env=THREADS)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert (a["processes"], b["processes"]) == (1, 2)
    assert 0 < a["robust_accuracy"]["0.1"] < a["clean_accuracy"]  # a comparison worth making
    assert without_timings(a) == without_timings(b)
    assert two.stdout.count("wrote report.json") == 1  # rank 1 neither prints nor writes


def read_metrics(folder: Path) -> dict[str, float]:
    """The last value of every column of a CSVLogger's metrics.csv under folder."""
    (path,) = folder.rglob("metrics.csv")
    values: dict[str, float] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


def test_ddp_fit_writes_one_run_and_validate_matches_one_process(tmp_path):
    env = {**THREADS, "ROBUST_TRAIN_OUTPUT": str(tmp_path / "runs")}
    fit = run("fit", "--recipe", "standard", *TWO_PROCESSES, *SMALL_RUN, "--trainer.max_epochs", "1",
              "--trainer.limit_train_batches", "6", env=env)
    assert fit.returncode == 0, fit.stderr[-3000:]
    runs = list((tmp_path / "runs" / "standard").iterdir())
    assert len(runs) == 1, runs  # rank 1 wrote into rank 0's run folder, not a second one
    ckpts = sorted(p.name for p in runs[0].glob("*.ckpt"))
    assert "last.ckpt" in ckpts and len(ckpts) == 2, ckpts
    assert len(list(runs[0].glob("wandb/offline-run-*"))) == 1  # one wandb run, from rank 0

    metrics = {}
    for name, extra in (("one", []), ("two", TWO_PROCESSES)):
        res = run("validate", "--recipe", "standard", *SMALL_RUN, *extra, "--ckpt_path", str(runs[0] / "last.ckpt"),
                  "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                  "--trainer.logger.save_dir", str(tmp_path / name), env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        metrics[name] = read_metrics(tmp_path / name)
    one, two = metrics["one"], metrics["two"]
    assert {"val/acc", "val/robust_acc", "val/loss"} <= set(one)
    # 101 validation images: 51 and 50 per rank, none counted twice, so the accuracies are the same fractions
    assert two["val/acc"] == one["val/acc"]
    assert two["val/robust_acc"] == one["val/robust_acc"]
    assert two["val/loss"] == pytest.approx(one["val/loss"], rel=1e-5)
    assert round(one["val/acc"] * 101) == pytest.approx(one["val/acc"] * 101, abs=1e-4)
