"""Pictures beside report.md (report.json `pictures`, `picture_settings`), each PNG written atomically before the
report that links them: `gallery.png`, the first images clean and attacked at every ε with the CAM of the predicted
class; `transition.png`, one targeted PGD run at the main ε (MNIST: a 7 driven to 9) with the CAMs of the true and
the target class at each stage; on a ProtoPNet, `prototypes.png`, the prototypes each clean and attacked image
activates most beside the training patches they were pushed from. They need an output folder and run on the first
process alone."""
from __future__ import annotations

from pathlib import Path

import torch

from robust_train.attacks import AutoAttack, create_attack
from robust_train.evaluate.evaluation import Evaluation
from robust_train.evaluate.sections.base import Section, add_pictures, register_section
from robust_train.evaluate.sections.stability import NO_MAPS_NOTE
from robust_train.models.protopnet import is_prototype_model

TRANSITION = {"mnist": (7, 9)}  # (true class, target) of the transition picture, when such an image is evaluated
TRANSITION_STEPS = 40


def transition_choice(model, x, y, clean, dataset, num_classes) -> tuple[int, int]:
    """(index into x, target class) for the transition picture: on MNIST (10 classes) a correctly classified 7
    driven to 9 when one is among x; otherwise the first correctly classified image (else the first) driven to
    its most likely wrong class, i.e. its second most likely one."""
    if dataset in TRANSITION and num_classes == 10:
        source, target = TRANSITION[dataset]
        hits = (y == source).nonzero().flatten().tolist()
        right = [i for i in hits if bool(clean[i])]
        if right or hits:
            return (right or hits)[0], target
    correct = clean.nonzero().flatten().tolist()
    index = correct[0] if correct else 0
    with torch.no_grad():
        logits = model(x[index:index + 1])[0].clone()
    logits[int(y[index])] = float("-inf")
    return index, int(logits.argmax())


def gallery_attack(suite: list[str]) -> str:
    """The suite's first attack that runs here (AutoAttack runs through its own package: too slow for a picture)."""
    return next((a for a in suite if not isinstance(create_attack(a, 0.0), AutoAttack)), "pgd")


@register_section("pictures")
class Pictures(Section):
    order = 50
    title = "Pictures"
    on_console = False  # links to PNGs mean nothing in a terminal; the files are named in the last line
    fields = {"pictures": [], "picture_settings": {}}

    def run(self, ev: Evaluation) -> dict:
        opts = ev.options
        if not opts.pictures or opts.out is None:
            return {}
        if not ev.has_maps:
            ev.note(NO_MAPS_NOTE.format(model=type(ev.model).__name__))
            return {}
        if not len(ev.x) or not ev.split.main:
            return {}
        from robust_train.figures import attack_gallery, prototype_figure, transition_figure  # matplotlib

        model, x, y, out = ev.model, ev.x, ev.y, Path(opts.out)
        spec = ev.info["data_spec"]
        class_names, dataset = spec.get("class_names"), spec.get("name")
        attack_name = gallery_attack(ev.results["suite"])
        attack_at = lambda e: create_attack(attack_name, e, steps=opts.steps, restarts=opts.restarts)  # noqa: E731
        figures, settings = {}, {}
        torch.manual_seed(opts.seed)
        eps_list = [0.0, *(e for e in ev.grid if e > 0)]
        count = min(opts.n_pictures, len(x))
        figures["gallery.png"] = attack_gallery(model, x[:count], y[:count], eps_list, attack_at,
                                                class_names=class_names, path=out / "gallery.png")
        settings["gallery"] = {"file": "gallery.png", "attack": attack_name, "eps": eps_list, "images": count}

        index, target = transition_choice(model, x, y, ev.clean, dataset, int(spec.get("num_classes", 0)))
        eps = ev.main_eps
        figures["transition.png"], _ = transition_figure(model, x[index:index + 1], y[index:index + 1], target, eps,
                                                         TRANSITION_STEPS, class_names=class_names,
                                                         path=out / "transition.png")
        settings["transition"] = {"file": "transition.png", "index": index, "label": int(y[index]),
                                  "target": target, "eps": eps, "steps": TRANSITION_STEPS,
                                  "step_size": 2.5 * eps / TRANSITION_STEPS}
        if is_prototype_model(model):
            from robust_train.callbacks.prototype_push import PrototypePush
            from robust_train.interpret.prototype import prototype_sources

            x_adv = attack_at(eps)(model, x[:count], y[:count])
            sources = prototype_sources(model, PrototypePush.dataset_for(ev.datamodule))
            figures["prototypes.png"] = prototype_figure(model, x[:count], y[:count], x_adv, k=3, sources=sources,
                                                         class_names=class_names, path=out / "prototypes.png")
            settings["prototypes"] = {"file": "prototypes.png", "attack": attack_name, "eps": eps, "k": 3,
                                      "images": count}
        return {"pictures": add_pictures(ev, figures), "picture_settings": settings}

    def text(self, report: dict) -> str:
        settings = report.get("picture_settings") or {}
        if not report.get("pictures"):
            return ""
        parts = []
        gallery = settings.get("gallery")
        if gallery:
            parts.append(f"The first {gallery['images']} images, clean (ε = 0) and attacked by `{gallery['attack']}` "
                         f"(a fresh run) at each ε; below each, the CAM of the predicted class (red title: wrong)."
                         f"\n\n![attack gallery]({gallery['file']})")
        transition = settings.get("transition")
        if transition:
            parts.append(f"Test image {transition['index']} (class {transition['label']}) driven to class "
                         f"{transition['target']} by a targeted L∞ PGD at ε = {transition['eps']:g} "
                         f"({transition['steps']} steps); rows: the image, the CAM of the true class, the CAM of the "
                         f"target.\n\n![targeted transition]({transition['file']})")
        prototypes = settings.get("prototypes")
        if prototypes:
            parts.append(f"The {prototypes['k']} prototypes each image activates most, clean and attacked by "
                         f"`{prototypes['attack']}` at ε = {prototypes['eps']:g}: their similarity maps, and the "
                         f"training patch each prototype was pushed from.\n\n![top prototypes]({prototypes['file']})")
        return "\n\n".join(parts)
