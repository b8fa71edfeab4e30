from robust_train.callbacks.attack_accuracy import AttackAccuracy

__all__ = ["AttackAccuracy"]
