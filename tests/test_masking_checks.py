"""Gradient-masking checks: each check on handmade numbers, on masked toy models (a saturated softmax as in
defensive distillation deployed at T = 1, a non-differentiable quantisation) against unmasked ones, and inside
`evaluate` (report["checks"], --transfer-from, --no-checks, one-line errors)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robust_train.evaluate.evaluation as evaluation_module
import robust_train.evaluate.sections.transfer as transfer_module
from robust_train.attacks import create_attack
from robust_train.evaluate import masking as mc
from robust_train.checkpoint import classifier_from_checkpoint, read_checkpoint
from robust_train.cli import main as cli_main
from robust_train.data import MNISTData
from robust_train.evaluate import correct_under, evaluate, format_markdown
from robust_train.methods import StandardTraining
from robust_train.models import create_model
from tests.conftest import quiet_trainer

ALL_CHECKS = ["deterministic", "outputs_are_logits", "zero_gradients", "monotone_in_eps", "monotone_in_steps",
              "iterative_not_weaker", "large_eps_breaks", "noise_not_stronger"]
T = 1e4  # a briefly trained net has logit gaps of ~1; ×T saturates the softmax as distillation's ×100 does on a
# fully trained one


def by_name(rows):
    return {r["check"]: r for r in rows}


def assert_row(row, name, passed):
    assert row["check"] == name and row["passed"] is passed and isinstance(row["detail"], str) and row["detail"]
    json.dumps(row, allow_nan=False)


# --------------------------------------------------------------------------------------------- handmade numbers
def test_tolerance_is_one_example_and_at_least_three_tenths_of_a_point():
    assert mc.tolerance(100) == pytest.approx(0.01)
    assert mc.tolerance(1000) == pytest.approx(0.003)
    assert mc.tolerance(10_000) == pytest.approx(0.003)


def test_monotone_in_eps():
    assert_row(mc.monotone_in_eps({"0": 0.99, "0.1": 0.7, "0.2": 0.3, "0.3": 0.0}, 100), "monotone_in_eps", True)
    assert_row(mc.monotone_in_eps({0.2: 0.305, 0.1: 0.30}, 100), "monotone_in_eps", True)  # within one example
    bad = mc.monotone_in_eps({"0": 0.99, "0.1": 0.3, "0.2": 0.5, "0.3": 0.4}, 100)
    assert_row(bad, "monotone_in_eps", False)
    assert bad["max_rise"] == pytest.approx(0.2) and "ε=0.1" in bad["detail"] and "ε=0.2" in bad["detail"]
    # a slow drift upwards, each step within the tolerance, is caught against the lowest value so far
    assert_row(mc.monotone_in_eps({"0.1": 0.30, "0.2": 0.308, "0.3": 0.316}, 100), "monotone_in_eps", False)


def test_monotone_in_steps_numbers():
    assert_row(mc.steps_compared({10: 0.40, 40: 0.38}, 100), "monotone_in_steps", True)
    bad = mc.steps_compared({40: 0.50, 10: 0.40}, 100)
    assert_row(bad, "monotone_in_steps", False)
    assert bad["accuracy_by_steps"] == {"10": 0.40, "40": 0.50}


def test_iterative_not_weaker():
    assert_row(mc.iterative_not_weaker(fgsm_acc=0.5, pgd_acc=0.3, n=100), "iterative_not_weaker", True)
    assert_row(mc.iterative_not_weaker(fgsm_acc=0.3, pgd_acc=0.305, n=100), "iterative_not_weaker", True)
    assert_row(mc.iterative_not_weaker(fgsm_acc=0.3, pgd_acc=0.5, n=100), "iterative_not_weaker", False)


def test_black_box_and_noise_not_stronger():
    assert_row(mc.black_box_not_stronger(white_acc=0.4, transfer_acc=0.6, n=100), "black_box_not_stronger", True)
    bad = mc.black_box_not_stronger(white_acc=0.4, transfer_acc=0.2, n=100)
    assert_row(bad, "black_box_not_stronger", False)
    assert bad["transfer_accuracy"] == 0.2 and bad["white_box_accuracy"] == 0.4
    assert_row(mc.noise_not_stronger(white_acc=0.4, noise_acc=0.9, n=100), "noise_not_stronger", True)
    assert_row(mc.noise_not_stronger(white_acc=0.4, noise_acc=0.395, n=100), "noise_not_stronger", True)
    assert_row(mc.noise_not_stronger(white_acc=0.4, noise_acc=0.1, n=100), "noise_not_stronger", False)


def test_format_checks_marks_passed_and_failed():
    table = mc.format_checks([mc.result("a", True, "fine"), mc.result("b", False, "broken")])
    assert "| ✓ | a | fine |" in table and "| ✗ | b | broken |" in table
    assert mc.masking_suspected([mc.result("a", True, "")]) is False
    assert mc.masking_suspected([mc.result("a", True, ""), mc.result("b", False, "")]) is True


def test_sign_noise_is_a_corner_of_the_ball():
    x = torch.full((2, 1, 4, 4), 0.5)
    moved = (mc.sign_noise(x, 0.1) - x).abs()
    assert torch.allclose(moved, torch.full_like(x, 0.1))


# ------------------------------------------------------------------------------------------------- toy models
class Scaled(nn.Module):
    """logits × T: a student trained at temperature T and deployed at T = 1."""

    def __init__(self, inner: nn.Module, t: float):
        super().__init__()
        self.inner, self.t = inner, t

    def forward(self, x):
        return self.inner(x) * self.t


class Quantised(nn.Module):
    """x → round(4x)/4 before the net: the gradient of the rounding is zero almost everywhere."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 4) / 4)


