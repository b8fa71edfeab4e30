"""Gradient-masking checks (report.json `checks`, `masking_suspected`, `checks_settings`), in the spirit of
AutoAttack's flags, on the first `checks_n` images at the main ε: accuracy that does not fall with ε or with more
steps, PGD weaker than FGSM, accuracy above 0 at ε = 1, random noise or transferred examples beating the white-box
attacks, exactly zero input gradients (see `robust_train.evaluate.masking`). They run on the first process alone."""
from __future__ import annotations

import time

from robust_train.evaluate import masking
from robust_train.evaluate.evaluation import Evaluation
from robust_train.evaluate.sections.base import Section, register_section
from robust_train.evaluate.sections.suite import worst_at


@register_section("checks")
class Checks(Section):
    order = 30
    title = "Gradient masking"
    fields = {"checks": [], "masking_suspected": None, "checks_settings": {}}

    def run(self, ev: Evaluation) -> dict:
        opts = ev.options
        if not opts.checks or not ev.split.main:
            return {}
        t0, eps, count = time.perf_counter(), ev.main_eps, min(opts.checks_n, len(ev.x))
        suite_worst = worst_at(ev, eps)
        report = ev.results["report"]
        at_main = {r["name"]: r["accuracy"] for r in report["attacks"] if abs(r["eps"] - eps) < 1e-12}
        reuse = (at_main["fgsm"], at_main["pgd"]) if {"fgsm", "pgd"} <= set(at_main) else None
        rows = masking.run_checks(
            ev.model, ev.x[:count], ev.y[:count], eps, robust_by_eps=report["robust_accuracy"], n_eval=len(ev.x),
            white_correct=None if suite_worst is None else suite_worst[:count], reuse_fgsm_pgd=reuse,
            transfer_correct=ev.results.get("transfer_correct"), transfer_white=suite_worst,
            batch_size=opts.batch_size, seed=opts.seed)
        return {"checks": rows, "masking_suspected": masking.masking_suspected(rows),
                "checks_settings": {"eps": eps, "n": count, "seconds": round(time.perf_counter() - t0, 2)}}

    def text(self, report: dict) -> str:
        rows = report.get("checks") or []
        if not rows:
            return ""
        settings = report.get("checks_settings") or {}
        verdict = ("**gradient masking suspected**: the accuracies above may overstate robustness; trust the margin "
                   "loss (pgd_margin) and AutoAttack more than cross-entropy PGD" if report.get("masking_suspected")
                   else "no sign of gradient masking")
        return (f"Checks on the first {settings.get('n')} images at ε = {settings.get('eps', float('nan')):g}: "
                f"{verdict}.\n\n{masking.format_checks(rows)}")
