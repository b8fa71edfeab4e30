"""Carlini–Wagner L2: the exact distance to an affine classifier's boundary, the invariants of the result (box,
success means misclassified or on target, κ margin, unchanged inputs), the model's state left as it was, the ε-ball
of the registered attack, argument checks (invariants on a small MNIST CNN trained here), and a median L2 no worse
than torchattacks' CW on a small MNIST MLP trained here."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_train.attacks.carlini_wagner import BINARY_SEARCH_STEPS
from robust_train.attacks import ATTACKS, CarliniWagnerL2, attack_loss, carlini_wagner_l2, create_attack, is_minimal
from robust_train.errors import ConfigError
from tests.conftest import SmallMLP, train_on_mnist

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = {"steps": 150, "binary_search_steps": 2, "initial_const": 10.0}  # fools every digit here, cheaply


def affine(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """logits = W·flatten(x) + b on NCHW images."""
    lin = nn.Linear(weight.shape[1], weight.shape[0]).to(weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        lin.bias.copy_(bias)
    return nn.Sequential(nn.Flatten(), lin)


def l2(delta: torch.Tensor) -> torch.Tensor:
    return delta.flatten(1).norm(dim=1)


class RowCounter:
    """Counts the examples the model is run on."""

    def __init__(self, model):
        self.rows = 0
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.rows += args[0].shape[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ----------------------------------------------------------------------------------------------- closed form
@pytest.fixture
def two_class():
    """Two classes on 1x4x4 images near 0.5, the boundary 0.2–0.6 away (L2) from every example, so that the
    nearest boundary point is well inside the box."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 16, generator=g, dtype=torch.float64)
    unit = (w[0] - w[1]) / (w[0] - w[1]).norm()
    side = torch.tensor([1.0, -1.0] * 4, dtype=torch.float64)
    offset = side * torch.linspace(0.2, 0.6, 8, dtype=torch.float64)  # signed distance from the boundary
    x = 0.5 + 0.05 * (2 * torch.rand(8, 16, generator=g, dtype=torch.float64) - 1)
    x = (x + offset[:, None] * unit).view(8, 1, 4, 4)
    c = -0.5 * (w[0] - w[1]).sum()  # f_0 = f_1 at the centre 0.5
    model = affine(w, torch.stack([c / 2, -c / 2]))
    with torch.no_grad():
        z = model(x)
    y = z.argmax(1)
    assert 0 < y.sum() < len(y), "premise: both classes are predicted"
    return model, w, z, x, y


def test_affine_norm_is_the_distance_to_the_boundary(two_class):
    """With κ = 0 CW converges onto the hyperplane: the norm is |f_0 − f_1| / ‖w_0 − w_1‖, just past it, and x'
    is x moved along ±(w_0 − w_1)."""
    model, w, z, x, y = two_class
    diff = w[0] - w[1]
    dist = (z[:, 0] - z[:, 1]).abs() / diff.norm()
    direction = (w[1 - y] - w[y]) / diff.norm()
    expected = x + dist.view(-1, 1, 1, 1) * direction.view_as(x)
    assert expected.min() > 0.05 and expected.max() < 0.95, "premise: the box plays no part"

    x_adv, norms, success = carlini_wagner_l2(model, x, y)
    assert success.all()
    ratio = norms / dist
    assert (ratio >= 1 - 1e-9).all() and (ratio < 1.01).all(), ratio  # never inside: x' is past the boundary
    cosine = F.cosine_similarity((x_adv - x).flatten(1), direction, dim=1)
    assert (cosine > 0.999).all(), cosine
    with torch.no_grad():
        assert (model(x_adv).argmax(1) != y).all()
    torch.testing.assert_close(norms, l2(x_adv - x), atol=1e-12, rtol=0)


def test_flat_margin_needs_the_later_search_steps(two_class):
    """A model with a flat margin (the weights of `two_class` scaled by 1e-3, as near x on an adversarially trained
    model) is broken only with c of some 10^3: the default search (c tenfold per step from 1e-3) reaches it, five
    steps (c at most 10) do not; the norm is the same distance to the boundary."""
    model, w, z, x, y = two_class
    flat = affine(w * 1e-3, model[1].bias.detach() * 1e-3)
    dist = (z[:, 0] - z[:, 1]).abs() / (w[0] - w[1]).norm()
    assert not carlini_wagner_l2(flat, x, y, binary_search_steps=5).success.any(), "premise: c = 10 is too small"
    found = carlini_wagner_l2(flat, x, y)
    assert found.success.all()
    ratio = found.norms / dist
    assert (ratio >= 1 - 1e-9).all() and (ratio < 1.01).all(), ratio


