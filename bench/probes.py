"""Shape-bias probes (Zhang & Zhu, "Interpreting Adversarially Trained CNNs", ICML 2019) on our models: is an
adversarially trained CNN more accurate than a standard one under saturation (texture flattened, shapes kept) and
less accurate under patch shuffling (shapes destroyed, texture kept), as the paper found on Caltech-256 and Tiny
ImageNet?

Models: `standard`, `pgd` and `int2_adv`, each on two data sets:

* MNIST (bundled, 17,435 training images): the recipes of the same names as written (their full schedules, about
  2 min, 1 h and 1 h on 2 CPU cores), or --epochs E for a shorter run;
* CIFAR-10 subset (/work/shared/data/cifar10-subset, 4,585 training images, 1,017 test images): the repository's
  CIFAR recipes are 200-epoch PreAct ResNet-18 runs for GPUs and there is no standard one, so here every model is
  `small_cnn` (--cifar-arch) trained for --cifar-epochs (default 30) with the recipes' methods and settings:
  `standard` is recipes/standard.yaml on CIFAR10Data at ε 8/255 (ε only sets the validation attack),
  `pgd` recipes/pgd_cifar10.yaml, `int2_adv` recipes/int2_adv_cifar10.yaml, all with batch 128.

Training is the CLI's (`python -m robust_train fit --recipe ...`). When a run has fewer epochs than its recipe, the
recipe's schedule is compressed to fit: max_epochs E, and the ε warm-up (start, end) and the learning-rate
milestones scaled by E / the recipe's epochs (milestones at least 1). --train-fraction also caps the batches per
epoch (Lightning's limit_train_batches), and --train-steps S gives the adversarially trained models' PGD S steps
of 2.5·ε/S instead of the recipe's. --ckpt NAME=PATH reuses a checkpoint instead of training (NAME `pgd` for
MNIST, `cifar10:pgd` for CIFAR-10).

Each model is evaluated with `robust_train.evaluate` on the first --n test images: clean accuracy, PGD-20 at the
training ε (MNIST 0.3, CIFAR-10 8/255, or --mnist-eps / --cifar-eps: are the adversarially trained models robust
at all?) and the probes, saturation p ∈ {1, 4, 8, 16, 64, 1024} and patch shuffling k ∈ {2, 4, 8} (seeded,
--seed).

The verdict, per data set, probe and adversarially trained model against `standard`: the mean accuracy over the
levels (saturation without p = 2, the identity) is compared; AGREES with the paper when it is higher under
saturation and lower under shuffling by more than two standard errors of the difference, DISAGREES when it is the
other way by as much, otherwise NO CLEAR DIFFERENCE; NOT COMPARABLE when either model is at chance (clean accuracy
below 0.2) or the adversarially trained one is not robust (PGD accuracy not 5 points above the standard one's),
since neither then tests the paper's claim. The accuracy kept (probe / clean) is printed too, since the
adversarially trained models start lower. The paper gives its numbers in figures only, so only the direction is
compared.

    python bench/probes.py [--data mnist,cifar10] [--models standard,pgd,int2_adv] [--quick] [--epochs E]
        [--cifar-epochs 30] [--train-fraction F] [--train-steps S] [--mnist-eps 0.3] [--cifar-eps 8/255]
        [--ckpt NAME=PATH ...] [--n 1000] [--device cuda] [--out bench/out/probes.json]

A quick CPU check (MNIST only, one epoch each at ε 0.1, 500 test images; numbers only indicative). Compressed to
one epoch, the recipes' ε warm-up is too short for ε 0.3: measured (half an epoch, PGD-10), `pgd` and `int2_adv`
both collapsed to one class (clean 0.134), hence --quick's ε 0.1. With half of each epoch and 5 PGD steps, 9
minutes on a busy 2-core machine (load ~7; one thread each, as more threads stall there):

    OMP_NUM_THREADS=1 python bench/probes.py --quick --train-fraction 0.5 --train-steps 5 --out /tmp/probes.json \
        --runs /tmp/probes_runs
"""
from __future__ import annotations

import argparse
import math
import time
from fractions import Fraction
from pathlib import Path

import torch
import yaml

from common import ROOT, device_name, log, train_recipe, write_result
from robust_train.evaluate import evaluate

