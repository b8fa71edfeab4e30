"""Attacks, usable without Lightning: `x_adv = PGD(eps=0.3, steps=40, step_size=0.01)(model, x, y)`, or by name:
`create_attack("pgd_margin", eps=0.3)` (`python -m robust_train attacks` lists the names)."""
from robust_train.attacks.base import Attack, attack_loss, project
from robust_train.attacks.registry import ATTACKS, create_attack, register_attack
from robust_train.attacks.fgsm import FGSM
from robust_train.attacks.rand_fgsm import RandFGSM
from robust_train.attacks.pgd import PGD
from robust_train.attacks.pgd_targeted import MultiTargetedPGD
from robust_train.attacks.pgd_prototype import PrototypePGD
from robust_train.attacks.bim import BIM
from robust_train.attacks.mim import MIM
from robust_train.attacks.trades_kl import TRADESKL
from robust_train.attacks.aai import AAI
from robust_train.attacks.pgd_discrepancy import DiscrepancyPGD
from robust_train.attacks.pgd_ig_norm import IGNormPGD  # noqa: F401  (register)
from robust_train.attacks.autoattack import AutoAttack
from robust_train.attacks.minimal import MinimalResult, is_minimal
from robust_train.attacks.deepfool import DeepFool, deepfool
from robust_train.attacks.fmn import FMN, fmn
from robust_train.attacks.carlini_wagner import CarliniWagnerL2, carlini_wagner_l2

__all__ = ["AAI", "ATTACKS", "Attack", "AutoAttack", "BIM", "CarliniWagnerL2", "DeepFool", "DiscrepancyPGD", "FGSM",
           "MIM", "MultiTargetedPGD", "PGD", "PrototypePGD", "RandFGSM", "TRADESKL", "attack_loss", "carlini_wagner_l2",
           "create_attack", "deepfool", "FMN", "fmn", "is_minimal", "MinimalResult", "project",
           "register_attack"]
