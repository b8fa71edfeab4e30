"""Standard (non-adversarial) training: the baseline every robust method is compared with."""
from robust_train.methods.base import RobustModule
from robust_train.methods.registry import register_method


@register_method
class StandardTraining(RobustModule):
    """Cross-entropy on clean images; `eps` is only the budget its validation attack reports against."""
