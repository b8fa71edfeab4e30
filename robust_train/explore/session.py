"""What one `explore` process holds: model A (attacked, white-box), optionally model B (shown the same x',
black-box), the gallery, uploads, the class aggregates of Bluff's view, and the ε grids already computed. The
server's routes call the methods here; every result is plain JSON (pictures as PNG data URIs)."""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from robust_train.checkpoint import classifier_from_checkpoint, read_checkpoint
from robust_train.errors import ConfigError
from robust_train.explore import images as pictures
from robust_train.explore.gallery import Gallery, checkpoint_images, folder_images, measure
from robust_train.explore.grid import (PAGE_ATTACKS, AdversarialGrid, AttackChoice, adversarial_grid, map_grid,
                                       probabilities, saliency_difference, supported_maps)
from robust_train.explore.pathways import (cache_path_for, channel_curve, channel_examples, channel_layers,
                                           file_sha256, load_or_build_aggregates, pathway_graph)

MAX_UPLOADS, MAX_GRIDS = 32, 24
RANKINGS = ("adversarial", "change", "original", "target")


class RequestError(ValueError):
    """A request the page should not have made (unknown image, out-of-range class, ...): HTTP 400 with this text."""


def _int(value, name: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name}={value!r} is not a whole number") from None
    if not low <= number <= high:
        raise RequestError(f"{name}={number} is out of range: use {low}–{high}")
    return number


