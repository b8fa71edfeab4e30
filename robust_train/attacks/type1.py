"""Type-I adversarial attack through a supervised VAE (Tang et al. 2019, "Adversarial attack type I: cheat classifiers
by significant changes"). A Type-II attack (PGD and the rest) keeps the image and changes the label: f(x') ≠ f(x) with
d(x, x') ≤ ε. A Type-I attack does the opposite: the image changes significantly, to another class in the attacker's
own view, while the attacked classifier f keeps its label: f(x') = f(x).

The attacker's view is a supervised VAE (`robust_train.models.svae`): its encoder gives z = μ(x), its decoder turns a
latent code into an image, its head p(y|z) says which class a code is, and its latent discriminator D(z) says how
much z looks like a sample of the prior N(0, I). Starting from z₀ = μ(x), Adam minimises over z alone

    L(z) = CE(p(·|z), target) + label_weight · CE(f(dec(z)), label) − prior_weight · log D(z)

(log D(z) = log-sigmoid of D's logit; the sum over images, each image's z is independent of the others). The first
term makes the code, hence the decoded image, a `target`; the second keeps f's label on the decoded image, its
gradient reaching z through the decoder; the third keeps z where the prior, on which the decoder was trained, has its
mass (without it, the first term is still falling when z is far out, where the decoder never saw a code).

Defaults (100 Adam steps of 0.05, label_weight 0.3, prior_weight 1), measured with the `svae` recipe's SVAE against
the `standard` recipe's CNN on the first 100 test images it gets right: success 1.00, and the SVAE re-reading the
decoded images sees the target on 0.84 of them. Adam moves every coordinate of z by about lr per step whatever the
size of the gradient, so terms already satisfied keep pushing z outwards: without the discriminator's term 64 % of
the final codes lie beyond √d + 3 (where N(0, I) has about 1 % of its mass, and the decoder never trained) and 0.75
re-read as the target; with it, 3 % and 0.84. 200 steps with label_weight 1 and prior_weight 0.1: 69 % beyond, 0.69.
label_weight 0 lets f follow the image to the target (label kept on 3 %). D is trained with prior samples as 1 and
encoded codes as 0 (recipe SVAE: D ≈ 0.09 on μ of test images, 0.90 on prior samples); it falls towards 0 along
the ray out of an encoded code (0.004 at 1.5 μ) and on inflated prior samples (0.23 at 3z), so −log D(z) resists
moving z outwards; it also scores codes pulled inwards high (0.96 at 0.5 μ), so what it keeps z in is the prior's
bulk rather than the encoded codes themselves.

Choices: the attack ends after `steps` steps and reports the last iterate (no early stop, no best-of: what is
reported is what was optimised); the adversarial image is dec(z), not x plus a perturbation (Type I changes the image
by design, so there is no ε); `label` defaults to f's own prediction on x. Both models run in eval mode with their
modes restored afterwards, and gradients are taken with respect to z alone (`torch.autograd.grad`), so no parameter's
`.grad` is touched. Plain PyTorch, no Lightning.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from robust_train.attacks.base import check_positive
from robust_train.modes import model_mode


class Type1Result(NamedTuple):
    """What `type1_attack` found, per image (N images):

    x_adv: dec(z), (N, C, H, W) in [0, 1]; z: the final codes (N, d); target, label: (N,) the SVAE class asked for
    and the classifier label to keep; svae_pred: the SVAE head's class of z; classifier_pred: f's class of x_adv;
    reencoded_pred: the SVAE's class of x_adv encoded again (head(μ(x_adv))), an independent look at whether the
    decoded image itself reads as the target; decoded_changed: svae_pred == target; label_kept: classifier_pred ==
    label; success: both; frames: (F, N, C, H, W) decoded images along the path, frames[0] = dec(μ(x)), the last
    the final x_adv; frame_z: (F, N, d) their codes; frame_steps: the step count of each frame.
    """

    x_adv: torch.Tensor
    z: torch.Tensor
    target: torch.Tensor
    label: torch.Tensor
    svae_pred: torch.Tensor
    classifier_pred: torch.Tensor
    reencoded_pred: torch.Tensor
    decoded_changed: torch.Tensor
    label_kept: torch.Tensor
    success: torch.Tensor
    frames: torch.Tensor
    frame_z: torch.Tensor
    frame_steps: list[int]


def frame_schedule(steps: int, frames: int) -> list[int]:
    """Step counts of the `frames` pictured iterates: 0, then the ends of frames − 1 near-equal stages."""
    return [0, *(round(k * steps / (frames - 1)) for k in range(1, frames))]


def _as_classes(value, n: int, device) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.long, device=device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n).clone()
    if t.numel() != n:
        raise ValueError(f"expected one class or {n}, got {t.numel()}")
    return t


def type1_loss(svae: nn.Module, classifier: nn.Module, z: torch.Tensor, target: torch.Tensor, label: torch.Tensor,
               label_weight: float, prior_weight: float) -> torch.Tensor:
    """L(z) per image (N,): CE(head(z), target) + label_weight·CE(f(dec(z)), label) − prior_weight·log D(z)."""
    loss = F.cross_entropy(svae.classify(z), target, reduction="none")
    if label_weight:
        loss = loss + label_weight * F.cross_entropy(classifier(svae.decode(z)), label, reduction="none")
    if prior_weight:
        loss = loss - prior_weight * F.logsigmoid(svae.discriminator(z))
    return loss


def type1_attack(svae: nn.Module, classifier: nn.Module, x: torch.Tensor, target, *, label=None, steps: int = 100,
                 lr: float = 0.05, label_weight: float = 0.3, prior_weight: float = 1.0,
                 frames: int = 8) -> Type1Result:
    """Type-I attack on `classifier` through the supervised VAE `svae` (see the module's docstring for the loss).

    x: images (N, C, H, W) in [0, 1]; target: the class the SVAE should see (int or (N,)); label: the class the
    classifier must keep (int or (N,); default its prediction on x); steps, lr: Adam on z; label_weight,
    prior_weight: weights of the classifier's and the discriminator's terms; frames: decoded images kept along the
    path (≥ 2). Returns a `Type1Result`.
    """
    steps = int(check_positive("steps", steps))
    lr = float(check_positive("lr", lr))
    label_weight = float(check_positive("label_weight", label_weight, allow_zero=True))
    prior_weight = float(check_positive("prior_weight", prior_weight, allow_zero=True))
    if int(frames) < 2:
        raise ValueError(f"frames={frames}: need at least 2 (the start and the end)")
    schedule = frame_schedule(steps, int(frames))
    with model_mode(svae, "eval", grad=False), model_mode(classifier, "eval", grad=False):
        x = x.detach()
        z0 = svae.encode(x)[0]
        n = len(x)
        target = _as_classes(target, n, x.device)
        label = classifier(x).argmax(1) if label is None else _as_classes(label, n, x.device)
        z = z0.clone()
        snapshots = {0: z0}
    with model_mode(svae, "eval", grad=True), model_mode(classifier, "eval", grad=True):
        z.requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        for step in range(1, steps + 1):
            loss = type1_loss(svae, classifier, z, target, label, label_weight, prior_weight).sum()
            (grad,) = torch.autograd.grad(loss, z)
            z.grad = grad
            opt.step()
            z.grad = None
            if step in schedule:
                snapshots[step] = z.detach().clone()
    with model_mode(svae, "eval", grad=False), model_mode(classifier, "eval", grad=False):
        z = z.detach()
        x_adv = svae.decode(z)
        svae_pred = svae.classify(z).argmax(1)
        classifier_pred = classifier(x_adv).argmax(1)
        reencoded_pred = svae(x_adv).argmax(1)
        frame_z = torch.stack([snapshots[s] for s in schedule])
        frames = svae.decode(frame_z.flatten(0, 1)).unflatten(0, frame_z.shape[:2])
    decoded_changed, label_kept = svae_pred == target, classifier_pred == label
    return Type1Result(x_adv, z, target, label, svae_pred, classifier_pred, reencoded_pred, decoded_changed,
                       label_kept, decoded_changed & label_kept, frames, frame_z, schedule)
