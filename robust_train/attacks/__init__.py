"""Attacks, usable without Lightning: `x_adv = PGD(eps=0.3, steps=40, step_size=0.01)(model, x, y)`."""
from robust_train.attacks.base import Attack, attack_loss, attack_mode, project
from robust_train.attacks.registry import ATTACKS, create_attack
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

__all__ = ["AAI", "Attack", "ATTACKS", "BIM", "DiscrepancyPGD", "FGSM", "MIM", "MultiTargetedPGD", "PGD", "PrototypePGD", "RandFGSM", "TRADESKL", "attack_loss", "attack_mode",
           "create_attack", "project"]
