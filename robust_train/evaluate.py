"""`python -m robust_train evaluate --ckpt PATH`: accuracy of a checkpoint under attack over an ε grid.

Robust accuracy at each ε is the per-example worst case over every attack run (an example counts as robust only
if no attack broke it), not the minimum of the per-attack means, which would overstate robustness.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from fractions import Fraction
from pathlib import Path

import torch
from tqdm import tqdm

from robust_train.attacks.base import check_eps
from robust_train.attacks.suite import DEFAULT_SUITE, EXTERNAL, build_attack
from robust_train.checkpoint import atomic_write_text, classifier_from_checkpoint, read_checkpoint
from robust_train.errors import ConfigError


def parse_eps(text: str) -> list[float]:
    """'0,0.1,8/255' -> [0.0, 0.1, 0.0313...]; fractions are parsed, never eval'ed."""
    values = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            values.append(float(Fraction(item)))
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"--eps {item!r} is not a number: give values like 0.3 or 8/255, comma-separated")
    return [check_eps(v) for v in values]


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


def run_autoattack(model, x, y, eps, batch_size, device, version, seed) -> tuple[torch.Tensor, dict]:
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        raise ConfigError("--attacks autoattack needs the AutoAttack package: pip install 'robust-train[autoattack]'")
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    if version == "standard":
        aa = AutoAttack(model, eps=eps, norm="Linf", device=device, seed=seed, version="standard")
        row = {"attack": "autoattack_standard", "steps": 100, "restarts": 1}
    else:  # APGD-CE + APGD-T (9 target classes) as in standard AutoAttack, without FAB-T and Square
        aa = AutoAttack(model, eps=eps, norm="Linf", device=device, seed=seed, version="custom",
                        attacks=["apgd-ce", "apgd-t"])
        aa.apgd.n_restarts = 1
        row = {"attack": "autoattack", "steps": 100, "restarts": 1}
    _, y_adv = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    return (y_adv.to(y.device) == y), {**row, "norm": "linf", "eps": eps, "step_size": None, "loss": "ce+dlr",
                                      "targeted": False}


def evaluate(ckpt_path: str, attacks: list[str] | None = None, eps: list[float] | None = None, n: int = 1000,
             batch_size: int = 250, device: str | None = None, data_root: str | None = None,
             steps: int | None = None, restarts: int | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Run the suite and return the report as a dict (see `write_report`)."""
    attacks = list(attacks or DEFAULT_SUITE)
    for name in attacks:
        if name not in EXTERNAL:
            build_attack(name, 0.0, steps, restarts)  # unknown names fail before any work
    ckpt = read_checkpoint(ckpt_path)
    info = ckpt["robust_train"]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = classifier_from_checkpoint(ckpt).to(device)
    grid = list(eps if eps is not None else info["data_spec"].get("eps_grid") or [info["eps"]])
    x, y = build_datamodule(ckpt, data_root).test_tensors(n)
    x, y = x.to(device), y.to(device)
    torch.manual_seed(seed)

    clean = predictions(model, x, batch_size) == y
    rows, robust = [], {}
    n_batches = -(-len(x) // batch_size)
    bar = tqdm(total=len(grid) * len(attacks) * n_batches, desc="evaluate", unit="batch", disable=not progress)
    for e in grid:
        worst = clean.clone()
        for name in attacks:
            t0 = time.perf_counter()
            bar.set_postfix_str(f"{name} eps={e:g}")
            if name in EXTERNAL:
                if e == 0:
                    correct, row = clean.clone(), {"attack": name, "norm": "linf", "eps": 0.0, "steps": 0,
                                                   "step_size": None, "restarts": 1}
                else:
                    correct, row = run_autoattack(model, x, y, e, batch_size, device,
                                                  "standard" if name == "autoattack_standard" else "custom", seed)
                bar.update(n_batches)
            else:
                attack = build_attack(name, e, steps, restarts)
                correct = torch.empty_like(clean)
                for i in range(0, len(x), batch_size):
                    x_adv = attack(model, x[i:i + batch_size], y[i:i + batch_size])
                    correct[i:i + batch_size] = predictions(model, x_adv, batch_size) == y[i:i + batch_size]
                    bar.update(1)
                row = attack.describe()
            row = {"name": name, **row, "accuracy": correct.float().mean().item()}
            row["seconds"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
            worst &= correct
        robust[f"{e:g}"] = worst.float().mean().item()
    bar.close()
    return {
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
        "device": str(device),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


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


def write_report(report: dict, out: Path) -> None:
    table = format_table(report)
    md = (f"# Evaluation of `{report['checkpoint']}`\n\n"
          f"Recipe `{report['recipe']}` ({report['method']}, {report['arch']}) on {report['dataset']}: "
          f"{report['n_examples']} test images, clean accuracy **{report['clean_accuracy']:.4f}**.\n\n"
          f"Accuracy under each attack; the last column counts an image as robust only if no attack broke it.\n\n"
          f"{table}\n\nAttack settings are in report.json. Device {report['device']}, {report['date']}.\n")
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "report.md", md)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="robust-train evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint written by fit (e.g. .../last.ckpt)")
    parser.add_argument("--attacks", default=",".join(DEFAULT_SUITE),
                        help=f"comma-separated presets (default {','.join(DEFAULT_SUITE)}); 'autoattack' runs "
                             "APGD-CE + APGD-T through the pyautoattack package")
    parser.add_argument("--eps", default=None, help="comma-separated budgets, e.g. 0,0.1,0.3 or 0,2/255,8/255 "
                                                    "(default: the data set's standard grid)")
    parser.add_argument("--n", type=int, default=1000, help="number of test images (default 1000)")
    parser.add_argument("--out", default=None, help="report folder (default: beside the checkpoint)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--steps", type=int, default=None, help="override the presets' iteration counts")
    parser.add_argument("--restarts", type=int, default=None, help="override the presets' restarts")
    parser.add_argument("--device", default=None)
    parser.add_argument("--data-root", default=None, help="where the test set lives, if not where it was trained")
    parser.add_argument("--seed", type=int, default=0)
    parser.error = lambda message: (_ for _ in ()).throw(ConfigError(f"evaluate: {message}"))  # one line, exit 2
    args = parser.parse_args(argv)
    if args.n <= 0 or args.batch_size <= 0:
        raise ConfigError("--n and --batch-size must be positive integers")
    ckpt = Path(args.ckpt)
    out = Path(args.out) if args.out else ckpt.parent / f"eval-{ckpt.stem}"
    report = evaluate(str(ckpt), [a.strip() for a in args.attacks.split(",") if a.strip()],
                      parse_eps(args.eps) if args.eps else None, args.n, args.batch_size, args.device,
                      args.data_root, args.steps, args.restarts, args.seed, progress=True)
    write_report(report, out)
    print(f"\n{report['recipe']}: clean accuracy {report['clean_accuracy']:.4f} on {report['n_examples']} images\n")
    print(format_table(report))
    print(f"\nwrote {out / 'report.json'} and {out / 'report.md'}")
    return 0
