"""IG-Norm and IG-Norm-Sum (Chen et al. 2019, as Boopathy et al. 2020 train them):

    IG(x, x') = (x' − x) ⊙ (1/5)·Σ_{k=1..5} ∇_z CE(z_k, y),  z_k = x + (k/5)(x' − x)
    loss = CE(f(x̂), y) + λ·mean ‖IG(x, x*)‖₁,   x̂ = x (IG-Norm) or x* (IG-Norm-Sum)

The IG against closed forms and a hand-made Riemann sum, its derivatives (to x' through both the factor and the path
points, to the weights through double backprop) against finite differences, the inner attack's guarantees, the
λ = 0 reductions to standard and PGD training, bad options, and the four recipes.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from robust_train.attacks import PGD, create_attack
from robust_train.attacks.base import random_start
from robust_train.attacks.pgd_ig_norm import IGNormPGD
from robust_train.data import CIFAR10Data, MNISTData
from robust_train.errors import ConfigError
from robust_train.losses.ig_norm import ig_norm_penalty, path_integrated_gradients
from robust_train.methods import METHODS, IGNormSumTraining, IGNormTraining, PGDTraining, StandardTraining
from robust_train.models import create_model
from tests.conftest import SmallMLP, train_recipe_briefly

pytestmark = pytest.mark.usefixtures("one_thread")
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
FAST = {"steps": 3, "step_size": 0.1}


@pytest.fixture(scope="module")
def batch():
    """8 MNIST test images and labels."""
    return MNISTData().test_tensors(8)


def small_cnn(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("small_cnn", num_classes=10, in_channels=1, mean=[0.1307], std=[0.3081], widths=(8, 16, 32))


def tanh_mlp(seed: int = 0):
    """A smooth float64 net on (N, 3, 2, 2) inputs: gradients change along the path, second derivatives are dense."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def tiny_batch(seed: int = 1, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 2, 2, generator=g, dtype=torch.float64)
    x_adv = (x + (torch.rand(x.shape, generator=g, dtype=torch.float64) * 2 - 1) * 0.8).clamp(0, 1)
    return x, x_adv, torch.randint(0, 3, (n,), generator=g)