def test_abort_early_saves_work_not_accuracy(two_class):
    model, _, _, x, y = two_class
    with RowCounter(model) as early:
        quick = carlini_wagner_l2(model, x, y, steps=200)
    with RowCounter(model) as full:
        slow = carlini_wagner_l2(model, x, y, steps=200, abort_early=False)
    assert early.rows < 0.6 * full.rows, (early.rows, full.rows)
    assert quick.success.all() and slow.success.all()
    assert (quick.norms / slow.norms - 1).abs().max() < 0.02


# ------------------------------------------------------------------------------------------ trained MNIST models
class SmallCNN(nn.Module):
    """conv(1→8, 5x5, stride 3)-BN-ReLU, dropout, linear: 28x28 → 10 logits; BatchNorm and Dropout make a wrong
    train/eval mode show."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 5, stride=3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                 nn.Dropout(0.1), nn.Linear(8 * 8 * 8, 10))

    def forward(self, x):
        return self.net(x)


@pytest.fixture(scope="module")
def mnist(one_thread):
    torch.manual_seed(0)
    return train_on_mnist(SmallCNN(), keep=12)


@pytest.fixture(scope="module")
def untargeted(mnist):
    """QUICK's result on the CNN's 12 digits, shared by the tests that only read it."""
    model, x, y = mnist
    return carlini_wagner_l2(model, x, y, **QUICK)


def check_result(model, x, result, y, target=None, kappa=0.0):
    """The contract of a MinimalResult: x' in [0, 1], norms measured on it, success exactly when x' is adversarial
    (with margin κ), and x' = x where it failed."""
    x_adv, norms, success = result
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    torch.testing.assert_close(norms, l2(x_adv - x), atol=1e-6, rtol=0)
    with torch.no_grad():
        logits = model(x_adv)
    cls = y if target is None else target
    own = logits.gather(1, cls[:, None]).squeeze(1)
    others = logits.scatter(1, cls[:, None], -math.inf).amax(1)
    margin = others - own if target is None else own - others
    adversarial = (logits.argmax(1) != y if target is None else logits.argmax(1) == target) & (margin >= kappa)
    assert torch.equal(success, adversarial)
    assert torch.equal(x_adv[~success], x[~success]) and (norms[~success] == 0).all()


def test_untargeted_invariants(mnist, untargeted):
    model, x, y = mnist
    check_result(model, x, untargeted, y)
    assert untargeted.success.all(), untargeted.success
    assert (untargeted.norms > 0.1).all()


def test_input_not_modified_and_failures_come_back_unchanged(mnist):
    model, x, y = mnist
    x, y = x[:4], y[:4]
    x_before = x.clone()
    # c stays far too small for 5 steps to reach any boundary: every digit fails and comes back as it was.
    result = carlini_wagner_l2(model, x, y, steps=5, binary_search_steps=1)
    assert torch.equal(x, x_before), "the input must not be modified in place"
    assert not result.success.any() and torch.equal(result.x_adv, x) and (result.norms == 0).all()
    # The ε-ball attack returns its nearest attempt instead (the highest-margin iterate, here inside the ball).
    x_adv = CarliniWagnerL2(3.0, steps=5, binary_search_steps=1)(model, x, y)
    assert (l2(x_adv - x) > 0).all() and (l2(x_adv - x) <= 3.0).all()
    with torch.no_grad():
        assert (attack_loss(model(x_adv), y, "margin") > attack_loss(model(x), y, "margin")).all()


def test_targeted_reaches_the_target(mnist, untargeted):
    model, x, y = mnist
    target = (y + 1) % 10
    result = carlini_wagner_l2(model, x, y, target=target, **QUICK)
    check_result(model, x, result, y, target=target)
    assert result.success.sum() >= 10, result.success
    both = result.success & untargeted.success
    # The nearest boundary is at most as far as the one of a given class (up to the search's slack).
    assert (untargeted.norms[both] <= result.norms[both] * 1.05).all()
    assert untargeted.norms[both].median() < result.norms[both].median()


def test_kappa_margin(mnist, untargeted):
    model, x, y = mnist
    confident = carlini_wagner_l2(model, x, y, kappa=2.0, **QUICK)
    check_result(model, x, confident, y, kappa=2.0)
    both = untargeted.success & confident.success
    assert both.sum() >= 10
    assert (confident.norms[both] > untargeted.norms[both]).all()


