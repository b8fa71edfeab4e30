"""DeepFool: closed forms on affine classifiers (one step onto the nearest hyperplane), early stopping, the model's
state left as it was, the ε-ball of the registered attack, argument checks, and agreement with torchattacks on a
small MNIST model trained here."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robust_train.attacks import ATTACKS, DeepFool, create_attack, deepfool
from robust_train.attacks.deepfool import NUDGE
from robust_train.errors import ConfigError
from tests.conftest import SmallMLP, train_on_mnist

pytestmark = pytest.mark.usefixtures("one_thread")

NORMS = ["l2", "linf"]


def affine(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """logits = W·flatten(x) + b on NCHW images."""
    lin = nn.Linear(weight.shape[1], weight.shape[0]).to(weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        lin.bias.copy_(bias)
    return nn.Sequential(nn.Flatten(), lin)


def dual(v: torch.Tensor, norm: str) -> torch.Tensor:
    return v.norm(dim=-1) if norm == "l2" else v.abs().sum(-1)


def size(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.norm(dim=1) if norm == "l2" else flat.abs().amax(1)


def closed_form_step(w_dir: torch.Tensor, gap: torch.Tensor, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The step onto the hyperplane {f_k = f_y} of an affine model, w_dir = w_k − w_y (rows), gap = f_y − f_k > 0:
    (step, distance in the attack's norm). NUDGE is foolbox's extra 1e-4 of length, part of the method."""
    dist = gap / dual(w_dir, norm)
    unit = w_dir / w_dir.norm(dim=1, keepdim=True) if norm == "l2" else w_dir.sign()
    return (dist + NUDGE)[:, None] * unit, dist


