"""Are some architectures more robust than others with no adversarial training at all? VGG16, attentional pooling
and ProtoPNet, trained the same way, under FGSM, BIM, PGD and MIM: the seed's table (shared/seeds/
000_b5c68cee53e7b51a.txt, "Accuracy of different networks to attacks") reproduced on our CIFAR-10 subset.

    python bench/architectures.py [--epochs 30] [--head-epochs 10] [--batch-size 128] [--n 1017] [--device cuda]
        [--models vgg16_bn,attention_pool,protopnet] [--max-train N] [--retrain] [--data PATH]
        [--ckpt-dir bench/out/architectures] [--margin-steps 100] [--checks-n 256]
        [--out bench/out/architectures.json]

Smoke test (CPU, a few minutes, numbers meaningless; keep its checkpoints out of bench/out):

    OMP_NUM_THREADS=1 python bench/architectures.py --epochs 1 --head-epochs 3 --max-train 256 --n 64 \
        --margin-steps 20 --checks-n 32 --ckpt-dir /tmp/arch_smoke_ckpt --out /tmp/arch_smoke.json

Models: one shared backbone, then each model on it. The seed's networks were ImageNet-pretrained and fine-tuned;
we have no pretrained weights offline, so `backbone`, a vgg16_bn with GAP + linear head, is trained first from
scratch (`StandardTraining`, Adam 1e-3, cosine to 0, no weight decay, --epochs) and plays the pretrained network.
Each model then starts from its weights and trains --head-epochs more, so all three see the same backbone budget:

* `vgg16_bn`: the backbone itself (its GAP + linear head kept), `StandardTraining` at Adam 3e-4, cosine;
* `attention_pool`: the backbone's feature extractor with a new rank-1 attentional pooling head (init_std 0.1, no
  dropout, as recipes/attention_pool.yaml), the same `StandardTraining`;
* `protopnet`: the backbone's feature extractor with a new prototype layer (10 prototypes per class, D = 128),
  `ProtoPNetTraining` with the official schedule for a pretrained backbone in --head-epochs: warm (a fifth of the
  epochs: backbone frozen, add-on and prototypes at 3e-3), joint (backbone 1e-4, StepLR(5, 0.1)), one push after the
  last joint epoch, last-layer epochs (a fifth, Adam 1e-4), so the run ends on pushed prototypes (checked: the JSON
  records how many prototypes the `PrototypePush` callback placed); official loss coefficients.

Why not from scratch, as a first version of this script did: a random ProtoPNet's similarities log((d+1)/(d+1e-4))
sit near 1/d with d ≈ 20 for every image, so its logits differ across images by ~0.08 and the cross-entropy reaches
the backbone through a factor ~1/d² while the cluster cost pulls at full strength, and from scratch it stayed near
chance where the GAP model learned. ProtoPNet's warm phase assumes a trained backbone.

Training uses the Lightning Trainer on our methods in this process (logger and Lightning checkpointing off, clean
validation on the data module's 500 held-out training images each epoch). The final weights go to
<ckpt-dir>/<backbone or model>/final.ckpt (a robust_train checkpoint, `robust_train.load` reads it) with
train.json beside it; a later run reuses them when train.json's settings (for a model, the backbone's too)
equal the requested ones, unless --retrain.

Evaluation on the first --n test images (default all 1,017), L∞, images in [0, 1], the model in eval mode; the
seed's column notation (ε in /255, iterations):

* FGSM (2,1), (8,1): one signed step of α = ε from the clean image;
* BIM (ε,10): 10 steps of α = ε/10 from the clean image, last iterate (our `BIM` default; Kurakin et al.);
* PGD (ε,10): 10 steps of α = 2.5·ε/10 from a uniform random start, last iterate (Madry et al.'s step rule,
  our `PGD` default α; keep_best off, so it is the textbook attack the seed's column names);
* MIM (ε,10): 10 steps of α = ε/10 with momentum μ = 1 on the L1-normalised gradient (Dong et al., our default);
* PGDm (8,100): margin-loss PGD, the attack registry's `pgd_margin` preset (100 steps from a random
  start, α = ε on a cosine schedule, each example's best iterate), at 8/255 (--margin-steps);
* PGDp (2,100), (8,100), ProtoPNet only: the adaptive `pgd_prototype` (robust_train/attacks/pgd_prototype.py), the same
  100 cosine steps on the margin of head(−d), the logits ProtoPNet would give with a linear similarity. Its log
  similarity saturates the losses on its real logits, so CE and margin PGD overstate its robustness (the numbers
  are in bench/RESULTS.md);
* worst (ε): per example, correct on the clean image and under every attack above at that ε (not the minimum of
  the column means).

Gradient-masking checks: an iterative attack (BIM, PGD, MIM, PGDm) leaving more examples correct than FGSM at the
same ε, beyond one example of n, is flagged; `robust_train.evaluate.masking.run_checks` runs at 8/255 on the first
--checks-n images (PGD at 10 vs 40 steps, ε = 1 breaks everything, random noise not stronger, zero gradients,
monotone in ε, ...), with the FGSM and PGD columns reused for its FGSM-vs-PGD check.

The table prints our row above the seed's published one ("published, CUB-12") for each architecture. Their setting
differs from ours in everything but the attacks: 12 CUB-200 bird classes, 300 training and 299 test images, ImageNet-
pretrained networks at CUB resolution; ours is 10 CIFAR-10 classes at 32×32, 4,585 training images, on a backbone
trained here from scratch. Absolute accuracies are therefore not comparable: compare the orderings (which
architecture is most robust under each attack), which the output lists per column. --max-train and small
--epochs or --head-epochs are for smoke tests only. Figures, settings, the machine (platform, torch, device name)
and the date go to --out (JSON, written after each model so a crash keeps the finished ones).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path

import torch

from common import ROOT, device_name, log, machine_info, write_result
from robust_train.attacks import BIM, FGSM, MIM, PGD, create_attack
from robust_train.attacks.base import Attack
from robust_train.checkpoint import atomic_write_text, classifier_from_checkpoint, read_checkpoint
from robust_train.evaluate.accuracy import correct_under, mean, worst_case
from robust_train.evaluate.masking import iterative_not_weaker, masking_suspected, run_checks
from robust_train.models.protopnet import is_prototype_model

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-subset" / "cifar10_subset.npz"
DEFAULT_CKPT_DIR = ROOT / "bench" / "out" / "architectures"
MODELS = ("vgg16_bn", "attention_pool", "protopnet")
EPS = (2 / 255, 8 / 255)  # the seed's two budgets
STEPS = 10                # the seed's iterative attacks
MARGIN_EPS = 8 / 255
MARGIN_STEPS = 100        # the suite's pgd_margin preset
ATTACKS = ("fgsm", "bim", "pgd", "mim")  # the seed's column order
ITERATIVE = ("bim", "pgd", "mim", "pgd_margin", "pgd_prototype")
SEED_FILE = "shared/seeds/000_b5c68cee53e7b51a.txt (lines 240-270)"
COMMON = {"eps": 8 / 255}  # not used for training; recorded in the checkpoint
TUNE_LR = 3e-4             # Adam, cosine to 0, for every model's epochs on the trained backbone

# The seed's table: accuracy of networks under attack, 12 CUB classes, 299 test images, pretrained networks.
PUBLISHED = {
    "VGG16": {"clean": .8896, "fgsm_2": .3946, "fgsm_8": .2107, "bim_2": .1037, "bim_8": .0301,
              "pgd_2": .0535, "pgd_8": .0201, "mim_2": .1338, "mim_8": .0301},
    "Attention Pooling": {"clean": .8462, "fgsm_2": .4241, "fgsm_8": .3311, "bim_2": .2074, "bim_8": .1672,
                          "pgd_2": .1739, "pgd_8": .1472, "mim_2": .2274, "mim_8": .1739},
    "ProtoPNet": {"clean": .7692, "fgsm_2": .4415, "fgsm_8": .3779, "bim_2": .0435, "bim_8": .0334,
                  "pgd_2": .0368, "pgd_8": .0033, "mim_2": .0268, "mim_8": .0167},
}
PUBLISHED_NAME = {"vgg16_bn": "VGG16", "attention_pool": "Attention Pooling", "protopnet": "ProtoPNet"}
PUBLISHED_SETTING = {"data": "CUB-200, 12 classes", "train_images": 300, "test_images": 299,
                     "networks": "pretrained VGG16 / attention pooling / ProtoPNet"}


def eps_tag(eps: float) -> str:
    """ε in /255 units, as the seed writes it: 8/255 -> '8'."""
    return f"{round(eps * 255, 4):g}"


def column_key(attack: str, eps: float | None = None) -> str:
    return "clean" if attack == "clean" else f"{attack}_{eps_tag(eps)}"


# ------------------------------------------------------------------------------------------------------ evaluation
def build_attacks(eps_list=EPS, steps: int = STEPS, margin_eps=(MARGIN_EPS,),
                  margin_steps: int = MARGIN_STEPS, prototypes: bool = False) -> dict[str, Attack]:
    """The table's attacks by column key, in the seed's order (FGSM, BIM, PGD, MIM, each at every ε), then
    margin PGD, then (prototypes: a ProtoPNet) the adaptive pgd_prototype. Step sizes: see the module docstring."""
    attacks: dict[str, Attack] = {}
    for name in ATTACKS:
        for eps in eps_list:
            if name == "fgsm":
                attack = FGSM(eps)                                          # α = ε, no random start
            elif name == "bim":
                attack = BIM(eps, steps=steps)                              # α = ε/steps, last iterate
            elif name == "pgd":
                attack = PGD(eps, steps=steps, random_start=True, keep_best=False)  # α = 2.5ε/steps
            else:
                attack = MIM(eps, steps=steps)                              # α = ε/steps, μ = 1
            attacks[column_key(name, eps)] = attack
    for eps in margin_eps:
        attacks[column_key("pgd_margin", eps)] = create_attack("pgd_margin", eps, steps=margin_steps)
    for eps in sorted({*eps_list, *margin_eps}) if prototypes else ():
        attacks[column_key("pgd_prototype", eps)] = create_attack("pgd_prototype", eps, steps=margin_steps)
    return attacks


def attack_label(key: str, steps: dict[str, int]) -> str:
    """The seed's header notation: 'FGSM (8,1)', 'PGDm (8,100)', 'Clean (0,0)', 'worst (8)'; steps: by key."""
    if key == "clean":
        return "Clean (0,0)"
    name, tag = key.rsplit("_", 1)
    if name == "worst":
        return f"worst ({tag})"
    short = {"fgsm": "FGSM", "bim": "BIM", "pgd": "PGD", "mim": "MIM", "pgd_margin": "PGDm",
             "pgd_prototype": "PGDp"}[name]
    return f"{short} ({tag},{steps[key]})"