class Noisy(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(F.dropout(x, 0.5, training=True))


class Softmaxed(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).softmax(1)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A small CNN after 40 batches of standard training (about 60% of the test images right), 'trained' at ε 0.1."""
    torch.manual_seed(0)
    dm = MNISTData(batch_size=128, val_size=100)
    module = StandardTraining(eps=0.1, lr=5e-3)
    trainer = quiet_trainer(tmp_path_factory.mktemp("fit"), max_steps=40, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def data(tiny_checkpoint):
    model = classifier_from_checkpoint(read_checkpoint(tiny_checkpoint))
    x, y = MNISTData().test_tensors(80)
    return model, x, y


def test_the_tiny_model_is_partly_right(data):
    model, x, y = data
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert 0.25 < acc < 0.95, acc


def test_zero_gradients_flag_a_saturated_softmax_only(data):
    model, x, y = data
    plain = mc.zero_gradient_share(model, x, y)
    assert_row(plain, "zero_gradients", True)
    assert plain["share"] == 0.0 and plain["element_share"] < 0.01
    saturated = mc.zero_gradient_share(Scaled(model, T), x, y)
    assert_row(saturated, "zero_gradients", False)
    # float32: exp(-gap) underflows for the correctly classified points, whose gradient is then exactly zero
    assert saturated["share_of_correct"] > 0.8 and saturated["share"] > 0.2
    assert saturated["count"] == round(saturated["share"] * len(x))


def test_randomized_models_and_probability_outputs_are_flagged(data):
    model, x, _ = data
    assert_row(mc.deterministic_output(model, x), "deterministic", True)
    assert_row(mc.deterministic_output(Noisy(model), x), "deterministic", False)
    assert_row(mc.outputs_are_logits(model, x), "outputs_are_logits", True)
    assert_row(mc.outputs_are_logits(Softmaxed(model), x), "outputs_are_logits", False)


def test_large_eps_breaks_a_random_net_but_not_a_quantised_one(data):
    model, x, y = data
    torch.manual_seed(0)
    random_net = create_model("small_cnn", num_classes=10, in_channels=1).eval()
    for net in (random_net, model):
        ok = mc.large_eps_breaks(net, x[:40], y[:40], steps=10)
        assert_row(ok, "large_eps_breaks", True)
        assert ok["accuracy"] <= 0.05 and ok["eps"] == 1.0
    # with zero gradients PGD never leaves the clean image (no random start here, which would be noise at ε = 1)
    masked = mc.large_eps_breaks(Quantised(model), x[:40], y[:40], steps=10)
    assert_row(masked, "large_eps_breaks", False)
    with torch.no_grad():
        clean = (model(x[:40]).argmax(1) == y[:40]).float().mean().item()
    assert masked["accuracy"] >= clean - 0.1


def test_monotone_in_steps_runs_pgd_at_k_and_4k_steps(data):
    model, x, y = data
    row = mc.monotone_in_steps(model, x[:40], y[:40], 0.1, steps=3)
    assert_row(row, "monotone_in_steps", True)
    assert set(row["accuracy_by_steps"]) == {"3", "12"} and row["eps"] == 0.1


def test_unmasked_model_passes_every_check_and_masked_ones_fail(data):
    model, x, y = data
    plain = by_name(mc.run_checks(model, x, y, 0.1))
    assert list(plain) == [c for c in ALL_CHECKS if c != "monotone_in_eps"]
    assert all(r["passed"] for r in plain.values()), [r["detail"] for r in plain.values() if not r["passed"]]

    distilled = by_name(mc.run_checks(Scaled(model, T), x, y, 0.1))
    assert not distilled["zero_gradients"]["passed"] and not distilled["large_eps_breaks"]["passed"]
    assert not distilled["noise_not_stronger"]["passed"]  # noise breaks more than CE-PGD, which cannot move
    quantised = by_name(mc.run_checks(Quantised(model), x, y, 0.1))
    assert quantised["zero_gradients"]["share"] == 1.0
    assert not quantised["zero_gradients"]["passed"] and not quantised["large_eps_breaks"]["passed"]


def test_distilled_model_looks_robust_to_cross_entropy_pgd_only(data):
    """The issue's test case: CE-PGD on the deployed student looks robust, the margin loss breaks it."""
    model, x, y = data
    student = Scaled(model, T)
    acc = {}
    for name in ("pgd", "pgd_margin"):
        torch.manual_seed(0)
        acc[name] = correct_under(student, x, y, create_attack(name, 0.1, steps=10)).float().mean().item()
    torch.manual_seed(0)
    undistilled = correct_under(model, x, y, create_attack("pgd", 0.1, steps=10)).float().mean().item()
    assert acc["pgd"] > undistilled + 0.1 and acc["pgd"] > acc["pgd_margin"] + 0.1, (acc, undistilled)


# ------------------------------------------------------------------------------------------------ in evaluate
def quick(ckpt, **kwargs):
    defaults = dict(attacks=["fgsm", "pgd"], eps=[0.0, 0.1, 0.2], n=60, steps=5, progress=False,
                    stability_attacks=(), pictures=False)
    return evaluate(str(ckpt), **{**defaults, **kwargs})


def test_evaluate_reports_the_checks(tiny_checkpoint):
    report = quick(tiny_checkpoint, checks_n=40)
    assert [r["check"] for r in report["checks"]] == ALL_CHECKS
    assert report["masking_suspected"] is False, [r["detail"] for r in report["checks"] if not r["passed"]]
    assert report["checks_settings"]["eps"] == 0.1 and report["checks_settings"]["n"] == 40
    iterative = by_name(report["checks"])["iterative_not_weaker"]
    assert iterative.get("reused") and iterative["pgd_accuracy"] == report["attacks"][3]["accuracy"]
    assert report["transfer"] is None
    md = format_markdown(report)
    assert "## Gradient masking" in md and "| ✓ | zero_gradients |" in md
    off = quick(tiny_checkpoint, eps=[0.0, 0.1], checks=False)
    assert off["checks"] == [] and off["masking_suspected"] is None
    assert "Gradient masking" not in format_markdown(off)


def test_evaluate_flags_the_distilled_student(tiny_checkpoint, monkeypatch):
    load = evaluation_module.classifier_from_checkpoint

    def student(ckpt):  # the same weights with the head ×T: a Classifier still, logits ×T
        model = copy.deepcopy(load(ckpt))
        with torch.no_grad():
            model.head.weight.mul_(T)
            model.head.bias.mul_(T)
        return model

    monkeypatch.setattr(evaluation_module, "classifier_from_checkpoint", student)
    report = quick(tiny_checkpoint, attacks=["pgd", "pgd_margin"], eps=[0.0, 0.1], steps=10, checks_n=40)
    acc = {r["name"]: r["accuracy"] for r in report["attacks"] if r["eps"] == 0.1}
    assert acc["pgd"] > acc["pgd_margin"] + 0.1, acc
    assert report["masking_suspected"] is True
    assert not by_name(report["checks"])["zero_gradients"]["passed"]
    assert "gradient masking suspected" in format_markdown(report)


def test_transfer_from_the_same_checkpoint(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "r"
    rc = cli_main(["evaluate", "--ckpt", str(tiny_checkpoint), "--n", "40", "--eps", "0,0.1", "--attacks",
                   "fgsm,pgd", "--steps", "5", "--stability-attacks", "none", "--no-pictures", "--out", str(out),
                   "--transfer-from", str(tiny_checkpoint)])
    printed = capsys.readouterr().out
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    transfer = report["transfer"]
    assert transfer["source"] == str(tiny_checkpoint) and transfer["eps"] == 0.1 and transfer["n"] == 40
    white = report["robust_accuracy"]["0.1"]
    assert transfer["white_box_accuracy"] == white
    assert transfer["accuracy"] >= white - 1e-9  # white box includes more than this one PGD run
    black_box = by_name(report["checks"])["black_box_not_stronger"]
    assert black_box["passed"] and black_box["transfer_accuracy"] == transfer["accuracy"]
    assert "Transfer (black box)" in printed and "| ✓ | black_box_not_stronger |" in printed
    assert "Transfer (black box)" in (out / "report.md").read_text()


def test_transfer_crafts_strongest_examples(tiny_checkpoint, tmp_path, monkeypatch):
    """The transfer attack returns each example's highest-loss iterate on the source, not its first success (which
    barely crosses the source's boundary and transfers worst)."""
    seen = []
    real = transfer_module.create_attack

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(transfer_module, "create_attack", spy)
    rc = cli_main(["evaluate", "--ckpt", str(tiny_checkpoint), "--n", "8", "--eps", "0,0.1", "--attacks", "fgsm",
                   "--steps", "2", "--stability-attacks", "none", "--no-pictures", "--no-checks",
                   "--out", str(tmp_path / "r"), "--transfer-from", str(tiny_checkpoint)])
    assert rc == 0 and len(seen) == 1
    assert seen[0].name == "pgd" and seen[0].keep_best and seen[0].early_stop is False


@pytest.mark.parametrize("case", ["missing", "corrupt", "checks-n 0"])
def test_bad_transfer_source_gives_one_line_and_exit_code_2(tiny_checkpoint, tmp_path, capsys, case):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    flags, expected = {
        "missing": (["--transfer-from", str(tmp_path / "nope.ckpt")], "--transfer-from: checkpoint"),
        "corrupt": (["--transfer-from", str(corrupt)], "--transfer-from: checkpoint"),
        "checks-n 0": (["--checks-n", "0"], "--checks-n 0 must be a positive integer"),
    }[case]
    rc = cli_main(["evaluate", "--ckpt", str(tiny_checkpoint), "--n", "8", "--eps", "0,0.1", "--attacks", "fgsm",
                   "--out", str(tmp_path / "r"), *flags])
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip() and "%|" not in ln]  # not progress bars
    assert rc == 2
    assert len(lines) == 1 and lines[0].startswith("robust-train: error:") and expected in lines[0], captured.err
    assert not (tmp_path / "r").exists()
