"""The evaluation: ε parsing, per-example worst case, and agreement of the default suite with AutoAttack."""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from robust_train.attacks.suite import DEFAULT_SUITE
from robust_train.data import MNISTData
from robust_train.errors import ConfigError
from robust_train.evaluate import evaluate, format_table, parse_eps
from robust_train.methods import FastFGSMTraining


def test_parse_eps_reads_fractions_without_eval():
    assert parse_eps("0, 0.1,8/255") == pytest.approx([0.0, 0.1, 8 / 255])
    for bad in ("abc", "__import__('os')", "1/0"):
        with pytest.raises(ConfigError):
            parse_eps(bad)
    with pytest.raises(ConfigError):
        parse_eps("0.5,1.5")


@pytest.fixture(scope="module")
def robustish_checkpoint(tmp_path_factory):
    """A small CNN given a little fast-FGSM training at ε 0.1: robust accuracy neither 0 nor 1 at ε 0.1."""
    torch.manual_seed(0)
    dm = MNISTData(batch_size=64, val_size=100)
    module = FastFGSMTraining(eps=0.1, lr=2e-3)
    trainer = pl.Trainer(max_steps=250, limit_val_batches=0, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path_factory.mktemp("fit"))
    trainer.fit(module, datamodule=dm)
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_worst_case_is_per_example_and_below_every_attack(robustish_checkpoint):
    report = evaluate(str(robustish_checkpoint), ["fgsm", "pgd", "pgd_margin"], [0.0, 0.1, 0.2], n=100,
                      steps=20, progress=False)
    assert report["robust_accuracy"]["0"] == pytest.approx(report["clean_accuracy"])
    for eps in ("0.1", "0.2"):
        accs = [r["accuracy"] for r in report["attacks"] if f"{r['eps']:g}" == eps]
        worst = report["robust_accuracy"][eps]
        assert worst <= min(accs) + 1e-9
        assert worst >= report["clean_accuracy"] - sum(report["clean_accuracy"] - a for a in accs) - 1e-9
    assert 0.05 < report["robust_accuracy"]["0.1"] < report["clean_accuracy"]
    assert report["robust_accuracy"]["0.2"] <= report["robust_accuracy"]["0.1"]
    assert "worst case" in format_table(report)


def test_default_suite_agrees_with_autoattack(robustish_checkpoint):
    pytest.importorskip("pyautoattack")
    ours = evaluate(str(robustish_checkpoint), DEFAULT_SUITE, [0.1], n=100, progress=False)
    aa = evaluate(str(robustish_checkpoint), ["autoattack"], [0.1], n=100, progress=False)
    ours_acc, aa_acc = ours["robust_accuracy"]["0.1"], aa["robust_accuracy"]["0.1"]
    assert 0.05 < aa_acc < 0.95, "the model must be partly robust for the comparison to mean anything"
    # 100 images: one image is 1 point; bench/mnist_pgd.py checks 1.5 points on 1,000 images.
    assert abs(ours_acc - aa_acc) <= 0.03, (ours_acc, aa_acc)
