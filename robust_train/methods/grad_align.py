"""GradAlign training (Andriushchenko & Flammarion, NeurIPS 2020, arXiv:2007.02617): FGSM training plus λ·(1 −
mean cos(∇ₓℓ(x), ∇ₓℓ(x + η))), η ~ U(−ε, ε), which keeps the gradients aligned inside the ε-ball and so prevents
the catastrophic overfitting of FGSM training at large ε (robust_train.losses.grad_align has the math)."""
from __future__ import annotations

from robust_train.attacks.base import check_positive
from robust_train.errors import ConfigError
from robust_train.losses.grad_align import gradient_alignment, uniform_noise
from robust_train.methods.fgsm import FGSMTraining
from robust_train.methods.registry import register_method


@register_method
class GradAlignTraining(FGSMTraining):
    """Cross-entropy at FGSM(x) (step `step_ratio`·ε from x, no random start, as in the paper) + `lam`·GradAlign.

    λ = 0.2 is the paper's CIFAR-10 value at ε 8/255 (its rule for other ε: λ = 0.02·10^(ε·255/8)). The regulariser
    costs two more forward/backward passes, one of them a double backward: about 3× FGSM training per batch.
    Logs `train/grad_align` (1 − cos, before the factor λ).
    """

    def __init__(self, lam: float = 0.2, step_ratio: float = 1.0, random_start: bool = False, **kwargs):
        super().__init__(step_ratio=step_ratio, random_start=random_start, **kwargs)
        self.lam = float(check_positive("lam", lam, allow_zero=True))
        if self.hparams.compile and self.lam > 0:
            raise ConfigError("GradAlign needs a double backward, which torch.compile does not support: set compile "
                              "to false (or lam to 0)")

    def training_loss(self, x, y, x_adv):
        loss, logits = super().training_loss(x, y, x_adv)
        eps = self.current_eps()
        if self.lam == 0 or eps == 0:  # λ = 0 is FGSM training exactly; at ε = 0 (warm-up) η = 0 and cos = 1
            return loss, logits
        # In the model's current mode: the training step's train mode, as the reference computes it.
        align = gradient_alignment(self.model, x, y, uniform_noise(x, eps))
        if self._trainer is not None:
            self.log("train/grad_align", align.detach())
        return loss + self.lam * align, logits
