"""Fast adversarial training methods: N-FGSM (de Jorge et al. 2022), GradAlign (Andriushchenko & Flammarion 2020)
and MART (Wang et al. 2020).

Their math against closed forms on a linear softmax model (input gradient W^T(p − onehot)) and on hand-made logits,
the reductions at a limit (noise 0 is unprojected FGSM, λ = 0 is FGSM training, β = 0 is the boosted CE alone),
the attack base's guarantees, and each MNIST recipe trained for two batches.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from robust_train.attacks import FGSM, PGD
from robust_train.attacks.noisy_fgsm import NoisyFGSM
from robust_train.data import MNISTData
from robust_train.errors import ConfigError
from robust_train.losses.grad_align import alignment_penalty, gradient_alignment, input_gradients
from robust_train.losses.mart import mart_loss, mart_terms
from robust_train.methods import FGSMTraining, GradAlignTraining, MARTTraining, NFGSMTraining
from tests.conftest import SmallMLP, train_recipe_briefly

pytestmark = pytest.mark.usefixtures("one_thread")

FAST_NET = {"arch": "fast_mnist_cnn"}  # 0.6 M multiply-adds per image: every method's step in milliseconds
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture(scope="module")
def batch():
    """16 MNIST test images and labels."""
    return MNISTData().test_tensors(16)


def make(cls, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return cls(**{**FAST_NET, **kwargs})


def linear_softmax(d: int = 6, k: int = 4, seed: int = 0, dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, k)).to(dtype)


def closed_form_gradients(model, x, y):
    """Rows of ∇ₓ Σ CE for logits Wx + b: W^T(softmax(Wx + b) − onehot(y)), reshaped like x."""
    lin = model[1]
    p = F.softmax(x.flatten(1) @ lin.weight.T + lin.bias, dim=1)
    return ((p - F.one_hot(y, p.shape[1]).to(p.dtype)) @ lin.weight).reshape(x.shape)


def cosines(g1, g2):
    g1, g2 = g1.flatten(1), g2.flatten(1)
    return (g1 * g2).sum(1) / (g1.norm(dim=1) * g2.norm(dim=1))


# -- N-FGSM ------------------------------------------------------------------------------------------------------

def test_n_fgsm_stays_within_its_radius_and_in_the_unit_box_but_leaves_the_eps_ball(batch):
    x, y = batch
    module = make(NFGSMTraining, eps=0.1, noise_ratio=1.5, step_ratio=0.5)
    x_adv = module.adversarial_batch(x, y, 0.1)
    dist = (x_adv - x).abs().amax()
    assert module.training_attack.attack.radius == pytest.approx(0.2)
    assert dist <= 0.2 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert dist > 0.15, "x' must leave the ε-ball: N-FGSM does not project"


def test_n_fgsm_without_noise_is_fgsm_from_x_without_projection(batch):
    x, y = batch
    model = make(NFGSMTraining).model
    # Step 2ε: FGSM at ε would clip it back to the ball; with a budget of 1 only [0, 1] clips, as N-FGSM does.
    x_adv = NoisyFGSM(0.1, noise_ratio=0.0, step_ratio=2.0)(model, x, y)
    assert torch.equal(x_adv, FGSM(1.0, step_size=0.2)(model, x, y))
    assert (x_adv - x).abs().amax() == pytest.approx(0.2, abs=1e-6)


def test_n_fgsm_without_noise_on_a_linear_model_is_the_signed_closed_form_gradient():
    model = linear_softmax(dtype=torch.float32)
    torch.manual_seed(1)
    x, y = torch.rand(5, 1, 2, 3), torch.tensor([0, 1, 2, 3, 0])
    expected = (x + 0.3 * closed_form_gradients(model, x, y).sign()).clamp(0, 1)
    assert torch.allclose(NoisyFGSM(0.3, noise_ratio=0.0)(model, x, y), expected, atol=1e-7)


def test_n_fgsm_noise_spreads_over_k_eps_not_eps():
    # x = 0.5 keeps x + η away from the [0, 1] clip, step 0 leaves the noise alone: x' − x = η ~ U(−kε, kε).
    x, y = torch.full((32, 1, 28, 28), 0.5), torch.zeros(32, dtype=torch.long)
    torch.manual_seed(0)
    eta = NoisyFGSM(0.1, noise_ratio=2.0, step_ratio=0.0)(make(NFGSMTraining).model, x, y) - x
    assert eta.abs().amax() > 0.199 and eta.abs().amax() <= 0.2 + 1e-6
    assert eta.abs().mean().item() == pytest.approx(0.1, rel=0.02)  # E|U(−a, a)| = a/2
    assert (eta.abs() > 0.1).float().mean().item() == pytest.approx(0.5, abs=0.02)  # half beyond ε


def test_n_fgsm_hands_the_model_back_untouched():
    torch.manual_seed(0)
    model = SmallMLP().train()
    bn = model.net[2]
    stats = bn.running_mean.clone(), bn.num_batches_tracked.clone()
    x, y = torch.rand(8, 1, 28, 28).bfloat16(), torch.arange(8)
    x_adv = NoisyFGSM(0.1, bn_mode="train")(model, x, y)
    assert x_adv.dtype == torch.float32 and not x_adv.requires_grad
    assert all(m.training for m in model.modules())
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.num_batches_tracked, stats[1])
    assert all(p.grad is None for p in model.parameters())
    NoisyFGSM(0.1)(model.eval(), x.float(), y)
    assert not any(m.training for m in model.modules())


def test_n_fgsm_training_step_leaves_mode_and_grads_alone(batch):
    x, y = batch
    module = make(NFGSMTraining).train()
    module.adversarial_batch(x, y, 0.3)
    assert module.training and all(p.grad is None for p in module.parameters())


def test_shrink_step_changes_the_step_of_the_next_batch(batch):
    x, y = batch
    module = make(NFGSMTraining, eps=0.1, noise_ratio=0.0, step_ratio=1.0)
    model = module.model
    assert torch.equal(module.adversarial_batch(x, y, 0.1), FGSM(1.0, step_size=0.1)(model, x, y))
    module.shrink_step(0.5)
    assert module.step_ratio == 0.5
    assert torch.equal(module.adversarial_batch(x, y, 0.1), FGSM(1.0, step_size=0.05)(model, x, y))
    assert torch.equal(module.adversarial_batch(x, y, 0.06), FGSM(1.0, step_size=0.03)(model, x, y))  # warm-up ε
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ConfigError):
            module.shrink_step(bad)


def test_a_shrunk_step_survives_a_checkpoint(batch):
    x, y = batch
    module = make(NFGSMTraining, eps=0.1, noise_ratio=0.0)
    module.shrink_step(0.5)
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    resumed = make(NFGSMTraining, eps=0.1, noise_ratio=0.0)
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.step_ratio == 0.5
    assert torch.equal(resumed.adversarial_batch(x, y, 0.1), FGSM(1.0, step_size=0.05)(resumed.model, x, y))


@pytest.mark.parametrize("bad", [{"noise_ratio": -1.0}, {"noise_ratio": math.nan}, {"noise_ratio": math.inf},
                                 {"step_ratio": -0.5}, {"step_ratio": math.inf}])
def test_n_fgsm_rejects_bad_values(bad):
    with pytest.raises(ConfigError):
        NFGSMTraining(**bad)


def test_n_fgsm_accepts_zero_noise_and_only_linf():
    assert NFGSMTraining(noise_ratio=0.0).training_attack.attack.noise_ratio == 0.0
    with pytest.raises(ConfigError):
        NoisyFGSM(0.1, norm="l2")


# -- GradAlign ---------------------------------------------------------------------------------------------------

def test_input_gradients_are_the_closed_form_per_example_gradients():
    model = linear_softmax()
    x, y = torch.rand(5, 1, 2, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 1])
    assert torch.allclose(input_gradients(model, x, y), closed_form_gradients(model, x, y), atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


def test_gradient_alignment_equals_one_minus_mean_cos_of_the_closed_form_gradients():
    model = linear_softmax()
    torch.manual_seed(2)
    x, y = torch.rand(6, 1, 2, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 1, 0])
    eta = (torch.rand_like(x) * 2 - 1) * 4  # large: a linear model's gradients turn only as its softmax moves
    expected = 1 - cosines(closed_form_gradients(model, x, y), closed_form_gradients(model, x + eta, y)).mean()
    value = gradient_alignment(model, x, y, eta)
    assert value.item() == pytest.approx(expected.item(), rel=1e-10)
    assert 0.01 < value.item() <= 2, "premise: the noise misaligns the gradients"


def test_gradient_alignment_is_zero_without_noise_and_in_0_2():
    model = linear_softmax()
    x, y = torch.rand(6, 1, 2, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 1, 0])
    assert gradient_alignment(model, x, y, torch.zeros_like(x)).item() == pytest.approx(0.0, abs=1e-12)
    g = torch.randn(4, 3, 5, dtype=torch.float64)
    assert alignment_penalty(g, -3 * g).item() == pytest.approx(2.0)
    assert alignment_penalty(g, 2 * g).item() == pytest.approx(0.0, abs=1e-12)
    for seed in range(5):
        torch.manual_seed(seed)
        assert 0 <= alignment_penalty(torch.randn(8, 10), torch.randn(8, 10)).item() <= 2


def test_gradient_alignment_reaches_the_weights_through_the_noisy_gradient_only():
    model = linear_softmax()
    torch.manual_seed(3)
    x, y = torch.rand(6, 1, 2, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 1, 0])
    eta = (torch.rand_like(x) * 2 - 1) * 0.5
    params = list(model.parameters())
    grads = torch.autograd.grad(gradient_alignment(model, x, y, eta), params)
    assert all(torch.isfinite(g).all() for g in grads) and grads[0].abs().sum() > 1e-6
    # The closed form differentiated by autograd, the gradient at x held constant as in the reference:
    g1 = closed_form_gradients(model, x, y).detach()
    expected = torch.autograd.grad(1 - cosines(g1, closed_form_gradients(model, x + eta, y)).mean(), params)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(grads, expected))
    both = torch.autograd.grad(1 - cosines(closed_form_gradients(model, x, y),
                                           closed_form_gradients(model, x + eta, y)).mean(), params)
    assert not torch.allclose(grads[0], both[0], atol=1e-6), "premise: detaching the first gradient matters"


def test_examples_with_a_zero_gradient_are_left_out_of_the_mean():
    g1, g2 = torch.randn(4, 2, 3, dtype=torch.float64), torch.randn(4, 2, 3, dtype=torch.float64)
    g1[1] = 0  # the gradient at x vanishes
    g2[3] = 0  # the gradient at x + η vanishes
    expected = 1 - cosines(g1[[0, 2]], g2[[0, 2]]).mean()
    assert alignment_penalty(g1, g2).item() == pytest.approx(expected.item(), rel=1e-12)
    # Through a model: example 0 is saturated (p = onehot exactly in float32), so both its gradients are zero.
    model = linear_softmax(dtype=torch.float32)
    lin = model[1]
    x, y = torch.rand(4, 1, 2, 3), torch.tensor([0, 1, 2, 3])
    x[0] = (1e3 * lin.weight[0]).detach().reshape(1, 2, 3)
    eta = torch.full_like(x, 0.01)
    assert (input_gradients(model, x[:1], y[:1]) == 0).all(), "premise: a saturated softmax has a zero gradient"
    value = gradient_alignment(model, x, y, eta)
    assert torch.isfinite(value) and value.item() == pytest.approx(
        gradient_alignment(model, x[1:], y[1:], eta[1:]).item(), rel=1e-6)
    nothing = gradient_alignment(model, x[:1], y[:1], eta[:1])
    assert nothing.item() == 0.0
    nothing.backward()  # still a graph to differentiate, with zero gradient
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


def test_grad_align_with_zero_lambda_is_fgsm_training_exactly(batch):
    x, y = batch
    align, fgsm = make(GradAlignTraining, lam=0.0), make(FGSMTraining)
    x_adv = align.adversarial_batch(x, y, 0.3)
    assert torch.equal(x_adv, fgsm.adversarial_batch(x, y, 0.3))
    assert torch.equal(align.training_loss(x, y, x_adv)[0], fgsm.training_loss(x, y, x_adv)[0])


def test_grad_align_loss_is_fgsm_loss_plus_lambda_times_the_regulariser(batch):
    x, y = batch
    module = make(GradAlignTraining, lam=0.7, eps=0.3)
    x_adv = module.adversarial_batch(x, y, 0.3)
    torch.manual_seed(5)
    loss, logits = module.training_loss(x, y, x_adv)
    torch.manual_seed(5)
    eta = ((x + (torch.rand_like(x) * 2 - 1) * 0.3).clamp(0, 1)) - x  # η ~ U(−ε, ε), x + η in [0, 1]
    reg = gradient_alignment(module.model, x, y, eta)
    assert reg.item() > 1e-4, "premise: the regulariser is not 0 here"
    assert loss.item() == pytest.approx(F.cross_entropy(logits, y).item() + 0.7 * reg.item(), rel=1e-5)
    assert torch.equal(logits, module.model(x_adv))


def test_grad_align_regulariser_runs_in_train_mode_and_leaves_no_parameter_grads(batch):
    x, y = batch
    module = make(GradAlignTraining).train()
    x_adv = module.adversarial_batch(x, y, 0.3)
    modes = []
    handle = module.model.register_forward_hook(lambda m, args, out: modes.append(m.training))
    try:
        loss, _ = module.training_loss(x, y, x_adv)
    finally:
        handle.remove()
    assert modes == [True, True, True]  # CE at x', the gradients at x and at x + η
    assert all(p.grad is None for p in module.parameters())
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())


@pytest.mark.parametrize("lam", [-0.1, math.nan, math.inf])
def test_grad_align_rejects_bad_lambda(lam):
    with pytest.raises(ConfigError):
        GradAlignTraining(lam=lam)


def test_grad_align_refuses_torch_compile_which_has_no_double_backward():
    with pytest.raises(ConfigError, match="compile"):
        GradAlignTraining(compile=True)


def test_grad_align_inherits_fgsm_trainings_shrink_step(batch):
    x, y = batch
    module = make(GradAlignTraining, eps=0.2)
    module.shrink_step(0.5)
    assert torch.equal(module.adversarial_batch(x, y, 0.2), FGSM(0.2, step_size=0.1)(module.model, x, y))


def test_grad_align_defaults_are_the_papers():
    module = GradAlignTraining()
    assert module.lam == 0.2 and module.step_ratio == 1.0 and not module.random_start


# -- MART --------------------------------------------------------------------------------------------------------

LOGITS_CLEAN = [[2.0, 0.5, -1.0], [0.1, 0.3, 0.2], [-0.5, 1.5, 0.0]]
LOGITS_ADV = [[1.0, 1.2, -0.3], [0.4, -0.2, 0.9], [0.2, 2.5, -1.0]]
LABELS = [0, 1, 1]  # example 0 flips to class 1 at x', example 1 is misclassified, example 2 stays correct


def softmax_by_hand(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def mart_by_hand(beta):
    """MART's formula written out example by example."""
    bce = kl_term = 0.0
    for zc, za, y in zip(LOGITS_CLEAN, LOGITS_ADV, LABELS):
        pc, pa = softmax_by_hand(zc), softmax_by_hand(za)
        wrong = max(p for k, p in enumerate(pa) if k != y)
        bce += -math.log(pa[y]) - math.log(1.0001 - wrong + 1e-12)
        kl = sum(c * (math.log(c) - math.log(a)) for c, a in zip(pc, pa))
        kl_term += kl * (1.0000001 - pc[y])
    n = len(LABELS)
    return bce / n + beta * kl_term / n, bce / n


