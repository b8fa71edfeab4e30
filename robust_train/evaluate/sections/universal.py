"""A universal adversarial perturbation (`--universal`, report.json `universal`; Moosavi-Dezfooli et al., CVPR 2017,
see `robust_train.attacks.universal`): one v with ‖v‖ ≤ ε (`--universal-eps`, default the main ε, in
`--universal-norm`) computed on the first `--universal-n` training images in a seeded random order, then added to
every test image. Its fooling rate is the share of the test images whose prediction changes under clip(x + v) (the
paper's definition, right or wrong before), beside that of random noise of the same norm (a fresh draw per image:
random signs × ε for L∞, a Gaussian scaled to ε for L2); the dominant labels are the classes the fooled images are
sent to most. With pictures on, `universal.png`: v amplified, and `--n-pictures` test images clean and with v (the
first fooled ones, then the first others).

It runs on the first process alone: v is updated mini-batch after mini-batch of training images, which does not share
out across processes without gathering after every mini-batch (the test images' predictions would share out, but
they take a fraction of the time). Its picture's link is a section of its own (`universal_picture`), in report.md
with the other pictures and not on the console.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar

import torch

from robust_train.attacks.universal import apply_perturbation, random_like, universal_perturbation
from robust_train.distributed import batch_seed
from robust_train.errors import ConfigError
from robust_train.evaluate.accuracy import predictions
from robust_train.evaluate.evaluation import Evaluation
from robust_train.evaluate.options import MIN_UNIVERSAL_IMAGES
from robust_train.evaluate.sections.base import Section, add_pictures, register_section

UNIVERSAL_STREAM = 6  # random stream of batch_seed, apart from the suite's, transfer's, stability's, minimal's, probes'
PICTURE = "universal.png"
DOMINANT = 3  # dominant labels reported
MAX_PASSES = 5  # over the training images; the paper loops until 80% of them are fooled
NORM_NAMES = {"linf": "L∞", "l2": "L2"}


def training_set(datamodule):
    """The data module's training split without its augmentation (the images a universal perturbation is computed
    on are the training images themselves, as in the paper)."""
    from robust_train.callbacks.prototype_push import without_augmentation  # Lightning: imported by the data

    if getattr(datamodule, "train_set", None) is None:
        datamodule.prepare_data()
        datamodule.setup("fit")
    return without_augmentation(datamodule.train_set, datamodule)


def training_images(datamodule, n: int, generator: torch.Generator) -> torch.Tensor:
    """n training images (all of them when there are fewer) drawn in a random order from `generator`."""
    from torch.utils.data import DataLoader, Subset

    from robust_train.data.base import collate

    dataset = training_set(datamodule)
    rows = torch.randperm(len(dataset), generator=generator)[:n].tolist()
    loader = DataLoader(Subset(dataset, rows), batch_size=max(getattr(datamodule, "batch_size", 0) or 0, 256),
                        collate_fn=collate)
    return torch.cat([x for x, _ in loader])


def dominant_labels(labels: torch.Tensor, num_classes: int, class_names=None, k: int = DOMINANT) -> list[dict]:
    """The k classes most of `labels` (the predictions of the fooled images) fall in, with their share of them."""
    if not len(labels):
        return []
    counts = torch.bincount(labels.cpu(), minlength=num_classes)
    top = counts.argsort(descending=True, stable=True)[:k]
    return [{"class": int(c), "name": str(class_names[c]) if class_names else str(int(c)), "count": int(counts[c]),
             "share": counts[c].item() / len(labels)} for c in top if counts[c] > 0]


def universal_figure(v: torch.Tensor, x: torch.Tensor, clean_pred: torch.Tensor, pred_v: torch.Tensor,
                     summary: str, class_names=None, path=None):
    """Column 0: v amplified to its largest entry (one channel: a divergent colormap, blue −, red +; RGB: 0.5 + v
    scaled, as the paper shows it) over a summary; then each image clean (top) and with v (bottom), titled with the
    prediction, red where it changed."""
    from robust_train.figures.base import RIGHT_COLOR, WRONG_COLOR, class_name, new_figure, save_png, show_image

    fig, axes = new_figure(2, len(x) + 1)
    v = v.detach().float().cpu()
    peak = v.abs().max().item() or 1.0
    if v.shape[0] == 1:
        axes[0, 0].imshow(v[0].numpy(), cmap="RdBu_r", vmin=-peak, vmax=peak, interpolation="nearest")
    else:
        axes[0, 0].imshow((0.5 + 0.5 * v / peak).clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
    axes[0, 0].set_title(f"v, scaled to ±{peak:.3g}", fontsize=8)
    axes[1, 0].axis("off")
    axes[1, 0].text(0.02, 0.5, summary, fontsize=7, va="center", ha="left", transform=axes[1, 0].transAxes)
    x_v = apply_perturbation(x, v.to(x.device))
    for i in range(len(x)):
        changed = bool(pred_v[i] != clean_pred[i])
        show_image(axes[0, i + 1], x[i])
        axes[0, i + 1].set_title(f"clean · pred {class_name(int(clean_pred[i]), class_names)}", fontsize=8)
        show_image(axes[1, i + 1], x_v[i])
        axes[1, i + 1].set_title(f"+ v · pred {class_name(int(pred_v[i]), class_names)}", fontsize=8,
                                 color=WRONG_COLOR if changed else RIGHT_COLOR)
    if path is not None:
        save_png(fig, path)
    return fig


def _rate(flags: torch.Tensor) -> float:
    return flags.float().mean().item() if len(flags) else float("nan")


@register_section("universal")
class Universal(Section):
    order = 42  # after the attacks and map stability (40), which it does not need; before the probes (45)
    title = "Universal perturbation"
    fields: ClassVar[dict] = {"universal": None}

    def prepare(self, ev: Evaluation) -> None:
        if not ev.options.universal:
            return
        count = len(training_set(ev.datamodule))
        if count < MIN_UNIVERSAL_IMAGES:
            raise ConfigError(f"--universal: the training split has {count} images, a universal perturbation needs "
                              f"at least {MIN_UNIVERSAL_IMAGES}: evaluate a checkpoint trained on more images")

    def run(self, ev: Evaluation) -> dict:
        opts = ev.options
        if not opts.universal or not ev.split.main:
            return {}
        t0, norm = time.perf_counter(), opts.universal_norm
        eps = opts.universal_eps if opts.universal_eps is not None else ev.main_eps
        if opts.universal_eps is None and norm == "l2":
            ev.note(f"the universal perturbation's L2 budget is the main ε ({eps:g}), an L∞-sized number: give "
                    "--universal-eps for a meaningful L2 budget")
        # The training images and the order of each pass from one generator, the noise from another (it does not
        # depend on how many passes were made).
        generator = torch.Generator().manual_seed(batch_seed(opts.seed, UNIVERSAL_STREAM, 0))
        x_train = training_images(ev.datamodule, opts.universal_n, generator).to(ev.device)
        result = universal_perturbation(ev.model, x_train, eps=eps, norm=norm, max_passes=MAX_PASSES,
                                        generator=generator, progress=ev.progress)
        v, model, x, batch = result.v, ev.model, ev.x, opts.batch_size
        clean_pred = predictions(model, x, batch)
        pred_v = predictions(model, apply_perturbation(x, v), batch)
        noise = random_like(v, eps, norm, torch.Generator().manual_seed(batch_seed(opts.seed, UNIVERSAL_STREAM, 1)),
                            n=len(x))
        pred_noise = predictions(model, apply_perturbation(x, noise), batch)
        changed = pred_v != clean_pred
        spec = ev.info["data_spec"]
        class_names = spec.get("class_names")
        universal = {
            "eps": eps, "norm": norm, "n_train": len(x_train), "n_test": len(x),
            "fooling_rate": _rate(changed), "noise_fooling_rate": _rate(pred_noise != clean_pred),
            "dominant_labels": dominant_labels(pred_v[changed], int(spec.get("num_classes") or 0), class_names),
            "clean_correct": int(ev.clean.sum()), "accuracy_with_v": _rate(pred_v == ev.y),
            "accuracy_with_noise": _rate(pred_noise == ev.y),
            "train_fooling_rate": result.fooling_rate_train, "passes": result.passes, "max_passes": MAX_PASSES,
            "v_linf": v.abs().max().item(), "v_l2": v.norm().item(),
        }
        fields = {"universal": universal}
        if opts.pictures and opts.out is not None and len(x):
            count = min(opts.n_pictures, len(x))
            shown = torch.cat([changed.nonzero().flatten(), (~changed).nonzero().flatten()])[:count]  # fooled first
            summary = (f"ε = {eps:g} ({NORM_NAMES[norm]})\nfooling rate\n{universal['fooling_rate']:.3f}\n"
                       f"noise {universal['noise_fooling_rate']:.3f}")
            fig = universal_figure(v, x[shown], clean_pred[shown], pred_v[shown], summary, class_names,
                                   path=Path(opts.out) / PICTURE)
            universal["picture"] = PICTURE
            fields["pictures"] = add_pictures(ev, {PICTURE: fig})  # a Figure, as the pictures section's (wandb_log)
        universal["seconds"] = round(time.perf_counter() - t0, 2)
        return fields

    def text(self, report: dict) -> str:
        u = report.get("universal")
        if not u:
            return ""
        labels = ", ".join(f"{d['name']} ({d['share']:.0%})" for d in u["dominant_labels"]) or "none"
        passes = f"{u['passes']} pass" + ("es" if u["passes"] != 1 else "")
        return (f"One perturbation with ‖v‖ ≤ {u['eps']:g} ({NORM_NAMES.get(u['norm'], u['norm'])}), computed on "
                f"{u['n_train']} training images in {passes} (fooling {u['train_fooling_rate']:.4f} of them), changes "
                f"the prediction of **{u['fooling_rate']:.4f}** of the {u['n_test']} test images; "
                f"random noise of the same norm {u['noise_fooling_rate']:.4f}. Accuracy with v "
                f"{u['accuracy_with_v']:.4f} ({u['clean_correct']} of {u['n_test']} right before).\n\n"
                f"Dominant labels of the fooled images: {labels}.")


@register_section("universal_picture")
class UniversalPicture(Section):
    """The link to universal.png in report.md, beside the other pictures (links mean nothing on the console)."""

    order = 56  # after the pictures (50) and the probes' picture (55)
    on_console = False

    def run(self, ev: Evaluation) -> dict:
        return {}

    def text(self, report: dict) -> str:
        u = report.get("universal") or {}
        if not u.get("picture") or u["picture"] not in (report.get("pictures") or []):
            return ""
        return (f"Universal perturbation: v amplified (left), and test images clean (top) and with v (bottom), the "
                f"first fooled ones then the first others, red where the prediction changed."
                f"\n\n![universal perturbation]({u['picture']})")
