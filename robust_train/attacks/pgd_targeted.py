"""Multi-targeted PGD (Gowal et al., 2019, arXiv:1910.09338): one targeted margin attack towards each of the k
classes the model ranks highest after the true one. An example counts as broken if any target run misclassifies
it. This is what AutoAttack's APGD-T does with 9 targets; it catches robustness that untargeted losses overstate."""
from __future__ import annotations

import torch

from robust_train.attacks.base import Attack, attack_loss, check_positive
from robust_train.attacks.pgd import PGD
from robust_train.attacks.registry import register_attack


@register_attack("pgd_targeted", summary="targeted margin PGD-100 towards the 3 likeliest wrong classes")
class MultiTargetedPGD(Attack):
    """PGD on the targeted margin z_t − max_{j≠t} z_j for each of the top-`targets` wrong classes of the clean input.
    early_stop: the inner PGD's (see PGD).

    Example: ``x_adv = MultiTargetedPGD(eps=0.3, targets=3, steps=100)(model, x, y)``
    """

    def __init__(self, eps: float, *, targets: int = 3, steps: int = 100, step_size: float | None = None,
                 step_schedule: str = "cosine", early_stop: bool = True, **kwargs):
        kwargs.setdefault("loss", "margin")
        super().__init__(eps, **kwargs)
        self.targets = int(check_positive("targets", targets))
        self.pgd = PGD(eps, steps=steps, step_size=(self.eps or None) if step_size is None else step_size,
                       step_schedule=step_schedule, targeted=True, loss=self.loss, norm=self.norm,
                       bn_mode=self.bn_mode, early_stop=early_stop)
        self.steps, self.step_size = self.pgd.steps, self.pgd.step_size

    def perturb(self, model, x, y, target):
        with torch.no_grad():
            ranked = model(x).scatter(1, y[:, None], float("-inf")).argsort(1, descending=True)
            x_best, margin = x.clone(), attack_loss(model(x), y, "margin")
        for k in range(min(self.targets, ranked.shape[1] - 1)):
            todo = (margin <= 0).nonzero().squeeze(1)  # examples still classified correctly
            if len(todo) == 0:
                break
            x_adv = self.pgd.perturb(model, x[todo], y[todo], ranked[todo, k])
            with torch.no_grad():
                new_margin = attack_loss(model(x_adv), y[todo], "margin")
            # Keep, per example, the iterate closest to (or past) the decision boundary over all targets.
            better = new_margin > margin[todo]
            x_best[todo[better]] = x_adv[better]
            margin[todo[better]] = new_margin[better]
        return x_best

    def describe(self) -> dict:
        return {**super().describe(), "targets": self.targets, "step_schedule": self.pgd.step_schedule}
