"""The LightningModule every training method shares. A method is a small subclass that says two things:

    self.training_attack = self.make_training_attack(Attack, **options)   how it perturbs a training batch
    training_loss(x, y, x_adv) -> (loss, logits)    what it minimises (logits feed the training accuracy)

(`adversarial_batch(x, y, eps)` runs the training attack; a method that perturbs otherwise overrides it.)

Everything else lives here once: the model from the registry, the ε warm-up, the training attacks (built once
with the module, `make_training_attack`), optimiser and schedule, metrics, and the checkpoint metadata that lets
`robust_train.load` rebuild the classifier without unpickling code.
Accuracy under attack at validation comes from the AttackAccuracy callback, so `validate`/`test` report it too.
"""
from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from robust_train.attacks.base import Attack, BNMode, check_eps, check_positive
from robust_train.checkpoint import checkpoint_metadata
from robust_train.errors import ConfigError
from robust_train.methods.training_attack import TrainingAttack
from robust_train.methods.weight_perturbation import perturbed_parameters, shift_weights, weight_perturbation
from robust_train.models import create_model
from robust_train.modes import model_mode

SCHEDULES = ("constant", "cosine", "multistep", "onecycle", "cyclic")
DEFAULT_SPEC = {"name": "mnist", "num_classes": 10, "in_channels": 1, "image_size": [28, 28],
                "mean": [0.1307], "std": [0.3081]}