MODELS = ("standard", "pgd", "int2_adv")
ADVERSARIAL = ("pgd", "int2_adv")
DATASETS = ("mnist", "cifar10")
CIFAR_SUBSET = ROOT.parent / "shared" / "data" / "cifar10-subset"
EPS = {"mnist": 0.3, "cifar10": 8 / 255}
CIFAR_RECIPE = {"standard": "standard", "pgd": "pgd_cifar10", "int2_adv": "int2_adv_cifar10"}
SATURATION = [1.0, 4.0, 8.0, 16.0, 64.0, 1024.0]
SHUFFLE = [2, 4, 8]
PGD_STEPS = 20
PAPER = {"source": "Zhang & Zhu, ICML 2019 (PKUAI26/AT-CNN), Caltech-256 and Tiny ImageNet, figures only",
         "saturation": "adversarially trained CNNs more accurate than standard ones (less sensitive to texture loss)",
         "patch_shuffle": "adversarially trained CNNs less accurate than standard ones (biased towards shapes)"}
EXPECTED = {"saturation": +1, "patch_shuffle": -1}  # sign of (adversarial − standard) the paper reports
MIN_CLEAN = 0.2         # clean accuracy below twice chance (10 classes): a collapsed model, no verdict
MIN_ROBUST_GAIN = 0.05  # PGD accuracy the adversarially trained model must have above the standard one's


def budget(text: str) -> float:
    """'8/255' or '0.1' -> a float (fractions parsed, never eval'ed)."""
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number like 0.1 or 8/255") from None


def recipe_path(recipe: str) -> Path:
    return ROOT / "recipes" / f"{recipe}.yaml"


def schedule_flags(recipe: str, epochs: int | None) -> list[str]:
    """CLI flags compressing the recipe's schedule to `epochs` (none when None or not shorter than the recipe's)."""
    if epochs is None:
        return []
    config = yaml.safe_load(recipe_path(recipe).read_text())
    total = int((config.get("trainer") or {}).get("max_epochs") or epochs)
    flags = ["--trainer.max_epochs", str(epochs)]
    if epochs >= total:
        return flags
    scale, init = epochs / total, (config.get("model") or {}).get("init_args") or {}
    for key in ("eps_warmup_start", "eps_warmup_end"):
        if init.get(key):
            flags += [f"--model.init_args.{key}", f"{init[key] * scale:g}"]
    if init.get("milestones"):
        flags += ["--model.init_args.milestones", str([max(1, round(m * scale)) for m in init["milestones"]])]
    return flags


def recipe_eps(recipe: str) -> float | None:
    return ((yaml.safe_load(recipe_path(recipe).read_text()).get("model") or {}).get("init_args") or {}).get("eps")


def attack_flags(recipe: str, steps: int | None, eps: float) -> list[str]:
    """CLI flags giving the recipe's training attack `steps` iterations of 2.5·ε/steps (Madry et al.'s rule);
    none when steps is None or the recipe trains without an iterative attack."""
    init = (yaml.safe_load(recipe_path(recipe).read_text()).get("model") or {}).get("init_args") or {}
    if steps is None or "steps" not in init:
        return []
    return ["--model.init_args.steps", str(steps), "--model.init_args.step_size", repr(2.5 * eps / steps)]


def training(data: str, model: str, args) -> tuple[str, list[str]]:
    """(recipe, extra CLI flags) of one model on one data set."""
    if data == "mnist":
        recipe, extra, epochs = model, [], args.epochs
    else:
        recipe, epochs = CIFAR_RECIPE[model], args.epochs or args.cifar_epochs
        extra = ["--model.init_args.arch", args.cifar_arch, "--data.init_args.root", str(args.cifar_data),
                 "--data.init_args.batch_size", "128"]
        if model == "standard":  # the MNIST recipe's method and optimiser on CIFAR10Data, as its recipes load it
            extra = ["--data", "robust_train.data.CIFAR10Data", "--data.init_args.val_size", "500", *extra]
    eps = args.eps[data]
    if eps != recipe_eps(recipe):
        extra += ["--model.init_args.eps", repr(eps)]  # standard: ε only sets the validation attack
    extra += schedule_flags(recipe, epochs) + attack_flags(recipe, args.train_steps, eps)
    if args.train_fraction is not None:
        extra += ["--trainer.limit_train_batches", f"{args.train_fraction:g}"]
    return recipe, extra


