"""`Attack.per_example_eps`: one batched call over an ε grid gives, row by row, what the attack gives at each ε alone
(the explorer precomputes an image's whole ε grid this way)."""
import pytest
import torch

from robust_train.attacks import create_attack
from robust_train.errors import ConfigError
from robust_train.models import create_model

GRID = torch.tensor([0.0, 0.05, 0.1, 0.2, 0.3])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("small_cnn", in_channels=1, num_classes=10).eval()


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(1)
    return torch.rand(1, 1, 28, 28), torch.tensor([3])


@pytest.mark.parametrize("name, options", [
    ("fgsm", {}),
    ("pgd", {"steps": 7, "random_start": False, "early_stop": False}),
    ("bim", {"steps": 5}),
    ("aai", {"steps": 4, "random_start": False}),
])
def test_grid_rows_equal_single_eps_runs(model, image, name, options):
    x, y = image
    attack = create_attack(name, float(GRID.max()), **options)
    batched = attack.per_example_eps(GRID)(model, x.expand(len(GRID), -1, -1, -1), y.expand(len(GRID)))
    for i, eps in enumerate(GRID.tolist()):
        # Steps scale with ε: the same as building the attack at ε with its step shrunk alike (AAI's is absolute).
        step = attack.step_size * eps / attack.eps
        single = create_attack(name, eps, **options, step_size=step)(model, x, y) if eps > 0 else x
        assert torch.allclose(batched[i:i + 1], single, atol=1e-6), (name, eps)
        assert (batched[i] - x[0]).abs().max() <= eps + 1e-6
    assert batched.min() >= 0 and batched.max() <= 1
    assert not torch.equal(batched[-1], x[0])  # the attack did move the image


def test_per_example_eps_refuses_what_it_cannot_do(model):
    with pytest.raises(ConfigError, match="per example"):
        create_attack("pgd_l2", 1.0).per_example_eps(GRID)
    with pytest.raises(ConfigError, match="per example"):
        create_attack("mim", 0.3).per_example_eps(GRID)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        create_attack("fgsm", 0.3).per_example_eps(torch.tensor([0.1, float("nan")]))


def test_per_example_eps_leaves_the_original_attack_alone():
    attack = create_attack("pgd", 0.3)
    attack.per_example_eps(GRID)
    assert attack.eps == 0.3 and attack.early_stop is True and isinstance(attack.step_size, float)
