"""`python -m robust_train evaluate --ckpt PATH`: accuracy of a checkpoint under attack over an ε grid.

Robust accuracy at each ε is the per-example worst case over every attack run (an example counts as robust only
if no attack broke it), not the minimum of the per-attack means, which would overstate robustness.

The report also measures how far an attack moves the model's interpretation map (Boopathy et al., ICML 2020; see
`robust_train.interpret.stability`): for each ε > 0 and each stability attack, Kendall's τ-b between the clean and
the adversarial true-class map at feature resolution and the top-k overlap, averaged over the first
`stability_n` images whose predicted label the attack did not change (`n_used` says how many; constant maps,
whose τ is undefined, are counted in `n_constant` and left out). The stability attacks are

* `aai`: the attack against interpretability, 200 steps of 0.01 from a random start on the map's top-k mass
  (the authors' evaluation, methods.md §9), attacking the same map and k that are measured;
* `pgd`: a plain L∞ PGD on cross-entropy, 40 steps of 2.5·ε/40 from a random start, last iterate (Madry et al.'s
  step rule; not the suite's 100-step cosine PGD, whose job is breaking labels, not comparing maps);
* any other preset of `robust_train.attacks.suite` by name (e.g. `pgd200`, the paper's 200 steps of 0.01).

Gradient-masking checks (`robust_train.masking_checks`, in the spirit of AutoAttack's flags) run on the first
`checks_n` images at the main ε (the training ε, else the middle of the grid's positive values): accuracy that does
not fall with ε or with more steps, PGD weaker than FGSM, accuracy above 0 at ε = 1, random noise or transferred
examples beating the white-box attacks, exactly zero input gradients. They go into report["checks"] with
report["masking_suspected"] (any failed). `--transfer-from CKPT` crafts the suite's `pgd` on another checkpoint at
the main ε and evaluates this one on the result (report["transfer"], and the black-box check).

With an output folder, pictures are saved beside report.md (each PNG written atomically, before the report that
links them): `gallery.png`, the first images clean and attacked at every ε with the CAM of the predicted class, and
`transition.png`, one targeted PGD run (MNIST: a 7 driven to 9) with the CAMs of the true and target class at
each stage. When a wandb run is active in the process, the pictures and the stability table are logged to it.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import json
import logging
import math
import numbers
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from robust_train import masking_checks
from robust_train.attacks.aai import AAI
from robust_train.attacks.base import Attack, attack_mode, check_eps
from robust_train.attacks.pgd import PGD
from robust_train.attacks.pgd_prototype import is_prototype_model
from robust_train.attacks.suite import DEFAULT_SUITE, EXTERNAL, PRESETS, build_attack
from robust_train.checkpoint import atomic_write_text, classifier_from_checkpoint, read_checkpoint
from robust_train.distributed import Split, batch_seed, launch
from robust_train.errors import ConfigError
from robust_train.interpret.registry import MAPS

STABILITY_ATTACKS = ("aai", "pgd")
AAI_STEPS, AAI_STEP_SIZE = 200, 0.01  # Boopathy et al.'s evaluation, MNIST and CIFAR alike
STABILITY_PGD_STEPS = 40
MAIN_EPS = {"mnist": 0.3, "cifar10": 8 / 255}  # the transition picture's ε when the checkpoint was trained at ε = 0
TRANSITION = {"mnist": (7, 9)}  # (true class, target) of the transition picture, when such an image is evaluated
TRANSITION_STEPS = 40
PICTURE_FILES = ("gallery.png", "transition.png")
TRANSFER_STREAM, STABILITY_STREAM = 1, 2  # random streams of batch_seed, apart from the suite's (0, ε, attack)


def parse_eps(text: str) -> list[float]:
    """'0,0.1,8/255' -> [0.0, 0.1, 0.0313...]; fractions are parsed, never eval'ed."""
    values = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            values.append(float(Fraction(item)))
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"--eps {item!r} is not a number: give values like 0.3 or 8/255, comma-separated")
    return [check_eps(v) for v in values]


