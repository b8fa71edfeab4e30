"""Training methods as LightningModules on one base; recipes name them by class (`class_path: PGDTraining`)."""
from robust_train.methods.base import RobustModule
from robust_train.methods.standard import StandardTraining
from robust_train.methods.fgsm import FGSMTraining
from robust_train.methods.fgsm_rs import FastFGSMTraining
from robust_train.methods.pgd import PGDTraining
from robust_train.methods.trades import TRADESTraining

METHODS = {cls.__name__: cls for cls in (StandardTraining, FGSMTraining, FastFGSMTraining, PGDTraining,
                                         TRADESTraining)}

__all__ = ["METHODS", "RobustModule", *METHODS]
