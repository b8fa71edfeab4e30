"""Ensemble adversarial training (Tramèr et al., ICLR 2018, arXiv:1705.07204), run the way the official code
(ftramer/ensemble-adv-training, `train_adv.py` / `tf_utils.py::tf_train`) runs it; methods.md §7:

  * a few *static* pre-trained models are loaded and never updated;
  * for every batch one source is drawn uniformly from the static models plus the model being trained, and that
    source alone crafts the adversarial copy of the whole batch (the TF graph evaluates every source each step and
    keeps one; here only the sampled one is computed: same distribution, less work);
  * the attack is FGSM (x' = clip(x + ε·sign ∇ₓ CE(m(x), ŷ_m))) or RAND-FGSM (a random α·sign(N(0, I)) step,
    then FGSM with ε − α), with ŷ_m = argmax m(x), the **source's own prediction**, "to avoid label leaking";
  * the loss is ½·(CE(f(x), y) + CE(f(x'), y)), with the true labels.

Static models are classifiers taking [0, 1] images, the contract of `robust_train.load` (each applies its own
normalisation inside). They are either checkpoints named in `static_checkpoints` (written by this framework's
`fit`, any architecture of the registry including `tv_<name>` torchvision models), or, when none is named, trained
here once at the start of the first fit (architectures `static_archs`, `static_epochs` each, plain Adam/SGD loop
with the module's optimiser settings on the same training data), saved atomically next to the run folders and
reused by every later run with the same settings. Either way they are frozen (`requires_grad_(False)`), in eval
mode, on the module's device, kept outside the module's submodules (never in `state_dict` or the optimiser) and
referenced in the checkpoint by path and SHA-256 (`checkpoint["robust_train"]["static_models"]`), not copied.

Differences from the official code, on purpose: ties in ŷ_m go to the first class (argmax) instead of being split
evenly (ties between float logits do not happen in practice); Tramèr's static models A–D are Keras CNN/MLP variants,
the self-trained defaults here are two small CNNs of different widths (name others in `static_archs`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from robust_train.attacks import FGSM, RandFGSM
from robust_train.checkpoint import (checkpoint_metadata, classifier_from_checkpoint, read_checkpoint,
                                     save_classifier)
from robust_train.errors import ConfigError
from robust_train.methods.auxiliary import train_auxiliary
from robust_train.methods.base import DEFAULT_SPEC, RobustModule
from robust_train.methods.distillation import file_sha256
from robust_train.methods.registry import register_method
from robust_train.modes import model_mode

# Two different small MNIST architectures, cheap enough to train on a CPU in a minute or two each.
DEFAULT_STATIC_ARCHS = [{"arch": "small_cnn", "arch_kwargs": {"widths": [8, 16, 50]}},
                        {"arch": "small_cnn", "arch_kwargs": {"widths": [32, 64, 128]}}]


@register_method
class EnsembleAdvTraining(RobustModule):
    """Ensemble adversarial training: ½·(CE(f(x), y) + CE(f(x'), y)), x' crafted on one source per batch, drawn
    uniformly from the static models and the current model (the last index).

    Args:
        static_checkpoints: robust_train checkpoints of the static models (e.g. `checkpoints/standard/<run>/last.ckpt`).
            When empty or None, the static models are trained here from `static_archs`.
        static_archs: the self-trained static models, one dict each: {"arch": registry name, "arch_kwargs": {...}}.
            Default: two small CNNs of different widths (DEFAULT_STATIC_ARCHS).
        static_epochs: epochs of plain cross-entropy training for each self-trained static model.
        static_max_batches: at most this many batches per static epoch (None: the whole training set); meant for
            tests and smoke runs. It is part of the saved file's name, so a short run never reuses a full one.
        static_dir: folder of the self-trained static models (default: next to the run folders,
            `<output>/<recipe>/`, or the Trainer's default_root_dir outside the CLI).
        attack: "fgsm" (Tramèr's training attack) or "rand_fgsm" (random α step, then FGSM with ε − α).
        rand_alpha: RAND-FGSM's α (Tramèr: 0.05 on MNIST); capped at the current ε during an ε warm-up.
        source_seed: seed of the generator that draws the source of each batch (its state is checkpointed).
    """

    def __init__(self, static_checkpoints: list[str] | None = None, static_archs: list[dict] | None = None,
                 static_epochs: int = 2, static_max_batches: int | None = None, static_dir: str | None = None,
                 attack: Literal["fgsm", "rand_fgsm"] = "fgsm", rand_alpha: float = 0.05, source_seed: int = 0,
                 **kwargs):
        super().__init__(**kwargs)
        if attack not in ("fgsm", "rand_fgsm"):
            raise ConfigError(f"attack={attack!r}: ensemble adversarial training crafts with 'fgsm' or 'rand_fgsm'")
        if attack == "rand_fgsm" and not 0 <= rand_alpha <= self.eps:
            raise ConfigError(f"rand_alpha={rand_alpha} must lie in [0, eps={self.eps}] (Tramèr: 0.05 at eps 0.3)")
        if static_epochs < 1:
            raise ConfigError(f"static_epochs={static_epochs} must be >= 1")
        if static_max_batches is not None and static_max_batches < 1:
            raise ConfigError(f"static_max_batches={static_max_batches} must be >= 1 (or null for whole epochs)")
        self.static_checkpoints = [str(p) for p in static_checkpoints or []]
        archs = DEFAULT_STATIC_ARCHS if static_archs is None else static_archs
        self.static_archs = [self._check_arch(a) for a in archs] if not self.static_checkpoints else []
        if not self.static_checkpoints and not self.static_archs:
            raise ConfigError("ensemble adversarial training needs at least one static model: name "
                              "static_checkpoints or give static_archs to train")
        self.static_epochs, self.static_max_batches = static_epochs, static_max_batches
        self.static_dir = static_dir
        self.attack, self.rand_alpha = attack, float(rand_alpha)
        attack_cls, options = (FGSM, {}) if attack == "fgsm" else (RandFGSM, {"alpha": self.alpha_at})
        self.current_attack = self.make_training_attack(attack_cls, **options)
        self.static_attack = self.make_training_attack(attack_cls, bn_mode="eval", **options)
        self.source_generator = torch.Generator().manual_seed(source_seed)
        self.last_source: int | None = None
        # Not submodules: never in state_dict, the optimiser or `.to()`; set up at the start of fit.
        object.__setattr__(self, "static_models", [])
        self.static_refs: list[dict] = []  # [{"path", "sha256"}] of the files the static models were read from

    @staticmethod
    def _check_arch(spec) -> dict:
        if not isinstance(spec, dict) or not isinstance(spec.get("arch"), str) or \
                not set(spec) <= {"arch", "arch_kwargs"}:
            raise ConfigError(f"static_archs entry {spec!r} must look like {{'arch': 'small_cnn', 'arch_kwargs': "
                              "{'widths': [8, 16, 50]}}")
        return {"arch": spec["arch"], "arch_kwargs": dict(spec.get("arch_kwargs") or {})}

    @property
    def num_sources(self) -> int:
        """Static models plus the current model (the last index)."""
        return len(self.static_checkpoints or self.static_archs) + 1

    def draw_source(self) -> int:
        """One source index, uniform over range(num_sources), from the module's own generator."""
        return int(torch.randint(self.num_sources, (1,), generator=self.source_generator))

    # -- static models -------------------------------------------------------------------------------------------
    def _spec(self) -> dict:
        return dict(self.hparams.data_spec or DEFAULT_SPEC)

    def static_folder(self) -> Path:
        if self.static_dir:
            return Path(self.static_dir)
        run_dir = self.run_info.get("run_dir")
        return Path(run_dir).parent if run_dir else Path(self.trainer.default_root_dir)

    def _static_record(self, i: int) -> dict:
        """What a self-trained static model depends on; its hash names the file, so other settings train anew."""
        spec = self._spec()
        return {"index": i, **self.static_archs[i], "epochs": self.static_epochs,
                "max_batches": self.static_max_batches, "data": spec.get("name"),
                "optimizer": self.hparams.optimizer, "lr": self.hparams.lr}

    def static_path(self, i: int) -> Path:
        record = self._static_record(i)
        digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:8]
        return self.static_folder() / f"static{i}-{record['arch']}-{self.static_epochs}ep-{digest}.ckpt"

    def _load_static(self, path: Path, expected: dict | None = None) -> nn.Module:
        sha = file_sha256(path) if path.is_file() else None
        ckpt = read_checkpoint(path)  # ConfigError with one line if missing, corrupt, unsafe or not ours
        info, spec = ckpt["robust_train"], self._spec()
        theirs = info.get("data_spec") or {}
        if (theirs.get("num_classes"), theirs.get("in_channels")) != (spec["num_classes"], spec["in_channels"]):
            raise ConfigError(f"static model {path} classifies {theirs.get('num_classes')} classes of "
                              f"{theirs.get('in_channels')}-channel images, the data has {spec['num_classes']} "
                              f"and {spec['in_channels']}: name a checkpoint trained on this data set")
        if expected is not None and info.get("static") != expected:
            raise ConfigError(f"static model {path} was trained with other settings ({info.get('static')}): "
                              "delete it or set static_dir")
        self.static_refs.append({"path": str(path.resolve()), "sha256": sha})
        return classifier_from_checkpoint(ckpt)

    def on_fit_start(self) -> None:
        self.static_refs = []
        models = []
        if self.static_checkpoints:
            models = [self._load_static(Path(p)) for p in self.static_checkpoints]
        else:
            for i in range(len(self.static_archs)):
                path, record = self.static_path(i), self._static_record(i)
                if not path.is_file():
                    if self.trainer.is_global_zero:
                        self._save_static(self.train_static(i), path, record)
                    self.trainer.strategy.barrier("ensemble_adv_static")
                models.append(self._load_static(path, record))  # the file, so every run uses the same bytes
        models = [m.to(self.device).eval().requires_grad_(False) for m in models]
        object.__setattr__(self, "static_models", models)

    def train_static(self, i: int) -> nn.Module:
        """Plain cross-entropy training of static model i: the module's optimiser settings, the fit's training
        data, a fixed seed per index (under fork_rng, so the main run's random stream does not depend on whether
        the static models were trained or reused)."""
        if self.trainer.datamodule is None:
            raise ConfigError("ensemble adversarial training trains its static models on the fit's data module: "
                              "pass datamodule= to trainer.fit, or name static_checkpoints")
        arch = self.static_archs[i]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(i)
            return train_auxiliary(self, arch["arch"], arch["arch_kwargs"], F.cross_entropy, self.static_epochs,
                                   f"static model {i} ({arch['arch']})", self.static_max_batches)

    def _save_static(self, model: nn.Module, path: Path, record: dict) -> None:
        metadata = checkpoint_metadata("EnsembleStaticModel", record["arch"], record["arch_kwargs"], self._spec(),
                                       0.0, {"static": record})
        save_classifier(model, metadata, path)

    # -- training ------------------------------------------------------------------------------------------------
    def craft(self, source: int, x: torch.Tensor, eps: float) -> torch.Tensor:
        """The adversarial batch from source `source` (index num_sources − 1: the current model), attacked with
        its own predicted labels. Static sources run in eval mode; the current model in `attack_bn_mode`."""
        if not self.static_models and self.num_sources > 1:
            raise RuntimeError("the static models are set up at the start of fit; call trainer.fit")
        current = source == self.num_sources - 1
        model = self.model if current else self.static_models[source]
        bn_mode = self.hparams.attack_bn_mode if current else "eval"
        if eps == 0:
            return x.detach().clone()
        # The prediction in the attack's mode (model_mode restores modes and BatchNorm statistics afterwards).
        with model_mode(model, bn_mode, grad=False):
            y_hat = model(x).argmax(1)
        return (self.current_attack if current else self.static_attack)(model, x, y_hat, eps)

    def alpha_at(self, eps: float) -> float:
        """RAND-FGSM's random step at ε: rand_alpha, capped at ε during an ε warm-up."""
        return min(self.rand_alpha, eps)

    def adversarial_batch(self, x, y, eps):
        self.last_source = self.draw_source()  # drawn even at ε = 0, so the stream does not depend on the warm-up
        return self.craft(self.last_source, x, eps)

    def training_loss(self, x, y, x_adv):
        logits = self.model(x)
        logits_adv = self.model(x_adv)
        # train/acc is on the adversarial half, as for the other adversarial methods.
        return 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits_adv, y)), logits_adv

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train/source", float(self.last_source))
        return loss

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["robust_train"]["static_models"] = [dict(r) for r in self.static_refs]
        checkpoint["ensemble_source_generator"] = self.source_generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("ensemble_source_generator")
        if state is not None:
            self.source_generator.set_state(state)
