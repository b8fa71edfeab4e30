"""A guard against catastrophic overfitting: robust accuracy on a fixed held-out batch, watched during training.

Single-step adversarial training (FGSM, and FGSM from a random start, the "fast" training of Wong et al. 2020,
arXiv:2001.03994) can collapse within an epoch: accuracy on its own FGSM examples rises while accuracy under PGD falls
to about 0. Wong et al. (locuslab/fast_adversarial, CIFAR-10 code) run PGD-5 on the first training batch once per
epoch and stop when robust accuracy drops by more than 0.2. This guard runs the same test every N optimizer steps
(a collapse takes a few hundred steps, less than an epoch of CIFAR-10), on held-out validation images, and on a
collapse puts back the last weights and optimizer state that passed, then stops or shrinks the method's step
(`shrink_step`, which FGSM-based methods have: Wong et al.'s advice is a smaller step).

Logged (equal on every rank): `guard/robust_acc` at each check, `guard/collapses` (count). Lightning hands step
values to the logger every `trainer.log_every_n_steps` steps (default 50): make every_n_steps a multiple of it to
see every check there.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterable, Iterator, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from robust_train.attacks.base import check_eps, check_positive
from robust_train.attacks.registry import create_attack
from robust_train.errors import ConfigError
from robust_train.modes import model_mode

log = logging.getLogger(__name__)
Batches = list[tuple[torch.Tensor, torch.Tensor]]


def is_whole(value, low: int) -> bool:
    """`value` is an integer (a float with no fraction passes, a bool does not) ≥ `low`."""
    try:
        return not isinstance(value, bool) and int(value) == value and value >= low
    except (TypeError, ValueError, OverflowError):
        return False


def cpu_copy(obj):
    """A deep copy of a (nested) state_dict with every tensor copied to the CPU: the live state keeps training, and
    a copy of a large model would not fit next to it on the accelerator."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, cpu_copy(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj  # numbers, strings, None: immutable