class RowCounter:
    """Counts the examples the model is run on, to see how many steps were taken and who stayed in the batch."""

    def __init__(self, model):
        self.rows, self.calls = 0, 0
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.rows += args[0].shape[0]
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ----------------------------------------------------------------------------------------------- closed forms
@pytest.fixture
def two_class():
    """Two classes on 1x4x4 images near 0.5, the boundary through the middle of the batch, so every example's
    crossing point is well inside the box."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 16, generator=g, dtype=torch.float64)
    c = 0.05 - 0.5 * (w[0] - w[1]).sum()  # f_0 − f_1 = 0.05 at the centre 0.5: both classes in the batch
    b = torch.stack([c / 2, -c / 2])
    x = 0.5 + 0.05 * (2 * torch.rand(6, 1, 4, 4, generator=g, dtype=torch.float64) - 1)
    model = affine(w, b)
    with torch.no_grad():
        z = model(x)
    y = z.argmax(1)  # y as the model's prediction: every example is attacked
    assert 0 < y.sum() < len(y), "premise: both classes are predicted"
    return model, w, z, x, y


@pytest.mark.parametrize("overshoot", [0.02, 0.5])
@pytest.mark.parametrize("norm", NORMS)
def test_two_classes_one_step_closed_form(two_class, norm, overshoot):
    model, w, z, x, y = two_class
    other = 1 - y
    gap = z.gather(1, y[:, None]).squeeze(1) - z.gather(1, other[:, None]).squeeze(1)
    step, dist = closed_form_step(w[other] - w[y], gap, norm)
    expected = x + (1 + overshoot) * step.view_as(x)
    assert expected.min() > 0.05 and expected.max() < 0.95, "premise: the box plays no part"

    with RowCounter(model) as counter:
        x_adv, norms, success = deepfool(model, x, y, norm=norm, overshoot=overshoot)
    torch.testing.assert_close(x_adv, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(norms, (1 + overshoot) * (dist + NUDGE), atol=1e-10, rtol=0)
    # The nudge is the only difference from the textbook |f'| / ‖w'‖ distance.
    assert ((norms - (1 + overshoot) * dist).abs() <= (1 + overshoot) * NUDGE + 1e-12).all()
    assert success.all() and success.dtype == torch.bool
    # Exactly one step: one look at x, one at x + step (fooled, so nothing more), and one step suffices.
    assert counter.calls == 2 and counter.rows == 2 * len(x)
    one = deepfool(model, x, y, norm=norm, overshoot=overshoot, steps=1)
    assert torch.equal(one.x_adv, x_adv) and one.success.all()


@pytest.fixture
def five_class():
    """Five classes whose weight rows differ in length, so the runner-up logit is often not the nearest
    hyperplane."""
    g = torch.Generator().manual_seed(1)
    scale = torch.tensor([1.0, 4.0, 0.5, 2.0, 1.0], dtype=torch.float64)[:, None]
    w = torch.randn(5, 16, generator=g, dtype=torch.float64) * scale
    b = 0.2 * torch.randn(5, generator=g, dtype=torch.float64)
    x = 0.5 + 0.03 * (2 * torch.rand(32, 1, 4, 4, generator=g, dtype=torch.float64) - 1)
    model = affine(w, b)
    with torch.no_grad():
        z = model(x)
    return model, w, z, x, z.argmax(1)


def _nearest(w, z, y, norm, classes=None):
    """Per example, the class k ≠ y (among `classes`, all by default) whose hyperplane is nearest, and the step."""
    n, c = z.shape
    own = z.gather(1, y[:, None])
    dists = (own - z) / dual(w[None, :, :] - w[y][:, None, :], norm)  # (n, c)
    dists = dists.scatter(1, y[:, None], math.inf)
    if classes is not None:
        dists = torch.where(torch.zeros(n, c, dtype=torch.bool).scatter(1, classes, True), dists, math.inf)
    k = dists.argmin(1)
    gap = (own.squeeze(1) - z.gather(1, k[:, None]).squeeze(1))
    return k, closed_form_step(w[k] - w[y], gap, norm)[0]


@pytest.mark.parametrize("norm", NORMS)
def test_multiclass_steps_to_nearest_hyperplane(five_class, norm):
    model, w, z, x, y = five_class
    runner_up = z.scatter(1, y[:, None], -math.inf).argmax(1)
    k, step = _nearest(w, z, y, norm)
    assert (k != runner_up).sum() >= 4 and (k == runner_up).sum() >= 4, \
        "premise: the nearest hyperplane is not just the second-highest logit"
    expected = x + 1.02 * step.view_as(x)
    assert expected.min() > 0 and expected.max() < 1

    x_adv, _, success = deepfool(model, x, y, norm=norm)
    torch.testing.assert_close(x_adv, expected, atol=1e-10, rtol=0)
    assert success.all()
    with torch.no_grad():
        assert (model(x_adv).argmax(1) != y).all()

    # With two candidates only the runner-up (the label counts as one) is considered.
    k2, step2 = _nearest(w, z, y, norm, classes=runner_up[:, None])
    assert torch.equal(k2, runner_up)
    got = deepfool(model, x, y, norm=norm, candidates=2).x_adv
    torch.testing.assert_close(got, x + 1.02 * step2.view_as(x), atol=1e-10, rtol=0)
    assert not torch.allclose(got[k != runner_up], x_adv[k != runner_up])


def test_misclassified_examples_are_left_alone_and_dropped(two_class):
    """y is the label moved away from: with y ≠ prediction there is nothing to do (norm 0, success). Those examples
    and, after the first step, every fooled one leave the batch."""
    model, _, _, x, pred = two_class
    y = pred.clone()
    y[::2] = 1 - y[::2]  # half the batch: already "misclassified"
    with RowCounter(model) as counter:
        x_adv, norms, success = deepfool(model, x, y)
    assert success.all()
    assert torch.equal(x_adv[::2], x[::2]) and (norms[::2] == 0).all()
    assert (norms[1::2] > 0).all()
    assert counter.rows == len(x) + len(x) // 2  # everyone once, then only the three that took a step


# ------------------------------------------------------------------------------------------ trained MNIST model
@pytest.fixture(scope="module")
def mnist(one_thread):
    """A small MLP trained for 300 Adam steps on 2,000 bundled MNIST digits (about a second on one core), in eval
    mode, and 100 test digits it classifies correctly."""
    torch.manual_seed(0)
    return train_on_mnist(SmallMLP(), keep=100)


@pytest.mark.parametrize("norm", NORMS)
def test_invariants_and_model_state(mnist, norm):
    model, x, y = mnist
    x, y = x[:32], y[:32]
    reference = deepfool(model, x, y, norm=norm)  # the model in eval mode

    # Train mode, some .grad set, one None, one parameter frozen: all must come back as they were.
    model.train()
    model.net[2].eval()  # a mixed state: BatchNorm frozen
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model.net[-1].bias.grad = None
    model.net[1].bias.requires_grad_(False)
    modes = {n: m.training for n, m in model.named_modules()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    try:
        got = deepfool(model, x, y, norm=norm)
        assert {n: m.training for n, m in model.named_modules()} == modes
        for n, p in model.named_parameters():
            if grads[n] is None:
                assert p.grad is None, n
            else:
                assert torch.equal(p.grad, grads[n]), n
        for n, b in model.named_buffers():
            assert torch.equal(b, buffers[n]), n
    finally:
        model.eval()
        model.net[1].bias.requires_grad_(True)
        for p in model.parameters():
            p.grad = None
    # Same numbers as in eval mode: dropout was off and BatchNorm used its running statistics.
    assert torch.equal(got.x_adv, reference.x_adv) and torch.equal(got.success, reference.success)

    x_adv, norms, success = got
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    torch.testing.assert_close(norms, size(x_adv - x, norm), atol=1e-6, rtol=0)
    with torch.no_grad():
        fooled = model(x_adv).argmax(1) != y
    assert torch.equal(fooled, success)
    assert success.all(), "every digit of this small model falls within 50 steps"


@pytest.mark.parametrize("norm", NORMS)
def test_class_keeps_the_minimal_perturbation_inside_the_ball(mnist, norm):
    model, x, y = mnist
    x, y = x[:32], y[:32]
    minimal = DeepFool(1.0, norm=norm).minimal(model, x, y)
    eps = minimal.norms.median().item()  # half the examples need more than ε
    attack = DeepFool(eps, norm=norm)
    assert torch.equal(attack.minimal(model, x, y).x_adv, minimal.x_adv)
    x_adv = attack(model, x, y)
    sizes = size(x_adv - x, norm)
    assert (sizes <= eps + 1e-5).all()
    inside = minimal.norms <= eps
    assert 0 < inside.sum() < len(x)
    # Within ε the minimal perturbation is returned as is (and still fools); beyond it, it is cut back onto the
    # sphere (L2: scaled, so the clip to [0, 1] has nothing to do; L∞: clipped per pixel).
    assert torch.equal(x_adv[inside], minimal.x_adv[inside])
    with torch.no_grad():
        assert (model(x_adv[inside]).argmax(1) != y[inside]).all()
    torch.testing.assert_close(sizes[~inside], torch.full_like(sizes[~inside], eps), atol=1e-5, rtol=0)


def test_class_in_train_bn_mode_keeps_the_batch_and_restores_statistics(mnist):
    model, x, y = mnist
    x, y = x[:16], y[:16]
    attack = DeepFool(2.0, bn_mode="train")
    stats = [b.clone() for b in model.buffers()]
    with RowCounter(model) as counter:
        result = attack.minimal(model, x, y)
    assert counter.rows == counter.calls * len(x), "with batch statistics nobody leaves the batch"
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), stats)) and not model.training
    assert result.success.float().mean() > 0.5 and (result.x_adv.min() >= 0) and (result.x_adv.max() <= 1)


def test_grad_modes(mnist):
    model, x, y = mnist
    x, y = x[:8], y[:8]
    expected, projected = deepfool(model, x, y).x_adv, DeepFool(0.5)(model, x, y)
    assert not torch.equal(expected, x)
    with torch.no_grad():  # e.g. inside a validation step: the attack turns gradients on for itself
        assert torch.equal(deepfool(model, x, y).x_adv, expected)
        assert torch.equal(DeepFool(0.5)(model, x, y), projected)
        assert not torch.is_grad_enabled()
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="inference"):
            deepfool(model, x, y)
        with pytest.raises(RuntimeError, match="inference"):
            DeepFool(0.5).minimal(model, x, y)


# ---------------------------------------------------------------------------------------- torchattacks agreement
def test_agrees_with_torchattacks(mnist):
    """Same median L2 norm as torchattacks' DeepFool (50 steps, overshoot 0.02) to 5 %, and per digit where both
    succeed. torchattacks applies the overshoot per step and clips every step, with no absolute nudge: on the MNIST
    background (pixels on 0) its iterates creep up to the boundary without crossing, so it fools fewer digits; its
    median is taken over those it fools, ours over ours (and, for a like-for-like check, over the same digits)."""
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = mnist
    ours = deepfool(model, x, y, steps=50, overshoot=0.02)
    adv = torchattacks.DeepFool(model, steps=50, overshoot=0.02)(x, y)
    with torch.no_grad():
        fooled = model(adv).argmax(1) != y
    theirs = (adv - x).flatten(1).norm(dim=1)
    assert fooled.sum() >= 20, "premise: enough digits to compare"
    assert ours.success.sum() >= fooled.sum()

    ours_median, theirs_median = ours.norms[ours.success].median(), theirs[fooled].median()
    assert abs(ours_median / theirs_median - 1) < 0.05, (ours_median.item(), theirs_median.item())
    both = ours.success & fooled
    assert abs(ours.norms[both].median() / theirs_median - 1) < 0.05
    ratio = ours.norms[both] / theirs[both]
    assert (ratio - 1).abs().median() < 0.01 and (ratio - 1).abs().max() < 0.05, ratio


# ------------------------------------------------------------------------------------------ registry, arguments
def test_registered_preset():
    assert "deepfool" in ATTACKS.names()
    attack = create_attack("deepfool", eps=1.5, steps=7)
    assert isinstance(attack, DeepFool) and attack.norm == "l2" and attack.steps == 7 and attack.eps == 1.5
    described = attack.describe()
    assert described["attack"] == "deepfool" and described["steps"] == 7 and described["overshoot"] == 0.02
    assert described["candidates"] == 10 and described["norm"] == "l2"
    assert "overshoot=0.02" in repr(attack)


@pytest.mark.parametrize("bad, match", [
    ({"overshoot": -0.1}, "overshoot"), ({"overshoot": math.nan}, "overshoot"), ({"overshoot": math.inf}, "overshoot"),
    ({"steps": 0}, "steps"), ({"steps": 2.5}, "steps"), ({"steps": -1}, "steps"),
    ({"candidates": 1}, "candidates"), ({"candidates": 3.0}, "candidates"), ({"norm": "l1"}, "norm"),
])
def test_bad_arguments_raise(two_class, bad, match):
    model, _, _, x, y = two_class
    with pytest.raises(ConfigError, match=match):
        deepfool(model, x, y, **bad)
    with pytest.raises(ConfigError, match=match):
        DeepFool(0.5, **bad)


def test_bad_class_arguments_raise():
    for kwargs, match in [({"targeted": True}, "untargeted"), ({"loss": "margin"}, "loss"),
                          ({"eps": -1.0}, "eps"), ({"eps": math.nan}, "eps")]:
        eps = kwargs.pop("eps", 0.5)
        with pytest.raises(ConfigError, match=match):
            DeepFool(eps, **kwargs)
