"""The attacks training methods craft their batches with: built once at the module's ε, rebuilt only when the
warm-up's ε differs, x itself at ε = 0, the module's BatchNorm mode, bad options refused at construction."""
from __future__ import annotations

import pytest
import torch

from robust_train.attacks import FGSM, PGD, TRADESKL, PrototypePGD, RandFGSM
from robust_train.errors import ConfigError
from robust_train.methods import (EnsembleAdvTraining, FastFGSMTraining, FGSMTraining, Int2Training, IntTraining,
                                  ParsevalTraining, PGDTraining, ProtoPNetTraining, RobustModule, TRADESTraining)
from robust_train.methods.training_attack import TrainingAttack

pytestmark = pytest.mark.usefixtures("one_thread")


class CountedPGD(PGD):
    built = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        CountedPGD.built += 1


@pytest.fixture
def counted():
    CountedPGD.built = 0
    return TrainingAttack(CountedPGD, 0.3, steps=2, step_size=0.1, keep_best=False)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(6, 1, 28, 28, generator=g), torch.randint(0, 10, (6,), generator=g)


def test_it_is_built_once_at_construction_and_reused_at_that_eps(counted, batch):
    assert CountedPGD.built == 1 and counted.attack.eps == 0.3
    first, model = counted.attack, PGDTraining().model
    for _ in range(3):
        x_adv = counted(model, *batch, 0.3)
        assert counted.attack is first and not torch.equal(x_adv, batch[0])
    assert CountedPGD.built == 1


def test_it_returns_x_itself_at_eps_zero_without_building(counted, batch):
    x, y = batch
    model = PGDTraining().model
    assert counted(model, x, y, 0.0) is x
    assert CountedPGD.built == 1


def test_it_rebuilds_only_when_eps_changes(counted, batch):
    x, y = batch
    model = PGDTraining().model
    for eps in (0.1, 0.1, 0.2, 0.3, 0.3):  # a warm-up's last steps, then the full ε
        x_adv = counted(model, x, y, eps)
        assert counted.attack.eps == eps and (x_adv - x).abs().max() <= eps + 1e-6
    assert CountedPGD.built == 4  # construction, 0.1, 0.2, 0.3


def test_callable_options_are_functions_of_eps():
    attack = TrainingAttack(RandFGSM, 0.3, alpha=lambda eps: min(0.05, eps))
    assert attack.attack.alpha == 0.05 and attack.at(0.02).alpha == 0.02
    fast = FastFGSMTraining(eps=0.3)
    assert fast.training_attack.attack.step_size == pytest.approx(0.375)
    assert fast.training_attack.at(0.1).step_size == pytest.approx(0.125)
    assert FGSMTraining(eps=0.0).training_attack.attack.eps == 0.0  # ε = 0 trains clean and stays valid


def test_the_module_helper_fills_in_the_attack_bn_mode():
    module = RobustModule(attack_bn_mode="train")
    assert module.make_training_attack(PGD, steps=1).attack.bn_mode == "train"
    assert module.make_training_attack(PGD, bn_mode="eval", steps=1).attack.bn_mode == "eval"
    for cls in (FGSMTraining, PGDTraining, TRADESTraining, IntTraining, Int2Training):
        assert cls(attack_bn_mode="train").training_attack.attack.bn_mode == "train"
    ensemble = EnsembleAdvTraining(attack_bn_mode="train")
    assert ensemble.current_attack.attack.bn_mode == "train"
    assert ensemble.static_attack.attack.bn_mode == "eval"  # static sources are always attacked in eval mode


def test_warm_up_batches_build_one_attack_per_new_eps(batch, monkeypatch):
    module = PGDTraining(steps=2, step_size=0.1)
    built = []
    real_build = module.training_attack.build
    monkeypatch.setattr(module.training_attack, "build", lambda eps: built.append(eps) or real_build(eps))
    x, y = batch
    for eps in (0.0, 0.0, 0.15, 0.3, 0.3, 0.3):
        x_adv = module.adversarial_batch(x, y, eps)
        assert x_adv is x if eps == 0 else (x_adv - x).abs().max() <= eps + 1e-6
    assert built == [0.15, 0.3]


