"""An adaptive attack on ProtoPNet (`robust_train.models.protopnet`): PGD on the margin of the logits the same
network gives with the linear similarity −d in place of its log similarity.

Why ProtoPNet needs its own attack. Its logits read each prototype's smallest distance d through
log((d + 1)/(d + 1e-4)), a well 9.2 deep and about 1e-4 wide: an image whose latent cell sits near a pushed
prototype (d ≈ 0.003 measured on our CIFAR-10 model) gets a margin of 8–15, the softmax saturates, and the
gradient of any loss on those logits is dominated by the one prototype at the bottom of the well. Cross-entropy and
margin PGD then stall: on our CIFAR-10 ProtoPNet they left 40% and 27% correct at 8/255, and 11% at ε = 1, where
any image can be painted (the `large_eps_breaks` check flags it). The same steps on W·(−d), which moves every
prototype's distance linearly, leave 0.8% (bench/RESULTS.md, 500 test images): the robustness was the log's
saturation, not the model's (gradient masking by a saturating non-linearity, Athalye et al. 2018; Tramèr et al.
2020 §"adaptive").

It complements the suite, it does not replace it: on an adversarially trained MNIST ProtoPNet, whose logits are
not saturated, it is the weaker attack (0.40 left at ε 0.3 against CE-PGD's 0.23), which is why `evaluate` adds it
to the default suite and counts the per-example worst case.

The loop is PGD's (random start, α = ε on a cosine schedule in the preset, each example's best iterate); only the
ascended loss changes. Success is still judged on the model's own logits, so x' is a real adversarial example.
"""
from __future__ import annotations

from robust_train.attacks.base import attack_loss, upcast
from robust_train.attacks.pgd import PGD
from robust_train.attacks.registry import register_attack
from robust_train.errors import ConfigError


def is_prototype_model(model) -> bool:
    """True for a ProtoPNet (anything with `forward_with_distances` and a linear `head` over similarities)."""
    return callable(getattr(model, "forward_with_distances", None)) and hasattr(model, "head")


@register_attack("pgd_prototype")
class PrototypePGD(PGD):
    """PGD ascending `loss` ("margin", the default, or "ce") on head(−min_distances) instead of the logits.

    Example: ``x_adv = PrototypePGD(eps=8/255, steps=100, step_size=8/255, step_schedule="cosine")(protopnet, x, y)``
    """

    name = "pgd_prototype"

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
