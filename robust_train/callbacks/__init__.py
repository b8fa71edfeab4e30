from robust_train.callbacks.attack_accuracy import AttackAccuracy
from robust_train.callbacks.checkpoint import RobustCheckpoint
from robust_train.callbacks.map_stability import MapStability

__all__ = ["AttackAccuracy", "MapStability", "RobustCheckpoint"]
