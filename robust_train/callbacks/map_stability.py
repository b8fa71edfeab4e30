"""How stable the model's interpretation maps are under attack, tracked during training: every N epochs, the first
few validation batches are attacked at each ε and Kendall's τ and the top-k overlap between the clean and the
attacked maps are logged (`robust_train.interpret.stability`, Boopathy et al., ICML 2020), with a gallery of a few
attacked images and their CAMs for loggers that take images (WandbLogger).

Logged, per attack and ε (`<stage>` is `val` or `test`):

    <stage>/map_tau/<attack>@<ε>      mean Kendall τ_b over images whose label did not change (NaN when none)
    <stage>/map_topk/<attack>@<ε>     mean top-k overlap over the same images
    <stage>/map_n_used/<attack>@<ε>   how many images those means are over (summed over processes)
    <stage>/map_gallery               (image) 4 validation images over ε = 0 and every ε, attacked by the first attack

Under DDP the `max_batches` are shared out (each of W processes attacks its first ceil(max_batches / W) batches,
which together are the images one process would take) and τ and top-k are pooled over all usable images of all
processes, as one process would pool them; the random starts differ, so the numbers agree in distribution. They
are a trend to watch, not a result: the evaluation (`python -m robust_train evaluate`) is where the full-strength
attack on a full test set belongs.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from robust_train.attacks.base import check_eps, check_positive
from robust_train.attacks.aai import stability_attack
from robust_train.errors import ConfigError
from robust_train.interpret.registry import MAPS
from robust_train.interpret.stability import aggregate_stability, stability_per_image
from robust_train.modes import model_mode

GALLERY_IMAGES = 4


class MapStability(pl.Callback):
    """Logs `<stage>/map_tau|map_topk|map_n_used/<attack>@<ε>` every `every_n_epochs` validation epochs (and at
    the last epoch, so a short run logs once), and at every `validate`/`test` run.

    Args:
        every_n_epochs: run at the validation of epochs N, 2N, ... (counted from 1); 0 disables the callback
            entirely (validation during fit, `validate` and `test` alike).
        eps: budgets (L∞, pixel units of [0, 1] images); None means the training method's own ε (`pl_module.eps`).
        attacks: names in the attack registry (`python -m robust_train attacks`), e.g. "aai" (the attack on the
            map itself) and "pgd_madry" (an attack on the label, whose effect on the map is measured on the images
            whose label survived). Each is built by `stability_attack` with `steps` below; AAI also gets the map
            and `topk` below, so it attacks the very cells the metric looks at.
        steps: attack iterations. 50 rather than the evaluation's 200 (Boopathy et al.): this runs inside
            training, once per (attack, ε) every few epochs, and its purpose is to show a trend. AAI moves
            α = 0.01 per step, so 50 steps can still reach the boundary of any ε ≤ 0.5 ball (MNIST's 0.3 after
            30 steps), while costing a quarter of the full attack; the full-strength number is the evaluation's.
        max_batches: number of validation (or test) batches used, from the start of the loader.
        map: interpretation map name (`robust_train.interpret.MAPS`), of the true class; default CAM.
        topk: k of the top-k overlap (and of AAI's attacked cells).
        log_images: log a gallery (`attack_gallery`) of 4 images under ε = 0 and each ε, attacked by the first
            attack, to every logger with a `log_image` method (WandbLogger), from rank 0, each time it runs.
    """

    def __init__(self, every_n_epochs: int = 5, eps: list[float] | None = None,
                 attacks: list[str] = ["aai"],  # noqa: B006 (never mutated; a list so --print_config shows a list)
                 steps: int = 50, max_batches: int = 2, map: str = "cam", topk: int = 8, log_images: bool = True):
        if every_n_epochs is None or int(every_n_epochs) != every_n_epochs or every_n_epochs < 0:
            raise ConfigError(f"every_n_epochs={every_n_epochs} must be an integer >= 0 (0 disables map stability)")
        self.every_n_epochs = int(every_n_epochs)
        self.eps = [check_eps(e) for e in eps] if eps is not None else None
        self.attacks = list(attacks)
        if not self.attacks:
            raise ConfigError("attacks is empty: name at least one attack, e.g. ['aai'] (or set every_n_epochs 0)")
        self.steps = int(check_positive("steps", steps))
        self.max_batches = int(check_positive("max_batches", max_batches))
        self.map_name = map
        self.map_fn = MAPS.get(map)  # fail at construction, not after an epoch
        self.topk = int(check_positive("topk", topk))
        self.log_images = bool(log_images)
        self._warned_small_map = False
        for name in self.attacks:
            self.make_attack(name, 0.0)

    # -- the work itself, usable without a Trainer ------------------------------------------------------------
    def make_attack(self, name: str, eps: float):
        return stability_attack(name, eps, self.map_name, self.topk, self.steps)

    def budgets(self, pl_module) -> list[float]:
        return self.eps if self.eps is not None else [check_eps(pl_module.eps)]

    def stability(self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                  eps_list: list[float]) -> dict[tuple[str, float], dict]:
        """{(attack, ε): aggregate_stability(...)} over the batches (x, y). The model comes back in the mode it
        was handed over in (every module's), whatever the attacks and maps do; inference mode is lifted."""
        per_image: dict[tuple[str, float], list] = {(a, e): [] for a in self.attacks for e in eps_list}
        with torch.inference_mode(False), model_mode(model, "eval", grad=True):
            for x, y in batches:
                x, y = x.clone(), y.clone()  # inference tensors (made under inference mode) cannot enter autograd
                for name in self.attacks:
                    for eps in eps_list:
                        x_adv = self.make_attack(name, eps)(model, x, y)
                        per_image[(name, eps)].append(
                            stability_per_image(model, x, y, x_adv, map_fn=self.map_fn, k=self.topk))
        out = {}
        for key, parts in per_image.items():
            if parts:
                tau, topk, unchanged = (np.concatenate(p) for p in zip(*parts))
            else:
                tau = topk = unchanged = np.zeros(0)
            out[key] = aggregate_stability(tau, topk, unchanged)
        return out

    def gallery(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_list: list[float],
                class_names=None) -> np.ndarray:
        """(H, W, 3) uint8 picture of `attack_gallery` on the first images of x under [0] + ε, first attack."""
        from robust_train.figures import attack_gallery, figure_to_array  # matplotlib only when used

        with torch.inference_mode(False), torch.enable_grad():
            x, y = x[:GALLERY_IMAGES].clone(), y[:GALLERY_IMAGES].clone()
            fig = attack_gallery(model, x, y, [0.0, *[e for e in eps_list if e != 0]],
                                 lambda e: self.make_attack(self.attacks[0], e), class_names=class_names)
        return figure_to_array(fig)

    # -- Lightning plumbing -------------------------------------------------------------------------------------
    def should_run(self, trainer: pl.Trainer) -> bool:
        if self.every_n_epochs == 0 or trainer.sanity_checking:
            return False
        if trainer.state.fn != TrainerFn.FITTING:  # `validate` / `test`: every run is worth reporting
            return True
        epoch, last = trainer.current_epoch, trainer.max_epochs
        return (epoch + 1) % self.every_n_epochs == 0 or (last is not None and last > 0 and epoch == last - 1)

    def map_cells(self, model: nn.Module, x: torch.Tensor) -> int:
        """How many cells the map has for one image x (1, C, H, W): top-k needs at least k."""
        with torch.inference_mode(False), model_mode(model, "eval", grad=True):
            return int(self.map_fn(model, x.clone())[0].numel())

    @staticmethod
    def first_batches(loaders, n: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if isinstance(loaders, dict):
            loaders = next(iter(loaders.values()), None)
        if loaders is None:
            return
        for i, batch in enumerate(loaders):
            if i >= n:
                break
            yield batch[0].to(device), batch[1].to(device)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.should_run(trainer):
            return
        loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
        eps_list = self.budgets(pl_module)
        model = pl_module.model
        share = -(-self.max_batches // max(1, trainer.world_size))
        with torch.inference_mode(False):  # batches loaded here are ordinary tensors even under inference mode
            batches = list(self.first_batches(loaders, share, pl_module.device))
        if batches and self.map_cells(model, batches[0][0][:1]) < self.topk:
            if not self._warned_small_map:
                rank_zero_warn(f"map stability skipped: the {self.map_name} map of this model has fewer cells than "
                               f"topk={self.topk} (e.g. a 1x1 feature map); set map_stability.topk lower or "
                               "map_stability.every_n_epochs 0")
                self._warned_small_map = True
            return
        results = self.stability(model, batches, eps_list)
        for (name, eps), r in results.items():
            suffix = f"{name}@{eps:g}"
            n = float(r["n_used"])
            sums = torch.tensor([np.nan_to_num(r["kendall_tau"]) * n, np.nan_to_num(r["topk_intersection"]) * n, n],
                                dtype=torch.float64, device=pl_module.device)
            tau_sum, topk_sum, n = trainer.strategy.reduce(sums, reduce_op="sum").tolist()  # pooled over ranks
            # the same value on every rank, so sync_dist's mean changes nothing (and Lightning does not warn)
            pl_module.log(f"{stage}/map_tau/{suffix}", tau_sum / n if n else float("nan"), sync_dist=True)
            pl_module.log(f"{stage}/map_topk/{suffix}", topk_sum / n if n else float("nan"), sync_dist=True)
            pl_module.log(f"{stage}/map_n_used/{suffix}", n, sync_dist=True)
        if self.log_images and batches and trainer.is_global_zero:
            loggers = [lg for lg in trainer.loggers if callable(getattr(lg, "log_image", None))]
            if loggers:
                spec = getattr(pl_module, "hparams", {}).get("data_spec") or {}
                picture = self.gallery(model, *batches[0], eps_list, spec.get("class_names"))
                for logger in loggers:
                    logger.log_image(key=f"{stage}/map_gallery", images=[picture], step=trainer.global_step)

    def on_validation_epoch_end(self, trainer, pl_module):
        self._run(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module):
        self._run(trainer, pl_module, "test")
