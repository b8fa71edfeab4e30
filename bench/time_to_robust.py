"""Time to robustness: each MNIST recipe that trains for robustness, trained as written on the bundled MNIST, with
AutoAttack (APGD-CE + APGD-T, ε 0.3) on the same first --n test images at checkpoints along the way, so the result
is a curve of robust accuracy against training minutes, not one end point; the last checkpoint is also evaluated
with our default suite (`evaluate`'s worst case over its attacks) beside AutoAttack.

Minutes are the wall clock of `python -m robust_train fit --recipe R` from its start to the moment it wrote the
checkpoint: what a user waits for, Lightning's start-up and the recipe's own validation included.

Goals (issue 16):
  (a) the best single-step recipe (fgsm_rs, n_fgsm or gradalign): AutoAttack >= 0.80 in <= 8 minutes on the 2-core
      CPU, and no collapse over 5 seeds (`--seeds 5 --recipes n_fgsm`);
  (b) the best recipe: AutoAttack >= 0.85 within 60 minutes;
  (c) int2_adv: AutoAttack >= 0.70 in <= 34.5 minutes (half of the 69 minutes of its 40-epoch schedule).

    python bench/time_to_robust.py [--recipes fgsm_rs,n_fgsm,...] [--seeds 1] [--n 1000] [--points 6]
        [--runs bench/out/time_to_robust_runs] [--reuse] [--train-args "..."] [--no-suite]
        [--out bench/out/time_to_robust.json] [--png bench/out/time_to_robust.png]
    python bench/time_to_robust.py --combine A.json B.json ...   (earlier runs judged and plotted together)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import log, machine_info, write_result
from robust_train.evaluate import evaluate

RECIPES = ["fgsm_rs", "n_fgsm", "gradalign", "pgd", "trades", "mart", "pgd_awp", "int2_adv", "ig_norm", "ig_norm_sum"]
SINGLE_STEP = ["fgsm_rs", "n_fgsm", "gradalign"]
EPS = 0.3
GOALS = {"single_step": (0.80, 8.0), "best": (0.85, 60.0), "int2_adv": (0.70, 34.5)}
COLLAPSED = 0.2  # a run whose AutoAttack accuracy ends below this has catastrophically overfitted


def train(recipe: str, seed: int, runs: Path, extra: list[str], reuse: bool) -> tuple[Path, float, float]:
    """Train `recipe` with the CLI, a checkpoint after every validation; returns (run folder, start time, minutes).
    With `reuse`, an earlier finished run of this recipe and seed in `runs` is taken instead (its timing file)."""
    root = runs / f"{recipe}-seed{seed}"
    stamp = root / "timing.txt"
    if reuse and stamp.is_file():
        start, seconds, run = stamp.read_text().split("\n")[:3]
        log(f"{recipe} seed {seed}: reusing {run}")
        return Path(run), float(start), float(seconds) / 60
    env = {**os.environ, "ROBUST_TRAIN_OUTPUT": str(root), "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    log(f"{recipe} seed {seed}: training with the CLI -> {root}/")
    start = time.time()
    subprocess.run([sys.executable, "-m", "robust_train", "fit", "--recipe", recipe, "--seed_everything", str(seed),
                    "--trainer.enable_progress_bar", "false", "--checkpoint.save_top_k", "-1", *extra],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    seconds = time.time() - start
    run = max((p.parent for p in root.glob(f"{recipe}/*/last.ckpt")), key=lambda p: p.stat().st_mtime)
    stamp.write_text(f"{start}\n{seconds}\n{run}\n")
    log(f"{recipe} seed {seed}: trained in {seconds / 60:.1f} min")
    return run, start, seconds / 60


def checkpoints_along(run: Path, start: float, points: int) -> list[tuple[int, float, Path]]:
    """(epoch, minutes since the start, path) of up to `points` checkpoints evenly spread over the run, the last
    one always included."""
    found = []
    for p in run.glob("best-*.ckpt"):
        m = re.match(r"best-(\d+)-", p.name)
        if m:
            found.append((int(m.group(1)), (p.stat().st_mtime - start) / 60, p))
    found.sort()
    if len(found) <= points:
        return found
    picks = {round(i * (len(found) - 1) / (points - 1)) for i in range(points)}
    return [found[i] for i in sorted(picks)]


def robust_at(ckpt: Path, attacks: list[str] | None, n: int, seed: int) -> tuple[float, float]:
    rep = evaluate(str(ckpt), attacks=attacks, eps=[EPS], n=n, seed=seed, progress=False, pictures=False,
                   checks=False, stability_attacks=())
    return rep["clean_accuracy"], rep["robust_accuracy"][f"{EPS:g}"]


def first_reaching(curve: list[dict], level: float) -> float | None:
    return next((p["minutes"] for p in curve if p["autoattack"] >= level), None)


def judge(results: dict) -> dict:
    """Each goal: met / not met / not evaluated, with the figures it rests on."""
    def seeds_of(recipe):
        return results.get(recipe, {}).get("seeds", {})

    out = {}
    level, minutes = GOALS["single_step"]
    best, best_recipe = None, None
    for recipe in SINGLE_STEP:
        runs = seeds_of(recipe)
        if not runs:
            continue
        times = [first_reaching(r["curve"], level) for r in runs.values()]
        ok = all(t is not None and t <= minutes for t in times)
        finals = [r["curve"][-1]["autoattack"] for r in runs.values()]
        entry = {"seeds": len(runs), "minutes_to_level": times, "final_autoattack": finals,
                 "collapsed_seeds": sum(f < COLLAPSED for f in finals), "met": ok and len(runs) >= 5}
        out[f"single-step {recipe}: AA >= {level} in <= {minutes} min, 5 seeds without collapse"] = entry
        if best is None or min(finals) > best:
            best, best_recipe = min(finals), recipe
    level, minutes = GOALS["best"]
    reached = {r: first_reaching(s["curve"], level) for rec in results.values() for r, s in
               [(rec["recipe"], next(iter(rec["seeds"].values())))] if rec["seeds"]}
    hits = {r: t for r, t in reached.items() if t is not None and t <= minutes}
    out[f"best recipe: AA >= {level} within {minutes} min"] = {"met": bool(hits), "recipes": hits}
    level, minutes = GOALS["int2_adv"]
    runs = seeds_of("int2_adv")
    if runs:
        t = first_reaching(next(iter(runs.values()))["curve"], level)
        out[f"int2_adv: AA >= {level} in <= {minutes} min"] = {"met": t is not None and t <= minutes, "minutes": t}
    return out


def table(results: dict) -> str:
    lines = [f"{'recipe':<12} {'seed':>4} {'epoch':>5} {'minutes':>7} {'clean':>6} {'AutoAttack':>10} "
             f"{'suite':>6}"]
    for rec in results.values():
        for seed, run in rec["seeds"].items():
            for p in run["curve"]:
                suite = f"{p['suite']:.3f}" if p.get("suite") is not None else "–"
                lines.append(f"{rec['recipe']:<12} {seed:>4} {p['epoch']:>5} {p['minutes']:>7.1f} {p['clean']:>6.3f} "
                             f"{p['autoattack']:>10.3f} {suite:>6}")
    return "\n".join(lines)


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, rec in enumerate(results.values()):
        color = f"C{i % 10}"
        for j, (seed, run) in enumerate(rec["seeds"].items()):
            xs = [p["minutes"] for p in run["curve"]]
            ys = [p["autoattack"] for p in run["curve"]]
            ax.plot(xs, ys, "o-", color=color, alpha=1.0 if j == 0 else 0.35, ms=4,
                    label=rec["recipe"] if j == 0 else None)
    for level, minutes in GOALS.values():
        ax.plot([minutes], [level], "k*", ms=10)
    ax.set_xlabel("training minutes (2-core CPU)" if not torch.cuda.is_available() else "training minutes")
    ax.set_ylabel(f"AutoAttack accuracy at ε {EPS:g}")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Time to robustness on the bundled MNIST (★ = goals)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    log(f"wrote {png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipe names")
    ap.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 of every recipe (5 for goal (a))")
    ap.add_argument("--n", type=int, default=1000, help="test images (the first n of the test set)")
    ap.add_argument("--points", type=int, default=6, help="checkpoints per run evaluated with AutoAttack")
    ap.add_argument("--runs", default="bench/out/time_to_robust_runs", help="where the training runs go")
    ap.add_argument("--reuse", action="store_true", help="take finished runs from --runs instead of training")
    ap.add_argument("--train-args", default="", help="extra fit flags (smoke tests only: changes the recipes)")
    ap.add_argument("--no-suite", dest="suite", action="store_false", help="skip the default suite at the end")
    ap.add_argument("--combine", nargs="+", metavar="JSON", help="no training: merge earlier results (runs of "
                    "separate recipes), judge the goals on them together, print, write --out and --png")
    ap.add_argument("--out", default="bench/out/time_to_robust.json")
    ap.add_argument("--png", default="bench/out/time_to_robust.png")
    args = ap.parse_args()
    if args.seeds < 1 or args.n < 1 or args.points < 2:
        sys.exit("time_to_robust: --seeds and --n must be >= 1 and --points >= 2")
    recipes = [r for r in args.recipes.split(",") if r] if not args.combine else []
    result = {"benchmark": "time_to_robust", "eps": EPS, "n": args.n, "machine_info": machine_info("cpu"),
              "train_args": args.train_args, "goals": {}, "recipes": {}}
    for path in args.combine or []:
        earlier = json.loads(Path(path).read_text())
        result["recipes"].update(earlier["recipes"])
        result.setdefault("combined_from", []).append({"file": path, "date": earlier.get("date")})
    out = Path(args.out)
    for recipe in recipes:
        rec = result["recipes"].setdefault(recipe, {"recipe": recipe, "seeds": {}})
        for seed in range(args.seeds):
            run, start, minutes = train(recipe, seed, Path(args.runs), args.train_args.split(), args.reuse)
            curve = []
            points = checkpoints_along(run, start, args.points)
            for k, (epoch, at, ckpt) in enumerate(points):
                t0 = time.time()
                clean, aa = robust_at(ckpt, ["autoattack"], args.n, seed)
                point = {"epoch": epoch, "minutes": round(at, 2), "clean": clean, "autoattack": aa,
                         "checkpoint": str(ckpt)}
                if args.suite and k == len(points) - 1:
                    point["suite"] = robust_at(ckpt, None, args.n, seed)[1]
                curve.append(point)
                log(f"{recipe} seed {seed} epoch {epoch} ({at:.1f} min): clean {clean:.3f}, AutoAttack {aa:.3f}"
                    + (f", suite {point['suite']:.3f}" if "suite" in point else "") + f" ({time.time() - t0:.0f} s)")
            rec["seeds"][str(seed)] = {"train_minutes": round(minutes, 2), "run": str(run), "curve": curve}
            write_result(out, result, announce=False)  # a long run keeps what it has measured so far
    result["goals"] = judge(result["recipes"])
    print(table(result["recipes"]))
    for goal, entry in result["goals"].items():
        verdict = "MET" if entry["met"] else "NOT MET"
        print(f"{goal}: {verdict}  {({k: v for k, v in entry.items() if k != 'met'})}")
    write_result(out, result)
    plot(result["recipes"], Path(args.png))
    if any(math.isnan(p["autoattack"]) for r in result["recipes"].values() for s in r["seeds"].values()
           for p in s["curve"]):
        sys.exit("time_to_robust: some AutoAttack figures are NaN")


if __name__ == "__main__":
    main()
