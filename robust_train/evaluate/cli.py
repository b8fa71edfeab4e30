"""`python -m robust_train evaluate --ckpt PATH`: accuracy of a checkpoint under attack over an ε grid, map
stability, gradient-masking checks and pictures, written to report.json and report.md (see sections/)."""
from __future__ import annotations

import argparse
from pathlib import Path

from robust_train.attacks import ATTACKS
from robust_train.checkpoint import read_checkpoint
from robust_train.distributed import launch
from robust_train.errors import ConfigError
from robust_train.evaluate.options import (STABILITY_ATTACKS, EvaluateOptions, parse_budget, parse_eps,
                                           parse_levels,
                                           parse_names, parse_stability_attacks)
from robust_train.evaluate.probes import parse_probes
from robust_train.evaluate.report import format_console, write_report
from robust_train.evaluate.run import run
from robust_train.evaluate.sections.suite import DEFAULT_SUITE
from robust_train.interpret import MAPS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robust-train evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint written by fit (e.g. .../last.ckpt)")
    p.add_argument("--attacks", default=None,
                   help=f"comma-separated attack names (default {','.join(DEFAULT_SUITE)}, plus pgd_prototype on a "
                        "ProtoPNet; 'autoattack' runs APGD-CE + APGD-T through the pyautoattack package; known: "
                        f"{', '.join(ATTACKS.names())})")
    p.add_argument("--eps", default=None, help="comma-separated budgets, e.g. 0,0.1,0.3 or 0,2/255,8/255 "
                                               "(default: the data set's standard grid)")
    p.add_argument("--n", "--num-images", dest="n", type=int, default=1000,
                   help="number of test images (default 1000; spell it --num-images after torchrun, whose own "
                        "options --n would abbreviate)")
    p.add_argument("--out", default=None, help="report folder (default: eval-<checkpoint name> beside the checkpoint)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--steps", type=int, default=None, help="override every attack's iteration count")
    p.add_argument("--restarts", type=int, default=None, help="override every attack's restarts")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (one process)")
    p.add_argument("--devices", default="1",
                   help="processes on this machine (e.g. 4 GPUs): the images are shared out and the results "
                        "gathered, with the same numbers as one process; under torchrun or SLURM the launcher's "
                        "processes are used")
    p.add_argument("--accelerator", default="auto", help="with --devices: cpu, cuda or auto")
    p.add_argument("--num-nodes", type=int, default=1, help="with --devices under SLURM: machines")
    p.add_argument("--data-root", default=None, help="where the test set lives, if not where it was trained")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stability-attacks", default=",".join(STABILITY_ATTACKS),
                   help="attacks under which interpretation-map stability (Kendall τ, top-k overlap) is measured "
                        f"at each ε > 0 (default {','.join(STABILITY_ATTACKS)}; 'none' disables)")
    p.add_argument("--stability-n", type=int, default=200,
                   help="map stability on the first N of the evaluated images (default 200, as the paper)")
    p.add_argument("--stability-steps", type=int, default=None,
                   help="iterations of the stability attacks (default: each attack's own, AAI 200, pgd_madry 40)")
    p.add_argument("--map", default="cam", help=f"interpretation map for stability (default cam; known: "
                                                f"{', '.join(MAPS.names())})")
    p.add_argument("--topk", type=int, default=8, help="k of the top-k overlap and of AAI (default 8)")
    p.add_argument("--n-pictures", type=int, default=6, help="images in gallery.png (default 6)")
    p.add_argument("--no-pictures", action="store_true",
                   help="write no pictures (gallery, transition, robustness curve, probes, universal, Type-I)")
    p.add_argument("--no-checks", action="store_true", help="skip the gradient-masking checks")
    p.add_argument("--checks-n", type=int, default=200,
                   help="gradient-masking checks on the first N of the evaluated images (default 200)")
    p.add_argument("--transfer-from", default=None, metavar="CKPT",
                   help="also evaluate black-box transfer: PGD crafted on this checkpoint (same data) at the main ε, "
                        "then evaluated on --ckpt")
    p.add_argument("--probes", nargs="?", const="saturation,patch_shuffle", default=None, metavar="NAMES",
                   help="shape-bias probes (Zhang & Zhu 2019): accuracy under saturation and patch shuffling "
                        "(--probes alone: both; or a comma-separated subset)")
    p.add_argument("--saturation-levels", default="1,4,8,16,64,1024",
                   help="saturation exponents p (2 is the identity; default 1,4,8,16,64,1024)")
    p.add_argument("--shuffle-levels", default="2,4,8", help="patches per side for patch shuffling (default 2,4,8)")
    p.add_argument("--universal", action="store_true",
                   help="a universal adversarial perturbation (Moosavi-Dezfooli et al. 2017) computed on training "
                        "images, its fooling rate on the test images beside random noise of the same norm")
    p.add_argument("--universal-eps", default=None, help="its budget (default: the main ε), e.g. 0.2 or 8/255")
    p.add_argument("--universal-norm", default="linf", help="linf (default) or l2")
    p.add_argument("--universal-n", type=int, default=1000, help="training images it is computed on (default 1000)")
    p.add_argument("--type1", default=None, metavar="SVAE_CKPT",
                   help="Type-I attack through this supervised VAE (recipe svae): the decoded image becomes another "
                        "digit while the classifier keeps its label")
    p.error = lambda message: (_ for _ in ()).throw(ConfigError(f"evaluate: {message}"))  # one line, exit 2
    return p


def options_from(args: argparse.Namespace) -> EvaluateOptions:
    ckpt = Path(args.ckpt)
    return EvaluateOptions(
        ckpt=ckpt, attacks=parse_names(args.attacks, "--attacks") if args.attacks is not None else None,
        eps=parse_eps(args.eps) if args.eps is not None else None, n=args.n, batch_size=args.batch_size,
        device=args.device, data_root=args.data_root, steps=args.steps, restarts=args.restarts, seed=args.seed,
        stability_attacks=parse_stability_attacks(args.stability_attacks), stability_n=args.stability_n,
        stability_steps=args.stability_steps, map=args.map, topk=args.topk, pictures=not args.no_pictures,
        n_pictures=args.n_pictures, out=Path(args.out) if args.out else ckpt.parent / f"eval-{ckpt.stem}",
        checks=not args.no_checks, checks_n=args.checks_n, transfer_from=args.transfer_from, devices=args.devices,
        accelerator=args.accelerator, num_nodes=args.num_nodes,
        probes=parse_probes(args.probes) if args.probes is not None else (),
        saturation_levels=parse_levels(args.saturation_levels, "--saturation-levels"),
        shuffle_levels=parse_levels(args.shuffle_levels, "--shuffle-levels"), universal=args.universal,
        universal_eps=parse_budget(args.universal_eps, "--universal-eps") if args.universal_eps is not None else None,
        universal_norm=args.universal_norm, universal_n=args.universal_n, type1=args.type1)


def main(argv: list[str]) -> int:
    options = options_from(parser().parse_args(argv))  # every mistake in the options fails here, once
    read_checkpoint(options.ckpt)  # a bad file fails here, once, not in every process
    split, device = launch(options.devices, options.accelerator, options.num_nodes)
    report = run(options, split, device)
    split.barrier()
    if not split.main:
        return 0
    write_report(report, options.out)
    print(format_console(report))
    written = ["report.json", "report.md", *report["pictures"]]
    print(f"wrote {', '.join(written[:-1])} and {written[-1]} in {options.out}")
    return 0
