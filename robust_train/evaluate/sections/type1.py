"""Type-I attack (`--type1 SVAE_CKPT`, report.json `type1`; Tang et al. 2019, see robust_train/attacks/type1.py):
through a supervised VAE trained with `fit --recipe svae`, the code z = μ(x) of each of the first min(n, 100) test
images the evaluated classifier gets right is moved until the SVAE's head reads it as a target class, while the
decoded image dec(z) keeps the classifier's label. Beside the Type-II attacks of the suite (same image, other label),
it measures the opposite failure: another image (to the attacker's model), same label.

report.json `type1` (null without --type1): {"svae": the checkpoint, "n": images attacked, "steps", "lr",
"label_weight", "prior_weight" (the attack's settings), "success_rate" (the SVAE's head reads the final code as the
target and the classifier keeps its label), "decoded_changed_rate" (the first part alone), "label_kept_rate" (the
second alone), "reencoded_rate" (the SVAE's own classifier, head(μ(·)), reads the decoded image itself as the target:
a look at the picture rather than at the code), "reencoded_success_rate" (that and the label kept), "svae_accuracy"
(the SVAE's accuracy on the evaluated test images), "targets" (how the targets were chosen), "picture" (file or
null; with a picture also "picture_index", "picture_label", "picture_target", "picture_success"), "seconds"}. Target per image: the SVAE's likeliest class other than the label. The picture
`type1_transition.png` (when pictures are on and there is an output folder) follows one image, an MNIST 7 driven to 9
when one is attacked (as the Type-II transition), else the first: the image, then the decoded frames along the path,
titled with the SVAE head's class of the code and the classifier's class, and under them the CAM of the classifier's
class when the classifier has a feature map. It runs on the first process alone."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from robust_train.attacks.type1 import type1_attack
from robust_train.checkpoint import classifier_from_checkpoint, read_checkpoint
from robust_train.errors import ConfigError
from robust_train.evaluate.accuracy import mean, predictions
from robust_train.evaluate.evaluation import Evaluation
from robust_train.evaluate.sections.base import Section, add_pictures, register_section
from robust_train.evaluate.sections.pictures import transition_choice

MAX_IMAGES = 100
STEPS, LR, LABEL_WEIGHT, PRIOR_WEIGHT, FRAMES = 100, 0.05, 0.3, 1.0, 8  # type1_attack's defaults (see there)
PICTURE = "type1_transition.png"
TARGETS = "the SVAE's likeliest class other than the label"


def rate(value) -> str:
    """A rate as text: 4 decimals, "–" when there is none (no image attacked: NaN, null in report.json)."""
    return "–" if value is None or math.isnan(value) else f"{value:.4f}"


def read_svae(path: str | Path, info: dict, x: torch.Tensor) -> nn.Module:
    """The SVAE of an `svae` checkpoint; ConfigError (one line) when it cannot be read or does not fit the evaluated
    data: other image shape (channels, height, width) or another number of classes."""
    try:
        ckpt = read_checkpoint(path)
        if ckpt["robust_train"].get("arch") != "svae":
            raise ConfigError(f"{path} holds a {ckpt['robust_train'].get('arch')!r} model, not an svae")
        svae = classifier_from_checkpoint(ckpt)
    except ConfigError as e:
        raise ConfigError(f"--type1: {e}") from None
    theirs = (svae.in_channels, *svae.image_size)
    ours = tuple(x.shape[1:])
    if theirs != ours:
        raise ConfigError(f"--type1: the SVAE of {path} takes {'x'.join(map(str, theirs))} images, the evaluated "
                          f"data are {'x'.join(map(str, ours))}: train the SVAE on the same data")
    classes = int(info["data_spec"]["num_classes"])
    if svae.head.out_features != classes:
        raise ConfigError(f"--type1: the SVAE of {path} has {svae.head.out_features} classes, the evaluated "
                          f"checkpoint {classes}: train the SVAE on the same data")
    return svae


def svae_targets(svae: nn.Module, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Per image, the SVAE's likeliest class other than `label`."""
    with torch.no_grad():
        logits = svae(x).clone()
    logits[torch.arange(len(x), device=x.device), label] = float("-inf")
    return logits.argmax(1)


def type1_figure(classifier: nn.Module, svae: nn.Module, x: torch.Tensor, result, maps: bool,
                 class_names=None, path: Path | None = None):
    """One image's Type-I path: row 1 the image, then the decoded frames; row 2 (with `maps`) the CAM of the
    classifier's class over each. Titles: the step, the SVAE head's class of the code (of μ(x) for the image) and the
    classifier's class, red when the classifier's class is not the label any more."""
    from robust_train.figures.base import (RIGHT_COLOR, WRONG_COLOR, cam_overlay, class_name, new_figure, save_png,
                                           show_image)
    from robust_train.interpret.cam import all_class_cams
    from robust_train.modes import model_mode

    frames, codes = result.frames[:, 0], result.frame_z[:, 0]
    images = torch.cat([x, frames])
    with model_mode(svae, "eval", grad=False), model_mode(classifier, "eval", grad=False):
        svae_class = torch.cat([svae(x), svae.classify(codes)]).argmax(1)
        if maps:
            cams, logits = all_class_cams(classifier, images)
        else:
            cams, logits = None, classifier(images)
    f_class = logits.argmax(1)
    label, target = int(result.label[0]), int(result.target[0])
    fig, axes = new_figure(2 if maps else 1, len(images))
    for k in range(len(images)):
        show_image(axes[0, k], images[k])
        head = "image" if k == 0 else f"step {result.frame_steps[k - 1]}"
        axes[0, k].set_title(f"{head}\nSVAE {class_name(int(svae_class[k]), class_names)} · "
                             f"f {class_name(int(f_class[k]), class_names)}", fontsize=8,
                             color=WRONG_COLOR if int(f_class[k]) != label else RIGHT_COLOR)
        if maps:
            axes[1, k].imshow(cam_overlay(images[k], cams[k, int(f_class[k])]), interpolation="nearest")
    axes[0, 0].set_ylabel(f"{class_name(label, class_names)} → SVAE {class_name(target, class_names)}", fontsize=8)
    if maps:
        axes[1, 0].set_ylabel("CAM of f's class", fontsize=8)
    if path is not None:
        save_png(fig, path)
    return fig


