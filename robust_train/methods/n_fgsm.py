"""N-FGSM adversarial training (de Jorge et al., NeurIPS 2022, "Make some noise: reliable and efficient single-step
adversarial training", arXiv:2202.01181, code pdejorge/N-FGSM): cross-entropy at x' = clip_[0,1](x + η + α·sign
∇ℓ(x + η)), η ~ U(−kε, kε), without projecting x' back to the ε-ball. The large noise (k = 2, α = ε on CIFAR-10)
is what avoids catastrophic overfitting, at the cost of one gradient per batch, like FGSM."""
from __future__ import annotations

from robust_train.attacks.base import check_positive
from robust_train.attacks.noisy_fgsm import NoisyFGSM
from robust_train.methods.base import RobustModule
from robust_train.methods.registry import register_method
from robust_train.methods.step_shrink import ShrinkableStep


@register_method
class NFGSMTraining(ShrinkableStep, RobustModule):
    """Cross-entropy on N-FGSM examples: noise U(−`noise_ratio`·ε, `noise_ratio`·ε), then a signed step of
    `step_ratio`·ε; ‖x' − x‖∞ ≤ (noise_ratio + step_ratio)·ε. noise_ratio = 0 is FGSM training without the
    projection to the ε-ball. The defaults are the paper's CIFAR-10 setting (noise 2ε, α = ε)."""

    def __init__(self, noise_ratio: float = 2.0, step_ratio: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.noise_ratio = float(check_positive("noise_ratio", noise_ratio, allow_zero=True))
        self.step_ratio = float(check_positive("step_ratio", step_ratio, allow_zero=True))
        self.training_attack = self._build_attack()

    def _build_attack(self):
        return self.make_training_attack(NoisyFGSM, noise_ratio=self.noise_ratio, step_ratio=self.step_ratio)

    def rebuild_training_attack(self) -> None:
        self.training_attack = self._build_attack()  # the step ratio is fixed when an attack is built
