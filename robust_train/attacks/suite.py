"""Named attack configurations for evaluation, each a function of ε, so `evaluate --attacks pgd,pgd_margin` and
the AttackAccuracy callback mean the same thing everywhere. The default suite is what `evaluate` runs: its
per-example worst case is checked against AutoAttack (APGD-CE + APGD-T) by tests and bench/mnist_pgd.py."""
from __future__ import annotations

from typing import Callable

from robust_train.attacks.base import Attack
from robust_train.attacks.bim import BIM
from robust_train.attacks.fgsm import FGSM
from robust_train.attacks.mim import MIM
from robust_train.attacks.pgd import PGD
from robust_train.attacks.pgd_prototype import PrototypePGD
from robust_train.attacks.pgd_targeted import MultiTargetedPGD
from robust_train.attacks.rand_fgsm import RandFGSM
from robust_train.errors import ConfigError

# steps/restarts may be overridden per run (`evaluate --steps 200`); None keeps each preset's own value.
PRESETS: dict[str, Callable[..., Attack]] = {
    "fgsm": lambda eps, steps=None, restarts=None: FGSM(eps),
    "rand_fgsm": lambda eps, steps=None, restarts=None: RandFGSM(eps),
    "bim": lambda eps, steps=None, restarts=None: BIM(eps, steps=steps or 10),
    "mim": lambda eps, steps=None, restarts=None: MIM(eps, steps=steps or 10),
    # Cross-entropy and margin PGD complement each other: CE is strong early, the margin loss does not saturate
    # when the softmax does (the classic gradient-masking failure of CE). Steps start at ε and shrink on a
    # cosine: on robust models a constant small step stalls in flat regions (measured: 6 points weaker than
    # AutoAttack on an MNIST PGD-AT model, against about 1 point for this suite).
    "pgd": lambda eps, steps=None, restarts=None: PGD(eps, steps=steps or 100, restarts=restarts or 1,
                                                      step_size=eps or None, step_schedule="cosine"),
    "pgd_margin": lambda eps, steps=None, restarts=None: PGD(eps, steps=steps or 100, restarts=restarts or 1,
                                                             step_size=eps or None, step_schedule="cosine", loss="margin"),
    # ProtoPNet only: the margin of head(−distance), past the saturating log similarity (see pgd_prototype.py).
    "pgd_prototype": lambda eps, steps=None, restarts=None: PrototypePGD(eps, steps=steps or 100,
                                                                        restarts=restarts or 1, step_size=eps or None,
                                                                        step_schedule="cosine"),
    # Targeted margin attacks towards the 3 most likely wrong classes, as AutoAttack's APGD-T does with 9.
    "pgd_targeted": lambda eps, steps=None, restarts=None: MultiTargetedPGD(eps, targets=3, steps=steps or 100),
    # The MNIST tables of Boopathy et al. (ICML 2020): 200 steps of 0.01 from a random start.
    "pgd200": lambda eps, steps=None, restarts=None: PGD(eps, steps=steps or 200, step_size=0.01,
                                                         restarts=restarts or 1),
    "pgd_l2": lambda eps, steps=None, restarts=None: PGD(eps, norm="l2", steps=steps or 100,
                                                         restarts=restarts or 1),
}
DEFAULT_SUITE = ["pgd", "pgd_margin", "pgd_targeted"]
EXTERNAL = {"autoattack", "autoattack_standard"}  # run through the pyautoattack package, see robust_train/evaluate.py


def build_attack(name: str, eps: float, steps: int | None = None, restarts: int | None = None) -> Attack:
    if name not in PRESETS:
        known = ", ".join(sorted([*PRESETS, *EXTERNAL]))
        raise ConfigError(f"unknown attack {name!r}: choose from {known}")
    return PRESETS[name](eps, steps=steps, restarts=restarts)
