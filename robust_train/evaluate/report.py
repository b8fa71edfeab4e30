"""The report: report.json (strict JSON) and report.md, each written atomically, and the text printed at the end of
`evaluate`; a header and footer of its own around each section's text (`sections/`)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from robust_train.checkpoint import atomic_write_text
from robust_train.evaluate.sections import sections_in_order


def json_safe(obj):
    """A copy of a report in which every non-finite float is None, so `json.dumps(..., allow_nan=False)` works
    (plain `json.dumps` writes NaN, which is not JSON)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def section_texts(report: dict, console: bool = False) -> list[tuple[str | None, str]]:
    """(title, text) of every section that has something to say, in order (on the console: those shown there)."""
    return [(s.title, text) for s in sections_in_order() if (s.on_console or not console) and (text := s.text(report))]


def format_markdown(report: dict) -> str:
    md = (f"# Evaluation of `{report['checkpoint']}`\n\n"
          f"Recipe `{report['recipe']}` ({report['method']}, {report['arch']}) on {report['dataset']}: "
          f"{report['n_examples']} test images, clean accuracy **{report['clean_accuracy']:.4f}**.\n\n"
          f"Accuracy under each attack; the last column counts an image as robust only if no attack broke it.\n")
    for title, text in section_texts(report):
        md += f"\n## {title}\n\n{text}\n" if title else f"\n{text}\n"
    for note in report.get("notes") or []:
        md += f"\nNote: {note}\n"
    md += f"\nAttack settings are in report.json. Device {report['device']}, {report['date']}.\n"
    return md


def format_console(report: dict) -> str:
    text = f"\n{report['recipe']}: clean accuracy {report['clean_accuracy']:.4f} on {report['n_examples']} images\n"
    for title, body in section_texts(report, console=True):
        body = "\n".join(line for line in body.splitlines() if not line.startswith("![")).strip()  # md pictures
        if body:
            text += f"\n{title}\n\n{body}\n" if title else f"\n{body}\n"
    for note in report.get("notes") or []:
        text += f"\nnote: {note}\n"
    return text


def write_report(report: dict, out: Path) -> None:
    """report.json (strict JSON: NaN written as null) and report.md, each written atomically; pictures, if any,
    were already saved into the same folder by their section."""
    out = Path(out)
    atomic_write_text(out / "report.json", json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / "report.md", format_markdown(report))
