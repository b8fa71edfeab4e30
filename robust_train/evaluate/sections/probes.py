"""Shape-bias probes (`--probes`, report.json `probes` and `probe_settings`; Zhang & Zhu, "Interpreting Adversarially
Trained Convolutional Neural Networks", ICML 2019): accuracy on the first n test images after transforms that keep
shapes and flatten texture (saturation, level p) or keep local texture and destroy shape (patch shuffling, level k:
a k×k grid of patches permuted), in eval mode. The paper finds adversarially trained CNNs more accurate than
standard ones under saturation and less accurate under patch shuffling (they rely on shapes, not texture).

report.json `probes` is a list of rows {"probe", "level", "accuracy"}: first {"probe": "clean", "level": null} (the
report's clean_accuracy, so the table and figure read on their own), then one row per probe and level in the order
asked (`saturation_levels` for saturation, `shuffle_levels` for patch_shuffle). `probe_settings`: seed, n, levels,
image size, seconds and the figure's file (null without one).

Patch shuffling draws one permutation per image from a torch.Generator seeded by (options.seed, PROBES_STREAM, k):
the transformed images depend on the seed and k alone, not on the batch size, the other levels or the number of
processes. Several processes: each transforms all n images (cheap, and the same everywhere) and predicts on its
share of the batches (`ev.split`), summed, so the numbers equal one process's. The figure `probes.png` (accuracy
against level per probe; the first test image under each level) is drawn by the first process alone, when pictures
are on and there is an output folder.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import ClassVar

import torch

from robust_train.distributed import batch_seed
from robust_train.evaluate.accuracy import correct_under, mean, predictions
from robust_train.evaluate.evaluation import Evaluation
from robust_train.evaluate.probes import PROBES
from robust_train.evaluate.sections.base import Section, add_pictures, register_section

PROBES_STREAM = 5  # random stream of batch_seed, apart from the suite's, transfer's, stability's and minimal's
PICTURE = "probes.png"
LEVEL_OPTIONS = {"saturation": "saturation_levels", "patch_shuffle": "shuffle_levels"}  # EvaluateOptions fields
LEVEL_SYMBOL = {"saturation": "p", "patch_shuffle": "k"}


def probe_levels(options, name: str) -> list:
    """The levels asked of probe `name` (a probe without an option of its own: its class's default levels)."""
    option = LEVEL_OPTIONS.get(name)
    return list(getattr(options, option)) if option else list(PROBES.get(name).levels)


def probe_generator(seed: int, level) -> torch.Generator:
    """The generator of one probe level's random draws: the same for the same seed and level, whatever else ran."""
    return torch.Generator().manual_seed(batch_seed(seed, PROBES_STREAM, round(float(level) * 1000)))


def transformed(name: str, x: torch.Tensor, level, seed: int) -> torch.Tensor:
    """x under probe `name` at `level`, random draws from `probe_generator(seed, level)`."""
    return PROBES.get(name)()(x, level, probe_generator(seed, level))


def level_label(name: str, level) -> str:
    return "clean" if level is None else f"{LEVEL_SYMBOL.get(name, 'level ')}={level:g}"


def probe_rows(ev: Evaluation) -> list[dict]:
    """The clean row, then one {"probe", "level", "accuracy"} per probe and level (every process gets all rows)."""
    opts = ev.options
    rows = [{"probe": "clean", "level": None, "accuracy": mean(ev.clean)}]
    for name in opts.probes:
        for level in probe_levels(opts, name):
            x = transformed(name, ev.x, level, opts.seed)
            correct = correct_under(ev.model, x, ev.y, None, opts.batch_size, ev.split)
            rows.append({"probe": name, "level": level, "accuracy": mean(correct)})
    return rows


def probes_figure(ev: Evaluation, rows: list[dict], path: Path):
    """Row per probe: its accuracy against level (the clean accuracy dashed), then the first test image clean and
    under each level, titled with the model's prediction (red: wrong). Saved to `path`; returns the Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from robust_train.figures.base import (DPI, PANEL_INCHES, RIGHT_COLOR, WRONG_COLOR, class_name, save_png,
                                           show_image)

    opts, names = ev.options, list(ev.options.probes)
    class_names = ev.info["data_spec"].get("class_names")
    image, label = ev.x[:1], int(ev.y[0])
    cols = 2 + max(len(probe_levels(opts, name)) for name in names)
    fig = Figure(figsize=(cols * PANEL_INCHES, len(names) * PANEL_INCHES * 1.1), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(names), cols, squeeze=False)
    clean = rows[0]["accuracy"]
    for r, name in enumerate(names):
        levels = probe_levels(opts, name)
        plot = axes[r, 0]
        accuracy = [row["accuracy"] for row in rows if row["probe"] == name]
        plot.plot(levels, accuracy, marker="o")
        plot.axhline(clean, color="grey", linestyle="--", linewidth=1)
        if name == "saturation" and len(levels) > 1 and min(levels) > 0:
            plot.set_xscale("log", base=2)
            plot.minorticks_off()
        plot.set_xticks(levels, [f"{level:g}" for level in levels])
        plot.set_ylim(0, 1.02)
        plot.set_xlabel(LEVEL_SYMBOL.get(name, "level"), fontsize=8)
        plot.set_ylabel("accuracy", fontsize=8)
        plot.set_title(name, fontsize=9)
        plot.tick_params(labelsize=7)
        shown = [(None, image), *((level, transformed(name, image, level, opts.seed)) for level in levels)]
        for c, (level, xs) in enumerate(shown, start=1):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            show_image(ax, xs[0])
            pred = int(predictions(ev.model, xs, 1)[0])
            ax.set_title(f"{level_label(name, level)} · pred {class_name(pred, class_names)}", fontsize=8,
                         color=WRONG_COLOR if pred != label else RIGHT_COLOR)
        for c in range(len(shown) + 1, cols):
            axes[r, c].axis("off")
    axes[0, 1].set_ylabel(f"true {class_name(label, class_names)}", fontsize=8)
    save_png(fig, path)
    return fig


@register_section("probes")
class Probes(Section):
    order = 45  # after the attacks, which it does not need; before the pictures (its figure joins their list)
    title = "Shape-bias probes"
    fields: ClassVar[dict] = {"probes": [], "probe_settings": {}}

    def prepare(self, ev: Evaluation) -> None:
        side = min(ev.x.shape[-2:])
        for name in ev.options.probes:  # a level too fine for these images fails now, before any attack
            for level in probe_levels(ev.options, name):
                PROBES.get(name)().check_level(level, side)

    def run(self, ev: Evaluation) -> dict:
        opts = ev.options
        if not opts.probes:
            return {}
        t0 = time.perf_counter()
        rows = probe_rows(ev)
        settings = {"seed": opts.seed, "n": len(ev.x), "levels": {name: probe_levels(opts, name)
                                                                 for name in opts.probes},
                    "image_size": list(ev.x.shape[-2:]), "picture": None}
        fields = {"probes": rows, "probe_settings": settings}
        if opts.pictures and opts.out is not None and len(ev.x) and ev.split.main:
            fig = probes_figure(ev, rows, Path(opts.out) / PICTURE)
            settings["picture"] = PICTURE
            # The Figure, as the pictures section gives its own: log_to_wandb renders every value with
            # figure_to_array (add_pictures' docstring says RGB arrays, which log_to_wandb does not take yet).
            fields["pictures"] = add_pictures(ev, {PICTURE: fig})
        settings["seconds"] = round(time.perf_counter() - t0, 2)
        return fields

    def text(self, report: dict) -> str:
        rows = report.get("probes") or []
        if not rows:
            return ""
        settings = report.get("probe_settings") or {}
        clean = next((r["accuracy"] for r in rows if r["probe"] == "clean"), None)
        lines = ["| probe | level | accuracy | Δ clean |", "|---|---|---|---|"]
        for r in rows:
            acc = r["accuracy"]
            known = acc is not None and not (isinstance(acc, float) and math.isnan(acc))
            delta = (f"{acc - clean:+.4f}" if known and clean is not None and r["probe"] != "clean" else "")
            level = "" if r["level"] is None else f"{LEVEL_SYMBOL.get(r['probe'], '')} = {r['level']:g}"
            lines.append(f"| {r['probe']} | {level} | {acc:.4f} | {delta} |" if known else
                         f"| {r['probe']} | {level} | – | |")
        return (f"Accuracy on the first {settings.get('n')} test images, transformed (Zhang & Zhu 2019): saturation "
                f"(p = 2 is the image itself, large p binarises it) keeps shapes and flattens texture; patch "
                f"shuffling (a k×k grid of patches permuted, seed {settings.get('seed')}) keeps texture and "
                f"destroys shape. Adversarially trained CNNs are reported to do better than standard ones under "
                f"saturation and worse under shuffling.\n\n" + "\n".join(lines))


@register_section("probes_picture")
class ProbesPicture(Section):
    """The link to probes.png in report.md, beside the other pictures (links mean nothing on the console)."""

    order = 55
    on_console = False

    def run(self, ev: Evaluation) -> dict:
        return {}

    def text(self, report: dict) -> str:
        picture = (report.get("probe_settings") or {}).get("picture")
        if not picture or picture not in (report.get("pictures") or []):
            return ""
        return (f"Shape-bias probes: accuracy against level (dashed: clean), and test image 0 under each level "
                f"(red title: wrong).\n\n![shape-bias probes]({picture})")