def test_misclassified_examples_are_left_alone(mnist):
    """y is the label moved away from: where the model already disagrees there is nothing to do (norm 0, success),
    and those examples are never run again after the first look."""
    model, x, y = mnist
    x, y = x[:8], y[:8].clone()
    y[::2] = (y[::2] + 1) % 10
    with RowCounter(model) as counter:
        x_adv, norms, success = carlini_wagner_l2(model, x, y, **QUICK)
    assert success[::2].all() and torch.equal(x_adv[::2], x[::2]) and (norms[::2] == 0).all()
    assert success[1::2].all() and (norms[1::2] > 0).all()
    runs = QUICK["steps"] * QUICK["binary_search_steps"]
    assert counter.rows <= 2 * len(x) + runs * len(x) // 2  # the first look and the final check: everyone


def test_model_state_and_grads_unchanged(mnist, untargeted):
    model, x, y = mnist

    # Train mode, some .grad set, one None, one parameter frozen: all must come back as they were.
    model.train()
    model.net[1].eval()  # a mixed state: BatchNorm frozen
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model.net[-1].bias.grad = None
    model.net[0].bias.requires_grad_(False)
    modes = {n: m.training for n, m in model.named_modules()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    try:
        got = carlini_wagner_l2(model, x, y, **QUICK)
        minimal = CarliniWagnerL2(1.0, **QUICK).minimal(model, x, y)
        train_bn = CarliniWagnerL2(1.0, bn_mode="train", steps=10, binary_search_steps=2).minimal(model, x, y)
        assert {n: m.training for n, m in model.named_modules()} == modes
        for n, p in model.named_parameters():
            assert torch.equal(p.detach(), params[n]), n
            assert p.requires_grad == (n != "net.0.bias"), n
            if grads[n] is None:
                assert p.grad is None, n
            else:
                assert torch.equal(p.grad, grads[n]), n
        for n, b in model.named_buffers():
            assert torch.equal(b, buffers[n]), n  # also after the attack run with batch statistics
    finally:
        model.eval()
        model.net[0].bias.requires_grad_(True)
        for p in model.parameters():
            p.grad = None
    # Same numbers as in eval mode: dropout was off and BatchNorm used its running statistics.
    for result in (got, minimal):
        assert torch.equal(result.x_adv, untargeted.x_adv) and torch.equal(result.success, untargeted.success)
    assert train_bn.x_adv.min() >= 0 and train_bn.x_adv.max() <= 1


def test_class_keeps_the_minimal_perturbation_inside_the_ball(mnist, untargeted):
    model, x, y = mnist
    eps = untargeted.norms.median().item()  # half the examples need more than ε
    attack = CarliniWagnerL2(eps, **QUICK)
    assert is_minimal(attack)
    x_adv = attack(model, x, y)
    sizes = l2(x_adv - x)
    assert (sizes <= eps + 1e-5).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    inside = untargeted.norms <= eps
    assert inside.sum() >= 4 and (~inside).sum() >= 4
    # Within ε the minimal perturbation is returned as is (and still fools); beyond it, it is scaled back onto the
    # sphere (so the clip to [0, 1] has nothing to do).
    assert torch.equal(x_adv[inside], untargeted.x_adv[inside])
    with torch.no_grad():
        assert (model(x_adv[inside]).argmax(1) != y[inside]).all()
    torch.testing.assert_close(sizes[~inside], torch.full_like(sizes[~inside], eps), atol=1e-5, rtol=0)


def test_class_targeted(mnist):
    model, x, y = mnist
    x, y = x[:4], y[:4]
    target = (y + 3) % 10
    attack = CarliniWagnerL2(10.0, targeted=True, **QUICK)
    with pytest.raises(ValueError, match="target"):
        attack.minimal(model, x, y)
    with pytest.raises(ValueError, match="target"):
        attack(model, x, y)
    x_adv = attack(model, x, y, target=target)  # ε = 10 holds every perturbation found
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == target).all()


def test_grad_modes(two_class):
    model, _, _, x, y = two_class
    quick = {"steps": 50, "binary_search_steps": 1, "initial_const": 10.0}
    expected = carlini_wagner_l2(model, x, y, **quick)
    assert expected.success.all()
    with torch.no_grad():  # e.g. inside a validation step: the attack turns gradients on for itself
        assert torch.equal(carlini_wagner_l2(model, x, y, **quick).x_adv, expected.x_adv)
        assert torch.equal(CarliniWagnerL2(5.0, **quick)(model, x, y), expected.x_adv)
        assert not torch.is_grad_enabled()
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="inference"):
            carlini_wagner_l2(model, x, y)
        with pytest.raises(RuntimeError, match="inference"):
            CarliniWagnerL2(0.5).minimal(model, x, y)


