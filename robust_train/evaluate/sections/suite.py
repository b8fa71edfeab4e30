"""Accuracy under every attack of the suite at every ε of the grid, and the per-example worst case over them
(report.json `attacks`, `robust_accuracy`). The default suite's worst case is checked against AutoAttack (APGD-CE +
APGD-T) by the tests and by bench/mnist_pgd.py; `--attacks autoattack` runs AutoAttack itself."""
from __future__ import annotations

import time

from tqdm import tqdm

from robust_train.attacks import create_attack
from robust_train.errors import ConfigError
from robust_train.evaluate.accuracy import correct_under, worst_case
from robust_train.evaluate.evaluation import Evaluation
from robust_train.evaluate.sections.base import Section, register_section
from robust_train.evaluate.sections.minimal import minimal_names
from robust_train.models.protopnet import is_prototype_model

DEFAULT_SUITE = ["pgd", "pgd_margin", "pgd_targeted"]
SUITE_STREAM = 0  # random stream of batch_seed, apart from the transfer's and the stability attacks'


def suite_for(model, attacks) -> list[str]:
    """The attacks to run on this model: the named ones, else the default suite, plus the adaptive `pgd_prototype`
    on a ProtoPNet, whose log similarity can saturate every loss on its logits (see that attack)."""
    prototypes = is_prototype_model(model)
    if attacks is None:
        return [*DEFAULT_SUITE, *(["pgd_prototype"] if prototypes else [])]
    if "pgd_prototype" in attacks and not prototypes:
        raise ConfigError(f"--attacks pgd_prototype needs a ProtoPNet checkpoint; this one holds a "
                          f"{type(model).__name__}: drop pgd_prototype")
    minimal = minimal_names(attacks)  # they run once, in the minimal section, which adds them to the worst case
    return [a for a in attacks if a not in minimal]


def prototype_note(suite: list[str]) -> str:
    return ("ProtoPNet: its log similarity can saturate every loss on its logits, so cross-entropy and margin PGD "
            "may overstate its robustness and the masking checks may fail on them; "
            + ("the suite ran pgd_prototype (the adaptive attack on head(−distance)), so the worst case above "
               "includes it." if "pgd_prototype" in suite else
               "add pgd_prototype to --attacks (the adaptive attack on head(−distance)) before quoting robust "
               "accuracy."))


@register_section("suite")
class Suite(Section):
    order = 10
    fields = {"attacks": [], "robust_accuracy": {}}

    def prepare(self, ev: Evaluation) -> None:
        ev.results["suite"] = suite_for(ev.model, ev.options.attacks)

    def run(self, ev: Evaluation) -> dict:
        opts, suite = ev.options, ev.results["suite"]
        rows, robust, worst_by_eps = [], {}, {}
        bar = tqdm(total=len(ev.grid) * len(suite) * ev.split.count(len(ev.x), opts.batch_size), desc="evaluate",
                   unit="batch", disable=not ev.progress)
        for ei, eps in enumerate(ev.grid):
            correct_by_attack = []
            for ai, name in enumerate(suite):
                t0 = time.perf_counter()
                bar.set_postfix_str(f"{name} eps={eps:g}")
                attack = create_attack(name, eps, steps=opts.steps, restarts=opts.restarts)
                # Batch b's random draws depend only on (seed, ε, attack, b): the same on any rank, in any order.
                correct = correct_under(ev.model, ev.x, ev.y, attack, opts.batch_size, ev.split,
                                        seed=(opts.seed, SUITE_STREAM, ei, ai), on_batch=lambda: bar.update(1))
                rows.append({"name": name, **attack.describe(), "accuracy": correct.float().mean().item(),
                             "seconds": round(time.perf_counter() - t0, 2)})
                correct_by_attack.append(correct)
            worst_by_eps[eps] = worst_case(ev.clean, correct_by_attack)
            robust[f"{eps:g}"] = worst_by_eps[eps].float().mean().item()
        bar.close()
        ev.results["worst_by_eps"] = worst_by_eps
        if is_prototype_model(ev.model):
            ev.note(prototype_note(suite))
        return {"attacks": rows, "robust_accuracy": robust}

    def text(self, report: dict) -> str:
        """Rows: ε; columns: each attack's accuracy and the per-example worst case."""
        names = list(dict.fromkeys(r["name"] for r in report["attacks"]))
        by = {(f"{r['eps']:g}", r["name"]): r["accuracy"] for r in report["attacks"]}
        header = ["eps", *names, "worst case"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for e, worst in report["robust_accuracy"].items():
            cells = [e, *(f"{by.get((e, n), float('nan')):.4f}" for n in names), f"**{worst:.4f}**"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def worst_at(ev: Evaluation, eps: float):
    """The suite's per-example worst case at ε, or None when ε is not in the grid."""
    return next((w for e, w in ev.results.get("worst_by_eps", {}).items() if abs(e - eps) < 1e-12), None)
