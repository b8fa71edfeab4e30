"""What early stopping buys `evaluate`: the default suite over the ε grid on real checkpoints, with PGD dropping
each example once it is misclassified (the default) and without, side by side in one run, plus torchattacks' PGD
against ours on the same constant-step attack.

    python bench/eval_speed.py --ckpt standard=PATH --ckpt pgd=PATH [--n 500] [--eps 0,0.1,0.3] [--threads 1]

Per checkpoint, per ε, per attack of the default suite (pgd, pgd_margin, pgd_targeted), the two settings run back to
back on the same test images from the same seed; the table gives the seconds of each and whether every example's
outcome agrees (it must: an example's forward in eval mode does not depend on the rest of the batch). The last
columns compare PGD-100 with torchattacks' constant step 2.5ε/100 from a random start: torchattacks.PGD (last
iterate) against ours (each example's strongest iterate, early stopping), time and accuracy left.
"""
from __future__ import annotations

import argparse
import time

import torch

from common import ROOT, write_result
from robust_train.attacks import PGD, create_attack
from robust_train.checkpoint import classifier_from_checkpoint, read_checkpoint
from robust_train.evaluate import DEFAULT_SUITE, correct_under, datamodule_from_checkpoint, parse_eps

STEPS = 100


def timed_correct(model, attack, x, y, batch_size: int, seed: int) -> tuple[torch.Tensor, float]:
    """(per-example correct after the attack, seconds). Batch b is seeded from (seed, b), so two arms given the same
    seed start from the same random points."""
    t0 = time.perf_counter()
    correct = correct_under(model, x, y, attack, batch_size, seed=(seed,))
    return correct, time.perf_counter() - t0


def bench_checkpoint(name: str, path: str, eps_grid, n: int, batch_size: int) -> list[dict]:
    import torchattacks

    ckpt = read_checkpoint(path)
    model = classifier_from_checkpoint(ckpt).eval()
    x, y = datamodule_from_checkpoint(ckpt, None).test_tensors(n)
    grid = eps_grid or ckpt["robust_train"]["data_spec"].get("eps_grid")
    rows = []
    for eps in [e for e in grid if e > 0]:
        for attack_name in DEFAULT_SUITE:
            timing = {}
            for on in (False, True):
                attack = create_attack(attack_name, eps, early_stop=on)
                timing[on] = timed_correct(model, attack, x, y, batch_size, seed=1)
            (c_off, t_off), (c_on, t_on) = timing[False], timing[True]
            rows.append({"model": name, "eps": eps, "attack": attack_name, "seconds_all": t_off,
                         "seconds_early_stop": t_on, "accuracy_all": c_off.float().mean().item(),
                         "accuracy_early_stop": c_on.float().mean().item(),
                         "outcomes_differ": int((c_off != c_on).sum())})
            print(_row_line(rows[-1]), flush=True)
        alpha = 2.5 * eps / STEPS
        ta = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=STEPS, random_start=True)
        c_ta, t_ta = timed_correct(model, lambda m, xb, yb: ta(xb, yb), x, y, batch_size, seed=2)
        c_ours, t_ours = timed_correct(model, PGD(eps, steps=STEPS, step_size=alpha), x, y, batch_size, seed=2)
        rows.append({"model": name, "eps": eps, "attack": "pgd100_constant", "seconds_torchattacks": t_ta,
                     "seconds_ours": t_ours, "accuracy_torchattacks": c_ta.float().mean().item(),
                     "accuracy_ours": c_ours.float().mean().item()})
        print(_row_line(rows[-1]), flush=True)
    return rows


def _row_line(r: dict) -> str:
    if r["attack"] == "pgd100_constant":
        return (f"{r['model']:<10}{r['eps']:>6g}  {'PGD-100 const':<14}torchattacks {r['seconds_torchattacks']:7.1f} s "
                f"acc {r['accuracy_torchattacks']:.3f} | ours {r['seconds_ours']:7.1f} s acc {r['accuracy_ours']:.3f}"
                f" | {r['seconds_torchattacks'] / r['seconds_ours']:.2f}x")
    return (f"{r['model']:<10}{r['eps']:>6g}  {r['attack']:<14}all {r['seconds_all']:7.1f} s | early stop "
            f"{r['seconds_early_stop']:7.1f} s | {r['seconds_all'] / r['seconds_early_stop']:5.2f}x | acc "
            f"{r['accuracy_all']:.3f} / {r['accuracy_early_stop']:.3f} | outcomes differ: {r['outcomes_differ']}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", action="append", required=True, help="NAME=PATH (repeatable)")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--eps", type=parse_eps, default=None, help="default: the checkpoint data set's grid")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "eval_speed.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for spec in args.ckpt:
        name, _, path = spec.partition("=")
        rows += bench_checkpoint(name, path, args.eps, args.n, args.batch_size)

    print(f"\n{args.n} test images, batch {args.batch_size}, {torch.get_num_threads()} threads: the default suite "
          "with early stopping against without")
    print(f"{'model':<10}{'suite s (all)':>15}{'early stop s':>14}{'speedup':>9}{'outcomes differ':>17}")
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name and "seconds_all" in r]
        t_all, t_on = sum(r["seconds_all"] for r in mine), sum(r["seconds_early_stop"] for r in mine)
        differ = sum(r["outcomes_differ"] for r in mine)
        print(f"{name:<10}{t_all:>15.1f}{t_on:>14.1f}{t_all / t_on:>8.2f}x{differ:>17}")
    write_result(args.out, {"benchmark": "eval_speed", "n": args.n, "batch_size": args.batch_size, "rows": rows})


if __name__ == "__main__":
    main()