# ---------------------------------------------------------------------------------------- torchattacks agreement
@pytest.fixture(scope="module")
def mnist_mlp(one_thread):
    torch.manual_seed(0)
    return train_on_mnist(SmallMLP(), keep=80)


def test_no_worse_than_torchattacks(mnist_mlp):
    """Our median L2 (5 search steps × 200 Adam steps, to keep the test short; the default is 9 × 500) is no larger
    than the best of torchattacks' CW at c ∈ {1, 10, 100} with 200 Adam steps each (one of our search steps),
    failures counted as +inf on both sides, and no larger per digit on nearly every digit both break. torchattacks
    has no search over c, and starts pixels on 0 or 1 at atanh(∓1) = ∓inf, where they cannot move (most of an
    MNIST digit)."""
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = mnist_mlp
    ours = carlini_wagner_l2(model, x, y, steps=200, binary_search_steps=5)
    ours_median = torch.where(ours.success, ours.norms, math.inf).median().item()
    theirs, norms = {}, {}
    for c in (1, 10, 100):
        adv = torchattacks.CW(model, c=c, kappa=0, steps=200, lr=0.01)(x, y)
        with torch.no_grad():
            fooled = model(adv).argmax(1) != y
        norms[c] = torch.where(fooled, l2(adv - x), math.inf)
        theirs[c] = norms[c].median().item()
    print(f"CW median L2 on {len(x)} digits: ours {ours_median:.4f} ({ours.success.sum().item()} fooled), "
          f"torchattacks {theirs}")
    assert ours.success.all()
    assert ours_median <= min(theirs.values()), (ours_median, theirs)
    best = norms[min(theirs, key=theirs.get)]
    both = torch.isfinite(best)
    assert both.sum() >= 0.8 * len(x)
    assert (ours.norms[both] <= best[both]).double().mean() >= 0.9


# ------------------------------------------------------------------------------------------ registry, arguments
def test_registered_preset():
    assert "cw_l2" in ATTACKS.names()
    attack = create_attack("cw_l2", eps=1.5, steps=7)
    assert isinstance(attack, CarliniWagnerL2) and attack.norm == "l2" and attack.steps == 7 and attack.eps == 1.5
    described = attack.describe()
    assert described["attack"] == "cw_l2" and described["steps"] == 7 and described["binary_search_steps"] == BINARY_SEARCH_STEPS == 9
    assert described["kappa"] == 0.0 and described["lr"] == 0.01 and described["initial_const"] == 1e-3
    assert described["abort_early"] is True and described["targeted"] is False
    assert "kappa=0.0" in repr(attack)


@pytest.mark.parametrize("bad, match", [
    ({"kappa": -1.0}, "kappa"), ({"kappa": math.nan}, "kappa"), ({"kappa": math.inf}, "kappa"),
    ({"lr": 0.0}, "lr"), ({"lr": -0.01}, "lr"), ({"lr": math.nan}, "lr"),
    ({"steps": 0}, "steps"), ({"steps": 2.5}, "steps"), ({"steps": True}, "steps"),
    ({"binary_search_steps": 0}, "binary_search_steps"), ({"binary_search_steps": 1.5}, "binary_search_steps"),
    ({"initial_const": 0.0}, "initial_const"), ({"initial_const": -1.0}, "initial_const"),
    ({"initial_const": math.inf}, "initial_const"),
])
def test_bad_arguments_raise(two_class, bad, match):
    model, _, _, x, y = two_class
    with pytest.raises(ConfigError, match=match):
        carlini_wagner_l2(model, x, y, **bad)
    with pytest.raises(ConfigError, match=match):
        CarliniWagnerL2(0.5, **bad)
    with pytest.raises(ConfigError, match=match):
        create_attack("cw_l2", eps=0.5, **bad)


def test_bad_eps_raises():
    for eps in (-1.0, math.nan, math.inf):
        with pytest.raises(ConfigError, match="eps"):
            CarliniWagnerL2(eps)
    assert CarliniWagnerL2(3.0).eps == 3.0  # an L2 radius above 1 is legitimate