def mart_inputs():
    return (torch.tensor(LOGITS_CLEAN, dtype=torch.float64), torch.tensor(LOGITS_ADV, dtype=torch.float64),
            torch.tensor(LABELS))


def test_mart_loss_equals_the_formula_by_hand():
    clean, adv, y = mart_inputs()
    total, bce = mart_by_hand(2.5)
    assert mart_loss(clean, adv, y, 2.5).item() == pytest.approx(total, rel=1e-12)
    assert mart_terms(clean, adv, y)[0].item() == pytest.approx(bce, rel=1e-12)


def test_mart_with_zero_beta_is_the_boosted_ce_alone():
    clean, adv, y = mart_inputs()
    assert mart_loss(clean, adv, y, 0.0).item() == pytest.approx(mart_by_hand(0.0)[1], rel=1e-12)
    assert mart_loss(clean, adv, y, 1.0) > mart_loss(clean, adv, y, 0.0) + 1e-3, "premise: the KL term is not 0"


def test_mart_kl_vanishes_at_x_adv_equal_x():
    clean, _, y = mart_inputs()
    assert mart_terms(clean, clean, y)[1].item() == 0.0
    assert torch.equal(mart_loss(clean, clean, y, 6.0), mart_loss(clean, clean, y, 0.0))


def test_mart_gradient_is_finite_on_a_saturated_softmax():
    # Example 0: p_y(x) = 1 and p_y(x') = 1; example 1: x' confidently wrong (max_{k≠y} p_k = 1); float32.
    clean = torch.tensor([[80.0, 0.0, -80.0], [60.0, 0.0, 0.0]], requires_grad=True)
    adv = torch.tensor([[90.0, -50.0, 0.0], [0.0, 100.0, -100.0]], requires_grad=True)
    loss = mart_loss(clean, adv, torch.tensor([0, 0]), 6.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(clean.grad).all() and torch.isfinite(adv.grad).all()
    assert loss.item() < 200  # the 1.0001 bounds the margin term by −log(1e-4) ≈ 9.2 per example


def test_mart_training_loss_is_mart_at_pgd_examples(batch):
    x, y = batch
    module = make(MARTTraining, beta=3.0, steps=3, step_size=0.1, eps=0.3)
    x_adv = module.adversarial_batch(x, y, 0.3)
    assert (x_adv - x).abs().amax() <= 0.3 + 1e-6 and not torch.equal(x_adv, x)
    assert isinstance(module.training_attack.attack, PGD) and not module.training_attack.attack.keep_best
    loss, logits = module.training_loss(x, y, x_adv)
    assert torch.equal(logits, module.model(x_adv))
    assert loss.item() == pytest.approx(mart_loss(module.model(x), logits, y, 3.0).item(), rel=1e-6)
    clean_only, _ = module.training_loss(x, y, x)  # ε = 0 in the warm-up: the boosted CE at x
    assert clean_only.item() == pytest.approx(mart_terms(module.model(x), module.model(x), y)[0].item(), rel=1e-6)


@pytest.mark.parametrize("bad", [{"beta": -1.0}, {"beta": math.nan}, {"beta": math.inf}, {"steps": 0},
                                 {"step_size": -0.01}])
def test_mart_rejects_bad_values(bad):
    with pytest.raises(ConfigError):
        MARTTraining(**bad)


def test_mart_default_beta_is_the_papers():
    assert MARTTraining().beta == 6.0


# -- recipes -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, cls", [("n_fgsm", NFGSMTraining), ("gradalign", GradAlignTraining),
                                       ("mart", MARTTraining)])