# method, its arguments, and the attack it must run (class, options at ε) as the methods ran it per batch before
SAME_ATTACK = {
    "fgsm": (FGSMTraining, {}, lambda eps: FGSM(eps, step_size=eps)),
    "fast_fgsm": (FastFGSMTraining, {}, lambda eps: FGSM(eps, step_size=1.25 * eps, random_start=True)),
    "pgd": (PGDTraining, {"steps": 3, "step_size": 0.05},
            lambda eps: PGD(eps, steps=3, step_size=0.05, keep_best=False)),
    "pgd_no_start": (PGDTraining, {"steps": 3, "step_size": 0.05, "random_start": False},
                     lambda eps: PGD(eps, steps=3, step_size=0.05, random_start=False, keep_best=False)),
    "trades": (TRADESTraining, {"steps": 3, "step_size": 0.05}, lambda eps: TRADESKL(eps, steps=3, step_size=0.05)),
    "parseval": (ParsevalTraining, {"adversarial": "pgd", "steps": 3, "step_size": 0.05, "optimizer": "sgd"},
                 lambda eps: PGD(eps, steps=3, step_size=0.05, keep_best=False)),
    "protopnet": (ProtoPNetTraining, {"adversarial": "pgd", "steps": 2, "step_size": 0.1},
                  lambda eps: PGD(eps, steps=2, step_size=0.1, keep_best=False)),
    "protopnet_prototype": (ProtoPNetTraining, {"adversarial": "pgd_prototype", "steps": 2, "step_size": 0.1},
                            lambda eps: PrototypePGD(eps, steps=2, step_size=0.1, keep_best=False)),
}


@pytest.mark.parametrize("case", SAME_ATTACK)
def test_each_method_crafts_what_its_attack_crafts(case, batch):
    cls, kwargs, expected = SAME_ATTACK[case]
    torch.manual_seed(0)
    module = cls(eps=0.3, **kwargs)
    x, y = batch
    for eps in (0.3, 0.1):
        torch.manual_seed(1)
        ours = module.adversarial_batch(x, y, eps)
        torch.manual_seed(1)
        assert torch.equal(ours, expected(eps)(module.model, x, y))


def test_clean_parseval_and_protopnet_build_no_attack(batch):
    x, y = batch
    for module in (ParsevalTraining(optimizer="sgd", steps=0), ProtoPNetTraining(steps=0)):  # unused: not checked
        assert module.training_attack is None and module.adversarial_batch(x, y, 0.3) is None
    assert ParsevalTraining(adversarial="pgd", optimizer="sgd").adversarial_batch(x, y, 0.0) is None


STEPPED = [(PGDTraining, {}), (TRADESTraining, {}), (IntTraining, {}), (Int2Training, {}),
           (ParsevalTraining, {"adversarial": "pgd", "optimizer": "sgd"}), (ProtoPNetTraining, {"adversarial": "pgd"}),
           (ProtoPNetTraining, {"adversarial": "pgd_prototype"})]


@pytest.mark.parametrize("cls, kwargs", STEPPED, ids=[f"{c.__name__}-{k.get('adversarial')}" for c, k in STEPPED])
@pytest.mark.parametrize("bad", [{"steps": 0}, {"step_size": -0.01}, {"step_size": 0.0}], ids=str)
def test_bad_attack_options_are_config_errors_at_construction(cls, kwargs, bad):
    with pytest.raises(ConfigError):
        cls(**kwargs, **bad)


@pytest.mark.parametrize("cls, bad", [(FGSMTraining, {"step_ratio": -1.0}), (FastFGSMTraining, {"step_ratio": 0.0}),
                                      (EnsembleAdvTraining, {"attack": "rand_fgsm", "rand_alpha": -0.1})])
def test_bad_one_step_options_are_config_errors_at_construction(cls, bad):
    with pytest.raises(ConfigError):
        cls(**bad)
