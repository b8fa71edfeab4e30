"""A report section: one part of `evaluate`'s report, with the report.json fields it owns, the work that fills them
and its text in report.md and on the console. Adding one is a file with a registered `Section` subclass, imported
in sections/__init__.py; `order` places it (later sections may read what earlier ones left in `Evaluation.results`).
"""
from __future__ import annotations

from robust_train.evaluate.evaluation import Evaluation
from robust_train.registry import Registry

SECTIONS: Registry = Registry("report section")
register_section = SECTIONS.register


class Section:
    order = 0
    title: str | None = None  # its heading in report.md and on the console; None: no heading of its own
    on_console = True  # also printed at the end of `evaluate` (False: report.md only, e.g. picture links)
    fields: dict = {}  # report.json fields it owns, with their values when it does not run

    def prepare(self, ev: Evaluation) -> None:
        """Checks that need the model or the data, run for every section before any section's work."""

    def run(self, ev: Evaluation) -> dict:
        """The section's work; returns its report fields."""
        raise NotImplementedError

    def text(self, report: dict) -> str:
        """Its body in report.md and on the console; "" when it has nothing to say."""
        return ""


def add_pictures(ev: Evaluation, figures: dict) -> list[str]:
    """Record a section's pictures ({file name: matplotlib Figure or its RGB array}, already written into the
    report folder): wandb logs them, and the returned list, every picture of the report so far, is the section's
    `pictures` field."""
    ev.results.setdefault("figures", {}).update(figures)
    return [*ev.results["report"].get("pictures", []), *(f for f in figures if f not in
                                                         ev.results["report"].get("pictures", []))]


def sections_in_order() -> list[Section]:
    return sorted((SECTIONS.get(name)() for name in SECTIONS.names()), key=lambda s: s.order)