class RobustModule(pl.LightningModule):
    """Base of every training method.

    Args:
        arch: model name in the registry (`python -m robust_train models` lists them); arch_kwargs: its options.
        data_spec: the data set's description (classes, channels, normalisation), linked from the data module.
        eps: the L∞ budget the method trains for, in pixel units of [0, 1] images.
        eps_warmup_start, eps_warmup_end: ε is 0 before `start` epochs, ramps linearly and is full from `end`
            (fractional epochs; equal values mean no ramp).
        attack_bn_mode: BatchNorm mode while crafting training examples ("eval": running statistics, untouched).
        optimizer, lr, momentum, weight_decay, nesterov: the optimiser.
        lr_schedule: torch's schedulers: "constant", "cosine" (CosineAnnealingLR to 0, per step), "multistep"
            (MultiStepLR: ×gamma at `milestones` epochs), "onecycle" (OneCycleLR, linear: from lr/25 up to lr at
            `lr_peak_at` of training, then down to ~0; Smith's one cycle, the schedule of fast adversarial training)
            or "cyclic" (CyclicLR: `lr_cycles` triangles 0 → lr → 0 over training, each peaking at `lr_peak_at` of
            its period; one cycle at 0.4 is Wong et al.'s 0 → lr → 0).
        awp_gamma, awp_warmup: adversarial weight perturbation (Wu et al., NeurIPS 2020) on top of the method's own
            loss: each step the weights are moved by γ·‖w‖ (per layer) up that loss's gradient, the gradient is
            taken there and the step applied to the unperturbed weights (robust_train.methods.weight_perturbation).
            γ = 0 (default) turns it off; it starts after `awp_warmup` epochs.
        channels_last: keep the model's weights in NHWC memory order (the first convolution then returns NHWC
            activations whatever the layout of the images, so batches need no conversion): faster convolutions on GPUs, most of all under bf16 (`--trainer.precision
            bf16-mixed`, with which the attacks stay correct: see robust_train.attacks.base). Attacks work on
            channels_last tensors as on contiguous ones; checkpoints are unchanged (same keys, same values).
        compile: `torch.compile` the model in place (`nn.Module.compile`): the parameter names, hence the
            checkpoints and `robust_train.load`, stay as without it. Only `model(x)` is compiled; the first steps
            are slow (compilation, once per train/eval/grad mode). torch.compile does not support double backward
            (`create_graph=True`): GradAlign and IG-Norm need it and refuse `compile` (Int/Int2 differentiate CAMs,
            linear in the features, and call `model.features`, which runs eagerly); gradient-based maps (saliency, Grad-CAM,
            integrated gradients) through the compiled model do, e.g. in MapStability/AAI with such a `map`.
    """

    def __init__(self, arch: str = "small_cnn", arch_kwargs: dict | None = None, data_spec: dict | None = None,
                 eps: float = 0.3, eps_warmup_start: float = 0.0, eps_warmup_end: float = 0.0,
                 attack_bn_mode: Literal["eval", "train"] = "eval",
                 optimizer: Literal["sgd", "adam", "adamw"] = "adam", lr: float = 1e-3, momentum: float = 0.9,
                 weight_decay: float = 0.0, nesterov: bool = False,
                 lr_schedule: Literal["constant", "cosine", "multistep", "onecycle", "cyclic"] = "constant",
                 milestones: list[int] | None = None, gamma: float = 0.1, lr_peak_at: float = 0.4,
                 lr_cycles: int = 1, awp_gamma: float = 0.0, awp_warmup: float = 0.0, channels_last: bool = False,
                 compile: bool = False):
        super().__init__()
        self.save_hyperparameters()
        spec = dict(data_spec or DEFAULT_SPEC)
        check_eps(eps)
        if eps_warmup_start < 0 or eps_warmup_end < eps_warmup_start:
            raise ConfigError("eps_warmup_start must be >= 0 and <= eps_warmup_end")
        check_positive("lr", lr)
        if lr_schedule not in SCHEDULES:
            raise ConfigError(f"unknown lr_schedule {lr_schedule!r}: use {', '.join(SCHEDULES)}")
        if not 0 < lr_peak_at < 1:
            raise ConfigError(f"lr_peak_at={lr_peak_at} must be in (0, 1): the fraction of training (or of each "
                              "cycle) at which the learning rate peaks")
        check_positive("lr_cycles", lr_cycles)
        check_positive("awp_gamma", awp_gamma, allow_zero=True)
        check_positive("awp_warmup", awp_warmup, allow_zero=True)
        self.model = create_model(arch, num_classes=spec["num_classes"], in_channels=spec["in_channels"],
                                  mean=spec["mean"], std=spec["std"], **(arch_kwargs or {}))
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)  # 4-D weights only; keys unchanged
        if compile:
            self.model.compile()  # in place and lazy: no `_orig_mod.` in the state_dict keys, nothing compiled yet
        if awp_gamma > 0 and type(self).training_step is not RobustModule.training_step:
            raise ConfigError(f"{type(self).__name__} has a training step of its own, which does not apply "
                              "adversarial weight perturbation: set awp_gamma to 0")
        self.eps = eps
        self._awp_shift = None
        self.training_attack: TrainingAttack | None = None  # set by methods that train on adversarial batches
        self.run_info: dict = {}  # filled by the CLI (recipe name, run folder) and stored in checkpoints
        n = spec["num_classes"]
        self.train_acc = MulticlassAccuracy(n, average="micro")
        self.val_acc = MulticlassAccuracy(n, average="micro")
        self.test_acc = MulticlassAccuracy(n, average="micro")
        # Mean over images, not over batches: exact under DDP, where ranks hold different numbers of images.
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()

    # -- what a method overrides -------------------------------------------------------------------------------
    def adversarial_batch(self, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor | None:
        """x' from the method's `training_attack` (x itself at ε = 0); None, clean training, when it has none."""
        return None if self.training_attack is None else self.training_attack(self.model, x, y, eps)

    def training_loss(self, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor | None):
        logits = self.model(x if x_adv is None else x_adv)
        return F.cross_entropy(logits, y), logits

    def make_training_attack(self, attack_cls: type[Attack], bn_mode: BNMode | None = None,
                             **options) -> TrainingAttack:
        """The attack a method crafts its batches with, built at the module's ε (bad options raise ConfigError
        here); `bn_mode` defaults to `attack_bn_mode`. Options given as callables are functions of ε."""
        return TrainingAttack(attack_cls, self.eps, bn_mode=bn_mode or self.hparams.attack_bn_mode, **options)

    # -- shared machinery ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def current_eps(self) -> float:
        start, end = self.hparams.eps_warmup_start, self.hparams.eps_warmup_end
        if end <= start or self._trainer is None:
            return self.eps
        epoch = self.global_step / max(1, self.trainer.num_training_batches)
        return self.eps * min(1.0, max(0.0, (epoch - start) / (end - start)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        eps = self.current_eps()
        x_adv = self.adversarial_batch(x, y, eps)
        if self.awp_active():
            self.perturb_weights(x, y, x_adv)
        loss, logits = self.training_loss(x, y, x_adv)
        if not torch.isfinite(loss):
            self.restore_weights()
            raise FloatingPointError(f"training loss became {loss.item()} at step {self.global_step}: lower the "
                                     "learning rate or check the data")
        self.train_acc(logits.detach(), y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        self.log("train/eps", eps)
        return loss

    def awp_active(self) -> bool:
        hp = self.hparams
        if hp.awp_gamma == 0 or self._trainer is None:
            return False
        return self.global_step / max(1, self.trainer.num_training_batches) >= hp.awp_warmup

    def perturb_weights(self, x, y, x_adv) -> None:
        """AWP: move the weights to w + v, up the method's own loss (BatchNorm statistics untouched by this extra
        forward); `on_train_batch_end`, after the optimiser's step, moves them back by −v."""
        params = perturbed_parameters(self.model)
        with model_mode(self.model, "train"):  # the gradient inside: restoring the statistics bumps their version
            loss, _ = self.training_loss(x, y, x_adv)
            self._awp_shift = (params, weight_perturbation(params, loss, self.hparams.awp_gamma))
        shift_weights(*self._awp_shift, sign=1.0)

    def restore_weights(self) -> None:
        if getattr(self, "_awp_shift", None) is not None:
            shift_weights(*self._awp_shift, sign=-1.0)
            self._awp_shift = None

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.restore_weights()

    def _eval_step(self, batch, acc: MulticlassAccuracy, mean_loss: MeanMetric, stage: str):
        x, y = batch
        logits = self.model(x)
        acc(logits, y)
        mean_loss(F.cross_entropy(logits, y, reduction="none"))
        self.log(f"{stage}/loss", mean_loss)
        self.log(f"{stage}/acc", acc, prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_acc, self.val_loss, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_acc, self.test_loss, "test")

    def configure_optimizers(self):
        hp = self.hparams
        params = self.model.parameters()
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay,
                                  nesterov=hp.nesterov)
        elif hp.optimizer in ("adam", "adamw"):
            cls = torch.optim.Adam if hp.optimizer == "adam" else torch.optim.AdamW
            opt = cls(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            raise ConfigError(f"unknown optimizer {hp.optimizer!r}: use sgd, adam or adamw")
        if hp.lr_schedule == "constant":
            return opt
        if hp.lr_schedule == "multistep":
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(hp.milestones or []), gamma=hp.gamma)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        total = max(2, int(self.trainer.estimated_stepping_batches))
        schedulers = torch.optim.lr_scheduler
        if hp.lr_schedule == "cosine":
            sched = schedulers.CosineAnnealingLR(opt, T_max=total)
        elif hp.lr_schedule == "onecycle":
            # No momentum cycling: with Adam it would cycle β1, which fast adversarial training does not do.
            sched = schedulers.OneCycleLR(opt, max_lr=hp.lr, total_steps=total, pct_start=hp.lr_peak_at,
                                          anneal_strategy="linear", cycle_momentum=False)
        elif hp.lr_schedule == "cyclic":
            period = total / hp.lr_cycles
            up = max(1, round(hp.lr_peak_at * period))
            sched = schedulers.CyclicLR(opt, base_lr=0.0, max_lr=hp.lr, step_size_up=up,
                                        step_size_down=max(1, round(period) - up), cycle_momentum=False)
        else:
            raise ConfigError(f"unknown lr_schedule {hp.lr_schedule!r}: use {', '.join(SCHEDULES)}")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Everything `robust_train.load` needs, in plain types, so checkpoints load with weights_only=True.
        hp = self.hparams
        run_info = {k: v for k, v in self.run_info.items() if isinstance(v, (str, int, float))}
        checkpoint["robust_train"] = checkpoint_metadata(type(self).__name__, hp.arch, hp.arch_kwargs,
                                                         hp.data_spec or DEFAULT_SPEC, self.eps, run_info)
