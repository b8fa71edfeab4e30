"""Parseval networks: the retraction's fixed point and convergence, the simplex projection, the Lipschitz bound it
buys, and ParsevalTraining inside a real (3-batch) Lightning fit."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from robust_train.data import MNISTData
from robust_train.errors import ConfigError
from robust_train.methods.parseval import ParsevalTraining
from robust_train.methods.parseval_math import (ConvexCombination, orthogonal_init_, orthonormality_error,
                                                parseval_retraction_, project_to_simplex)
from tests.conftest import quiet_trainer

REPO = Path(__file__).resolve().parents[1]


def iterate(weight: torch.Tensor, beta: float, n: int, **kwargs) -> torch.Tensor:
    for _ in range(n):
        parseval_retraction_(weight, beta, **kwargs)
    return weight


# -- the retraction ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.1, 0.3])
def test_retraction_drives_a_random_wide_matrix_to_orthonormal_rows(beta):
    torch.manual_seed(0)
    w = torch.randn(20, 50, dtype=torch.float64) / 50 ** 0.5  # singular values 0.37..1.63, inside the basin
    assert orthonormality_error(w) > 1
    iterate(w, beta, 200)
    assert orthonormality_error(w) < 1e-8
    assert torch.allclose(torch.linalg.svdvals(w), torch.ones(20, dtype=torch.float64), atol=1e-9)


def test_retraction_on_a_conv_weight_orthonormalises_the_scaled_matrix():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3).double()  # matrix view 8 x 36
    assert orthonormality_error(conv.weight) > 0.5
    iterate(conv.weight, 0.2, 300)
    assert orthonormality_error(conv.weight) < 1e-8
    m = conv.weight.detach().reshape(8, -1)
    assert torch.allclose(m @ m.T, torch.eye(8, dtype=torch.float64) / 9, atol=1e-9)  # rows of norm 1/sqrt(3*3)
    plain = nn.Conv2d(4, 8, 3).double()
    iterate(plain.weight, 0.2, 300, conv_scaling=False)  # DingJianhao / parsnet: the unscaled matrix
    m = plain.weight.detach().reshape(8, -1)
    assert torch.allclose(m @ m.T, torch.eye(8, dtype=torch.float64), atol=1e-9)


def test_a_tall_matrix_goes_to_orthonormal_columns():
    torch.manual_seed(0)
    w = torch.randn(30, 10, dtype=torch.float64) / 30 ** 0.5
    iterate(w, 0.2, 300)
    assert orthonormality_error(w) < 1e-8
    assert torch.allclose(w.T @ w, torch.eye(10, dtype=torch.float64), atol=1e-9)


def test_the_step_is_the_identity_on_orthonormal_rows():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(50, 20, dtype=torch.float64))
    w = q.T.contiguous()  # 20 x 50, orthonormal rows
    before = w.clone()
    parseval_retraction_(w, 0.3)
    assert torch.allclose(w, before, atol=1e-12)
    assert parseval_retraction_(w, 0.0) is w and torch.equal(w, parseval_retraction_(w.clone(), 0.0))


def test_row_sampling_leaves_the_other_rows_untouched():
    torch.manual_seed(0)
    w = torch.randn(40, 60) / 60 ** 0.5
    before = w.clone()
    parseval_retraction_(w, 0.3, sample_rows=0.25, generator=torch.Generator().manual_seed(1))
    changed = (w != before).any(dim=1)
    assert changed.sum() == 10  # floor(0.25 * 40) rows moved, every other row is bit-for-bit the same
    assert torch.equal(w[~changed], before[~changed])
    # the same generator state picks the same rows, iterated: they (and only they) become orthonormal
    w2 = before.clone()
    for _ in range(300):
        parseval_retraction_(w2, 0.2, sample_rows=0.25, generator=torch.Generator().manual_seed(1))
    assert torch.equal(w2[~changed], before[~changed])
    assert orthonormality_error(w2[changed]) < 1e-4 and orthonormality_error(w2) > 1


def test_bad_arguments_are_refused():
    w = torch.randn(3, 4)
    with pytest.raises(ValueError):
        parseval_retraction_(w, 1.5)
    with pytest.raises(ValueError):
        parseval_retraction_(w, 0.1, sample_rows=0.0)
    with pytest.raises(ConfigError):
        ParsevalTraining(beta=-0.1)
    with pytest.raises(ConfigError):
        ParsevalTraining(optimizer="sgd", adversarial="fgsm")
    with pytest.raises(ConfigError):
        ParsevalTraining(optimizer="sgd", sample_rows=1.5)


# -- simplex ------------------------------------------------------------------------------------------------------
def test_simplex_projection_lands_on_the_simplex_and_is_idempotent():
    torch.manual_seed(0)
    v = 3 * torch.randn(64, 7, dtype=torch.float64)
    p = project_to_simplex(v)
    assert p.shape == v.shape and (p >= 0).all()
    assert torch.allclose(p.sum(-1), torch.ones(64, dtype=torch.float64))
    assert torch.allclose(project_to_simplex(p), p, atol=1e-12)
    on = torch.distributions.Dirichlet(torch.ones(7, dtype=torch.float64)).sample((16,))
    assert torch.allclose(project_to_simplex(on), on, atol=1e-12)


def test_simplex_projection_is_the_euclidean_argmin():
    assert torch.allclose(project_to_simplex(torch.tensor([0.8, 0.7, -0.2])), torch.tensor([0.55, 0.45, 0.0]))
    assert torch.equal(project_to_simplex(torch.tensor([5.0, 0.0])), torch.tensor([1.0, 0.0]))
    torch.manual_seed(0)
    v = 2 * torch.randn(32, 4, dtype=torch.float64)
    p = project_to_simplex(v)
    # optimality certificate: <v - p, q - p> <= 0 for every q in the simplex, i.e. for every vertex q = e_i
    r = v - p
    assert (r <= (r * p).sum(-1, keepdim=True) + 1e-12).all()
    # brute force: no Dirichlet sample is closer than p
    q = torch.distributions.Dirichlet(torch.ones(4, dtype=torch.float64)).sample((20000,))
    assert ((v[:, None] - q[None]).norm(dim=-1).min(1).values >= r.norm(dim=-1) - 1e-12).all()


def test_convex_combination_stays_on_the_simplex_and_is_1_lipschitz():
    torch.manual_seed(0)
    lin = nn.Linear(16, 16, bias=False)
    iterate(lin.weight, 0.2, 200)
    comb = ConvexCombination(2, init=(0.99, 0.01))
    comb.weight.data += torch.tensor([0.5, -0.3])  # as an optimiser step might leave it
    comb.project_()
    assert (comb.weight >= 0).all() and torch.isclose(comb.weight.sum(), torch.tensor(1.0))
    block = lambda x: comb(x, lin(x))  # noqa: E731  (shortcut + 1-Lipschitz branch)
    x, x2 = torch.randn(500, 16), torch.randn(500, 16)
    with torch.no_grad():
        assert ((block(x) - block(x2)).norm(dim=1) <= (x - x2).norm(dim=1) * (1 + 1e-4)).all()


# -- init and the Lipschitz bound -------------------------------------------------------------------------------------
def test_orthogonal_init_gives_orthonormal_rows():
    lin = orthogonal_init_(nn.Linear(30, 12))
    w = lin.weight.detach()
    assert torch.allclose(w @ w.T, torch.eye(12), atol=1e-5)
    conv = orthogonal_init_(nn.Conv2d(3, 8, 5))  # 8 x 75, scaled by 1/5
    assert orthonormality_error(conv.weight) < 1e-5
    m = conv.weight.detach().reshape(8, -1)
    assert torch.allclose(m @ m.T, torch.eye(8) / 25, atol=1e-6)


def test_retracted_linear_layer_is_1_lipschitz():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    lin.weight.data *= 3  # spectral norm well above 1 to start with
    assert torch.linalg.matrix_norm(lin.weight.detach(), ord=2) > 1.5
    iterate(lin.weight, 0.1, 300)
    assert torch.linalg.matrix_norm(lin.weight.detach(), ord=2) <= 1 + 1e-4
    x, x2 = torch.randn(2000, 64), torch.randn(2000, 64)
    with torch.no_grad():
        assert ((lin(x) - lin(x2)).norm(dim=1) <= (x - x2).norm(dim=1) * (1 + 1e-4)).all()


def conv_operator_norm(weight: torch.Tensor, padding: int, iters: int = 50) -> float:
    """‖conv‖₂ by power iteration on AᵀA (conv_transpose2d is the adjoint of a stride-1 conv)."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, weight.shape[1], 12, 12, generator=g)
    for _ in range(iters):
        v = F.conv_transpose2d(F.conv2d(v, weight, padding=padding), weight, padding=padding)
        v = v / v.norm()
    return float(F.conv2d(v, weight, padding=padding).norm())