def make(cls, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return cls(**{**(FAST if cls is not StandardTraining else {}), **kwargs})


def perturbed(x, eps: float = 0.3, seed: int = 1):
    delta = (torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * eps
    return (x + delta).clamp(0, 1)


# -- the integrated gradients ---------------------------------------------------------------------------------------
def test_ig_of_x_with_itself_is_zero(batch):
    x, y = batch
    model = small_cnn()
    assert torch.equal(path_integrated_gradients(model, x, x, y), torch.zeros_like(x))
    assert torch.equal(ig_norm_penalty(model, x, x.clone(), y, create_graph=True), torch.zeros(len(x)))


def test_constant_gradient_along_the_path_gives_the_exact_product():
    """Linear softmax model, x' − x in the null space of W: the logits, hence ∇CE = Wᵀ(softmax − e_y), are the same
    at every path point, so IG = (x' − x) ⊙ Wᵀ(softmax(Wx + b) − e_y) exactly: nonzero, summing to CE(x') − CE(x)."""
    torch.manual_seed(0)
    linear = nn.Linear(12, 3).double()
    v = torch.randn(12, dtype=torch.float64)
    with torch.no_grad():
        linear.weight -= torch.outer(linear.weight @ v, v) / v.dot(v)  # W v = 0
    model = nn.Sequential(nn.Flatten(), linear)
    x = torch.rand(2, 3, 2, 2, dtype=torch.float64)
    x_adv = x + 0.3 * v.view(3, 2, 2)
    y = torch.tensor([0, 2])
    p = torch.softmax(model(x), 1)
    expected = (x_adv - x) * ((p - F.one_hot(y, 3)) @ linear.weight).view_as(x)
    ig = path_integrated_gradients(model, x, x_adv, y)
    torch.testing.assert_close(ig, expected, rtol=1e-12, atol=1e-14)
    assert expected.abs().min() > 1e-4
    torch.testing.assert_close(ig.sum((1, 2, 3)), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(ig_norm_penalty(model, x, x_adv, y), expected.abs().sum((1, 2, 3)))


def test_riemann_sum_matches_five_gradients_taken_by_hand():
    model = tanh_mlp()
    x, x_adv, y = tiny_batch()
    grads = []
    for k in range(1, 6):
        z = (x + k / 5 * (x_adv - x)).requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(z), y, reduction="sum"), z)  # per-example gradients
        grads.append(g)
    right = (x_adv - x) * sum(grads) / 5
    torch.testing.assert_close(path_integrated_gradients(model, x, x_adv, y, points=5), right, rtol=1e-12, atol=1e-14)
    z0 = x.clone().requires_grad_(True)
    (g0,) = torch.autograd.grad(F.cross_entropy(model(z0), y, reduction="sum"), z0)
    left = (x_adv - x) * (g0 + sum(grads[:4])) / 5
    assert (left - right).abs().max() > 1e-3 * right.abs().max()  # the rule matters: z_1..z_5, not z_0..z_4
    # Per example: an example's IG does not depend on the rest of the batch (no batch-mean 1/N).
    torch.testing.assert_close(path_integrated_gradients(model, x[:1], x_adv[:1], y[:1]), right[:1])


def test_many_points_approach_completeness():
    """Σ IG → CE(x') − CE(x) as the Riemann sum refines: the scale of the sum (a mean over points) is right."""
    model = tanh_mlp()
    x, x_adv, y = tiny_batch()
    gap = F.cross_entropy(model(x_adv), y, reduction="none") - F.cross_entropy(model(x), y, reduction="none")
    total = path_integrated_gradients(model, x, x_adv, y, points=2000).sum((1, 2, 3))
    torch.testing.assert_close(total, gap.detach(), rtol=0, atol=2e-4)
    assert gap.abs().min() > 5e-3  # 25x the tolerance: a wrong scale (a sum over points, a 1/N) would show


def finite_difference(f, t: torch.Tensor, direction: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    with torch.no_grad():
        return (f(t + h * direction) - f(t - h * direction)) / (2 * h)


def test_gradient_wrt_x_adv_goes_through_the_factor_and_the_path_points():
    model = tanh_mlp()
    x, x_adv, y = tiny_batch()
    x_adv = x_adv.requires_grad_(True)
    (grad,) = torch.autograd.grad(ig_norm_penalty(model, x, x_adv, y, create_graph=True).sum(), x_adv)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    numeric = finite_difference(lambda t: ig_norm_penalty(model, x, t, y).sum(), x_adv.detach(), direction)
    torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-6, atol=1e-9)
    # Through the factor alone (gradients at the path points held fixed) the derivative is visibly different.
    ig = path_integrated_gradients(model, x, x_adv.detach(), y)
    factor_only = ig.sign() * ig / (x_adv.detach() - x)
    assert (factor_only * direction).sum().sub(numeric).abs() > 0.05 * numeric.abs()


def test_penalty_gradient_reaches_the_weights_only_with_create_graph():
    model = tanh_mlp()
    x, x_adv, y = tiny_batch()
    assert not ig_norm_penalty(model, x, x_adv, y).requires_grad  # the default is detached
    weight = model[1].weight
    (grad,) = torch.autograd.grad(ig_norm_penalty(model, x, x_adv, y, create_graph=True).sum(), weight)
    direction = torch.randn(weight.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    original = weight.detach().clone()

    def penalty_at(w):
        with torch.no_grad():
            weight.copy_(w)
        with torch.enable_grad():
            return ig_norm_penalty(model, x, x_adv, y).sum()

    numeric = finite_difference(penalty_at, original, direction)
    penalty_at(original)
    torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-6, atol=1e-9)
    # And on the ReLU small CNN every convolution gets a gradient from the penalty alone.
    cnn, (xm, ym) = small_cnn(), MNISTData().test_tensors(4)
    ig_norm_penalty(cnn, xm, perturbed(xm), ym, create_graph=True).sum().backward()
    for conv in (cnn.body[0], cnn.body[2], cnn.body[4]):
        assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0


def test_bad_points_are_rejected():
    model, (x, x_adv, y) = tanh_mlp(), tiny_batch()
    for points in (0, -1, 2.5, True):
        with pytest.raises(ConfigError):
            path_integrated_gradients(model, x, x_adv, y, points=points)


# -- the inner attack -----------------------------------------------------------------------------------------------
def test_attack_stays_in_the_ball_and_raises_the_ig_norm_over_its_start(batch):
    x, y = batch
    model = small_cnn()
    eps = 0.2
    for at_adv in (False, True):
        attack = IGNormPGD(eps, steps=5, step_size=0.05, lam=0.02, at_adv=at_adv)
        torch.manual_seed(3)
        start = random_start(x, eps)
        torch.manual_seed(3)
        x_adv = attack(model, x, y)
        assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
        assert not x_adv.requires_grad
        before, after = ig_norm_penalty(model, x, start, y), ig_norm_penalty(model, x, x_adv, y)
        if not at_adv:
            assert after.mean() > 1.5 * before.mean(), (before.mean(), after.mean())
        else:  # what IG-Norm-Sum's attack ascends: on this untrained net the CE (~2.3) dominates and moves little
            before = before * 0.02 + F.cross_entropy(model(start), y, reduction="none").detach()
            after = after * 0.02 + F.cross_entropy(model(x_adv), y, reduction="none").detach()
            assert (after > before).all() and after.mean() > before.mean() + 0.01, (before, after)


def test_attack_hands_the_model_back_as_it_found_it(batch):
    x, y = batch
    torch.manual_seed(0)
    model = SmallMLP().train()
    model(x)  # some BatchNorm statistics
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    IGNormPGD(0.3, steps=2, at_adv=True)(model, x, y)
    assert model.training
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_attack_options_and_registry(batch):
    attack = create_attack("pgd_ig_norm", 0.3, steps=4)
    assert isinstance(attack, IGNormPGD)
    assert (attack.steps, attack.step_size, attack.lam, attack.points, attack.at_adv) == (4, 2.5 * 0.3 / 4, 0.02, 5,
                                                                                         False)
    assert attack.describe()["loss"] == "ig_l1"
    for bad in ({"lam": -1.0}, {"lam": 0.0}, {"lam": math.nan}, {"random_start": False}, {"norm": "l2"},
                {"targeted": True}, {"steps": 0}, {"points": 0}):
        with pytest.raises(ConfigError):
            IGNormPGD(0.3, **bad)
    # With CE at x' λ may be 0: the IG is skipped and the attack is CE-PGD, bit for bit.
    x, y = batch
    model = small_cnn()
    torch.manual_seed(4)
    ours = IGNormPGD(0.3, steps=3, step_size=0.1, lam=0.0, at_adv=True)(model, x, y)
    torch.manual_seed(4)
    assert torch.equal(ours, PGD(0.3, steps=3, step_size=0.1, keep_best=False)(model, x, y))


# -- the training methods -------------------------------------------------------------------------------------------
def test_both_are_registered_and_build_the_ig_attack():
    for cls, adv in ((IGNormTraining, False), (IGNormSumTraining, True)):
        assert METHODS.get(cls.__name__) is cls and cls.adv is adv
        module = make(cls, lam=0.1, steps=4, step_size=0.05, points=3)
        attack = module.training_attack.at(0.2)
        assert isinstance(attack, IGNormPGD)
        assert (attack.eps, attack.steps, attack.step_size, attack.lam, attack.points, attack.at_adv,
                attack.random_start) == (0.2, 4, 0.05, 0.1, 3, adv, True)
        assert IGNormTraining().lam == 0.02 and (IGNormTraining().steps, IGNormTraining().step_size) == (40, 0.01)


@pytest.mark.parametrize("cls", [IGNormTraining, IGNormSumTraining], ids=lambda c: c.__name__)
def test_loss_is_cross_entropy_plus_lam_mean_ig_norm(cls, batch):
    x, y = batch
    module = make(cls, lam=0.5)
    x_adv = module.adversarial_batch(x, y, 0.3)
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6 and (x_adv - x).abs().max() > 0.15
    loss, logits = module.training_loss(x, y, x_adv)
    x_hat = x_adv if cls.adv else x
    base = F.cross_entropy(module.model(x_hat), y)
    norm = ig_norm_penalty(module.model, x, x_adv, y).mean()
    assert norm > 0.01
    torch.testing.assert_close(loss.detach(), base.detach() + 0.5 * norm)
    torch.testing.assert_close(logits, module.model(x_hat))
    # The regulariser reaches the weights: the gradient differs from the cross-entropy's alone.
    (g_loss,) = torch.autograd.grad(loss, module.model.body[0].weight)
    (g_ce,) = torch.autograd.grad(base, module.model.body[0].weight)
    assert (g_loss - g_ce).abs().max() > 1e-3 * g_ce.abs().max()
    # At ε = 0 the warm-up hands x itself: IG(x, x) = 0, the loss is the cross-entropy at x.
    assert torch.equal(module.training_loss(x, y, module.adversarial_batch(x, y, 0.0))[0],
                       F.cross_entropy(module.model(x), y))


def test_ig_norm_with_lam_zero_is_standard_training(batch):
    x, y = batch
    module, standard = make(IGNormTraining, lam=0.0), make(StandardTraining)
    standard.model.load_state_dict(module.model.state_dict())
    assert module.training_attack is None and module.adversarial_batch(x, y, 0.3) is None
    loss, logits = module.training_loss(x, y, None)
    ref_loss, ref_logits = standard.training_loss(x, y, None)
    assert torch.equal(loss, ref_loss) and torch.equal(logits, ref_logits)
    assert torch.equal(module.training_loss(x, y, perturbed(x))[0], ref_loss)  # an x' changes nothing at λ = 0


def test_ig_norm_sum_with_lam_zero_is_pgd_training(batch):
    x, y = batch
    module, pgd = make(IGNormSumTraining, lam=0.0), make(PGDTraining)
    pgd.model.load_state_dict(module.model.state_dict())
    torch.manual_seed(5)
    x_adv = module.adversarial_batch(x, y, 0.3)
    torch.manual_seed(5)
    assert torch.equal(x_adv, pgd.adversarial_batch(x, y, 0.3))
    loss, logits = module.training_loss(x, y, x_adv)
    ref_loss, ref_logits = pgd.training_loss(x, y, x_adv)
    assert torch.equal(loss, ref_loss) and torch.equal(logits, ref_logits)
    assert not torch.equal(loss, F.cross_entropy(module.model(x), y))


@pytest.mark.parametrize("lam", [-0.1, math.nan, math.inf, "much"])
def test_bad_lam_is_rejected(lam):
    for cls in (IGNormTraining, IGNormSumTraining):
        with pytest.raises(ConfigError, match="lam"):
            cls(lam=lam)
    with pytest.raises(ConfigError):
        IGNormTraining(points=0)
    with pytest.raises(ConfigError):
        IGNormSumTraining(steps=0)


# -- the recipes ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ig_norm", "ig_norm_sum"])
def test_mnist_recipe_trains_two_batches_through_the_ig(name, tmp_path):
    # No warm-up here: with the recipe's (ε = 0 for 2 epochs) two batches would never reach the IG.
    module = train_recipe_briefly(name, tmp_path, 2, eps_warmup_start=0.0, eps_warmup_end=0.0)
    assert type(module) is (IGNormSumTraining if name == "ig_norm_sum" else IGNormTraining)
    assert module.trainer.global_step == 2 and module.lam == 0.02  # = 1/50, the authors' MNIST batch
    metrics = module.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and metrics["train/ig_norm"] > 0


@pytest.mark.parametrize("name", ["ig_norm_cifar10", "ig_norm_sum_cifar10"])
def test_cifar_recipe_builds_and_takes_a_step(name):
    recipe = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    init, batch_size = recipe["model"]["init_args"], recipe["data"]["init_args"]["batch_size"]
    assert init["lam"] * batch_size == 1 and init["arch"] == "small_cnn"  # the code's 1/batch at its batch, 128
    torch.manual_seed(0)
    cls = IGNormSumTraining if name.startswith("ig_norm_sum") else IGNormTraining
    assert recipe["model"]["class_path"] == f"robust_train.methods.{cls.__name__}"
    module = cls(**{**init, "steps": 2}, data_spec=CIFAR10Data(root="unused").spec)
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    x_adv = module.adversarial_batch(x, y, module.eps)
    assert (x_adv - x).abs().max() <= module.eps + 1e-6
    loss, logits = module.training_loss(x, y, x_adv)
    assert torch.isfinite(loss) and logits.shape == (4, 10)
