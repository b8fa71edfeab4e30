"""What each defence buys, judged honestly, in one run: defensive distillation's gradient masking and ensemble
adversarial training's black-box robustness against PGD-AT's, on the bundled MNIST at ε 0.3 (issue 4, point 7).

Four targets trained with the CLI recipes as written (or taken with --ckpt NAME=PATH): `standard`, `distillation`,
`ensemble_adv` and `pgd`, plus a held-out black-box source: the `standard` recipe again with another seed (so it is
neither the standard target nor one of ensemble_adv's static models). Each target is evaluated on the same first
--n test images with FGSM, cross-entropy PGD-100, margin PGD-100 and AutoAttack (APGD-CE + APGD-T), the
per-example worst case over them, PGD-100 examples transferred from the source, and evaluate's masking checks.

What the table should show, and the script checks:
* distillation: CE-PGD reports robustness that the margin loss and AutoAttack take away, and the checks flag it;
* ensemble_adv: black-box accuracy well above the standard model's, white-box accuracy about as low;
* pgd: the reference, robust in both.

    python bench/defences.py [--n 500] [--ckpt pgd=PATH ...] [--source-ckpt PATH] [--out bench/out/defences.json]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import train_recipe, write_result
from robust_train.evaluate import evaluate

TARGETS = ("standard", "distillation", "ensemble_adv", "pgd")
ATTACKS = ["fgsm", "pgd", "pgd_margin", "autoattack"]
SOURCE_SEED = 1


def parse_ckpts(items: list[str]) -> dict[str, str]:
    ckpts = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or name not in TARGETS:
            raise SystemExit(f"--ckpt wants NAME=PATH with NAME one of {', '.join(TARGETS)}, got {item!r}")
        ckpts[name] = path
    return ckpts


def row_from_report(report: dict, eps: float) -> dict:
    acc = {r["name"]: r["accuracy"] for r in report["attacks"] if abs(r["eps"] - eps) < 1e-12}
    failed = [c["check"] for c in report["checks"] if not c["passed"]]
    return {"clean": report["clean_accuracy"], **acc, "worst": report["robust_accuracy"][f"{eps:g}"],
            "black_box": report["transfer"]["accuracy"], "masking_suspected": report["masking_suspected"],
            "failed_checks": failed}


def findings(rows: dict) -> dict:
    """The claims the benchmark exists to test, each with the numbers behind it."""
    d, e, s, p = rows["distillation"], rows["ensemble_adv"], rows["standard"], rows["pgd"]
    broken = min(d["pgd_margin"], d["autoattack"])
    return {
        "distillation_masking_exposed": {
            "holds": d["pgd"] - broken >= 0.2 and bool(d["masking_suspected"]),
            "ce_pgd": d["pgd"], "margin_or_autoattack": broken, "failed_checks": d["failed_checks"]},
        "ensemble_black_box_above_standard": {
            "holds": e["black_box"] - s["black_box"] >= 0.1,
            "ensemble_adv": e["black_box"], "standard": s["black_box"]},
        "ensemble_black_box_vs_pgd_at": {
            "holds": e["black_box"] >= p["black_box"],
            "ensemble_adv": e["black_box"], "pgd": p["black_box"]},
        "no_masking_flagged_on_pgd_at": {"holds": not p["masking_suspected"], "failed_checks": p["failed_checks"]},
    }


def format_table(rows: dict, n: int, eps: float) -> str:
    head = ("| target | clean | FGSM | CE-PGD-100 | margin PGD-100 | AutoAttack | worst case | black-box PGD | "
            "masking checks failed |")
    lines = [f"MNIST (bundled), small_cnn, first {n} test images, eps {eps:g}", "", head, "|---" * 9 + "|"]
    for name, r in rows.items():
        cells = [r["clean"], r["fgsm"], r["pgd"], r["pgd_margin"], r["autoattack"], r["worst"], r["black_box"]]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in cells) +
                     f" | {', '.join(r['failed_checks']) or 'none'} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="first n test images (AutoAttack is the slow part)")
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--ckpt", action="append", default=[], metavar="NAME=PATH",
                    help=f"reuse a trained target instead of training it; NAME in {', '.join(TARGETS)}")
    ap.add_argument("--source-ckpt", help="the black-box source (default: train `standard` with seed 1)")
    ap.add_argument("--checks-n", type=int, default=200)
    ap.add_argument("--runs", default="bench/out/runs")
    ap.add_argument("--out", default="bench/out/defences.json")
    args = ap.parse_args(argv)

    ckpts = parse_ckpts(args.ckpt)
    runs, trained = Path(args.runs), {}
    for name in TARGETS:
        if name not in ckpts:
            t0 = time.time()
            ckpts[name] = str(train_recipe(name, runs, []))
            trained[name] = round((time.time() - t0) / 60, 1)
    source = args.source_ckpt or str(train_recipe("standard", runs, ["--seed_everything", str(SOURCE_SEED)]))

    rows, seconds = {}, {}
    for name in TARGETS:
        t0 = time.time()
        report = evaluate(ckpts[name], ATTACKS, [args.eps], n=args.n, transfer_from=source,
                          checks_n=args.checks_n, stability_attacks=(), pictures=False)
        rows[name] = row_from_report(report, args.eps)
        seconds[name] = round(time.time() - t0, 1)
        print(f"{name}: evaluated in {seconds[name]:.0f} s", flush=True)

    print("\n" + format_table(rows, args.n, args.eps) + "\n")
    found = findings(rows)
    for claim, f in found.items():
        print(f"{claim}: {'HOLDS' if f['holds'] else 'DOES NOT HOLD'}  "
              + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in f.items() if k != "holds"))
    write_result(args.out, {"benchmark": "defences", "n": args.n, "eps": args.eps, "attacks": ATTACKS, "rows": rows,
                            "findings": found, "checkpoints": ckpts, "source": source, "trained_minutes": trained,
                            "eval_seconds": seconds})


if __name__ == "__main__":
    main()