def checks_eps(info: dict, grid: Sequence[float]) -> float:
    """The ε of the masking checks and of --transfer-from: the training ε when positive, else the middle of the
    grid's positive values, else the data set's usual one."""
    train = float(info.get("eps") or 0)
    if train > 0:
        return train
    positive = sorted(e for e in grid if e > 0)
    if positive:
        return positive[len(positive) // 2]
    return MAIN_EPS.get(info["data_spec"].get("name"), 0.3)


def read_transfer_source(path: str | Path, info: dict) -> nn.Module:
    """The classifier of the --transfer-from checkpoint; ConfigError (one line) when it cannot be read or was
    trained on other data than the evaluated one."""
    try:
        source = read_checkpoint(path)
        theirs, ours = source["robust_train"]["data_spec"], info["data_spec"]
        for key in ("name", "num_classes", "in_channels"):
            if theirs.get(key) is not None and ours.get(key) is not None and theirs.get(key) != ours.get(key):
                raise ConfigError(f"checkpoint {path} has {key} {theirs.get(key)!r}, the evaluated one "
                                  f"{ours.get(key)!r}: transfer needs a model of the same data")
        return classifier_from_checkpoint(source)
    except ConfigError as e:
        raise ConfigError(f"--transfer-from: {e}") from None


def transfer_correct(source: nn.Module, model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack,
                     batch_size: int, seed: int = 0, split: Split | None = None) -> torch.Tensor:
    """Per example: does `model` still classify correctly the adversarial example crafted on `source`?"""
    split = split or Split()
    correct = torch.zeros(len(x), dtype=torch.bool, device=y.device)
    for b, rows in split.batches(len(x), batch_size):
        torch.manual_seed(batch_seed(seed, TRANSFER_STREAM, b))
        correct[rows] = predictions(model, attack(source, x[rows], y[rows]), batch_size) == y[rows]
    return split.sum(correct)


def build_datamodule(ckpt: dict, data_root: str | None):
    from robust_train.data import DATAMODULES

    saved = dict(ckpt.get("datamodule_hyper_parameters") or {})
    by_class = {cls.__name__: cls for cls in DATAMODULES.values()}
    class_name = str(saved.get("_class_path", "")).rsplit(".", 1)[-1]
    cls = by_class.get(class_name) or DATAMODULES.get(ckpt["robust_train"]["data_spec"].get("name", ""))
    if cls is None:
        raise ConfigError(f"cannot tell which data set checkpoint was trained on ({class_name or 'unknown'}); "
                          f"known: {', '.join(DATAMODULES)}")
    kwargs = {k: v for k, v in saved.items() if not k.startswith("_")}
    if data_root is not None:
        kwargs["root"] = data_root
    return cls(**kwargs)


def predictions(model, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def autoattack_row(name: str, eps: float) -> dict:
    """The report's description of an AutoAttack run (`autoattack`: APGD-CE + APGD-T; `autoattack_standard`)."""
    return {"attack": name, "norm": "linf", "eps": eps, "steps": 100 if eps > 0 else 0, "step_size": None,
            "restarts": 1, "loss": "ce+dlr", "targeted": False}


def run_autoattack(model, x, y, eps, batch_size, device, version, seed) -> torch.Tensor:
    """Per example: still correct after AutoAttack (its own package) at ε?"""
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        raise ConfigError("--attacks autoattack needs the AutoAttack package: pip install 'robust-train[autoattack]'")
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    if version == "standard":
        aa = AutoAttack(model, eps=eps, norm="Linf", device=device, seed=seed, version="standard")
    else:  # APGD-CE + APGD-T (9 target classes) as in standard AutoAttack, without FAB-T and Square
        aa = AutoAttack(model, eps=eps, norm="Linf", device=device, seed=seed, version="custom",
                        attacks=["apgd-ce", "apgd-t"])
        aa.apgd.n_restarts = 1
    _, y_adv = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    return y_adv.to(y.device) == y


def finite_or_none(value):
    """NaN and ±inf -> None (JSON null); anything else unchanged."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def json_safe(obj):
    """A copy of a report in which every non-finite float is None, so `json.dumps(..., allow_nan=False)` works
    (plain `json.dumps` writes NaN, which is not JSON)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return finite_or_none(obj)


def has_feature_map(model: nn.Module) -> bool:
    """Whether the model keeps the Classifier contract that maps need: `features`, a linear `head` after GAP."""
    return (callable(getattr(model, "features", None)) and isinstance(getattr(model, "head", None), nn.Linear)
            and callable(getattr(model, "logits_from_features", None)))


def differentiable_map(map_fn: Callable) -> Callable:
    """The map with `create_graph=True` when it takes that argument (Grad-CAM, saliency, IG, ...), so that an
    attack can descend through it; CAM is differentiable as it is."""
    try:
        takes_graph = "create_graph" in inspect.signature(map_fn).parameters
    except (TypeError, ValueError):
        takes_graph = False
    return functools.partial(map_fn, create_graph=True) if takes_graph else map_fn


def build_stability_attack(name: str, eps: float, steps: int | None = None, map_fn: Callable | None = None,
                           k: int = 8) -> Attack:
    """The attack `name` as used for map stability (see the module docstring); steps=None keeps its default."""
    if name == "aai":
        return AAI(eps, k=k, steps=steps or AAI_STEPS, step_size=AAI_STEP_SIZE, map_fn=map_fn)
    if name == "pgd":
        return PGD(eps, steps=steps or STABILITY_PGD_STEPS, keep_best=False)
    if name in PRESETS:
        return build_attack(name, eps, steps)
    known = ", ".join(["aai", "pgd", *sorted(n for n in PRESETS if n != "pgd")])
    raise ConfigError(f"unknown stability attack {name!r}: choose from {known}, or none")


def check_attacks(attacks: list[str], steps: int | None, restarts: int | None) -> list[str]:
    """The attack names, after a ConfigError for any unknown one (before any work is done)."""
    for name in attacks:
        if name not in EXTERNAL:
            build_attack(name, 0.0, steps, restarts)
    return attacks


def suite_for(model: nn.Module, attacks: list[str] | None) -> list[str]:
    """The attacks to run on this model: the named ones, else the default suite, plus the adaptive
    `pgd_prototype` on a ProtoPNet, whose log similarity can saturate every loss on its logits (see that attack)."""
    prototypes = is_prototype_model(model)
    if attacks is None:
        return [*DEFAULT_SUITE, *(["pgd_prototype"] if prototypes else [])]
    if "pgd_prototype" in attacks and not prototypes:
        raise ConfigError(f"--attacks pgd_prototype needs a ProtoPNet checkpoint; this one holds a "
                          f"{type(model).__name__}: drop pgd_prototype")
    return attacks


def check_checks_n(checks_n) -> None:
    if isinstance(checks_n, bool) or not isinstance(checks_n, numbers.Integral) or checks_n <= 0:
        raise ConfigError(f"--checks-n {checks_n!r} must be a positive integer")


def check_stability_options(stability_attacks: Sequence[str], stability_n: int, stability_steps: int | None,
                            map_name: str, topk: int, n_pictures: int) -> None:
    """Every mistake in the stability and picture options as a ConfigError, before any work."""
    for label, value in (("--stability-n", stability_n), ("--topk", topk), ("--n-pictures", n_pictures)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise ConfigError(f"{label} {value!r} must be a positive integer")
    if stability_steps is not None and (isinstance(stability_steps, bool)
                                        or not isinstance(stability_steps, numbers.Integral) or stability_steps <= 0):
        raise ConfigError(f"--stability-steps {stability_steps!r} must be a positive integer (or left out for "
                          "each attack's default)")
    MAPS.get(map_name)  # unknown map names fail with the known ones listed
    for name in stability_attacks:
        build_stability_attack(name, 0.0, stability_steps, None, topk)


def check_map_cells(model: nn.Module, x: torch.Tensor, y: torch.Tensor, map_name: str, topk: int) -> None:
    """ConfigError when k exceeds the number of cells of this model's maps (one map of one image tells)."""
    if len(x):
        with attack_mode(model, "eval"):
            cells = MAPS.get(map_name)(model, x[:1], y[:1]).flatten(1).shape[1]
        if topk > cells:
            raise ConfigError(f"--topk {topk} is larger than the {cells} cells of a {map_name} map of this model")


def measure_stability(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Callable, map_fn: Callable,
                      k: int, batch_size: int, bar=None, seed: int = 0, split: Split | None = None) -> dict:
    """Attack x in batches and aggregate τ and top-k overlap over all of them (`aggregate_stability`): one row's
    {"kendall_tau", "topk_intersection", "n_used", "n_total", "n_constant"}, NaN means when no image is usable.
    Batch b's random start comes from `batch_seed(seed, b)`; with a `split`, each rank attacks its own batches."""
    from robust_train.interpret.stability import aggregate_stability, stability_per_image  # scipy: ~1 s to import

    split = split or Split()
    per_image = torch.zeros(3, len(x), dtype=torch.float64)  # τ, top-k overlap, label unchanged (0/1)
    for b, rows in split.batches(len(x), batch_size):
        torch.manual_seed(batch_seed(seed, b))
        xb, yb = x[rows], y[rows]
        tau, top, unchanged = stability_per_image(model, xb, yb, attack(model, xb, yb), map_fn, k)
        per_image[:, rows] = torch.from_numpy(np.stack([tau, top, unchanged]).astype(np.float64))
        if bar is not None:
            bar.update(1)
    tau, top, unchanged = split.sum(per_image.to(x.device)).cpu().numpy()
    return aggregate_stability(tau, top, unchanged.astype(bool))


def stability_rows(model, x, y, grid, names, map_name, topk, steps, batch_size, progress, seed: int = 0,
                   split: Split | None = None) -> list[dict]:
    """report["map_stability"]: one row per (stability attack, ε > 0), over the images x."""
    split = split or Split()
    map_fn = MAPS.get(map_name)
    positive = [e for e in grid if e > 0]
    if positive and names:
        check_map_cells(model, x, y, map_name, topk)
    n_batches = split.count(len(x), batch_size)
    rows = []
    bar = tqdm(total=len(positive) * len(names) * n_batches, desc="map stability", unit="batch",
               disable=not progress or not positive or not names)
    for a, name in enumerate(names):
        for e in positive:
            t0 = time.perf_counter()
            bar.set_postfix_str(f"{name} eps={e:g}")
            attack = build_stability_attack(name, e, steps, differentiable_map(map_fn), topk)
            stats = measure_stability(model, x, y, attack, map_fn, topk, batch_size, bar,
                                      seed=batch_seed(seed, STABILITY_STREAM, a, round(e * 1e9)), split=split)
            rows.append({"map": map_name, "attack": name, "eps": e,
                         **{key: finite_or_none(v) for key, v in stats.items()},
                         "k": topk, "steps": attack.steps, "step_size": attack.step_size,
                         "seconds": round(time.perf_counter() - t0, 2)})
    bar.close()
    return rows


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


def make_pictures(model, x, y, clean, grid, attack_name, steps, restarts, info, out: Path, n_pictures: int,
                  seed: int, datamodule=None) -> tuple[dict, dict]:
    """Save gallery.png and transition.png into `out` (and prototypes.png for a ProtoPNet: the top prototypes each
    clean and adversarial image activates, beside the training patches they were pushed from); returns
    ({file name: Figure}, settings for the report)."""
    from robust_train.interpret.figures import attack_gallery, transition_figure  # matplotlib: only when needed

    spec = info["data_spec"]
    class_names, dataset = spec.get("class_names"), spec.get("name")
    figures, settings = {}, {}
    torch.manual_seed(seed)
    eps_list = [0.0, *(e for e in grid if e > 0)]
    count = min(n_pictures, len(x))
    figures["gallery.png"] = attack_gallery(model, x[:count], y[:count], eps_list,
                                            lambda e: build_attack(attack_name, e, steps, restarts),
                                            class_names=class_names, path=out / "gallery.png")
    settings["gallery"] = {"file": "gallery.png", "attack": attack_name, "eps": eps_list, "images": count}

    index, target = transition_choice(model, x, y, clean, dataset, int(spec.get("num_classes", 0)))
    eps = float(info.get("eps") or 0) or MAIN_EPS.get(dataset) or max(grid, default=0.0) or 0.3
    figures["transition.png"], _ = transition_figure(model, x[index:index + 1], y[index:index + 1], target, eps,
                                                     TRANSITION_STEPS, class_names=class_names,
                                                     path=out / "transition.png")
    settings["transition"] = {"file": "transition.png", "index": index, "label": int(y[index]), "target": target,
                              "eps": eps, "steps": TRANSITION_STEPS, "step_size": 2.5 * eps / TRANSITION_STEPS}
    if hasattr(model, "prototype_vectors"):
        from robust_train.callbacks.prototype_push import PrototypePush
        from robust_train.interpret.prototype import prototype_figure, prototype_sources

        x_adv = build_attack(attack_name, eps, steps, restarts)(model, x[:count], y[:count])
        sources = prototype_sources(model, PrototypePush.dataset_for(datamodule)) if datamodule is not None else None
        figures["prototypes.png"] = prototype_figure(model, x[:count], y[:count], x_adv, k=3, sources=sources,
                                                     class_names=class_names, path=out / "prototypes.png")
        settings["prototypes"] = {"file": "prototypes.png", "attack": attack_name, "eps": eps, "k": 3,
                                  "images": count}
    return figures, settings


def log_to_wandb(report: dict, figures: dict) -> bool:
    """Log the pictures and the stability table to the active wandb run, if there is one; never starts a run.
    A run can only be active if wandb was imported, so wandb is looked up in sys.modules, never imported here."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return False
    from robust_train.interpret.figures import figure_to_array

    payload = {f"evaluate/{name.rsplit('.', 1)[0]}": wandb.Image(figure_to_array(fig), caption=name)
               for name, fig in figures.items()}
    if report.get("map_stability"):
        columns = ["map", "attack", "eps", "kendall_tau", "topk_intersection", "n_used", "n_total", "n_constant",
                   "steps", "step_size"]
        payload["evaluate/map_stability"] = wandb.Table(
            columns=columns, data=[[row.get(c) for c in columns] for row in report["map_stability"]])
    if payload:
        run.log(payload)
    return True


def evaluate(ckpt_path: str, attacks: list[str] | None = None, eps: list[float] | None = None, n: int = 1000,
             batch_size: int = 250, device: str | None = None, data_root: str | None = None,
             steps: int | None = None, restarts: int | None = None, seed: int = 0, progress: bool = True,
             stability_attacks: Sequence[str] = STABILITY_ATTACKS, stability_n: int = 200,
             stability_steps: int | None = None, map_name: str = "cam", topk: int = 8, pictures: bool = True,
             n_pictures: int = 6, out: str | Path | None = None, checks: bool = True, checks_n: int = 200,
             transfer_from: str | Path | None = None, split: Split | None = None) -> dict:
    """Run the suite, the map-stability attacks and (with `out`) the pictures; return the report as a dict (see
    `write_report`, which writes it into the same folder).

    stability_attacks: names (see the module docstring; empty disables), run on the first `stability_n` of the n
    images at each ε > 0; stability_steps: their iterations (None: AAI 200, PGD 40); map_name/topk: the
    interpretation map (`robust_train.interpret.MAPS`) and k of the top-k overlap (and of AAI). pictures: save
    `n_pictures` images as gallery.png and a transition.png into `out` (no pictures without `out`).
    checks: run the gradient-masking checks on the first `checks_n` images (see the module docstring);
    transfer_from: a checkpoint of the same data whose PGD examples are evaluated on this model (black box).
    split: this process's share when several evaluate together (`robust_train.distributed`): the suite, transfer
    and stability batches are shared out and summed, with the same numbers as one process; the checks and the
    pictures run on rank 0 alone, and only rank 0 logs.
    """
    split = split or Split()
    progress = progress and split.main
    attacks = check_attacks(list(attacks), steps, restarts) if attacks else None
    stability_attacks = list(stability_attacks or ())
    check_stability_options(stability_attacks, stability_n, stability_steps, map_name, topk, n_pictures)
    check_checks_n(checks_n)
    ckpt = read_checkpoint(ckpt_path)
    info = ckpt["robust_train"]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = classifier_from_checkpoint(ckpt).to(device)
    attacks = suite_for(model, attacks)
    source = read_transfer_source(transfer_from, info).to(device) if transfer_from is not None else None
    grid = list(eps if eps is not None else info["data_spec"].get("eps_grid") or [info["eps"]])
    datamodule = build_datamodule(ckpt, data_root)
    x, y = datamodule.test_tensors(n)
    x, y = x.to(device), y.to(device)
    maps_ok = has_feature_map(model)
    if maps_ok and stability_attacks and any(e > 0 for e in grid):
        check_map_cells(model, x, y, map_name, topk)  # before the long attacks, not after
    torch.manual_seed(seed)

    clean = predictions(model, x, batch_size) == y
    rows, robust, worst_by_eps = [], {}, {}
    bar = tqdm(total=len(grid) * len(attacks) * split.count(len(x), batch_size), desc="evaluate", unit="batch",
               disable=not progress)
    for ei, e in enumerate(grid):
        worst = clean.clone()
        for ai, name in enumerate(attacks):
            t0 = time.perf_counter()
            bar.set_postfix_str(f"{name} eps={e:g}")
            external = name in EXTERNAL
            attack = None if external else build_attack(name, e, steps, restarts)
            correct = torch.zeros_like(clean)
            for b, part in split.batches(len(x), batch_size):
                # Batch b's random draws depend only on (seed, ε, attack, b): the same on any rank, in any order.
                torch.manual_seed(batch_seed(seed, 0, ei, ai, b))
                if external and e == 0:
                    correct[part] = clean[part]
                elif external:
                    correct[part] = run_autoattack(model, x[part], y[part], e, batch_size, device,
                                                   "standard" if name == "autoattack_standard" else "custom", seed)
                else:
                    correct[part] = predictions(model, attack(model, x[part], y[part]), batch_size) == y[part]
                bar.update(1)
            correct = split.sum(correct)
            row = autoattack_row(name, e) if external else attack.describe()
            row = {"name": name, **row, "accuracy": correct.float().mean().item()}
            row["seconds"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
            worst &= correct
        robust[f"{e:g}"] = worst.float().mean().item()
        worst_by_eps[e] = worst
    bar.close()

    main_eps = checks_eps(info, grid)
    suite_worst = next((w for e, w in worst_by_eps.items() if abs(e - main_eps) < 1e-12), None)
    transfer, transfer_ok = None, None
    if source is not None:
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        attack = build_attack("pgd", main_eps, steps, restarts)
        attack.early_stop = False  # the highest-loss example on the source transfers best, not the first that fools it
        transfer_ok = transfer_correct(source, model, x, y, attack, batch_size, seed, split)
        transfer = {"source": str(transfer_from), "eps": main_eps, "attack": attack.describe(), "n": len(x),
                    "accuracy": transfer_ok.float().mean().item(),
                    "source_accuracy": (predictions(source, x, batch_size) == y).float().mean().item(),
                    "seconds": round(time.perf_counter() - t0, 2)}
    check_rows, checks_settings = [], {}
    if checks and split.main:
        t0 = time.perf_counter()
        count = min(checks_n, len(x))
        at_main = {r["name"]: r["accuracy"] for r in rows if abs(r["eps"] - main_eps) < 1e-12}
        reuse = (at_main["fgsm"], at_main["pgd"]) if {"fgsm", "pgd"} <= set(at_main) else None
        check_rows = masking_checks.run_checks(
            model, x[:count], y[:count], main_eps, robust_by_eps=robust, n_eval=len(x),
            white_correct=None if suite_worst is None else suite_worst[:count], reuse_fgsm_pgd=reuse,
            transfer_correct=transfer_ok, transfer_white=suite_worst, batch_size=batch_size, seed=seed)
        checks_settings = {"eps": main_eps, "n": count, "seconds": round(time.perf_counter() - t0, 2)}
    if transfer is not None and suite_worst is not None:
        transfer["white_box_accuracy"] = suite_worst.float().mean().item()

    notes, stability, figures, picture_settings = [], [], {}, {}
    if not maps_ok and (stability_attacks or (pictures and out is not None)):
        notes.append(f"{type(model).__name__} has no `features`/linear `head` (the Classifier contract), so no "
                     "interpretation maps: map stability and pictures were skipped.")
    if is_prototype_model(model):
        notes.append("ProtoPNet: its log similarity can saturate every loss on its logits, so cross-entropy and "
                     "margin PGD may overstate its robustness and the masking checks may fail on them; "
                     + ("the suite ran pgd_prototype (the adaptive attack on head(−distance)), so the worst case "
                        "above includes it." if "pgd_prototype" in attacks else
                        "add pgd_prototype to --attacks (the adaptive attack on head(−distance)) before quoting "
                        "robust accuracy."))
    if maps_ok and stability_attacks:
        torch.manual_seed(seed)  # the stability numbers do not depend on which accuracy attacks ran before
        count = min(stability_n, len(x))
        stability = stability_rows(model, x[:count], y[:count], grid, stability_attacks, map_name, topk,
                                   stability_steps, batch_size, progress, seed, split)
    if maps_ok and pictures and out is not None and len(x) and split.main:
        gallery_attack = next((a for a in attacks if a not in EXTERNAL), "pgd")
        figures, picture_settings = make_pictures(model, x, y, clean, grid, gallery_attack, steps, restarts, info,
                                                  Path(out), n_pictures, seed, datamodule)
    report = {
        "checkpoint": str(ckpt_path),
        "recipe": info.get("recipe", "unknown"),
        "method": info.get("method"),
        "arch": info.get("arch"),
        "dataset": info["data_spec"].get("name"),
        "train_eps": info.get("eps"),
        "n_examples": len(x),
        "seed": seed,
        "clean_accuracy": clean.float().mean().item(),
        "attacks": rows,
        "robust_accuracy": robust,
        "map_stability": stability,
        "pictures": list(figures),
        "picture_settings": picture_settings,
        "checks": check_rows,
        "masking_suspected": masking_checks.masking_suspected(check_rows) if checks else None,
        "checks_settings": checks_settings,
        "transfer": transfer,
        "notes": notes,
        "device": str(device),
        "processes": split.world,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if split.main:
        log_to_wandb(report, figures)
    return report


def format_table(report: dict) -> str:
    """Rows: ε; columns: each attack's accuracy and the per-example worst case."""
    names = list(dict.fromkeys(r["name"] for r in report["attacks"]))
    by = {(f"{r['eps']:g}", r["name"]): r["accuracy"] for r in report["attacks"]}
    header = ["eps", *names, "worst case"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e, worst in report["robust_accuracy"].items():
        cells = [e, *(f"{by.get((e, n), float('nan')):.4f}" for n in names), f"**{worst:.4f}**"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def format_stability_table(report: dict) -> str:
    """Rows: stability attack × map; columns: ε; cells "τ / top-k (n used)". Empty when nothing was measured."""
    rows = report.get("map_stability") or []
    if not rows:
        return ""
    eps_cols = list(dict.fromkeys(f"{r['eps']:g}" for r in rows))
    keys = list(dict.fromkeys((r["attack"], r["map"]) for r in rows))
    by = {(r["attack"], r["map"], f"{r['eps']:g}"): r for r in rows}
    header = ["attack", "map", *(f"ε={e}" for e in eps_cols)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for attack, map_name in keys:
        cells = [attack, map_name]
        for e in eps_cols:
            r = by.get((attack, map_name, e))
            cells.append("" if r is None else
                         f"{_number(r['kendall_tau'])} / {_number(r['topk_intersection'])} (n={r['n_used']})")
        lines.append("| " + " | ".join(cells) + " |")
    first = rows[0]
    legend = (f"Cells: mean Kendall τ-b / mean top-{first.get('k', 8)} intersection between the clean and the "
              f"adversarial true-class map at feature resolution, over n of the {first['n_total']} images whose "
              f"label the attack did not change (constant maps left out; – when none is left).")
    return legend + "\n\n" + "\n".join(lines)


def format_checks_section(report: dict) -> str:
    """The transfer result and the masking checks (✓/✗ with details); empty when neither ran."""
    parts = []
    transfer = report.get("transfer")
    if transfer:
        white = transfer.get("white_box_accuracy")
        parts.append(f"Transfer (black box) from `{transfer['source']}`: PGD crafted on it at ε = {transfer['eps']:g} "
                     f"leaves accuracy **{transfer['accuracy']:.4f}** on {transfer['n']} images"
                     + (f" (white-box worst case {white:.4f})." if white is not None else "."))
    rows = report.get("checks") or []
    if rows:
        settings = report.get("checks_settings") or {}
        verdict = ("**gradient masking suspected**: the accuracies above may overstate robustness; trust the margin "
                   "loss (pgd_margin) and AutoAttack more than cross-entropy PGD" if report.get("masking_suspected")
                   else "no sign of gradient masking")
        parts.append(f"Gradient-masking checks on the first {settings.get('n')} images at "
                     f"ε = {settings.get('eps', float('nan')):g}: {verdict}.\n\n"
                     + masking_checks.format_checks(rows))
    return "\n\n".join(parts)


def format_markdown(report: dict) -> str:
    md = (f"# Evaluation of `{report['checkpoint']}`\n\n"
          f"Recipe `{report['recipe']}` ({report['method']}, {report['arch']}) on {report['dataset']}: "
          f"{report['n_examples']} test images, clean accuracy **{report['clean_accuracy']:.4f}**.\n\n"
          f"Accuracy under each attack; the last column counts an image as robust only if no attack broke it.\n\n"
          f"{format_table(report)}\n")
    checks = format_checks_section(report)
    if checks:
        md += f"\n## Gradient masking\n\n{checks}\n"
    stability = format_stability_table(report)
    if stability:
        md += f"\n## Interpretation-map stability\n\n{stability}\n"
    settings = report.get("picture_settings") or {}
    if report.get("pictures"):
        md += "\n## Pictures\n"
        gallery = settings.get("gallery")
        if gallery:
            md += (f"\nThe first {gallery['images']} images, clean (ε = 0) and attacked by `{gallery['attack']}` "
                   f"(a fresh run) at each ε; below each, the CAM of the predicted class (red title: wrong).\n\n"
                   f"![attack gallery]({gallery['file']})\n")
        transition = settings.get("transition")
        if transition:
            md += (f"\nTest image {transition['index']} (class {transition['label']}) driven to class "
                   f"{transition['target']} by a targeted L∞ PGD at ε = {transition['eps']:g} "
                   f"({transition['steps']} steps); rows: the image, the CAM of the true class, the CAM of the "
                   f"target.\n\n![targeted transition]({transition['file']})\n")
        prototypes = settings.get("prototypes")
        if prototypes:
            md += (f"\nThe {prototypes['k']} prototypes each image activates most, clean and attacked by "
                   f"`{prototypes['attack']}` at ε = {prototypes['eps']:g}: their similarity maps, and the training "
                   f"patch each prototype was pushed from.\n\n![top prototypes]({prototypes['file']})\n")
    for note in report.get("notes") or []:
        md += f"\nNote: {note}\n"
    md += f"\nAttack settings are in report.json. Device {report['device']}, {report['date']}.\n"
    return md


def write_report(report: dict, out: Path) -> None:
    """report.json (strict JSON: NaN written as null) and report.md, each written atomically; pictures, if any,
    were already saved into the same folder by `evaluate`."""
    out = Path(out)
    atomic_write_text(out / "report.json", json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / "report.md", format_markdown(report))


def check_devices(devices: str, num_nodes: int) -> int | str:
    """--devices as Fabric takes it: a positive count, or "auto"."""
    if num_nodes <= 0:
        raise ConfigError(f"--num-nodes {num_nodes} must be a positive integer")
    if devices == "auto":
        return devices
    try:
        count = int(devices)
    except ValueError:
        count = 0
    if count <= 0:
        raise ConfigError(f"--devices {devices!r} must be a positive number of processes (or auto)")
    return count


def parse_stability_attacks(text: str) -> list[str]:
    """'aai,pgd' -> ['aai', 'pgd']; 'none' (or nothing) -> []."""
    names = [a.strip() for a in text.split(",") if a.strip()]
    if [a.lower() for a in names] in ([], ["none"]):
        return []
    if any(a.lower() == "none" for a in names):
        raise ConfigError(f"--stability-attacks {text!r}: give attack names, or 'none' alone")
    return names


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="robust-train evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint written by fit (e.g. .../last.ckpt)")
    parser.add_argument("--attacks", default=None,
                        help=f"comma-separated presets (default {','.join(DEFAULT_SUITE)}, plus pgd_prototype on a "
                             "ProtoPNet); 'autoattack' runs APGD-CE + APGD-T through the pyautoattack package")
    parser.add_argument("--eps", default=None, help="comma-separated budgets, e.g. 0,0.1,0.3 or 0,2/255,8/255 "
                                                    "(default: the data set's standard grid)")
    parser.add_argument("--n", "--num-images", dest="n", type=int, default=1000,
                        help="number of test images (default 1000; spell it --num-images after torchrun, whose own "
                             "options --n would abbreviate)")
    parser.add_argument("--out", default=None, help="report folder (default: beside the checkpoint)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--steps", type=int, default=None, help="override the presets' iteration counts")
    parser.add_argument("--restarts", type=int, default=None, help="override the presets' restarts")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (one process)")
    parser.add_argument("--devices", default="1",
                        help="processes on this machine (e.g. 4 GPUs): the images are shared out and the results "
                             "gathered, with the same numbers as one process; under torchrun or SLURM the "
                             "launcher's processes are used")
    parser.add_argument("--accelerator", default="auto", help="with --devices: cpu, cuda or auto")
    parser.add_argument("--num-nodes", type=int, default=1, help="with --devices under SLURM: machines")
    parser.add_argument("--data-root", default=None, help="where the test set lives, if not where it was trained")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stability-attacks", default=",".join(STABILITY_ATTACKS),
                        help="attacks under which interpretation-map stability (Kendall τ, top-k overlap) is "
                             f"measured at each ε > 0 (default {','.join(STABILITY_ATTACKS)}; 'none' disables)")
    parser.add_argument("--stability-n", type=int, default=200,
                        help="map stability on the first N of the evaluated images (default 200, as the paper)")
    parser.add_argument("--stability-steps", type=int, default=None,
                        help=f"iterations of the stability attacks (default: AAI {AAI_STEPS}, "
                             f"PGD {STABILITY_PGD_STEPS})")
    parser.add_argument("--map", default="cam", help="interpretation map for stability (default cam; known: "
                                                     f"{', '.join(MAPS.names())})")
    parser.add_argument("--topk", type=int, default=8, help="k of the top-k overlap and of AAI (default 8)")
    parser.add_argument("--n-pictures", type=int, default=6, help="images in gallery.png (default 6)")
    parser.add_argument("--no-pictures", action="store_true", help="write no gallery.png / transition.png")
    parser.add_argument("--no-checks", action="store_true", help="skip the gradient-masking checks")
    parser.add_argument("--checks-n", type=int, default=200,
                        help="gradient-masking checks on the first N of the evaluated images (default 200)")
    parser.add_argument("--transfer-from", default=None, metavar="CKPT",
                        help="also evaluate black-box transfer: PGD crafted on this checkpoint (same data) at the "
                             "main ε, then evaluated on --ckpt")
    parser.error = lambda message: (_ for _ in ()).throw(ConfigError(f"evaluate: {message}"))  # one line, exit 2
    args = parser.parse_args(argv)
    if args.n <= 0 or args.batch_size <= 0:
        raise ConfigError("--n and --batch-size must be positive integers")
    for flag, value in (("--steps", args.steps), ("--restarts", args.restarts)):
        if value is not None and value <= 0:  # 0 would otherwise silently mean "each attack's default"
            raise ConfigError(f"{flag} {value}: use a positive number of iterations, or leave it out for the defaults")
    stability_attacks = parse_stability_attacks(args.stability_attacks)
    check_stability_options(stability_attacks, args.stability_n, args.stability_steps, args.map, args.topk,
                            args.n_pictures)  # before the checkpoint is read
    check_checks_n(args.checks_n)
    devices = check_devices(args.devices, args.num_nodes)
    ckpt = Path(args.ckpt)
    out = Path(args.out) if args.out else ckpt.parent / f"eval-{ckpt.stem}"
    attacks = (check_attacks([a.strip() for a in args.attacks.split(",") if a.strip()], args.steps, args.restarts)
               if args.attacks else None)
    eps = parse_eps(args.eps) if args.eps else None
    read_checkpoint(ckpt)  # a bad file fails here, once, not in every process
    split, device = launch(devices, args.accelerator, args.num_nodes)
    report = evaluate(str(ckpt), attacks, eps, args.n, args.batch_size, device or args.device,
                      args.data_root, args.steps, args.restarts, args.seed, progress=True,
                      stability_attacks=stability_attacks, stability_n=args.stability_n,
                      stability_steps=args.stability_steps, map_name=args.map, topk=args.topk,
                      pictures=not args.no_pictures, n_pictures=args.n_pictures, out=out,
                      checks=not args.no_checks, checks_n=args.checks_n, transfer_from=args.transfer_from,
                      split=split)
    split.barrier()
    if not split.main:
        return 0
    write_report(report, out)
    print(f"\n{report['recipe']}: clean accuracy {report['clean_accuracy']:.4f} on {report['n_examples']} images\n")
    print(format_table(report))
    checks = format_checks_section(report)
    if checks:
        print(f"\n{checks}")
    stability = format_stability_table(report)
    if stability:
        print(f"\nInterpretation-map stability\n\n{stability}")
    for note in report["notes"]:
        print(f"\nnote: {note}")
    written = ["report.json", "report.md", *report["pictures"]]
    print(f"\nwrote {', '.join(written[:-1])} and {written[-1]} in {out}")
    return 0