@register_section("type1")
class Type1(Section):
    order = 46  # after the suite (which it does not need) and probes (45); before the pictures, whose list it joins
    title = "Type-I attack"
    fields: ClassVar[dict] = {"type1": None}

    def prepare(self, ev: Evaluation) -> None:
        if ev.options.type1 is not None:  # a bad or mismatched SVAE fails now, before any attack
            ev.results["type1_svae"] = read_svae(ev.options.type1, ev.info, ev.x).to(ev.device)

    def run(self, ev: Evaluation) -> dict:
        svae = ev.results.get("type1_svae")
        if svae is None or not ev.split.main:
            return {}
        opts, t0 = ev.options, time.perf_counter()
        rows = ev.clean.nonzero().flatten()[:MAX_IMAGES]
        x, label = ev.x[rows], ev.y[rows]
        torch.manual_seed(opts.seed)  # the attack draws nothing; kept so that any later change stays reproducible
        parts = []
        for start in range(0, len(x), opts.batch_size):
            xb, yb = x[start:start + opts.batch_size], label[start:start + opts.batch_size]
            parts.append(type1_attack(svae, ev.model, xb, svae_targets(svae, xb, yb), label=yb, steps=STEPS, lr=LR,
                                      label_weight=LABEL_WEIGHT, prior_weight=PRIOR_WEIGHT, frames=2))
        got = {name: torch.cat([getattr(p, name) for p in parts]) if parts else torch.zeros(0, dtype=torch.long)
               for name in ("success", "decoded_changed", "label_kept", "reencoded_pred", "target")}
        reencoded, kept = got["reencoded_pred"] == got["target"], got["label_kept"].bool()
        type1 = {"svae": str(opts.type1), "n": len(x), "steps": STEPS, "lr": LR, "label_weight": LABEL_WEIGHT,
                 "prior_weight": PRIOR_WEIGHT, "success_rate": mean(got["success"]),
                 "decoded_changed_rate": mean(got["decoded_changed"]), "label_kept_rate": mean(got["label_kept"]),
                 "reencoded_rate": mean(reencoded), "reencoded_success_rate": mean(reencoded & kept),
                 "svae_accuracy": mean(predictions(svae, ev.x, opts.batch_size) == ev.y), "targets": TARGETS,
                 "picture": None}
        fields = {"type1": type1}
        if opts.pictures and opts.out is not None and len(x):
            from robust_train.figures import figure_to_array  # matplotlib

            spec = ev.info["data_spec"]
            index, target = transition_choice(svae, x, label, torch.ones_like(label, dtype=torch.bool),
                                              spec.get("name"), int(spec.get("num_classes", 0)))
            one = type1_attack(svae, ev.model, x[index:index + 1], target, label=label[index:index + 1],
                               steps=STEPS, lr=LR, label_weight=LABEL_WEIGHT, prior_weight=PRIOR_WEIGHT,
                               frames=FRAMES)
            fig = type1_figure(ev.model, svae, x[index:index + 1], one, ev.has_maps, spec.get("class_names"),
                               Path(opts.out) / PICTURE)
            type1.update({"picture": PICTURE, "picture_index": int(rows[index]), "picture_label": int(label[index]),
                          "picture_target": int(target), "picture_success": bool(one.success[0])})
            fields["pictures"] = add_pictures(ev, {PICTURE: figure_to_array(fig)})
        type1["seconds"] = round(time.perf_counter() - t0, 2)
        return fields

    def text(self, report: dict) -> str:
        t = report.get("type1")
        if not t:
            return ""
        r = {k: rate(t.get(k)) for k in ("svae_accuracy", "success_rate", "decoded_changed_rate", "label_kept_rate",
                                         "reencoded_rate", "reencoded_success_rate")}
        line = (f"Through the SVAE `{t['svae']}` (accuracy {r['svae_accuracy']} on the evaluated test images), on the "
                f"first {t['n']} correctly classified ones, target {t['targets']}: success **{r['success_rate']}** "
                f"(the SVAE's head reads the moved code as the target: {r['decoded_changed_rate']}; the classifier "
                f"keeps its label on the decoded image: {r['label_kept_rate']}). The SVAE re-reading the decoded "
                f"image itself sees the target on {r['reencoded_rate']} ({r['reencoded_success_rate']} with the "
                f"label kept). Adam on z, {t['steps']} steps of lr {t['lr']:g}, label weight {t['label_weight']:g}, "
                f"prior weight {t['prior_weight']:g}.")
        picture = t.get("picture")
        if picture and picture in (report.get("pictures") or []):
            outcome = "a success" if t.get("picture_success") else "not a success"
            line += (f"\n\nTest image {t['picture_index']} (class {t['picture_label']}) driven to SVAE class "
                     f"{t['picture_target']} ({outcome}): the decoded frames, titled with the SVAE's class of the "
                     f"code and the classifier's class (red: the label is lost), over the classifier's CAM of its "
                     f"class.\n\n![Type-I transition]({picture})")
        return line
