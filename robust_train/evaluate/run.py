"""`evaluate`: a checkpoint's report, section by section (see sections/)."""
from __future__ import annotations

import copy
import time

from robust_train.distributed import Split
from robust_train.evaluate.evaluation import Evaluation
from robust_train.evaluate.options import EvaluateOptions
from robust_train.evaluate.sections import sections_in_order
from robust_train.evaluate.wandb_log import log_to_wandb


def run(options: EvaluateOptions, split: Split | None = None, device=None) -> dict:
    """The report of `options.ckpt` as a dict (`report.write_report` writes it). With a `split` (several processes,
    `robust_train.distributed`), the suite, transfer and stability batches are shared out and summed, with the same
    numbers as one process; the checks and the pictures run on the first process alone, which alone logs."""
    ev = Evaluation.load(options, split, device)
    sections = sections_in_order()
    for section in sections:
        section.prepare(ev)  # every check that needs the model or data, before any long attack
    info = ev.info
    report = {
        "checkpoint": str(options.ckpt),
        "recipe": info.get("recipe", "unknown"),
        "method": info.get("method"),
        "arch": info.get("arch"),
        "dataset": info["data_spec"].get("name"),
        "train_eps": info.get("eps"),
        "n_examples": len(ev.x),
        "seed": options.seed,
        "clean_accuracy": ev.clean.float().mean().item(),
    }
    for section in sections:
        report.update(copy.deepcopy(section.fields))
    ev.results["report"] = report
    for section in sections:
        report.update(section.run(ev))
    report.update({"notes": ev.notes, "device": str(ev.device), "processes": ev.split.world,
                   "date": time.strftime("%Y-%m-%d %H:%M:%S")})
    if ev.split.main:
        log_to_wandb(report, ev.results.get("figures", {}))
    return report


def evaluate(ckpt, attacks=None, eps=None, *, split: Split | None = None, **options) -> dict:
    """`run` with the options as arguments (`EvaluateOptions`' fields), e.g.
    `evaluate("checkpoints/pgd/<run>/last.ckpt", ["pgd", "pgd_margin"], [0, 0.3], n=500)`."""
    return run(EvaluateOptions(ckpt=ckpt, attacks=attacks, eps=eps, **options), split)