def test_each_mnist_recipe_trains_two_batches(name, cls, tmp_path):
    module = train_recipe_briefly(name, tmp_path, steps=2)
    assert type(module) is cls and module.trainer.global_step == 2
    metrics = module.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    if cls is GradAlignTraining:
        assert 0 <= metrics["train/grad_align"] <= 2


CIFAR = {"num_classes": 10, "in_channels": 3, "image_size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3}


@pytest.mark.parametrize("name", ["n_fgsm", "gradalign", "mart", "n_fgsm_cifar10", "gradalign_cifar10",
                                  "mart_cifar10"])
def test_recipes_describe_themselves_keep_attack_accuracy_and_build(name):
    import importlib

    text = (RECIPES / f"{name}.yaml").read_text()
    assert text.startswith("# ") and len(text.splitlines()[0]) <= 120
    recipe = yaml.safe_load(text)
    assert recipe["attack_accuracy"]["attack"] == "pgd"
    module_name, _, class_name = recipe["model"]["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    spec = CIFAR if name.endswith("cifar10") else None
    module = cls(**recipe["model"]["init_args"], data_spec=spec)  # options checked at construction
    judged_at = (recipe["attack_accuracy"].get("eps") or [module.eps])[0]
    assert judged_at == pytest.approx(8 / 255 if spec else 0.3), "validated at the budget the recipe is for"
    assert judged_at <= module.eps <= 1.2 * judged_at
