"""Defensive distillation (Papernot et al., S&P 2016), run the way Carlini's reproduction runs it:

  1. a teacher is trained at temperature T on the hard labels, CE(softmax(z/T), y);
  2. its soft labels q = softmax(z_teacher(x)/T) become the student's targets, CE(softmax(z/T), q);
  3. the student (same architecture) is deployed at T = 1: its raw logits, ~T times larger than usual.

Step 3 is why distillation looks robust: the deployed softmax saturates, cross-entropy input gradients underflow
to zero, and gradient-based attacks on the cross-entropy stall. The margin loss and AutoAttack see through it;
`evaluate`'s masking checks are meant to say so. It is here as the textbook case of gradient masking.

One `fit` runs both stages. The teacher is trained at the start of fit (a plain loop over the same training data,
same optimiser settings), saved atomically next to the run folders, and reused by every later run with the same
architecture, T and epochs. It stays frozen, in eval mode, out of the optimiser and out of the student's
checkpoint, which records only its path and SHA-256. Soft labels are computed per batch from the frozen teacher:
the same numbers as Carlini's offline pass, without holding them for the whole data set. No T² loss scaling
(that is Hinton-style distillation; Carlini's code has none). Carlini's extra one-epoch warm start is not copied.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F

from robust_train.checkpoint import checkpoint_metadata, classifier_from_checkpoint, read_checkpoint, save_classifier
from robust_train.errors import ConfigError
from robust_train.methods.auxiliary import train_auxiliary
from robust_train.methods.base import DEFAULT_SPEC, RobustModule
from robust_train.methods.registry import register_method


def soft_labels(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.softmax(logits / temperature, dim=1)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the batch of −Σ_i q_i log softmax(z/T)_i; its gradient in z is (softmax(z/T) − q)/T."""
    return -(targets * F.log_softmax(logits / temperature, dim=1)).sum(1).mean()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@register_method
class DistillationTraining(RobustModule):
    """Defensive distillation at temperature T: teacher, then student, deployed at T = 1 (a masking example).

    Args: temperature (T, 100 as in Carlini's MNIST and CIFAR runs), teacher_path (reuse or write the teacher
    here; default `<output>/<recipe>/teacher-<arch>-T<T>-<epochs>ep.ckpt`), teacher_epochs (default: the
    student's max_epochs)."""

    def __init__(self, temperature: float = 100.0, teacher_path: str | None = None,
                 teacher_epochs: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not temperature > 0:
            raise ConfigError(f"temperature={temperature} must be > 0 (Papernot et al. use 100)")
        if teacher_epochs is not None and teacher_epochs < 1:
            raise ConfigError(f"teacher_epochs={teacher_epochs} must be >= 1")
        self.temperature, self.teacher_path, self.teacher_epochs = temperature, teacher_path, teacher_epochs
        object.__setattr__(self, "teacher", None)  # not a submodule: never in state_dict or the optimiser

    # -- the teacher ---------------------------------------------------------------------------------------------
    def resolved_teacher_path(self) -> Path:
        if self.teacher_path:
            return Path(self.teacher_path)
        epochs = self.teacher_epochs or self.trainer.max_epochs
        run_dir = self.run_info.get("run_dir")
        folder = Path(run_dir).parent if run_dir else Path(self.trainer.default_root_dir)
        return folder / f"teacher-{self.hparams.arch}-T{self.temperature:g}-{epochs}ep.ckpt"

    def on_fit_start(self) -> None:
        path = self.resolved_teacher_path()
        if path.is_file():
            ckpt = read_checkpoint(path)
            info = ckpt["robust_train"]
            if info["arch"] != self.hparams.arch or info.get("temperature") != self.temperature:
                raise ConfigError(f"teacher {path} is a {info['arch']} at T={info.get('temperature')}, not a "
                                  f"{self.hparams.arch} at T={self.temperature:g}: delete it or set teacher_path")
            teacher = classifier_from_checkpoint(ckpt)
        else:
            teacher = self.train_teacher(path)
        teacher = teacher.to(self.device).eval().requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)

    def train_teacher(self, path: Path) -> torch.nn.Module:
        """The student's architecture with fresh weights, trained on CE(z/T, y) and saved to `path` (by rank 0)."""
        teacher = train_auxiliary(self, self.hparams.arch, self.hparams.arch_kwargs, self.teacher_loss,
                                  self.teacher_epochs or self.trainer.max_epochs, f"teacher at T={self.temperature:g}")
        if self.trainer.is_global_zero:
            self.save_teacher(teacher, path)
        return teacher

    def teacher_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits / self.temperature, y)

    def save_teacher(self, teacher: torch.nn.Module, path: Path) -> None:
        hp = self.hparams
        metadata = checkpoint_metadata("DistillationTeacher", hp.arch, hp.arch_kwargs, hp.data_spec or DEFAULT_SPEC,
                                       self.eps, {"temperature": float(self.temperature)})
        save_classifier(teacher, metadata, path)

    # -- the student ---------------------------------------------------------------------------------------------
    def training_loss(self, x, y, x_adv):
        if self.teacher is None:
            raise RuntimeError("the teacher is set up at the start of fit; call trainer.fit")
        with torch.no_grad():
            targets = soft_labels(self.teacher(x), self.temperature)
        logits = self.model(x)
        return soft_cross_entropy(logits, targets, self.temperature), logits

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        info = checkpoint["robust_train"]
        info["temperature"] = float(self.temperature)
        if self._trainer is not None:
            path = self.resolved_teacher_path()
            if path.is_file():
                info["teacher"] = {"path": str(path.resolve()), "sha256": file_sha256(path)}
