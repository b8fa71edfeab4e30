"""Training methods as LightningModules on one base, by name in `METHODS`; recipes name them by class
(`class_path: PGDTraining`)."""
from robust_train.methods.base import RobustModule
from robust_train.methods.registry import METHODS, register_method
from robust_train.methods.standard import StandardTraining
from robust_train.methods.fgsm import FGSMTraining
from robust_train.methods.fgsm_rs import FastFGSMTraining
from robust_train.methods.pgd import PGDTraining
from robust_train.methods.trades import TRADESTraining
from robust_train.methods.int import IntAdvTraining, IntOneClassTraining, IntTraining
from robust_train.methods.int2 import Int2AdvTraining, Int2Training
from robust_train.methods.distillation import DistillationTraining
from robust_train.methods.parseval import ParsevalTraining
from robust_train.methods.ensemble_adv import EnsembleAdvTraining
from robust_train.methods.protopnet import ProtoPNetTraining
from robust_train.methods.svae import SVAETraining  # noqa: F401  (register)
from robust_train.methods.ig_norm import IGNormSumTraining, IGNormTraining
from robust_train.methods.n_fgsm import NFGSMTraining
from robust_train.methods.grad_align import GradAlignTraining
from robust_train.methods.mart import MARTTraining

__all__ = ["METHODS", "DistillationTraining", "EnsembleAdvTraining", "FGSMTraining", "FastFGSMTraining",
           "GradAlignTraining", "MARTTraining", "NFGSMTraining",
           "IGNormSumTraining", "IGNormTraining",
           "Int2AdvTraining", "Int2Training", "IntAdvTraining", "IntOneClassTraining", "IntTraining", "PGDTraining",
           "ParsevalTraining", "ProtoPNetTraining", "RobustModule", "StandardTraining", "TRADESTraining",
           "register_method"]
