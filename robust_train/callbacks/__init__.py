from robust_train.callbacks.attack_accuracy import AttackAccuracy
from robust_train.callbacks.checkpoint import RobustCheckpoint
from robust_train.callbacks.map_stability import MapStability
from robust_train.callbacks.prototype_push import PrototypePush

__all__ = ["AttackAccuracy", "MapStability", "PrototypePush", "RobustCheckpoint"]