@contextlib.contextmanager
def seeded_rng(device: torch.device, seed: int) -> Iterator[None]:
    """The block draws from torch's generators seeded with `seed` (on the CPU and on `device`); the generators are
    put back afterwards, so the caller's random stream goes on as if the block had not run."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)  # this device only: torch.manual_seed would reseed every device
        yield


def count_correct(model: nn.Module, attack, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[int, int]:
    """(correct, total) of `model` on `attack`'s examples of `batches`, attacked and classified in eval mode (the
    accuracy the model will be judged by); every module's mode comes back as it was, parameter .grad untouched (the
    attack differentiates with respect to the input only)."""
    correct = total = 0
    # Lightning may run hooks under no_grad or inference mode; the attack needs gradients.
    with torch.inference_mode(False), torch.enable_grad(), model_mode(model, "eval"):
        for x, y in batches:
            x_adv = attack(model, x, y)
            with torch.no_grad():
                correct += int((model(x_adv).argmax(1) == y).sum())
            total += len(y)
    return correct, total


class OverfitGuard(pl.Callback):
    """Every `every_n_steps` optimizer steps: robust accuracy on a fixed held-out batch at ε (the method's); a
    drop of more than `drop` below the best so far is a collapse.

    On a collapse the model's and the optimizers' states are put back to the last check that passed (copies kept on
    the CPU; the learning-rate schedule and the data order go on), a warning is logged, and then:
      action "stop": training stops (`trainer.should_stop`), as in Wong et al.;
      action "shrink": `pl_module.shrink_step(shrink_factor)` (FGSM's step ratio ×factor) and training goes on from
      the restored weights; after `max_shrinks` shrinks the next collapse stops training.
    Before the first check that passes, the weights at the start of training (or of the resume) are the copy kept.

    Args:
        every_n_steps: check every N optimizer steps (trainer.global_step); None turns the guard off (the default).
        attack: a registered attack name (`python -m robust_train attacks`), run at `eps` with `steps`.
        eps: the budget of the check; None: the method's ε (`pl_module.eps`). A recipe that trains beyond the ε it
            is judged at (fgsm_rs: 0.35 for 0.3) checks at the judged one, where a robust model sits far above the
            allowed drop and a collapse is not confused with the noise of a hard budget.
        n_images: the held-out batch: the first n images of the validation set (`trainer.datamodule
            .val_dataloader()`, else `trainer.val_dataloaders`), taken once when training starts. Without a
            validation set, the first n training images the run sees are used instead (images the model trains on:
            a collapse still shows there, as in Wong et al., who use a training batch), and checks wait until the
            n are gathered (or the first epoch ended).
        drop: a collapse is robust accuracy < best − drop (Wong et al.: 0.2); 0 < drop ≤ 1.
        action: "stop" or "shrink" (needs a method with `shrink_step`, i.e. FGSM-based; ConfigError at fit start
            otherwise).
        shrink_factor: the step's factor per shrink, 0 < f < 1.
        max_shrinks: shrinks allowed before a collapse stops training (0: the first collapse stops it).

    No check runs while the method's current ε (`pl_module.current_eps()`) is 0 (its warm-up's clean epochs).
    The check draws its random numbers (the attack's random start) from a fixed seed inside a forked generator: the
    same weights measure the same accuracy at every check, and a guard that never fires leaves the run's random
    draws, hence its result, exactly as without it.
    Under DDP each rank attacks the first n_images of its own share (the validation loader shards the images;
    without one, its own training batches) and the correct/total counts are summed over ranks, so every rank sees
    the same accuracy and takes the same decision; ranks hold identical weights, so each restores its own identical
    copy.
    The best accuracy and the collapse and shrink counts are saved in checkpoints; the weight copies are not (the
    first copy after a resume is the resumed weights).
    """

    def __init__(self, every_n_steps: int | None = None, attack: str = "pgd", eps: float | None = None,
                 steps: int = 10, n_images: int = 256,
                 drop: float = 0.2, action: Literal["stop", "shrink"] = "shrink", shrink_factor: float = 0.5,
                 max_shrinks: int = 3):
        if every_n_steps is not None and not is_whole(every_n_steps, 1):
            raise ConfigError(f"overfit_guard.every_n_steps={every_n_steps} must be an integer ≥ 1, or null to turn "
                              "the guard off")
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self.steps = int(check_positive("overfit_guard.steps", steps))
        self.n_images = int(check_positive("overfit_guard.n_images", n_images))
        drop = float(check_positive("overfit_guard.drop", drop))
        if drop > 1:
            raise ConfigError(f"overfit_guard.drop={drop} must lie in (0, 1]: it is a drop in accuracy (Wong et al.: "
                              "0.2)")
        self.drop = drop
        if action not in ("stop", "shrink"):
            raise ConfigError(f"overfit_guard.action={action!r} is unknown: use 'stop' or 'shrink'")
        self.action = action
        shrink_factor = float(check_positive("overfit_guard.shrink_factor", shrink_factor))
        if shrink_factor >= 1:
            raise ConfigError(f"overfit_guard.shrink_factor={shrink_factor} must lie in (0, 1): it multiplies the "
                              "step, e.g. 0.5")
        self.shrink_factor = shrink_factor
        if not is_whole(max_shrinks, 0):
            raise ConfigError(f"overfit_guard.max_shrinks={max_shrinks} must be an integer ≥ 0")
        self.max_shrinks = int(max_shrinks)
        self.eps = None if eps is None else check_eps(eps)
        self.attack_name = attack
        create_attack(attack, 0.0, steps=self.steps)  # an unknown name fails at construction, not after an epoch
        self.attack = None
        self.best: float | None = None
        self.collapses = self.shrinks = 0
        self.held_out: Batches = []
        self.held_out_complete = False
        self.good: dict | None = None  # {"step", "acc", "model", "optimizers"}: the last state that passed
        self._last_step = -1

    @property
    def enabled(self) -> bool:
        return self.every_n_steps is not None

    # -- resume ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if not self.enabled:
            return {}  # checkpoints of runs without the guard stay as they were
        return {"best": self.best, "collapses": self.collapses, "shrinks": self.shrinks}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = state_dict.get("best", self.best)
        self.collapses = int(state_dict.get("collapses", self.collapses))
        self.shrinks = int(state_dict.get("shrinks", self.shrinks))

    # -- hooks -----------------------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.enabled and stage == "fit" and self.action == "shrink" and not hasattr(pl_module, "shrink_step"):
            raise ConfigError(f"overfit_guard.action=shrink needs a method with a step to shrink (FGSM-based, e.g. "
                              f"FGSMTraining or FastFGSMTraining); {type(pl_module).__name__} has none: use "
                              "overfit_guard.action stop")

    def on_train_start(self, trainer, pl_module) -> None:
        # After the checkpoint restore (on_fit_start comes before the optimizers' states are loaded).
        if not self.enabled:
            return
        budget = float(pl_module.eps) if self.eps is None else self.eps
        self.attack = create_attack(self.attack_name, budget, steps=self.steps)
        with seeded_rng(pl_module.device, trainer.global_rank):  # iterating a DataLoader draws a seed from torch's RNG
            self.held_out = self._validation_images(trainer, pl_module.device)
        self.held_out_complete = bool(self.held_out)
        self.good = self._snapshot(trainer, pl_module, trainer.global_step, math.nan)
        self._last_step = trainer.global_step  # no check before this run's first optimizer step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.enabled:
            return
        if not self.held_out_complete:
            self._gather(batch)
        step = trainer.global_step
        # Under gradient accumulation several batches end at one optimizer step: check once per step.
        if step == self._last_step or step % self.every_n_steps != 0 or not self.held_out_complete:
            return
        self._last_step = step
        current = pl_module.current_eps() if hasattr(pl_module, "current_eps") else pl_module.eps
        if current == 0:
            return
        self.check(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.enabled and self.held_out:
            self.held_out_complete = True  # a training set smaller than n_images: what one epoch gave

    # -- the check -------------------------------------------------------------------------------------------------
    def check(self, trainer, pl_module) -> float:
        """Measure, then keep a copy (passed) or restore the last copy and act (collapsed); returns the accuracy."""
        with seeded_rng(pl_module.device, trainer.global_rank):
            correct, total = count_correct(pl_module.model, self.attack, self.held_out)
        counts = trainer.strategy.reduce(torch.tensor([correct, total], dtype=torch.long, device=pl_module.device),
                                         reduce_op="sum")
        acc = float(counts[0]) / max(1, int(counts[1]))
        step = trainer.global_step
        collapsed = self.best is not None and acc < self.best - self.drop
        if collapsed:
            self._collapse(trainer, pl_module, step, acc)
        else:
            self.best = acc if self.best is None else max(self.best, acc)
            self.good = self._snapshot(trainer, pl_module, step, acc)
        pl_module.log("guard/robust_acc", acc, on_step=True, on_epoch=False)
        pl_module.log("guard/collapses", float(self.collapses), on_step=True, on_epoch=False)
        return acc

    def _collapse(self, trainer, pl_module, step: int, acc: float) -> None:
        self.collapses += 1
        good = self.good
        pl_module.model.load_state_dict(good["model"])
        for optimizer, state in zip(trainer.optimizers, good["optimizers"]):
            optimizer.load_state_dict(state)  # moves the state back to each parameter's device
        measured = f"robust accuracy {good['acc']:.3f}" if not math.isnan(good["acc"]) else "not measured"
        what = (f"overfit guard: robust accuracy fell to {acc:.3f} at step {step} (best {self.best:.3f}, allowed "
                f"drop {self.drop:g}): catastrophic overfitting; restored the model and optimizer of step "
                f"{good['step']} ({measured}); ")
        if self.action == "shrink" and self.shrinks < self.max_shrinks:
            self.shrinks += 1
            before = getattr(pl_module, "step_ratio", None)
            pl_module.shrink_step(self.shrink_factor)
            after = getattr(pl_module, "step_ratio", None)
            ratio = f" (step_ratio {before:g} -> {after:g})" if before is not None and after is not None else ""
            what += (f"shrinks the training step by x{self.shrink_factor:g}{ratio}, shrink {self.shrinks} of "
                     f"{self.max_shrinks}, and goes on")
        else:
            trainer.should_stop = True
            why = f" after {self.shrinks} shrinks" if self.action == "shrink" else ""
            what += f"stops training{why}"
        rank_zero_only(log.warning)(what)

    # -- helpers ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _snapshot(trainer, pl_module, step: int, acc: float) -> dict:
        return {"step": step, "acc": acc, "model": cpu_copy(pl_module.model.state_dict()),
                "optimizers": [cpu_copy(o.state_dict()) for o in trainer.optimizers]}

    def _validation_images(self, trainer, device: torch.device) -> Batches:
        """The first n_images of the validation loader, on `device`; [] when there is no validation set."""
        datamodule = trainer.datamodule
        loaders = None
        if datamodule is not None and is_overridden("val_dataloader", datamodule):
            loaders = datamodule.val_dataloader()
        elif trainer.val_dataloaders is not None:
            loaders = trainer.val_dataloaders
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        elif isinstance(loaders, dict):
            loaders = next(iter(loaders.values()), None)
        batches: Batches = []
        if loaders is None:
            return batches
        have = 0
        for batch in loaders:
            x, y = batch[0][: self.n_images - have], batch[1][: self.n_images - have]
            batches.append((x.to(device), y.to(device)))
            have += len(y)
            if have >= self.n_images:
                break
        return batches

    def _gather(self, batch) -> None:
        """The fallback without a validation set: the first training images, up to n_images."""
        have = sum(len(y) for _, y in self.held_out)
        x, y = batch[0][: self.n_images - have], batch[1][: self.n_images - have]
        self.held_out.append((x.detach().clone(), y.detach().clone()))
        self.held_out_complete = have + len(y) >= self.n_images
