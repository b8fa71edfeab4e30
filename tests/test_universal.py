"""Universal adversarial perturbations (Moosavi-Dezfooli et al. 2017): the projection and the noise baseline, an affine
model where one direction fools every image, the batched loop against the paper's sequential one, the model's state
left as it was, determinism; on a standard MNIST CNN, a fooling rate far above random noise of the same norm; and
`evaluate --universal` end to end (report.json `universal`, universal.png)."""
from __future__ import annotations

import json
import math
import types

import pytest
import torch
from torch import nn

from robust_train.attacks.deepfool import deepfool
from robust_train.attacks.universal import (apply_perturbation, fooled, perturbation_norm, predict,
                                            project_perturbation, random_like, universal_perturbation)
from robust_train.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

NORMS = ["linf", "l2"]


def size(v: torch.Tensor, norm: str) -> float:
    return float(perturbation_norm(v[None], norm)[0])


# ------------------------------------------------------------------------------------------ projection and noise
@pytest.mark.parametrize("norm", NORMS)
def test_projection_keeps_v_in_the_ball_and_leaves_small_v_alone(norm):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, 8, 8, generator=g)  # ‖v‖∞ ≈ 3, ‖v‖₂ ≈ 14
    eps = 0.3 if norm == "linf" else 2.0
    p = project_perturbation(v, eps, norm)
    assert size(p, norm) == pytest.approx(eps, rel=1e-5)  # outside the ball: onto its boundary
    assert (p < 0).any()  # v itself is not clipped to [0, 1], only x + v is
    if norm == "linf":
        assert torch.equal(p, v.clamp(-eps, eps))
    else:
        assert torch.allclose(p, v * eps / v.norm())  # the closest point of the L2 ball: same direction
    small = v * (0.5 * eps / size(v, norm))
    assert torch.equal(project_perturbation(small, eps, norm), small)
    x = torch.rand(4, 3, 8, 8, generator=g)
    assert torch.equal(apply_perturbation(x, p), (x + p).clamp(0, 1))


@pytest.mark.parametrize("norm", NORMS)
def test_random_like_has_the_exact_norm(norm):
    noise = random_like((1, 28, 28), 0.2, norm, torch.Generator().manual_seed(0), n=64)
    assert noise.shape == (64, 1, 28, 28)
    assert torch.allclose(perturbation_norm(noise, norm), torch.full((64,), 0.2), rtol=1e-5)
    if norm == "linf":  # random signs × ε: every entry ±ε, both signs about equally often
        assert torch.equal(noise.abs(), torch.full_like(noise, 0.2))
        assert 0.45 < (noise > 0).float().mean() < 0.55
        assert perturbation_norm(noise, "l2") == pytest.approx(torch.full((64,), 0.2 * 28), rel=1e-5)
    else:  # a uniform direction: no entry near ε
        assert noise.abs().amax() < 0.1
    one = random_like(torch.zeros(1, 28, 28, dtype=torch.float64), 0.2, norm, torch.Generator().manual_seed(0))
    assert one.shape == (1, 28, 28) and one.dtype == torch.float64 and size(one, norm) == pytest.approx(0.2)
    again = random_like((1, 28, 28), 0.2, norm, torch.Generator().manual_seed(0), n=64)
    assert torch.equal(noise, again)


# ------------------------------------------------------------------------------------------------ affine model
def affine(w: torch.Tensor, b: torch.Tensor) -> nn.Module:
    lin = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return nn.Sequential(nn.Flatten(), lin)


