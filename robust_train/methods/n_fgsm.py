"""N-FGSM adversarial training (de Jorge et al., NeurIPS 2022, "Make some noise: reliable and efficient single-step
adversarial training", arXiv:2202.01181, code pdejorge/N-FGSM): cross-entropy at x' = clip_[0,1](x + η + α·sign
∇ℓ(x + η)), η ~ U(−kε, kε), without projecting x' back to the ε-ball. The large noise (k = 2, α = ε on CIFAR-10)
is what avoids catastrophic overfitting, at the cost of one gradient per batch, like FGSM."""
from __future__ import annotations

from robust_train.attacks.base import check_positive
from robust_train.attacks.noisy_fgsm import NoisyFGSM
from robust_train.methods.base import RobustModule
from robust_train.methods.registry import register_method


@register_method
class NFGSMTraining(RobustModule):
    """Cross-entropy on N-FGSM examples: noise U(−`noise_ratio`·ε, `noise_ratio`·ε), then a signed step of
    `step_ratio`·ε; ‖x' − x‖∞ ≤ (noise_ratio + step_ratio)·ε. noise_ratio = 0 is FGSM training without the
    projection to the ε-ball. The defaults are the paper's CIFAR-10 setting (noise 2ε, α = ε)."""

    def __init__(self, noise_ratio: float = 2.0, step_ratio: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.noise_ratio = float(check_positive("noise_ratio", noise_ratio, allow_zero=True))
        self.step_ratio = float(check_positive("step_ratio", step_ratio, allow_zero=True))
        self.step_shrink = 1.0  # the product of shrink_step's factors, kept in checkpoints
        self.training_attack = self._build_attack()

    def _build_attack(self):
        return self.make_training_attack(NoisyFGSM, noise_ratio=self.noise_ratio, step_ratio=self.step_ratio)

    def shrink_step(self, factor: float) -> None:
        """step_ratio ← factor·step_ratio from the next batch on (the OverfitGuard's remedy for catastrophic
        overfitting, as for FGSMTraining). The attack is rebuilt: TrainingAttack keeps the one built at the current
        ε until ε changes, and the ratio is fixed when an attack is built."""
        factor = float(check_positive("factor", factor))
        self.step_ratio *= factor
        self.step_shrink *= factor
        self.training_attack = self._build_attack()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["fgsm_step_shrink"] = self.step_shrink  # the key FGSMTraining uses for the same state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A resumed run keeps its shrunk step, applied to the configured step_ratio.
        super().on_load_checkpoint(checkpoint)
        shrink = float(checkpoint.get("fgsm_step_shrink", 1.0))
        if shrink != self.step_shrink:
            self.shrink_step(shrink / self.step_shrink)