def attack_table(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps_list=EPS, steps: int = STEPS,
                 margin_eps=(MARGIN_EPS,), margin_steps: int = MARGIN_STEPS, batch_size: int = 256,
                 seed: int = 0, verbose: bool = False) -> dict:
    """Per-example correctness and accuracy of `model` on (x, y) clean and under every attack of `build_attacks`,
    plus the per-example worst case at each ε (clean and every attack at that ε). Every attack's batch b is seeded
    from (seed, b), so a column does not depend on which ran before.

    Returns {"n", "accuracy": {key: float}, "correct": {key: bool tensor (n,)}, "seconds": {key: float},
    "worst_of": {ε tag: the attack keys in its worst case}, "attacks": {key: describe()},
    "iterative_weaker_than_fgsm": [one line per flag]}.
    """
    attacks = build_attacks(eps_list, steps, margin_eps, margin_steps, prototypes=is_prototype_model(model))
    n_steps = {k: a.steps for k, a in attacks.items()}
    model.eval()
    correct, seconds = {}, {}
    for key, attack in {"clean": None, **attacks}.items():
        t0 = time.perf_counter()
        correct[key] = correct_under(model, x, y, attack, batch_size, seed=(seed,)).cpu()
        seconds[key] = time.perf_counter() - t0
        if verbose and attack is not None:
            log(f"  {attack_label(key, n_steps):<14} {mean(correct[key]):.4f} ({seconds[key]:.1f} s)")
    worst_of = {}
    for eps in sorted({*eps_list, *margin_eps}):
        tag = eps_tag(eps)
        worst_of[tag] = [k for k in attacks if k.rsplit("_", 1)[1] == tag]
        correct[f"worst_{tag}"] = worst_case(correct["clean"], [correct[k] for k in worst_of[tag]])
    accuracy = {k: mean(v) for k, v in correct.items()}
    flags = []
    for key in attacks:
        name, tag = key.rsplit("_", 1)
        fgsm = f"fgsm_{tag}"
        if name not in ITERATIVE or fgsm not in accuracy:
            continue
        check = iterative_not_weaker(accuracy[fgsm], accuracy[key], len(y))
        if not check["passed"]:
            flags.append(f"{attack_label(key, n_steps)} {accuracy[key]:.4f} > {attack_label(fgsm, n_steps)} "
                         f"{accuracy[fgsm]:.4f} (+{accuracy[key] - accuracy[fgsm]:.4f}, tolerance "
                         f"{check['tolerance']:.4f}): an iterative attack weaker than one step suggests gradient "
                         "masking")
    return {"n": len(y), "accuracy": accuracy, "correct": correct, "seconds": seconds, "worst_of": worst_of,
            "attacks": {k: a.describe() for k, a in attacks.items()}, "iterative_weaker_than_fgsm": flags}


