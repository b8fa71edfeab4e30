from robust_train.callbacks.attack_accuracy import AttackAccuracy
from robust_train.callbacks.checkpoint import RobustCheckpoint
from robust_train.callbacks.map_stability import MapStability
from robust_train.callbacks.overfit_guard import OverfitGuard
from robust_train.callbacks.prototype_push import PrototypePush
from robust_train.callbacks.rng_state import RNGState

__all__ = ["AttackAccuracy", "MapStability", "OverfitGuard", "PrototypePush", "RNGState", "RobustCheckpoint"]
