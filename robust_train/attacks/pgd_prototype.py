"""An adaptive attack on ProtoPNet (`robust_train.models.protopnet`): PGD on the margin of the logits the same
network gives with the linear similarity −d in place of its log similarity.

Why ProtoPNet needs its own attack. Its logits read each prototype's smallest distance d through
log((d + 1)/(d + 1e-4)), a well 9.2 deep and about 1e-4 wide: an image whose latent cell sits near a pushed
prototype gets a large margin, the softmax saturates, and the gradient of any loss on those logits is dominated by
the one prototype at the bottom of the well. Cross-entropy and margin PGD then stall, even at ε = 1 where any image
can be painted (the `large_eps_breaks` check flags it). The same steps on W·(−d), which moves every prototype's
distance linearly, break what they left: the robustness was the log's saturation, not the model's (gradient
masking by a saturating non-linearity, Athalye et al. 2018; Tramèr et al. 2020 §"adaptive"). bench/RESULTS.md has
the figures, measured on our CIFAR-10 and MNIST ProtoPNets.

It complements the suite, it does not replace it: on an adversarially trained ProtoPNet, whose logits are not
saturated, it can be the weaker attack, which is why `evaluate` adds it to the default suite and counts the
per-example worst case.

The loop is PGD's (random start, α = ε on a cosine schedule in the preset, each example's best iterate); only the
ascended loss changes. Success is still judged on the model's own logits, so x' is a real adversarial example.
"""
from __future__ import annotations

from robust_train.attacks.base import attack_loss, upcast
from robust_train.attacks.pgd import EVALUATION, PGD
from robust_train.attacks.registry import register_attack
from robust_train.errors import ConfigError
from robust_train.models.protopnet import is_prototype_model


@register_attack("pgd_prototype", summary="ProtoPNet only: PGD-100 on the margin of head(−distance)",
                 **EVALUATION)
class PrototypePGD(PGD):
    """PGD ascending `loss` ("margin", the default, or "ce") on head(−min_distances) instead of the logits.

    Example: ``x_adv = PrototypePGD(eps=8/255, steps=100, step_size=8/255, step_schedule="cosine")(protopnet, x, y)``
    """

    def __init__(self, eps: float, *, loss: str = "margin", **kwargs):
        super().__init__(eps, loss=loss, **kwargs)

    def perturb(self, model, x, y, target):
        if not is_prototype_model(model):
            raise ConfigError(f"pgd_prototype attacks ProtoPNet models only; {type(model).__name__} has no prototype "
                              "distances: use pgd or pgd_margin")
        return super().perturb(model, x, y, target)

    def objective(self, model, x_adv, y, target):
        logits, min_distances = model.forward_with_distances(x_adv)
        linear_logits = upcast(model.head(-upcast(min_distances)))
        return upcast(logits), attack_loss(linear_logits, y, self.loss, target)

    def describe(self) -> dict:
        return {**super().describe(), "logits": "head(-min_distance) (linear similarity)"}