class Explorer:
    def __init__(self, ckpt: str, compare: str | None = None, images: str | None = None, n: int = 200,
                 data_root: str | None = None, device: str | None = None, eps_max: float | None = None,
                 points: int = 21, progress: bool = False, log=print):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.ckpt_path = Path(ckpt)
        checkpoint = read_checkpoint(ckpt)
        self.info = checkpoint["robust_train"]
        self.spec = self.info["data_spec"]
        self.model = classifier_from_checkpoint(checkpoint).to(self.device)
        self.model_b = self.compare_path = None
        if compare:
            self.compare_path = Path(compare)
            other = read_checkpoint(compare)
            theirs = other["robust_train"]["data_spec"]
            for field in ("num_classes", "in_channels", "image_size"):
                if list(map(int, [theirs[field]] if field != "image_size" else theirs[field])) != \
                        list(map(int, [self.spec[field]] if field != "image_size" else self.spec[field])):
                    raise ConfigError(f"--compare {compare} takes other inputs than --ckpt ({field} "
                                      f"{theirs[field]} vs {self.spec[field]}): compare models of one data set")
            self.model_b = classifier_from_checkpoint(other).to(self.device)
        self.num_classes = int(self.spec["num_classes"])
        self.class_names = [str(c) for c in (self.spec.get("class_names") or range(self.num_classes))]
        grid = [float(e) for e in self.spec.get("eps_grid") or [self.info.get("eps") or 0.3]]
        self.eps_max = float(eps_max) if eps_max is not None else max(grid)
        self.small_eps = sorted(e for e in grid if e > 0)[1] if len([e for e in grid if e > 0]) > 1 else self.eps_max
        self.points = points
        self.gallery: Gallery = folder_images(images, n, self.spec) if images else \
            checkpoint_images(checkpoint, n, data_root)
        measure(self.gallery, self.model, grid, self.device, progress=progress)
        probe = self.gallery.x[:1].to(self.device)
        self.maps = supported_maps(self.model, probe)
        self.maps_b = supported_maps(self.model_b, probe) if self.model_b is not None else []
        layers = [name for name, _ in channel_layers(self.model)]
        key = {"checkpoint_sha256": file_sha256(self.ckpt_path), "images": self.gallery.source,
               "n": len(self.gallery.y), "layers": layers}
        self.aggregates, status = load_or_build_aggregates(
            self.model, self.gallery.x.to(self.device), self.gallery.y.to(self.device), self.num_classes,
            cache_path_for(self.ckpt_path), key)
        log(f"explore: channel statistics of {len(layers)} layers {status} ({cache_path_for(self.ckpt_path)})")
        self.uploads: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.upload_count = 0
        self.grids: OrderedDict[tuple, AdversarialGrid] = OrderedDict()
        self.lock = threading.Lock()  # one computation at a time: torch work from several tabs would only contend

    # ----- what the page asks -----
    def describe(self) -> dict:
        return {
            "model": {"path": str(self.ckpt_path), "method": self.info.get("method"), "arch": self.info.get("arch"),
                      "maps": self.maps},
            "compare": None if self.model_b is None else {"path": str(self.compare_path), "maps": self.maps_b},
            "classes": self.class_names, "channels": int(self.spec["in_channels"]),
            "image_size": [int(s) for s in self.spec["image_size"]],
            "attacks": [{"name": k, "label": label, "norm": norm} for k, (label, norm) in PAGE_ATTACKS.items()],
            "eps_max": self.eps_max, "points": self.points, "small_eps": self.small_eps,
            "images": self.gallery.source, "layers": self.aggregates.layers, "rankings": list(RANKINGS),
        }

    def thumbnails(self, show: str = "all", cls=None, limit: int = 120) -> dict:
        cls = None if cls in (None, "", "all") else _int(cls, "class", 0, self.num_classes - 1)
        try:
            picked = self.gallery.select(show, cls, self.small_eps)
        except ValueError as e:
            raise RequestError(str(e)) from None
        rows = []
        for i in picked[:limit]:
            broken = float(self.gallery.broken_eps[i])
            rows.append({"id": f"t{i}", "label": int(self.gallery.y[i]), "pred": int(self.gallery.pred[i]),
                         "broken_eps": None if math.isnan(broken) else broken,
                         "src": pictures.image_uri(self.gallery.x[i])})
        return {"count": len(picked), "images": rows}

    def add_upload(self, data: bytes) -> dict:
        x = pictures.decode_upload(data, int(self.spec["in_channels"]), tuple(self.spec["image_size"]))
        with self.lock:
            self.upload_count += 1
            key = f"u{self.upload_count}"
            self.uploads[key] = x
            while len(self.uploads) > MAX_UPLOADS:
                self.uploads.popitem(last=False)
        return {"id": key, "src": pictures.image_uri(x[0])}

    def image(self, image_id: str) -> tuple[torch.Tensor, int | None]:
        """(1, C, H, W) on the device, and the true label when known."""
        image_id = str(image_id)
        if image_id.startswith("t"):
            i = _int(image_id[1:], "image", 0, len(self.gallery.y) - 1)
            return self.gallery.x[i:i + 1].to(self.device), int(self.gallery.y[i])
        if image_id in self.uploads:
            return self.uploads[image_id].to(self.device), None
        raise RequestError(f"unknown image {image_id!r}: pick one from the gallery or upload it again")

    def choice(self, attack: str, steps=20, target=None, map_name: str = "") -> AttackChoice:
        if attack not in PAGE_ATTACKS:
            raise RequestError(f"unknown attack {attack!r}: use one of {', '.join(PAGE_ATTACKS)}")
        steps = _int(steps, "steps", 1, 500)
        if attack == "pgd_target":
            target = _int(target, "target", 0, self.num_classes - 1)
        else:
            target = None
        if attack == "aai":
            map_name = self.check_map(map_name)
        return AttackChoice(attack, steps if attack in ("pgd", "pgd_target", "aai") else 1, target,
                            map_name if attack == "aai" else "")

    def check_map(self, name: str, maps: list[str] | None = None) -> str:
        maps = self.maps if maps is None else maps
        if name not in maps:
            raise RequestError(f"map {name!r} is not available for this model: use one of {', '.join(maps)}")
        return name

    def adversarial(self, image_id: str, choice: AttackChoice) -> tuple[torch.Tensor, int, AdversarialGrid]:
        """The image, the class the attack moves away from, and its grid (computed once, then kept)."""
        x, label = self.image(image_id)
        original = label if label is not None else int(probabilities(self.model, x).argmax())
        if choice.name == "deepfool":  # DeepFool crosses the boundary of the model's own decision
            original = int(probabilities(self.model, x).argmax())
        key = (image_id, choice)
        if key not in self.grids:
            self.grids[key] = adversarial_grid(self.model, x, original, choice, self.eps_max, self.points)
            while len(self.grids) > MAX_GRIDS:
                self.grids.popitem(last=False)
        self.grids.move_to_end(key)
        return x, original, self.grids[key]

    def grid_view(self, image_id: str, choice: AttackChoice, map_name: str, cls=None) -> dict:
        with self.lock:
            x, original, grid = self.adversarial(image_id, choice)
            cls = original if cls in (None, "") else _int(cls, "class", 0, self.num_classes - 1)
            map_name = self.check_map(map_name)
            size = tuple(x.shape[-2:])
            delta = grid.delta
            view = {
                "eps": grid.eps.tolist(), "norm": grid.norm, "minimal_norm": grid.minimal_norm,
                "original": original, "label": self.image(image_id)[1], "target": choice.target,
                "map_class": cls, "x": pictures.image_uri(x[0]),
                "adversarial": [pictures.image_uri(a) for a in grid.x_adv],
                "perturbation": [pictures.perturbation_uri(d) for d in delta],
                "linf": delta.flatten(1).abs().amax(1).tolist(), "l2": delta.flatten(1).norm(dim=1).tolist(),
                "saliency_difference": pictures.difference_uris(
                    saliency_difference(self.model, x, grid.x_adv, cls), size),
                "models": {"a": self.scores_and_map(self.model, x, grid, original, cls, map_name)},
            }
            if self.model_b is not None:
                name_b = map_name if map_name in self.maps_b else (self.maps_b[0] if self.maps_b else None)
                view["models"]["b"] = self.scores_and_map(self.model_b, x, grid, original, cls, name_b)
            return view

    def scores_and_map(self, model, x, grid: AdversarialGrid, original: int, cls: int, map_name: str | None) -> dict:
        probs = probabilities(model, grid.x_adv).cpu()
        others = probs.clone()
        others[:, original] = -1
        top5 = probs.topk(min(5, self.num_classes), dim=1)
        out = {
            "pred": probs.argmax(1).tolist(), "p_original": probs[:, original].tolist(),
            "top_other": others.argmax(1).tolist(), "p_top_other": others.max(1).values.tolist(),
            "top5": [[{"class": int(c), "p": float(p)} for p, c in zip(ps, cs)]
                     for ps, cs in zip(top5.values, top5.indices)],
            "map": None,
        }
        if map_name:
            maps = map_grid(model, map_name, x, grid.x_adv, cls)
            size = tuple(x.shape[-2:])
            out["map"] = {"name": map_name, "clean": pictures.map_uris(maps["clean"], size)[0],
                          "adversarial": pictures.map_uris(maps["adversarial"], size),
                          "tau": [None if math.isnan(t) else float(t) for t in maps["tau"]]}
        return out

    def target_class(self, x_adv: torch.Tensor, original: int, choice: AttackChoice) -> int:
        if choice.target is not None:
            return choice.target
        probs = probabilities(self.model, x_adv)[0]
        probs[original] = -1
        return int(probs.argmax())

    def pathways(self, image_id: str, choice: AttackChoice, index, k=5, rank_by: str = "adversarial") -> dict:
        with self.lock:
            x, original, grid = self.adversarial(image_id, choice)
            i = _int(index, "eps_index", 0, len(grid.eps) - 1)
            k = _int(k, "k", 1, 50)
            if rank_by not in RANKINGS:
                raise RequestError(f"rank_by={rank_by!r}: use one of {', '.join(RANKINGS)}")
            x_adv = grid.x_adv[i:i + 1]
            target = self.target_class(x_adv, original, choice)
            graph = pathway_graph(self.model, x, x_adv, original, target, self.aggregates, k=k, rank_by=rank_by)
            return {**graph, "original": original, "target_class": target, "eps": float(grid.eps[i])}

    def channel(self, image_id: str, choice: AttackChoice, layer, channel) -> dict:
        with self.lock:
            _, _, grid = self.adversarial(image_id, choice)
            layer = _int(layer, "layer", 0, len(self.aggregates.layers) - 1)
            channel = _int(channel, "channel", 0, self.aggregates.channels[layer] - 1)
            crops = channel_examples(self.model, self.gallery.x.to(self.device), self.aggregates, layer, channel)
            curve = channel_curve(self.model, grid.x_adv, layer, channel, self.aggregates)
            return {"layer": self.aggregates.layers[layer], "channel": channel, "eps": grid.eps.tolist(),
                    "curve": [float(v) for v in curve], "examples": [pictures.image_uri(c) for c in crops]}
