"""ProtoPNet training (Chen et al., NeurIPS 2019) as the official code runs it (cfchen-duke/ProtoPNet `main.py`,
`train_and_test.py`; methods.md §1.3-1.4), optionally on PGD examples (`adversarial="pgd"`).

Loss, with min distances d_ij (image i, prototype j) and c(j) the class of prototype j:

    CE + λ_clst·Clst − λ_sep·Sep + λ_l1·‖W ⊙ (1 − identityᵀ)‖₁
    Clst = mean_i min_{j: c(j) = y_i} d_ij        Sep = mean_i min_{j: c(j) ≠ y_i} d_ij

with the official coefficients 0.8, 0.08 (entering with a minus sign: `sep_weight` is given positive) and 1e-4.
The masked minima use +∞ on the masked-out entries, which equals the official `max_dist − max((max_dist − d)·mask)`
whenever d ≤ max_dist = D (always true once prototypes are pushed into the sigmoid's (0, 1)^D) and stays correct
when an unpushed prototype drifts further away; the zero-masked `min(d·mask)` of some ports is 0, a known bug.

Phases, one per Lightning epoch, from a plan fixed by the arguments (`phase_plan`). "Outer" epochs are the
official `main.py` loop's epochs, i.e. the warm and joint epochs only:

    warm   outer epochs < warm_epochs: add-on layers (Adam 3e-3, wd 1e-3) and prototypes (3e-3) train; backbone
           and last layer frozen (requires_grad False, so their .grad stays None).
    joint  later outer epochs: backbone (1e-4, wd 1e-3), add-on (3e-3, wd 1e-3) and prototypes (3e-3) train; the
           last layer stays frozen, as officially (it is in neither optimizer there). The joint learning rates are
           multiplied by gamma^⌊(j + 1)/step⌋ in the j-th joint epoch (0-based), which is the official StepLR(5, 0.1)
           stepped at the *start* of every joint epoch.
    push   at the end of outer epoch e when e ≥ push_start and (e − push_start) is a multiple of push_every
           (official: push_start 10, every 10th epoch). Done by the `PrototypePush` callback, which this module adds
           to the Trainer itself when none is configured (`configure_callbacks`), so a run cannot skip it.
    last   `last_layer_epochs` Lightning epochs right after each push (official: 20 passes): only the last layer
           trains (Adam 1e-4); Clst and Sep have no gradient there, L1 does. Then joint resumes. (The official
           code skips this phase for the 'linear' similarity; here last_layer_epochs alone decides.)

E.g. warm_epochs=2, push_start=3, push_every=3, last_layer_epochs=2 gives the Lightning epochs
warm, warm, joint, joint*, last, last, joint, joint, joint*, last, last, ...  (* = push at its end).

Lightning: manual optimisation (`automatic_optimization = False`) with three Adam optimizers (warm, joint,
last layer: each keeps its own state, as the official three optimizers do); in every step only the current phase's
optimizer steps, and parameters outside it have requires_grad False for the epoch (set in `on_train_epoch_start`;
all are made trainable again when fitting ends). The base class's optimizer arguments (optimizer, lr, weight_decay,
lr_schedule, ...) are not used and must stay at their defaults. Under DDP, parameters change requires_grad between
phases, so use a strategy that finds unused parameters (`ddp_find_unused_parameters_true`).

Checkpoints. An epoch's validation (and with it best-*.ckpt and last.ckpt) comes before that epoch's push, and joint
epochs move the prototypes off their patches again, so only checkpoints of last-layer epochs hold pushed
prototypes; the recipes end on a last-layer epoch, so their final last.ckpt does (evaluate that one, not a best-*
of a joint epoch). Resuming from the checkpoint of a push epoch may skip that push.

Backbones trained from scratch. The warm phase protects a *pretrained* backbone from the gradients of the randomly
initialised add-on layers and prototypes; small_cnn on MNIST has nothing to protect, so its recipes set
warm_epochs 0 (joint from the first epoch) and train the backbone at a from-scratch learning rate
(`joint_lr_features`), see recipes/protopnet.yaml. The defaults here are the official ones for a pretrained one.

Adversarial (`adversarial="pgd"`): every phase's batch is replaced by PGD examples on cross-entropy (as
`PGDTraining`: `steps` × `step_size` from a random start, last iterate, the base class's ε warm-up), and the whole
loss (CE, Clst, Sep) is taken on them. Push always uses clean, un-augmented training images.
`adversarial="pgd_prototype"` crafts them with the same steps on the margin of head(−distance) instead
(`robust_train.attacks.pgd_prototype`, the attack that breaks a clean-trained ProtoPNet whose log similarity
saturates CE). On MNIST it measured as the worse choice (bench/RESULTS.md, the protopnet_pgd short run): the model
became robust to pgd_prototype only, not to CE-PGD. Keep "pgd" unless you are studying that.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn

from robust_train.attacks import PGD, PrototypePGD
from robust_train.errors import ConfigError
from robust_train.methods.base import RobustModule
from robust_train.methods.registry import register_method
from robust_train.models.protopnet import is_prototype_model

PHASES = ("warm", "joint", "last")
BASE_DEFAULTS = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "lr_schedule": "constant",
                 "milestones": None}


def cluster_separation(min_distances: torch.Tensor, y: torch.Tensor,
                       identity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Clst, Sep): the batch means of each image's smallest distance to a prototype of its own class and to one of
    another class. min_distances (N, P), labels y (N,), prototype_class_identity (P, K)."""
    own = identity.t()[y].bool()  # (N, P): prototype j belongs to image i's class
    inf = torch.tensor(float("inf"), dtype=min_distances.dtype, device=min_distances.device)
    cluster = torch.where(own, min_distances, inf).amin(1).mean()
    separation = torch.where(own, inf, min_distances).amin(1).mean()
    return cluster, separation


