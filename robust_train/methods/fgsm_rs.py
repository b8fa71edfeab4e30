""""Fast" adversarial training (Wong et al., 2020, arXiv:2001.03994): FGSM from a uniform random start in the
ε-ball with step 1.25·ε, which avoids the catastrophic overfitting of plain FGSM training at a similar cost."""
from robust_train.methods.fgsm import FGSMTraining
from robust_train.methods.registry import register_method


@register_method
class FastFGSMTraining(FGSMTraining):
    """"Fast" FGSM training: from a uniform random start in the ε-ball, step 1.25·ε (Wong et al.)."""

    def __init__(self, step_ratio: float = 1.25, random_start: bool = True, **kwargs):
        super().__init__(step_ratio=step_ratio, random_start=random_start, **kwargs)
