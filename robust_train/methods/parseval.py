"""Parseval networks (Cissé et al., ICML 2017, arXiv:1704.08847): keep every Linear and conv weight close to a
Parseval tight frame (W Wᵀ = I, so each layer is 1-Lipschitz) by one retraction step W ← (1+β)W − βWWᵀW after
every optimiser step, from an orthogonal init. Optionally on PGD examples (Madry et al.) instead of clean ones.

No official code exists; this follows the three reproductions summarised in shared/reference/methods.md §5 (maths
and conv scaling in `parseval_math`). What it does not do: grouped convs are skipped; BatchNorm layers are not
constrained (none in small_cnn; the ResNets have them); and our ResNets add their residual branches
(`out + shortcut`, 2-Lipschitz per block) rather than using the paper's convex combination. Models that use
`parseval_math.ConvexCombination` have its weights put back on the simplex after every step.
"""
from __future__ import annotations

from typing import Literal

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from robust_train.attacks import PGD
from robust_train.errors import ConfigError
from robust_train.methods.base import RobustModule
from robust_train.methods.parseval_math import (PARSEVAL_LAYERS, orthogonal_init_, orthonormality_error,
                                                parseval_retraction_, project_convex_combinations_)
from robust_train.methods.registry import register_method


@register_method
class ParsevalTraining(RobustModule):
    """Cross-entropy on clean (`adversarial: null`) or PGD examples, with the Parseval retraction after each step.

    Args:
        beta: retraction rate β. 3e-4 is Ivan1248's `ortho_retraction_rate` and a third-party trainer's
            `ParsevalRetrainTrainer(beta=0.0003)` (methods.md §5.1; DingJianhao uses 2e-3; the paper's value could
            not be read). 0 turns the retraction off (an orthogonally initialised baseline).
        sample_rows: None retracts all rows of every layer; a fraction in (0, 1] retracts that random share of rows
            per layer and step (the paper's cheaper variant; DingJianhao samples 30% of large Linear layers).
        conv_scaling: orthonormalise √(kh·kw)·W for convs so the conv, not only its matrix, is 1-Lipschitz
            (Ivan1248's division of conv outputs by the kernel size, put into the weight). Use SGD with it: Adam
            moves every entry by about lr whatever its size, so the scaled matrix √(kh·kw)·W moves √(kh·kw) times
            faster (on small_cnn with Adam the last conv's largest singular value grows several-fold within a few
            steps, where SGD keeps it near 1), and the retraction diverges past √((2+β)/β) (≈82 at β = 3e-4).
        include_head: also constrain the final classifier (methods.md §5.1: every linear layer and conv is retracted).
        adversarial: None trains on clean images; "pgd" on PGD-`steps` examples of `step_size` from a random
            start at the (warmed-up) ε, as PGDTraining does.
    """

    def __init__(self, beta: float = 3e-4, sample_rows: float | None = None, conv_scaling: bool = True,
                 include_head: bool = True, adversarial: Literal["pgd"] | None = None, steps: int = 40,
                 step_size: float = 0.01, random_start: bool = True, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= beta < 1:
            raise ConfigError(f"beta={beta} must be in [0, 1): the retraction rate, e.g. 3e-4 (0 turns it off)")
        if sample_rows is not None and not 0 < sample_rows <= 1:
            raise ConfigError(f"sample_rows={sample_rows} must be null (all rows) or a fraction in (0, 1], e.g. 0.3")
        if adversarial not in (None, "pgd"):
            raise ConfigError(f"adversarial={adversarial!r}: use null (clean training) or pgd")
        self.beta, self.sample_rows, self.conv_scaling = beta, sample_rows, conv_scaling
        self.adversarial, self.steps, self.step_size, self.random_start = adversarial, steps, step_size, random_start
        if conv_scaling and beta > 0 and self.hparams.optimizer in ("adam", "adamw"):
            rank_zero_warn("ParsevalTraining with conv_scaling and Adam: Adam's step ignores the 1/sqrt(kernel size) "
                           "weight scale and can push conv singular values out of the retraction's basin; use "
                           "optimizer: sgd (as the Parseval reproductions do) or conv_scaling: false")
        self.training_attack = None  # clean training
        if adversarial == "pgd":
            self.training_attack = self.make_training_attack(PGD, steps=steps, step_size=step_size,
                                                             random_start=random_start, keep_best=False)
        head = getattr(self.model, "head", None)
        self.parseval_layers: list[nn.Module] = [
            m for m in self.model.modules()
            if isinstance(m, PARSEVAL_LAYERS) and getattr(m, "groups", 1) == 1 and (include_head or m is not head)]
        if not self.parseval_layers:
            raise ConfigError(f"arch {self.hparams.arch!r} has no Linear or conv layer for Parseval training")
        for layer in self.parseval_layers:
            orthogonal_init_(layer, conv_scaling=conv_scaling)

    def adversarial_batch(self, x, y, eps):
        return None if eps == 0 else super().adversarial_batch(x, y, eps)  # ε = 0: the clean batch itself

    # The retraction goes in an `optimizer_step` override rather than `on_train_batch_end`: Lightning calls this
    # once per real optimiser step, so with `accumulate_grad_batches > 1` the weights are retracted once per update
    # (not once per micro-batch), and it runs right after `optimizer.step()`, before anything else sees the weights.
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.parseval_step()

    def parseval_step(self) -> None:
        """The post-step constraints: one retraction of every Parseval layer, convex combinations onto the simplex."""
        if self.beta > 0:
            for layer in self.parseval_layers:
                parseval_retraction_(layer.weight, self.beta, self.sample_rows, conv_scaling=self.conv_scaling)
        project_convex_combinations_(self.model.modules())

    def orthonormality_errors(self) -> list[float]:
        """‖WWᵀ − I‖_F of each Parseval layer (‖WᵀW − I‖_F for tall ones), convs scaled as the retraction sees them."""
        return [orthonormality_error(layer.weight, conv_scaling=self.conv_scaling) for layer in self.parseval_layers]

    def on_train_epoch_end(self) -> None:
        # Once per epoch, not per step: the Gram matrices of a wide ResNet are not free.
        errors = self.orthonormality_errors()
        self.log("train/parseval_error_mean", sum(errors) / len(errors))
        self.log("train/parseval_error_max", max(errors))