def phase_plan(n_epochs: int, warm_epochs: int, push_start: int, push_every: int,
               last_layer_epochs: int) -> tuple[list[str], set[int]]:
    """(phase of each of the first n_epochs Lightning epochs, Lightning epochs at whose end a push runs)."""
    phases: list[str] = []
    pushes: set[int] = set()
    outer = 0
    while len(phases) < n_epochs:
        phases.append("warm" if outer < warm_epochs else "joint")
        since = outer - push_start
        if since >= 0 and (since == 0 if push_every == 0 else since % push_every == 0):
            pushes.add(len(phases) - 1)
            phases.extend(["last"] * last_layer_epochs)
        outer += 1
    return phases[:n_epochs], {e for e in pushes if e < n_epochs}


@register_method
class ProtoPNetTraining(RobustModule):
    """ProtoPNet's losses and warm -> joint -> push -> last-layer schedule (module docstring) on arch `protopnet`.

    Args:
        arch: a ProtoPNet in the model registry (`protopnet`, default small_cnn backbone; `arch_kwargs` sets the
            backbone, prototypes_per_class and prototype_dim).
        adversarial: None (clean training), "pgd" (train on PGD-`steps` examples of step `step_size`) or
            "pgd_prototype" (the same steps on the adaptive loss, see the module docstring).
        warm_epochs, push_start, push_every, last_layer_epochs: the schedule, in official (outer) epochs except
            last_layer_epochs, which are extra Lightning epochs after each push (push_every 0: push once only).
        clst_weight, sep_weight, l1_weight: λ_clst (0.8), λ_sep (0.08, subtracted) and λ_l1 (1e-4).
        warm_lr_add_on, warm_lr_prototypes: warm-phase Adam learning rates (3e-3 each).
        joint_lr_features, joint_lr_add_on, joint_lr_prototypes: joint-phase ones (1e-4, 3e-3, 3e-3).
        feature_weight_decay: Adam weight decay of the backbone and add-on layers in both phases (1e-3).
        joint_lr_step_size, joint_lr_gamma: the joint StepLR (5, 0.1; step size 0 keeps the rates constant).
        last_layer_lr: the last-layer phase's Adam learning rate (1e-4).
        **kwargs: RobustModule's (arch_kwargs, data_spec, eps, eps warm-up, attack_bn_mode).
    """

    def __init__(self, arch: str = "protopnet", adversarial: Literal["pgd", "pgd_prototype"] | None = None,
                 steps: int = 40, step_size: float = 0.01, random_start: bool = True, warm_epochs: int = 5,
                 push_start: int = 10, push_every: int = 10, last_layer_epochs: int = 20, clst_weight: float = 0.8,
                 sep_weight: float = 0.08, l1_weight: float = 1e-4, warm_lr_add_on: float = 3e-3,
                 warm_lr_prototypes: float = 3e-3, joint_lr_features: float = 1e-4, joint_lr_add_on: float = 3e-3,
                 joint_lr_prototypes: float = 3e-3,
                 feature_weight_decay: float = 1e-3, joint_lr_step_size: int = 5, joint_lr_gamma: float = 0.1,
                 last_layer_lr: float = 1e-4, **kwargs):
        for key, default in BASE_DEFAULTS.items():
            if kwargs.get(key, default) != default:
                raise ConfigError(f"ProtoPNetTraining sets its optimisers per phase; {key}={kwargs[key]!r} is not "
                                  "used: leave it out and set warm_lr_*, joint_lr_*, last_layer_lr, "
                                  "feature_weight_decay or joint_lr_step_size instead")
        super().__init__(arch=arch, **kwargs)
        if not is_prototype_model(self.model):
            raise ConfigError(f"ProtoPNetTraining needs a ProtoPNet model (arch protopnet), got arch "
                              f"{self.hparams.arch!r}")
        if adversarial not in (None, "pgd", "pgd_prototype"):
            raise ConfigError(f"adversarial={adversarial!r}: use null (clean training), 'pgd' or 'pgd_prototype'")
        for label, value in (("warm_epochs", warm_epochs), ("push_start", push_start), ("push_every", push_every),
                             ("last_layer_epochs", last_layer_epochs), ("joint_lr_step_size", joint_lr_step_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{label}={value!r} must be an integer >= 0")
        for label, value in (("clst_weight", clst_weight), ("sep_weight", sep_weight), ("l1_weight", l1_weight),
                             ("feature_weight_decay", feature_weight_decay)):
            if value < 0:
                hint = " (it is subtracted: the official coefs['sep'] = -0.08 is sep_weight 0.08)" \
                    if label == "sep_weight" else ""
                raise ConfigError(f"{label}={value} must be >= 0{hint}")
        for label, value in (("warm_lr_add_on", warm_lr_add_on), ("warm_lr_prototypes", warm_lr_prototypes),
                             ("joint_lr_features", joint_lr_features), ("joint_lr_add_on", joint_lr_add_on),
                             ("joint_lr_prototypes", joint_lr_prototypes), ("last_layer_lr", last_layer_lr),
                             ("joint_lr_gamma", joint_lr_gamma)):
            if not value > 0:
                raise ConfigError(f"{label}={value} must be > 0")
        self.automatic_optimization = False
        self.adversarial = adversarial
        self.steps, self.step_size, self.random_start = steps, step_size, random_start
        self.training_attack = None  # clean training
        if adversarial is not None:
            self.training_attack = self.make_training_attack(
                PrototypePGD if adversarial == "pgd_prototype" else PGD, steps=steps, step_size=step_size,
                random_start=random_start, keep_best=False)
        self.phase = "warm" if warm_epochs > 0 else "joint"

    # -- schedule ----------------------------------------------------------------------------------------------------
    def plan(self, n_epochs: int) -> tuple[list[str], set[int]]:
        hp = self.hparams
        return phase_plan(n_epochs, hp.warm_epochs, hp.push_start, hp.push_every, hp.last_layer_epochs)

    def phase_at(self, epoch: int) -> str:
        return self.plan(epoch + 1)[0][epoch]

    def push_due(self, epoch: int) -> bool:
        """Whether a push runs at the end of Lightning epoch `epoch` (asked by `PrototypePush`)."""
        return epoch in self.plan(epoch + 1)[1]

    def joint_lr_factor(self, epoch: int) -> float:
        hp = self.hparams
        if hp.joint_lr_step_size == 0:
            return 1.0
        done = self.plan(epoch)[0].count("joint")  # joint epochs before this one
        return hp.joint_lr_gamma ** ((done + 1) // hp.joint_lr_step_size)

    def param_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        m = self.model
        return {"features": list(m.body.parameters()), "add_on": list(m.add_on.parameters()),
                "prototypes": [m.prototype_vectors], "last_layer": list(m.head.parameters())}

    TRAINED = {"warm": ("add_on", "prototypes"), "joint": ("features", "add_on", "prototypes"),
               "last": ("last_layer",)}

    def set_phase(self, phase: str) -> None:
        """Make exactly the phase's parameters trainable and clear every .grad."""
        if phase not in PHASES:
            raise ConfigError(f"unknown phase {phase!r}: {', '.join(PHASES)}")
        self.phase = phase
        for name, params in self.param_groups().items():
            for p in params:
                p.requires_grad_(name in self.TRAINED[phase])
                p.grad = None

    # -- losses ------------------------------------------------------------------------------------------------------
    def adversarial_batch(self, x, y, eps):
        return None if eps == 0 else super().adversarial_batch(x, y, eps)  # ε = 0: the clean batch itself

    def loss_terms(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(total loss, logits, {ce, cluster, separation, l1}) on images x."""
        hp = self.hparams
        logits, min_d = self.model.forward_with_distances(x)
        ce = F.cross_entropy(logits, y)
        cluster, separation = cluster_separation(min_d, y, self.model.prototype_class_identity)
        l1 = (self.model.head.weight * self.model.off_class_mask()).norm(p=1)
        loss = ce + hp.clst_weight * cluster - hp.sep_weight * separation + hp.l1_weight * l1
        return loss, logits, {"ce": ce, "cluster": cluster, "separation": separation, "l1": l1}

    def training_loss(self, x, y, x_adv):
        loss, logits, _ = self.loss_terms(x if x_adv is None else x_adv, y)
        return loss, logits

    # -- Lightning ---------------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        hp, g = self.hparams, self.param_groups()
        wd = hp.feature_weight_decay
        warm = torch.optim.Adam([{"params": g["add_on"], "lr": hp.warm_lr_add_on, "weight_decay": wd},
                                 {"params": g["prototypes"], "lr": hp.warm_lr_prototypes}])
        joint = torch.optim.Adam([{"params": g["features"], "lr": hp.joint_lr_features, "weight_decay": wd},
                                  {"params": g["add_on"], "lr": hp.joint_lr_add_on, "weight_decay": wd},
                                  {"params": g["prototypes"], "lr": hp.joint_lr_prototypes}])
        for group in joint.param_groups:
            group["base_lr"] = group["lr"]
        last = torch.optim.Adam([{"params": g["last_layer"], "lr": hp.last_layer_lr}])
        return [warm, joint, last]

    def configure_callbacks(self):
        from robust_train.callbacks.prototype_push import PrototypePush

        trainer = self._trainer
        if trainer is not None and any(isinstance(cb, PrototypePush) for cb in trainer.callbacks):
            return []
        return [PrototypePush()]

    def on_train_epoch_start(self) -> None:
        epoch = self.current_epoch
        self.set_phase(self.phase_at(epoch))
        joint = self.trainer.optimizers[PHASES.index("joint")]
        factor = self.joint_lr_factor(epoch)
        for group in joint.param_groups:
            group["lr"] = group["base_lr"] * factor

    def on_fit_start(self) -> None:
        last = self.trainer.max_epochs
        if last is not None and last > 0:
            phases, pushes = self.plan(last)
            if not pushes:
                rank_zero_warn(f"ProtoPNetTraining: no push within max_epochs={last} (push_start="
                               f"{self.hparams.push_start}): the prototypes will not be patches of training images")
            elif self.hparams.last_layer_epochs and phases[-1] != "last":
                rank_zero_warn(f"ProtoPNetTraining: max_epochs={last} ends in a {phases[-1]} epoch, after the last "
                               "push and last-layer phase: the final prototypes are not pushed; end the run right "
                               "after a last-layer phase (see phase_plan)")

    def on_fit_end(self) -> None:
        for params in self.param_groups().values():
            for p in params:
                p.requires_grad_(True)
                p.grad = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        eps = self.current_eps()
        x_adv = self.adversarial_batch(x, y, eps)
        loss, logits, parts = self.loss_terms(x if x_adv is None else x_adv, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {self.global_step}: lower the "
                                     "learning rates or check the data")
        opt = self.optimizers()[PHASES.index(self.phase)]
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()
        self.train_acc(logits.detach(), y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        self.log("train/eps", eps)
        self.log("train/phase", float(PHASES.index(self.phase)), on_step=False, on_epoch=True)
        for name, value in parts.items():
            self.log(f"train/{name}", value.detach(), on_step=False, on_epoch=True)
        return loss.detach()