def masking_rows(model, x, y, table: dict, checks_n: int, batch_size: int, seed: int) -> list[dict]:
    """robust_train.evaluate.masking.run_checks at 8/255 on the first checks_n images, reusing the table."""
    eps = max(EPS)
    tag = eps_tag(eps)
    m = min(checks_n, len(y))
    robust_by_eps = {0.0: table["accuracy"]["clean"]}
    robust_by_eps.update({e: table["accuracy"][f"worst_{eps_tag(e)}"] for e in EPS})
    return run_checks(model, x[:m], y[:m], eps, robust_by_eps=robust_by_eps, n_eval=table["n"],
                      white_correct=table["correct"][f"worst_{tag}"][:m].to(y.device),
                      reuse_fgsm_pgd=(table["accuracy"][f"fgsm_{tag}"], table["accuracy"][f"pgd_{tag}"]),
                      batch_size=batch_size, seed=seed)


# -------------------------------------------------------------------------------------------------------- training
def protopnet_schedule(head_epochs: int) -> dict:
    """ProtoPNetTraining's schedule on a trained backbone in `head_epochs` Lightning epochs: warm (backbone frozen,
    add-on and prototypes learn), joint, one push after the last joint epoch, then last-layer epochs, so the run
    ends on pushed prototypes. Warm and last-layer phases take a fifth of the epochs each (at least one)."""
    if head_epochs < 3:
        raise ValueError(f"protopnet needs --head-epochs >= 3 (warm, joint, last layer), got {head_epochs}")
    warm = last = max(1, head_epochs // 5)
    joint = head_epochs - warm - last
    return {"warm_epochs": warm, "push_start": warm + joint - 1, "push_every": 0, "last_layer_epochs": last}


def backbone_config(epochs: int) -> tuple[str, dict, int]:
    """(method, kwargs, max_epochs) of the shared backbone: vgg16_bn from scratch, GAP + linear head."""
    return "StandardTraining", {"arch": "vgg16_bn", **COMMON, "optimizer": "adam", "lr": 1e-3,
                                "weight_decay": 0.0, "lr_schedule": "cosine"}, epochs


def method_config(name: str, head_epochs: int) -> tuple[str, dict, int]:
    """(method class name, its init kwargs without data_spec, Lightning max_epochs) of one of MODELS, trained for
    `head_epochs` on top of the shared backbone (see the module docstring)."""
    tune = {**COMMON, "optimizer": "adam", "lr": TUNE_LR, "weight_decay": 0.0, "lr_schedule": "cosine"}
    if name == "vgg16_bn":
        return "StandardTraining", {"arch": "vgg16_bn", **tune}, head_epochs
    if name == "attention_pool":
        return "StandardTraining", {"arch": "attention_pool", "arch_kwargs": {
            "backbone": "vgg16_bn", "init_std": 0.1, "attention_dropout": 0.0}, **tune}, head_epochs
    if name == "protopnet":
        # ProtoPNet's official rates for a pretrained backbone (backbone 1e-4, add-on and prototypes 3e-3, last
        # layer 1e-4, StepLR(5, 0.1) on the joint rates) and official loss coefficients.
        return "ProtoPNetTraining", {
            "arch": "protopnet",
            "arch_kwargs": {"backbone": "vgg16_bn", "prototypes_per_class": 10, "prototype_dim": 128},
            **COMMON, "adversarial": None, **protopnet_schedule(head_epochs),
            "clst_weight": 0.8, "sep_weight": 0.08, "l1_weight": 1e-4}, head_epochs
    raise SystemExit(f"unknown model {name!r}: choose from {', '.join(MODELS)}")


def make_datamodule(args):
    from robust_train.data.base import TensorImageDataset
    from robust_train.data.cifar10 import CIFAR10Data

    dm = CIFAR10Data(root=str(args.data), batch_size=args.batch_size, download=False, seed=args.seed)
    dm.setup("fit")
    if args.max_train:
        ds = dm.train_set
        k = min(args.max_train, len(ds))
        dm.train_set = TensorImageDataset(ds.images[:k], ds.labels[:k], ds.augment)
    return dm


def trainer_device(device: str) -> tuple[str, object]:
    if device.startswith("cuda"):
        return "gpu", [int(device.split(":")[1])] if ":" in device else 1
    return "cpu", 1


def train_settings(stage: str, config: tuple[str, dict, int], args, dm, backbone: dict | None) -> dict:
    method, kwargs, max_epochs = config
    return {"model": stage, "method": method, "kwargs": kwargs, "max_epochs": max_epochs,
            "batch_size": args.batch_size, "train_images": len(dm.train_set), "val_images": len(dm.val_set),
            "max_train": args.max_train, "augment": "random crop (pad 4) + horizontal flip", "seed": args.seed,
            "data": str(Path(args.data).resolve()),
            "backbone": backbone}  # a model tuned on a backbone is stale once the backbone is retrained


def load_backbone(module, backbone_ckpt: Path, whole: bool) -> None:
    """Copy the trained backbone into module.model: the whole classifier (whole) or only its `body`, the feature
    extractor that the attention and prototype heads read."""
    trained = classifier_from_checkpoint(read_checkpoint(backbone_ckpt))
    target, source = (module.model, trained) if whole else (module.model.body, trained.body)
    target.load_state_dict(source.state_dict())


def train(stage: str, config: tuple[str, dict, int], args, dm, backbone: dict | None = None) -> tuple[Path, dict]:
    """Train one stage (the backbone, or a model on it) or reuse <ckpt-dir>/<stage>/final.ckpt made with the same
    settings; returns the checkpoint and the training record."""
    import lightning.pytorch as pl

    from robust_train.methods import StandardTraining
    from robust_train.methods.protopnet import ProtoPNetTraining

    folder = Path(args.ckpt_dir) / stage
    ckpt, record_path = folder / "final.ckpt", folder / "train.json"
    settings = train_settings(stage, config, args, dm, backbone)
    if ckpt.is_file() and record_path.is_file() and not args.retrain:
        record = json.loads(record_path.read_text())
        if record.get("settings") == settings:
            log(f"{stage}: reusing {ckpt} (trained {record.get('date')}, {record.get('seconds', 0) / 60:.1f} min)")
            return ckpt, {**record, "reused": True}
        log(f"{stage}: {ckpt} was trained with other settings; retraining")

    method, kwargs, max_epochs = config
    pl.seed_everything(args.seed, workers=True)
    cls = {"StandardTraining": StandardTraining, "ProtoPNetTraining": ProtoPNetTraining}[method]
    module = cls(data_spec=dm.spec, **kwargs)
    module.run_info = {"recipe": f"bench/architectures:{stage}"}
    if backbone is not None:
        load_backbone(module, Path(backbone["checkpoint"]), whole=kwargs["arch"] == "vgg16_bn")
    accelerator, devices = trainer_device(args.device)
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator=accelerator, devices=devices, logger=False,
                         enable_checkpointing=False, enable_progress_bar=args.progress, enable_model_summary=False,
                         num_sanity_val_steps=0, inference_mode=False, default_root_dir=str(folder))
    extra = "" if backbone is None else " on the trained backbone"
    if method == "ProtoPNetTraining":
        phases, pushes = module.plan(max_epochs)
        extra += f", phases {''.join(p[0] for p in phases)} (w/j/l), push after epochs {sorted(pushes)}"
    log(f"{stage}: training {method} {max_epochs} epochs on {len(dm.train_set)} images{extra}")
    t0 = time.time()
    trainer.fit(module, datamodule=dm)
    seconds = time.time() - t0
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    record = {"settings": settings, "seconds": round(seconds, 1), "val_acc": metrics.get("val/acc"),
              "train_acc": metrics.get("train/acc"), "epochs_run": trainer.current_epoch,
              "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "device": device_name(args.device)}
    if method == "ProtoPNetTraining":
        model = module.model
        push_cb = [cb for cb in trainer.callbacks if type(cb).__name__ == "PrototypePush"]
        pushed = int((model.prototype_image_index >= 0).sum())
        record.update({"phases": phases, "push_epochs": sorted(pushes),
                       "push_callback": bool(push_cb),
                       "last_push_epoch": push_cb[0].last_push["epoch"] if push_cb and push_cb[0].last_push else None,
                       "pushed_prototypes": pushed, "prototypes": int(model.num_prototypes)})
        if not pushed:
            log(f"{stage}: WARNING no prototype was pushed (PrototypePush did not run?)")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".final.ckpt.partial"
    trainer.save_checkpoint(str(tmp), weights_only=True)  # the weights and our model description
    os.replace(tmp, ckpt)
    atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
    log(f"{stage}: trained in {seconds / 60:.1f} min, val acc {record['val_acc']}"
        + (f", {record['pushed_prototypes']}/{record['prototypes']} prototypes pushed (last push after epoch "
           f"{record['last_push_epoch']})" if method == "ProtoPNetTraining" else "") + f" -> {ckpt}")
    return ckpt, {**record, "reused": False}


# ---------------------------------------------------------------------------------------------------------- report
def columns(eps_list=EPS, margin_eps=(MARGIN_EPS,)) -> list[str]:
    keys = ["clean"] + [column_key(a, e) for a in ATTACKS for e in eps_list]
    keys += [column_key("pgd_margin", e) for e in margin_eps]
    keys += [column_key("pgd_prototype", e) for e in sorted({*eps_list, *margin_eps})]
    return keys + [f"worst_{eps_tag(e)}" for e in sorted({*eps_list, *margin_eps})]


def pct(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def format_table(rows: dict, attack_info: dict, n: int) -> str:
    keys = [k for k in columns() if k == "clean" or k.startswith("worst_") or k in attack_info]
    labels = [attack_label(k, {k2: d["steps"] for k2, d in attack_info.items()}) for k in keys]
    width = [max(8, len(lab) + 1) for lab in labels]
    lines = [f"{'model':<20}{'':<19}" + "".join(f"{lab:>{w}}" for lab, w in zip(labels, width)),
             "-" * (39 + sum(width))]
    for name, row in rows.items():
        acc = row["accuracy"]
        lines.append(f"{name:<20}{f'ours, n={n}':<19}" + "".join(f"{pct(acc.get(k)):>{w}}"
                                                                  for k, w in zip(keys, width)))
        pub = PUBLISHED.get(PUBLISHED_NAME.get(name, ""), {})
        lines.append(f"{PUBLISHED_NAME.get(name, ''):<20}{'published, CUB-12':<19}"
                     + "".join(f"{pct(pub.get(k)):>{w}}" for k, w in zip(keys, width)))
    return "\n".join(lines)


def ranking(values: dict[str, float]) -> list[list[str]]:
    """Names grouped by equal value, highest first: {"a": .3, "b": .3, "c": .1} -> [["a", "b"], ["c"]]."""
    groups: list[list[str]] = []
    for name in sorted(values, key=lambda m: -values[m]):
        if groups and values[groups[-1][0]] == values[name]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def rank_text(groups: list[list[str]]) -> str:
    return " > ".join(" = ".join(g) for g in groups)


def orderings(rows: dict) -> dict:
    """Per published column: the models ranked by accuracy (best first, ties grouped), ours and published, over the
    models both have; same_order: identical rankings; same_best: the same single most robust model."""
    out = {}
    names = [m for m in rows if m in PUBLISHED_NAME]
    if len(names) < 2:
        return out
    for key in PUBLISHED["VGG16"]:
        ours = ranking({m: rows[m]["accuracy"][key] for m in names})
        theirs = ranking({m: PUBLISHED[PUBLISHED_NAME[m]][key] for m in names})
        out[key] = {"ours": ours, "published": theirs, "same_order": ours == theirs,
                    "same_best": len(ours[0]) == 1 and ours[0] == theirs[0]}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=30, help="epochs of the shared vgg16_bn backbone, from scratch")
    p.add_argument("--head-epochs", type=int, default=10, help="epochs of each model on the trained backbone "
                   "(ProtoPNet: warm, joint, push, last layer; at least 3)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch")
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--n", type=int, default=1017, help="first n test images evaluated (the subset has 1,017)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--max-train", type=int, default=None, help="cap the training images (smoke tests only)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="cifar10_subset.npz (or a torchvision CIFAR-10 "
                   "folder)")
    p.add_argument("--ckpt-dir", default=str(DEFAULT_CKPT_DIR), help="final checkpoints: <dir>/<model>/final.ckpt")
    p.add_argument("--retrain", action="store_true", help="train even if a checkpoint with these settings exists")
    p.add_argument("--margin-steps", type=int, default=MARGIN_STEPS, help="steps of the margin-loss PGD at 8/255")
    p.add_argument("--checks-n", type=int, default=256,
                   help="images for robust_train.evaluate.masking's checks (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true", help="Lightning progress bars")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "architectures.json"))
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}: choose from {', '.join(MODELS)}")
    if "protopnet" in models and args.head_epochs < 3:
        p.error("--head-epochs must be at least 3 for protopnet (warm, joint and last-layer epochs)")
    if min(args.epochs, args.head_epochs, args.batch_size, args.eval_batch_size, args.n, args.margin_steps) <= 0 or \
            args.checks_n < 0 or (args.max_train is not None and args.max_train <= 0):
        p.error("--epochs, --head-epochs, --batch-size, --eval-batch-size, --n, --margin-steps and --max-train "
                "must be positive")
    if not Path(args.data).exists():
        p.error(f"--data {args.data} not found: point it at cifar10_subset.npz")
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    for noise in (".*does not have many workers.*", ".*isinstance\\(treespec, LeafSpec\\).*",
                  ".*overridden `on_after_batch_transfer`.*"):
        warnings.filterwarnings("ignore", message=noise)

    smoke = args.max_train is not None or args.epochs < 30 or args.head_epochs < 10
    info = machine_info(args.device)
    dm = make_datamodule(args)
    x, y = dm.test_tensors(args.n)
    x, y = x.to(args.device), y.to(args.device)
    probe = build_attacks(margin_steps=args.margin_steps, prototypes="protopnet" in models)
    result = {
        "benchmark": "architectures", "seed": SEED_FILE, "published_setting": PUBLISHED_SETTING,
        "published": PUBLISHED,
        "settings": {"epochs": args.epochs, "head_epochs": args.head_epochs, "batch_size": args.batch_size,
                     "eval_batch_size": args.eval_batch_size,
                     "n": len(y), "test_images": "first n of the CIFAR-10 subset's test set",
                     "train_images": len(dm.train_set), "max_train": args.max_train,
                     "data": str(Path(args.data).resolve()), "eps": list(EPS), "steps": STEPS,
                     "margin_eps": MARGIN_EPS, "margin_steps": args.margin_steps, "checks_n": args.checks_n,
                     "seed": args.seed, "models": models, "smoke": smoke,
                     "attacks": {k: a.describe() for k, a in probe.items()}},
        "models": {}, "machine": info, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": False,
    }

    def save():
        result["orderings"] = orderings(result["models"])
        write_result(args.out, result, announce=False)

    t_all = time.time()
    backbone_ckpt, backbone_record = train("backbone", backbone_config(args.epochs), args, dm)
    result["backbone"] = backbone_record
    backbone = {"checkpoint": str(backbone_ckpt), "date": backbone_record["date"]}
    for name in models:
        t_model = time.time()
        ckpt, record = train(name, method_config(name, args.head_epochs), args, dm, backbone)
        model = classifier_from_checkpoint(read_checkpoint(ckpt)).to(args.device).eval()
        log(f"{name}: attacks on {len(y)} test images")
        t0 = time.time()
        table = attack_table(model, x, y, margin_steps=args.margin_steps, batch_size=args.eval_batch_size,
                             seed=args.seed, verbose=True)
        row = {"checkpoint": str(ckpt), "training": record, "n": table["n"], "accuracy": table["accuracy"],
               "worst_of": table["worst_of"],
               "seconds_per_attack": {k: round(v, 2) for k, v in table["seconds"].items()},
               "seconds_eval": round(time.time() - t0, 1),
               "iterative_weaker_than_fgsm": table["iterative_weaker_than_fgsm"]}
        if args.checks_n:
            t0 = time.time()
            checks = masking_rows(model, x, y, table, args.checks_n, args.eval_batch_size, args.seed)
            row["masking_checks"] = checks
            row["masking_suspected"] = masking_suspected(checks) or bool(table["iterative_weaker_than_fgsm"])
            row["seconds_checks"] = round(time.time() - t0, 1)
            log(f"{name}: masking checks ({min(args.checks_n, len(y))} images, {row['seconds_checks']:.0f} s): "
                + ", ".join(f"{c['check']} {'ok' if c['passed'] else 'FAILED'}" for c in checks))
        else:
            row["masking_suspected"] = bool(table["iterative_weaker_than_fgsm"])
        row["seconds"] = round(time.time() - t_model, 1)
        result["models"][name] = row
        save()
        del model

    rows = result["models"]
    n = len(y)
    print(f"\n## Accuracy (%) of architectures under attack, no adversarial training: ours (CIFAR-10 subset, "
          f"one vgg16_bn backbone trained {args.epochs} epochs from scratch, then {args.head_epochs} epochs per model, "
          f"{len(dm.train_set)} training images) vs the "
          "seed's (CUB-12, pretrained)\n")
    if smoke:
        print("**SMOKE SETTINGS (--max-train, --epochs < 30 or --head-epochs < 10): the numbers say nothing about "
              "the architectures**\n")
    print("Columns (ε/255, iterations), L∞: FGSM α=ε; BIM α=ε/10 from x; PGD α=2.5ε/10 from a random start, last "
          f"iterate; MIM α=ε/10, μ=1; PGDm margin loss, {args.margin_steps} steps, α=ε cosine, best iterate; "
          "PGDp (ProtoPNet only) the same on the margin of head(−distance), the adaptive attack; "
          f"worst = per example over clean and every attack at that ε. Test images: ours the first {n} of the "
          f"subset (±{100 * math.sqrt(0.25 / n):.1f} pt at most, binomial s.e.), theirs 299.\n")
    print(format_table(rows, result["settings"]["attacks"], n))
    ords = result["orderings"] = orderings(rows)
    if ords:
        print("\nOrdering by accuracy, most robust first (ours | published):")
        for key, o in ords.items():
            print(f"  {key:<7} {rank_text(o['ours']):<44} | {rank_text(o['published']):<44} "
                  f"{'same' if o['same_order'] else ('same best' if o['same_best'] else 'differs')}")
        agree = sum(o["same_best"] for o in ords.values())
        print(f"  same most robust architecture in {agree} of {len(ords)} columns")
    print("\nGradient masking:")
    for name, row in rows.items():
        failed = [c["check"] for c in row.get("masking_checks", []) if not c["passed"]]
        flags = row["iterative_weaker_than_fgsm"]
        if not failed and not flags:
            print(f"  {name}: no sign (iterative attacks ≤ FGSM"
                  + (f"; masking_checks all passed on {min(args.checks_n, n)} images)" if args.checks_n else ")"))
        else:
            print(f"  {name}: SUSPECTED" + (f"; failed checks: {', '.join(failed)}" if failed else ""))
            for f in flags:
                print(f"    {f}")
    b = result["backbone"]
    print(f"\nTime: backbone {b['seconds'] / 60:.1f} min{' (reused)' if b.get('reused') else ''}; " + "; ".join(
        f"{m} train {r['training']['seconds'] / 60:.1f} min{' (reused)' if r['training'].get('reused') else ''}, "
        f"attacks {r['seconds_eval'] / 60:.1f} min" + (f", checks {r['seconds_checks'] / 60:.1f} min"
                                                        if "seconds_checks" in r else "")
        for m, r in rows.items()))
    result["seconds"] = round(time.time() - t_all, 1)
    result["complete"] = True
    save()
    print(f"\nwrote {args.out} ({result['seconds'] / 60:.1f} min, {info['device_name']}, torch {info['torch']})")


if __name__ == "__main__":
    main()