def test_conv_scaling_makes_the_convolution_itself_1_lipschitz():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    iterate(conv.weight, 0.2, 300)
    w = conv.weight.detach()
    assert conv_operator_norm(w, 1) <= 1 + 1e-4
    x, x2 = torch.rand(200, 3, 12, 12), torch.rand(200, 3, 12, 12)
    with torch.no_grad():
        diff = (conv(x) - conv(x2)).flatten(1).norm(dim=1)
    assert (diff <= (x - x2).flatten(1).norm(dim=1) * (1 + 1e-4)).all()
    # without the scaling the matrix is orthonormal but the convolution is not 1-Lipschitz
    plain = nn.Conv2d(3, 8, 3, padding=1)
    iterate(plain.weight, 0.2, 300, conv_scaling=False)
    assert conv_operator_norm(plain.weight.detach(), 1) > 1.5


# -- the training method ----------------------------------------------------------------------------------------------
def test_parseval_training_starts_orthogonal_and_picks_its_layers():
    module = ParsevalTraining(optimizer="sgd")
    assert len(module.parseval_layers) == 4  # small_cnn: three convs and the head
    assert max(module.orthonormality_errors()) < 1e-4
    assert module.model.head not in ParsevalTraining(optimizer="sgd", include_head=False).parseval_layers