@pytest.fixture
def one_direction():
    """Two classes, logit gap f(x) = w·(x − 0.5) + 0.3 (class 0 when > 0), ‖w‖₁ = 2, on 1x6x6 images in [0.45, 0.55]:
    every image is class 0 with a margin in [0.2, 0.4], and −ε·sign(w) (L∞) or −ε·w/‖w‖₂ (L2) lowers every gap by
    ε‖w‖₁ or ε‖w‖₂: one direction fools them all once that exceeds 0.4, and nothing fools any below 0.2."""
    g = torch.Generator().manual_seed(0)
    w = torch.where(torch.rand(36, generator=g) < 0.5, -1.0, 1.0) * (1 + 0.5 * torch.rand(36, generator=g))
    w = w * 2 / w.abs().sum()
    x = 0.45 + 0.1 * torch.rand(120, 1, 6, 6, generator=g)
    model = affine(torch.stack([w / 2, -w / 2]), torch.stack([0.15 - 0.25 * w.sum(), -0.15 + 0.25 * w.sum()]))
    assert (predict(model, x) == 0).all(), "premise: every image is class 0"
    return model, x, w


@pytest.mark.parametrize("norm", NORMS)
def test_affine_model_one_direction_fools_every_image(one_direction, norm):
    model, x, w = one_direction
    dual = float(w.abs().sum() if norm == "linf" else w.norm())
    eps = 1.3 * 0.4 / dual  # 30% to spare over the largest margin
    assert 0.45 - eps * float(w.abs().max() / (1 if norm == 'linf' else w.norm())) > 0  # nothing is clipped
    result = universal_perturbation(model, x[:60], eps=eps, norm=norm, generator=torch.Generator().manual_seed(0))
    v = result.v
    assert result.fooling_rate_train == 1.0 and result.passes <= 2
    assert size(v, norm) <= eps * (1 + 1e-6)
    assert fooled(model, x[60:], v).all()  # held-out images of the same distribution too
    direction = -(w.sign() if norm == "linf" else w / w.norm())
    cosine = torch.nn.functional.cosine_similarity(v.flatten(), direction, dim=0)
    assert cosine > (0.99 if norm == "l2" else 0.8), cosine  # L2: DeepFool's steps are all along −w
    # Below the margin of the closest image no perturbation of the norm fools everything: the rate stays below 1.
    eps_small = 0.9 * 0.2 / dual
    weak = universal_perturbation(model, x, eps=eps_small, norm=norm, max_passes=2,
                                  generator=torch.Generator().manual_seed(0))
    assert weak.fooling_rate_train == 0.0 and size(weak.v, norm) <= eps_small * (1 + 1e-6)


def paper_loop(model, x, eps, norm, passes, generator):
    """Algorithm 1 as printed, one image at a time (the authors' code: only Δv_i DeepFool found are added), returning
    the v of the pass with the highest fooling rate (the first pass's, then only a strictly higher one)."""
    v, best, best_rate = torch.zeros_like(x[0]), None, -1.0
    clean = predict(model, x)
    for _ in range(passes):
        for i in torch.randperm(len(x), generator=generator).tolist():
            xv = apply_perturbation(x[i:i + 1], v)
            if predict(model, xv)[0] == clean[i]:
                found = deepfool(model, xv, clean[i:i + 1], norm="l2", overshoot=0.02, steps=10)
                if found.success[0]:
                    v = project_perturbation(v + (found.x_adv - xv)[0], eps, norm)
        rate = fooled(model, x, v, clean).float().mean().item()
        if rate > best_rate:
            best, best_rate = v.clone(), rate
    return best, best_rate


@pytest.mark.parametrize("norm", NORMS)
def test_batch_size_one_is_the_papers_sequential_loop(norm):
    """Three classes (so the fooled images go different ways) and a budget too small to reach the target: both run
    the same passes over the same orders and must give the same v."""
    g = torch.Generator().manual_seed(1)
    model = affine(torch.randn(3, 16, generator=g) * 0.3, torch.zeros(3))
    x = torch.rand(20, 1, 4, 4, generator=g)
    eps = 0.05 if norm == "linf" else 0.2
    ours = universal_perturbation(model, x, eps=eps, norm=norm, max_passes=2, target_fooling=1.0, batch_size=1,
                                  generator=torch.Generator().manual_seed(3))
    theirs, their_rate = paper_loop(model, x, eps, norm, 2, torch.Generator().manual_seed(3))
    assert ours.passes == 2 and 0 < ours.fooling_rate_train < 1.0
    assert ours.fooling_rate_train == their_rate
    assert torch.allclose(ours.v, theirs, atol=1e-6)


