"""`python -m robust_train compare A/report.json B/ ...`: several evaluations side by side, their minimal-perturbation
medians in a table and their robustness curves on one plot (robustness_curves.png, or --out)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from robust_train.errors import ConfigError


def read_report(path: str) -> tuple[str, dict]:
    """(label, report) of a report.json or a folder holding one; ConfigError in one line otherwise."""
    file = Path(path)
    file = file / "report.json" if file.is_dir() else file
    if not file.is_file():
        raise ConfigError(f"{path}: no report.json there; give report.json files or folders written by evaluate")
    try:
        report = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{file} is not a report.json (it does not parse as JSON); run evaluate again") from None
    if not isinstance(report, dict) or "checkpoint" not in report:
        raise ConfigError(f"{file} is not a report written by evaluate (no checkpoint in it)")
    return f"{report.get('recipe', 'unknown')}: {Path(str(report['checkpoint'])).stem}", report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robust-train compare", description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", help="report.json files, or the folders evaluate wrote them to")
    p.add_argument("--out", default="robustness_curves.png", help="the plot (default robustness_curves.png)")
    p.error = lambda message: (_ for _ in ()).throw(ConfigError(f"compare: {message}"))
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    labelled = [read_report(path) for path in args.reports]
    names = [label for label, _ in labelled]
    # two runs of one recipe and checkpoint name: tell them apart by where they are
    labels = [f"{name} ({path})" if names.count(name) > 1 else name for name, path in zip(names, args.reports)]
    curves = {label: report.get("robustness_curve") or {} for label, (_, report) in zip(labels, labelled)}
    if not any(curves.values()):
        raise ConfigError("none of these reports has a robustness curve: evaluate with a minimal-perturbation "
                          "attack, e.g. --attacks pgd,deepfool,fmn")
    out = Path(args.out)
    if out.suffix.lower() != ".png" or not out.parent.resolve().is_dir():
        raise ConfigError(f"--out {out}: give a .png path in an existing folder")
    print("| report | attack | norm | median | found / n |")
    print("|---|---|---|---|---|")
    for label, (_, report) in zip(labels, labelled):
        for row in report.get("minimal_perturbation") or []:
            median = "–" if row.get("median") is None else f"{row['median']:.4f}"
            print(f"| {label} | {row['attack']} | {row['norm']} | {median} | {row['n_success']} / {row['n']} |")
    from robust_train.figures.curves import robustness_curve_figure  # matplotlib

    robustness_curve_figure({label: c for label, c in curves.items() if c}, out)
    print(f"wrote {out}")
    return 0
