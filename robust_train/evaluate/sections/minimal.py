"""Minimal perturbations (`--attacks deepfool,cw_l2,fmn`, report.json `minimal_perturbation` and
`robustness_curve`): how far each test image is from the decision boundary, as found by the minimal-norm attacks.

Each minimal attack runs once on the images, not once per ε. Per example, its norm is the size of the smallest
adversarial perturbation it found: 0 for an image the model already gets wrong, +inf where it found none (an upper
bound on the true distance either way, so smaller is stronger). A row per attack gives `median` and `quantiles` over
all n images (+inf counts, and a statistic landing on it is null), `mean` over the images with a finite norm,
`n_success` and `n`.

The robustness curve of a norm is the accuracy at ε as every attack of that norm sees it, foolbox's way: an image is
robust at ε only if no attack found a perturbation of at most ε. Where the fixed-ε suite also ran in that norm (the
grid is L∞), an image the suite broke at a grid ε' counts as broken from ε' on, and the suite's robust accuracy
and its per-attack rows take the L∞ minimal attacks in too: at a grid ε an L∞ minimal attack "breaks" the images
whose norm is at most ε. L2 attacks get their own curve and do not enter the L∞ grid's figures.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from robust_train.attacks import ATTACKS, create_attack, is_minimal
from robust_train.distributed import batch_seed
from robust_train.evaluate.evaluation import Evaluation
from robust_train.evaluate.sections.base import Section, add_pictures, register_section

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
CURVE_POINTS = 60
MINIMAL_STREAM = 3  # random stream of batch_seed, apart from the suite's, the transfer's and the stability's
GRID_NORM = "linf"  # the suite's grid is L∞ (every data set's eps_grid)


def minimal_names(attacks) -> list[str]:
    """The minimal-perturbation attacks among the names (they run here, once, not in the fixed-ε suite)."""
    return [name for name in attacks or () if name in ATTACKS and is_minimal(create_attack(name, 1.0))]


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def norm_statistics(norms: torch.Tensor) -> dict:
    """median, quantiles (inf counted), mean (finite only), n_success, n of per-example minimal norms."""
    values = norms.double().sort().values
    finite = values[torch.isfinite(values)]

    def quantile(q: float) -> float | None:  # the lower value at the rank, so +inf is never interpolated
        return finite_or_none(float(values[min(len(values) - 1, int(math.floor(q * (len(values) - 1) + 0.5)))]))

    return {"median": quantile(0.5), "mean": float(finite.mean()) if len(finite) else None,
            "quantiles": {f"{q:g}": quantile(q) for q in QUANTILES}, "n_success": int(len(finite)),
            "n": int(len(values))}


def curve(broken_at: torch.Tensor, clean: torch.Tensor, grid: list[float]) -> dict:
    """Accuracy at each ε of a fine grid (plus the given ε): robust where clean and not broken at or below ε."""
    finite = broken_at[torch.isfinite(broken_at)]
    top = max([float(finite.max()) if len(finite) else 0.0, *grid, 1e-3]) * 1.05
    points = sorted({*torch.linspace(0, top, CURVE_POINTS).tolist(), *grid})
    accuracy = [float((clean & (broken_at > e)).float().mean()) if len(clean) else float("nan") for e in points]
    return {"eps": points, "accuracy": accuracy}


@register_section("minimal")
class MinimalPerturbation(Section):
    order = 15  # after the suite, whose per-example results it combines; before transfer and checks, which read them
    title = "Minimal perturbations"
    fields = {"minimal_perturbation": [], "robustness_curve": {}}

    def prepare(self, ev: Evaluation) -> None:
        ev.results["minimal"] = minimal_names(ev.options.attacks)

    def run(self, ev: Evaluation) -> dict:
        names = ev.results["minimal"]
        if not names:
            return {}
        opts, rows, broken = ev.options, [], {}
        for ai, name in enumerate(names):
            t0 = time.perf_counter()
            attack = create_attack(name, 1.0, steps=opts.steps)
            norms = torch.zeros(len(ev.x), dtype=torch.float64, device=ev.y.device)
            for b, rows_b in ev.split.batches(len(ev.x), opts.batch_size):
                torch.manual_seed(batch_seed(opts.seed, MINIMAL_STREAM, ai, b))
                found = attack.minimal(ev.model, ev.x[rows_b], ev.y[rows_b])
                norms[rows_b] = torch.where(found.success, found.norms.double(), math.inf)
            norms = ev.split.sum(norms)
            norms[~ev.clean.to(norms.device)] = 0.0  # already wrong: no perturbation needed
            broken.setdefault(attack.norm, []).append(norms.cpu())
            rows.append({"attack": name, "norm": attack.norm, **norm_statistics(norms.cpu()),
                         "settings": attack.describe(), "seconds": round(time.perf_counter() - t0, 2)})
        report, clean = ev.results["report"], ev.clean.cpu()
        fields = {"minimal_perturbation": rows, "robustness_curve": {}}
        for norm, per_attack in broken.items():
            broken_at = torch.stack(per_attack).amin(0)
            grid = ev.grid if norm == GRID_NORM else []
            if norm == GRID_NORM:
                broken_at = torch.minimum(broken_at, self.suite_breaks(ev))
                fields.update(self.with_suite(ev, names, per_attack, report))
            fields["robustness_curve"][norm] = curve(broken_at, clean, grid)
        if opts.pictures and opts.out is not None and ev.split.main:
            from robust_train.figures.curves import robustness_curve_figure  # matplotlib

            label = Path(str(opts.ckpt)).stem
            picture = robustness_curve_figure({label: fields["robustness_curve"]},
                                              Path(opts.out) / "robustness_curve.png")
            fields["pictures"] = add_pictures(ev, {"robustness_curve.png": picture})
        return fields

    @staticmethod
    def suite_breaks(ev: Evaluation) -> torch.Tensor:
        """Per example, the smallest grid ε at which the fixed-ε suite broke it (+inf if never)."""
        broken_at = torch.full((len(ev.x),), math.inf, dtype=torch.float64)
        for eps, robust in sorted(ev.results.get("worst_by_eps", {}).items(), reverse=True):
            broken_at[~robust.cpu() & ev.clean.cpu()] = eps
        return broken_at

    @staticmethod
    def with_suite(ev: Evaluation, names: list[str], per_attack: list[torch.Tensor], report: dict) -> dict:
        """The L∞ minimal attacks as rows of the suite's table at each grid ε, and in its per-example worst case."""
        linf = [n for n in names if create_attack(n, 1.0).norm == GRID_NORM]
        rows, robust = list(report.get("attacks", [])), dict(report.get("robust_accuracy", {}))
        worst_by_eps = ev.results.setdefault("worst_by_eps", {})
        for eps in ev.grid:
            survivors = worst_by_eps.get(eps, ev.clean).clone()
            for name, norms in zip(linf, per_attack):
                holds = (norms > eps).to(survivors.device) & ev.clean
                rows.append({"name": name, "attack": name, "norm": GRID_NORM, "eps": eps, "minimal": True,
                             "accuracy": holds.float().mean().item(), "seconds": 0.0})
                survivors &= holds
            worst_by_eps[eps] = survivors
            robust[f"{eps:g}"] = survivors.float().mean().item()
        return {"attacks": rows, "robust_accuracy": robust}

    def text(self, report: dict) -> str:
        rows = report.get("minimal_perturbation") or []
        if not rows:
            return ""
        fmt = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
        lines = ["| attack | norm | median | mean (found) | 25 % | 75 % | found / n |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            q = r["quantiles"]
            lines.append(f"| {r['attack']} | {r['norm']} | {fmt(r['median'])} | {fmt(r['mean'])} | "
                         f"{fmt(q.get('0.25'))} | {fmt(q.get('0.75'))} | {r['n_success']} / {r['n']} |")
        text = "\n".join(lines)
        if "robustness_curve.png" in (report.get("pictures") or []):
            text += ("\n\nAccuracy against ε: an image counts as robust at ε only if no attack found a perturbation "
                     "of at most ε.\n\n![robustness curve](robustness_curve.png)")
        return text
