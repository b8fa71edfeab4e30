from robust_train.callbacks.attack_accuracy import AttackAccuracy
from robust_train.callbacks.checkpoint import RobustCheckpoint

__all__ = ["AttackAccuracy", "RobustCheckpoint"]