# ----------------------------------------------------------------------------------------- model state, checks
class SmallMLP(nn.Module):
    """BatchNorm and Dropout, so a wrong train/eval mode or touched running statistics would show."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3),
                                 nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)


def test_model_state_grads_and_determinism():
    torch.manual_seed(0)
    model = SmallMLP()
    with torch.no_grad():
        model.net[2].running_mean.uniform_(-0.2, 0.2)
    model.train()
    model.net[2].eval()  # a half-eval model must come back half-eval
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    modes = {n: m.training for n, m in model.named_modules()}
    state = {k: t.clone() for k, t in model.state_dict().items()}
    x = torch.rand(40, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    first = universal_perturbation(model, x, eps=0.2, generator=torch.Generator().manual_seed(7), max_passes=2)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(torch.equal(t, state[k]) for k, t in model.state_dict().items())
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    second = universal_perturbation(model, x, eps=0.2, generator=torch.Generator().manual_seed(7), max_passes=2)
    assert torch.equal(first.v, second.v) and first.fooling_rate_train == second.fooling_rate_train
    assert first.v.abs().max() > 0  # it did something
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference mode"):
        universal_perturbation(model, x, eps=0.2)


@pytest.mark.parametrize("bad, match", [
    ({"norm": "l1"}, "unknown norm"), ({"eps": 1.5}, "out of range"), ({"eps": -0.1}, "out of range"),
    ({"max_passes": 0}, "max_passes"), ({"target_fooling": 1.5}, "target_fooling"),
    ({"deepfool_steps": 0}, "deepfool_steps"), ({"overshoot": -1.0}, "overshoot"), ({"batch_size": 0}, "batch_size"),
    ({"deepfool_norm": "l1"}, "deepfool_norm"),
])
def test_bad_arguments_raise(bad, match):
    model = affine(torch.randn(2, 4), torch.zeros(2))
    with pytest.raises(ConfigError, match=match):
        universal_perturbation(model, torch.rand(3, 1, 2, 2), **{"eps": 0.1, **bad})


# --------------------------------------------------------------------------------------- standard MNIST model
@pytest.fixture(scope="module")
def standard(explore_checkpoints):
    """The explorer's small CNN A (200 Adam steps on 3,000 MNIST digits, no adversarial training), training images
    it was not fitted on, and 500 test digits."""
    from robust_train.checkpoint import classifier_from_checkpoint, read_checkpoint
    from robust_train.data.mnist import _bundled

    model = classifier_from_checkpoint(read_checkpoint(explore_checkpoints[0])).eval()
    x_train, _ = _bundled("train")
    x_test, y_test = _bundled("t10k")
    x_test, y_test = x_test[:500].float() / 255, y_test[:500]
    assert (predict(model, x_test) == y_test).float().mean() > 0.75, "premise: the model is trained"
    return model, x_train[-200:].float() / 255, x_test


@pytest.mark.parametrize("norm, eps, at_least, above, times", [("linf", 0.2, 0.45, 0.12, 1.3),
                                                              ("l2", 3.0, 0.45, 0.3, 4.0)])
def test_standard_model_fooling_rate_far_above_noise(standard, norm, eps, at_least, above, times):
    """Measured here (seed 0, 200 training images, 2 passes, 500 test images): L∞ 0.2, universal 0.56 against 0.36
    for random signs × 0.2 (an L2 norm of 5.6, more than half a digit's own, so a strong baseline on MNIST: at L∞ 0.3
    the noise alone changes 0.82 of the predictions, more than v does); L2 3.0, 0.63 against 0.09 for Gaussian noise
    of norm 3. The bounds leave room for another BLAS or a slightly different model."""
    model, x_train, x_test = standard
    result = universal_perturbation(model, x_train, eps=eps, norm=norm, max_passes=2,
                                    generator=torch.Generator().manual_seed(0))
    rate = fooled(model, x_test, result.v).float().mean().item()
    noise = random_like(result.v, eps, norm, torch.Generator().manual_seed(1), n=len(x_test))
    noise_rate = fooled(model, x_test, noise).float().mean().item()
    print(f"{norm} ε={eps}: universal {rate:.3f} (train {result.fooling_rate_train:.3f}, {result.passes} passes), "
          f"noise {noise_rate:.3f}")
    assert size(result.v, norm) <= eps * (1 + 1e-6)
    assert rate >= at_least and rate >= noise_rate + above and rate >= times * noise_rate, (rate, noise_rate)
    assert abs(rate - result.fooling_rate_train) < 0.2  # it generalises from the training images to the test ones


# ----------------------------------------------------------------------------------------------------- evaluate
def test_evaluate_universal_end_to_end(explore_checkpoints, tmp_path, monkeypatch):
    import robust_train.evaluate.sections.universal as section
    from robust_train.cli import main as cli_main
    from robust_train.evaluate.sections.universal import Universal

    monkeypatch.setattr(section, "MAX_PASSES", 1)  # one pass over the 200 images: seconds, not half a minute
    out = tmp_path / "eval"
    assert cli_main(["evaluate", "--ckpt", str(explore_checkpoints[0]), "--n", "50", "--eps", "0,0.1",
                     "--attacks", "fgsm", "--stability-attacks", "none", "--no-checks", "--universal",
                     "--universal-n", "200", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    u = report["universal"]
    assert {"eps", "norm", "n_train", "n_test", "fooling_rate", "noise_fooling_rate", "dominant_labels",
            "train_fooling_rate", "passes", "seconds"} <= set(u)
    assert (u["eps"], u["norm"], u["n_train"], u["n_test"]) == (0.1, "linf", 200, 50)  # ε: the main one
    for key in ("fooling_rate", "noise_fooling_rate", "train_fooling_rate", "accuracy_with_v"):
        assert 0.0 <= u[key] <= 1.0, key
    assert u["fooling_rate"] > 0 and u["passes"] == u["max_passes"] == 1 and u["v_linf"] <= 0.1 + 1e-6
    assert u["clean_correct"] == round(report["clean_accuracy"] * 50)
    shares = [d["share"] for d in u["dominant_labels"]]
    assert 1 <= len(shares) <= 3 and shares == sorted(shares, reverse=True) and sum(shares) <= 1 + 1e-9
    fooled_count = round(u["fooling_rate"] * 50)
    assert all(d["count"] == round(d["share"] * fooled_count) for d in u["dominant_labels"])
    assert "universal.png" in report["pictures"] and (out / "universal.png").stat().st_size > 1000
    assert "gallery.png" in report["pictures"]  # the other pictures are still listed
    md = (out / "report.md").read_text()
    assert "## Universal perturbation" in md and "![universal perturbation](universal.png)" in md
    assert f"**{u['fooling_rate']:.4f}**" in Universal().text(report)

    # Fewer than 10 training images: refused before any work, in one line.
    from robust_train.data.base import TensorImageDataset

    tiny = TensorImageDataset(torch.zeros(5, 1, 4, 4, dtype=torch.uint8), torch.zeros(5))
    ev = types.SimpleNamespace(options=types.SimpleNamespace(universal=True),
                               datamodule=types.SimpleNamespace(train_set=tiny))
    with pytest.raises(ConfigError, match="5 images.*at least 10"):
        Universal().prepare(ev)
    assert not math.isnan(u["seconds"])