def parse_ckpts(items: list[str]) -> dict[tuple[str, str], str]:
    ckpts = {}
    for item in items:
        name, sep, path = item.partition("=")
        data, _, model = name.rpartition(":")
        data = data or "mnist"
        if not sep or data not in DATASETS or model not in MODELS:
            raise SystemExit(f"--ckpt wants NAME=PATH with NAME one of {', '.join(MODELS)} (MNIST) or "
                             f"cifar10:{'|'.join(MODELS)}, got {item!r}")
        ckpts[(data, model)] = path
    return ckpts


def row_from_report(report: dict, eps: float) -> dict:
    probes = [r for r in report["probes"] if r["probe"] != "clean"]
    return {"clean": report["clean_accuracy"], "pgd": report["robust_accuracy"][f"{eps:g}"],
            "saturation": {f"{r['level']:g}": r["accuracy"] for r in probes if r["probe"] == "saturation"},
            "patch_shuffle": {f"{r['level']:g}": r["accuracy"] for r in probes if r["probe"] == "patch_shuffle"},
            "n": report["n_examples"], "train_eps": report["train_eps"], "method": report["method"],
            "arch": report["arch"]}


def probe_mean(row: dict, probe: str) -> float:
    """Mean accuracy over the probe's levels (saturation without p = 2, which is the clean image)."""
    values = [v for level, v in row[probe].items() if not (probe == "saturation" and float(level) == 2.0)]
    return sum(values) / len(values) if values else float("nan")


def verdict(adv: dict, std: dict, probe: str) -> dict:
    """The adversarially trained model against the standard one under one probe, with the paper's direction."""
    a, s, n = probe_mean(adv, probe), probe_mean(std, probe), min(adv["n"], std["n"])
    levels = [lv for lv in adv[probe] if lv in std[probe] and not (probe == "saturation" and float(lv) == 2.0)]
    # as if two independent binomial means on n images: the same images for both models (positively correlated)
    # and the mean over levels both make the true standard error of the difference smaller, so this is conservative
    se = math.sqrt(max(a * (1 - a), 1e-4) / n + max(s * (1 - s), 1e-4) / n)
    diff = a - s
    if min(adv["clean"], std["clean"]) < MIN_CLEAN:
        word = "NOT COMPARABLE (a model at chance)"  # a constant guess is "unaffected" by every probe
    elif adv["pgd"] < std["pgd"] + MIN_ROBUST_GAIN:
        word = "NOT COMPARABLE (the adversarially trained model is not robust)"
    elif abs(diff) <= 2 * se:
        word = "NO CLEAR DIFFERENCE"
    else:
        word = "AGREES" if math.copysign(1, diff) == EXPECTED[probe] else "DISAGREES"
    kept_a = a / adv["clean"] if adv["clean"] else float("nan")
    kept_s = s / std["clean"] if std["clean"] else float("nan")
    wins = sum(1 for lv in levels if (adv[probe][lv] - std[probe][lv]) * EXPECTED[probe] > 0)
    return {"adversarial": a, "standard": s, "diff": diff, "se": se, "verdict": word, "kept_adversarial": kept_a,
            "kept_standard": kept_s, "kept_agrees": (kept_a - kept_s) * EXPECTED[probe] > 0,
            "levels_in_paper_direction": f"{wins}/{len(levels)}"}