def test_adam_with_scaled_convs_warns():
    with pytest.warns(UserWarning, match="optimizer: sgd"):
        ParsevalTraining(optimizer="adam")


def test_pgd_option_crafts_examples_in_the_ball():
    torch.manual_seed(0)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    assert ParsevalTraining(optimizer="sgd").adversarial_batch(x, y, 0.3) is None
    module = ParsevalTraining(optimizer="sgd", adversarial="pgd", steps=2)
    x_adv = module.adversarial_batch(x, y, 0.3)
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6 and not torch.equal(x_adv, x)


def fit_three_batches(beta: float, tmp_path) -> ParsevalTraining:
    pl.seed_everything(0, verbose=False)
    module = ParsevalTraining(beta=beta, optimizer="sgd", lr=0.05)
    calls = []
    step = module.parseval_step
    module.parseval_step = lambda: (calls.append(1), step())
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(module, datamodule=MNISTData(batch_size=16))
    assert len(calls) == 3, "one retraction per optimiser step"
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert "train/parseval_error_mean" in trainer.callback_metrics
    return module


def test_a_short_fit_keeps_conv_layers_closer_to_orthonormal_than_without_retraction(tmp_path):
    with_retraction = fit_three_batches(0.1, tmp_path)
    without = fit_three_batches(0.0, tmp_path)
    convs = [i for i, m in enumerate(with_retraction.parseval_layers) if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3
    err_with, err_without = with_retraction.orthonormality_errors(), without.orthonormality_errors()
    assert err_without[convs[-1]] > 1e-3, "the optimiser should move the weights off the Parseval set"
    for i in convs:
        assert err_with[i] < err_without[i]


# -- recipes ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["parseval", "parseval_pgd"])
def test_recipe_builds_the_module_it_describes(recipe):
    config = yaml.safe_load((REPO / "recipes" / f"{recipe}.yaml").read_text())
    assert config["model"]["class_path"] == "robust_train.methods.ParsevalTraining"
    module = ParsevalTraining(**config["model"]["init_args"])
    assert module.adversarial == (None if recipe == "parseval" else "pgd")


def test_recipe_parses_on_the_command_line():
    env = {**os.environ, "WANDB_MODE": "disabled", "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-m", "robust_train", "fit", "--recipe", "parseval", "--print_config"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "class_path: robust_train.methods.ParsevalTraining" in out.stdout