def format_table(data: str, rows: dict, eps: float, n: int) -> str:
    sat = [f"{p:g}" for p in SATURATION]
    shf = [f"{k:g}" for k in SHUFFLE]
    head = (["model", "clean", f"PGD-{PGD_STEPS} ε {eps:.4g}"] + [f"sat p={p}" for p in sat]
            + [f"shuffle k={k}" for k in shf] + ["sat mean", "shuffle mean"])
    lines = [f"{data}: first {n} test images", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for model, r in rows.items():
        cells = [r["clean"], r["pgd"], *(r["saturation"].get(p, float("nan")) for p in sat),
                 *(r["patch_shuffle"].get(k, float("nan")) for k in shf), probe_mean(r, "saturation"),
                 probe_mean(r, "patch_shuffle")]
        lines.append(f"| {model} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="comma list of mnist, cifar10 (default both; --quick mnist)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="train every model this many epochs, the recipe's schedule compressed (default: MNIST "
                         "the recipes' own, CIFAR-10 --cifar-epochs)")
    ap.add_argument("--cifar-epochs", type=int, default=30, help="epochs on the CIFAR-10 subset (default 30)")
    ap.add_argument("--cifar-arch", default="small_cnn", help="model on the CIFAR-10 subset (default small_cnn)")
    ap.add_argument("--cifar-data", default=str(CIFAR_SUBSET), help="folder of cifar10_subset.npz (or the file)")
    ap.add_argument("--train-fraction", type=float, default=None,
                    help="fraction (or number) of training batches per epoch (Lightning's limit_train_batches)")
    ap.add_argument("--mnist-eps", type=budget, default=None,
                    help="ε of the adversarially trained MNIST models and of the PGD column (default 0.3, the "
                         "recipes'; --quick 0.1)")
    ap.add_argument("--cifar-eps", type=budget, default=EPS["cifar10"],
                    help="ε of the adversarially trained CIFAR-10 models and of the PGD column (default 8/255)")
    ap.add_argument("--train-steps", type=int, default=None,
                    help="iterations of the adversarially trained models' PGD, step 2.5·ε/steps (default: the "
                         "recipe's, 40 on MNIST, 10 on CIFAR-10)")
    ap.add_argument("--quick", action="store_true",
                    help="a CPU check: MNIST only, 1 epoch each, 500 test images (unless given otherwise)")
    ap.add_argument("--ckpt", action="append", default=[], metavar="NAME=PATH",
                    help="reuse a checkpoint instead of training: standard|pgd|int2_adv=PATH for MNIST, "
                         "cifar10:pgd=PATH for CIFAR-10 (repeatable)")
    ap.add_argument("--models", default=",".join(MODELS),
                    help="comma list of the models to probe (standard, the baseline, is always one of them)")
    ap.add_argument("--n", type=int, default=None, help="first n test images (default 1000; --quick 500)")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0, help="seed of the patch shuffling")
    ap.add_argument("--device", default=None, help="evaluation device (default: cuda if available, else cpu)")
    ap.add_argument("--runs", default="bench/out/runs/probes", help="where trained runs go (ROBUST_TRAIN_OUTPUT)")
    ap.add_argument("--out", default="bench/out/probes.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs = args.epochs or 1
    if args.mnist_eps is None:
        args.mnist_eps = 0.1 if args.quick else EPS["mnist"]
    if not (0 < args.mnist_eps <= 1 and 0 < args.cifar_eps <= 1):
        ap.error("--mnist-eps and --cifar-eps must be in (0, 1]")
    args.eps = {"mnist": args.mnist_eps, "cifar10": args.cifar_eps}
    args.data = args.data or ("mnist" if args.quick else ",".join(DATASETS))
    args.n = args.n or (500 if args.quick else 1000)
    datasets = [d.strip() for d in args.data.split(",") if d.strip()]
    if not datasets or any(d not in DATASETS for d in datasets):
        ap.error(f"--data {args.data!r}: use a comma list of {', '.join(DATASETS)}")
    if min(args.n, args.batch_size, args.cifar_epochs, args.epochs or 1, args.train_steps or 1) <= 0:
        ap.error("--n, --batch-size, --train-steps and the epochs must be positive")
    if "cifar10" in datasets and not Path(args.cifar_data).exists():
        ap.error(f"--cifar-data {args.cifar_data} not found: point it at the folder of cifar10_subset.npz")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if "standard" not in models or any(m not in MODELS for m in models):
        ap.error(f"--models {args.models!r}: a comma list of {', '.join(MODELS)} that includes standard")
    models = [m for m in MODELS if m in models]
    ckpts = parse_ckpts(args.ckpt)
    device = args.device
    result = {"benchmark": "probes", "paper": PAPER, "settings": {
        "data": datasets, "models": models, "n": args.n, "epochs": args.epochs, "cifar_epochs": args.cifar_epochs,
        "cifar_arch": args.cifar_arch, "train_fraction": args.train_fraction, "train_steps": args.train_steps,
        "seed": args.seed, "saturation_levels": SATURATION, "shuffle_levels": SHUFFLE, "pgd_steps": PGD_STEPS,
        "eps": args.eps},
        "rows": {}, "verdicts": {}, "checkpoints": {}, "training": {}, "complete": False,
        "device": device or ("cuda" if torch.cuda.is_available() else "cpu")}
    result["device_name"] = device_name(result["device"])
    t_all = time.time()
    for data in datasets:
        rows = result["rows"].setdefault(data, {})
        for model in models:
            ckpt = ckpts.get((data, model))
            if ckpt is None:
                recipe, extra = training(data, model, args)
                t0 = time.time()
                ckpt = str(train_recipe(recipe, Path(args.runs) / data, extra))
                result["training"][f"{data}:{model}"] = {"recipe": recipe, "flags": extra,
                                                         "minutes": round((time.time() - t0) / 60, 1)}
            result["checkpoints"][f"{data}:{model}"] = ckpt
            t0 = time.time()
            report = evaluate(ckpt, ["pgd"], [0.0, args.eps[data]], n=args.n, steps=PGD_STEPS,
                              batch_size=args.batch_size, seed=args.seed, device=device,
                              probes=["saturation", "patch_shuffle"],
                              saturation_levels=SATURATION, shuffle_levels=SHUFFLE, stability_attacks=(),
                              checks=False, pictures=False, progress=False)
            rows[model] = row_from_report(report, args.eps[data]) | {"seconds": round(time.time() - t0, 1)}
            log(f"{data} {model}: clean {rows[model]['clean']:.3f}, PGD-{PGD_STEPS} {rows[model]['pgd']:.3f}, "
                f"saturation mean {probe_mean(rows[model], 'saturation'):.3f}, shuffle mean "
                f"{probe_mean(rows[model], 'patch_shuffle'):.3f}")
            write_result(args.out, result, announce=False)  # a crash keeps the finished models
        result["verdicts"][data] = {f"{model} vs standard": {probe: verdict(rows[model], rows["standard"], probe)
                                                             for probe in EXPECTED}
                                    for model in ADVERSARIAL if model in models}

    print("\n## Shape-bias probes (Zhang & Zhu 2019) on our models\n")
    print(f"Paper ({PAPER['source']}): under saturation {PAPER['saturation']}; under patch shuffling "
          f"{PAPER['patch_shuffle']}.\n")
    for data in datasets:
        print(format_table(data, result["rows"][data], args.eps[data], args.n) + "\n")
        for pair, by_probe in result["verdicts"][data].items():
            for probe, v in by_probe.items():
                print(f"- {data}, {probe}, {pair}: mean {v['adversarial']:.3f} vs {v['standard']:.3f} "
                      f"(Δ {v['diff']:+.3f} ± {2 * v['se']:.3f}), levels in the paper's direction "
                      f"{v['levels_in_paper_direction']}, kept/clean {v['kept_adversarial']:.2f} vs "
                      f"{v['kept_standard']:.2f}: **{v['verdict']}** (paper: adversarial "
                      f"{'higher' if EXPECTED[probe] > 0 else 'lower'})")
        print()
    for key, trained in result["training"].items():
        print(f"Trained {key}: recipe {trained['recipe']} {' '.join(trained['flags'])} ({trained['minutes']} min)")
    for key, ckpt in result["checkpoints"].items():
        if key not in result["training"]:
            print(f"Reused {key}: {ckpt}")
    mnist_short = any(k.startswith("mnist:") for k in result["training"]) and (
        args.epochs is not None or args.train_fraction is not None or args.train_steps is not None)
    if mnist_short or "cifar10" in datasets:
        print("\nNot the recipes' training (" + ", ".join(
            (["MNIST shortened"] if mnist_short else []) + ([f"CIFAR-10 {args.cifar_arch}, not PreAct ResNet-18"]
                                                           if "cifar10" in datasets else []))
              + "): the verdicts say what these models do, not what the paper's would.")
    result["seconds"] = round(time.time() - t_all, 1)
    result["complete"] = True
    write_result(args.out, result)


if __name__ == "__main__":
    main()
