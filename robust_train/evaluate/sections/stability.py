"""How far an attack moves the model's interpretation map (Boopathy et al., ICML 2020; report.json
`map_stability`): for each ε > 0 and each stability attack, Kendall's τ-b between the clean and the adversarial
true-class map at feature resolution and the top-k overlap, averaged over the first `stability_n` images whose
predicted label the attack did not change (`n_used` says how many; constant maps, whose τ is undefined, are counted
in `n_constant` and left out; see `robust_train.interpret.stability`).

The default stability attacks are `aai`, the attack against interpretability (200 steps of 0.01 from a random
start on the map's top-k mass, the authors' evaluation, attacking the very map and k that are measured), and
`pgd_madry`, a plain CE PGD-40 of 2.5ε/40 keeping its last iterate (Madry et al.'s; not the suite's cosine PGD,
whose job is breaking labels, not comparing maps). Any registered attack can be named.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from tqdm import tqdm

from robust_train.attacks.aai import stability_attack
from robust_train.distributed import Split, batch_seed
from robust_train.errors import ConfigError
from robust_train.evaluate.evaluation import Evaluation
from robust_train.evaluate.sections.base import Section, register_section
from robust_train.interpret import MAPS
from robust_train.modes import model_mode

STABILITY_STREAM = 2  # random stream of batch_seed, apart from the suite's and the transfer's
NO_MAPS_NOTE = ("{model} has no `features`/linear `head` (the Classifier contract), so no interpretation maps: map "
                "stability and pictures were skipped.")


def finite_or_none(value):
    """NaN and ±inf -> None (JSON null); anything else unchanged."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def check_map_cells(model, x, y, map_name: str, topk: int) -> None:
    """ConfigError when k exceeds the number of cells of this model's maps (one map of one image tells)."""
    if len(x):
        with model_mode(model, "eval", grad=True):
            cells = MAPS.get(map_name)(model, x[:1], y[:1]).flatten(1).shape[1]
        if topk > cells:
            raise ConfigError(f"--topk {topk} is larger than the {cells} cells of a {map_name} map of this model")


def measure_stability(model, x, y, attack, map_fn, k: int, batch_size: int, bar=None, seed: int = 0,
                      split: Split | None = None) -> dict:
    """Attack x in batches and aggregate τ and top-k overlap over all of them: one row's {"kendall_tau",
    "topk_intersection", "n_used", "n_total", "n_constant"}, NaN means when no image is usable. Batch b's random
    start comes from `batch_seed(seed, b)`; with a `split`, each process attacks its own batches."""
    from robust_train.interpret.stability import aggregate_stability, stability_per_image  # scipy: ~1 s to import

    split = split or Split()
    per_image = torch.zeros(3, len(x), dtype=torch.float64)  # τ, top-k overlap, label unchanged (0/1)
    for b, rows in split.batches(len(x), batch_size):
        torch.manual_seed(batch_seed(seed, b))
        xb, yb = x[rows], y[rows]
        tau, top, unchanged = stability_per_image(model, xb, yb, attack(model, xb, yb), map_fn, k)
        per_image[:, rows] = torch.from_numpy(np.stack([tau, top, unchanged]).astype(np.float64))
        if bar is not None:
            bar.update(1)
    tau, top, unchanged = split.sum(per_image.to(x.device)).cpu().numpy()
    return aggregate_stability(tau, top, unchanged.astype(bool))


def stability_rows(model, x, y, grid, names, map_name: str, topk: int, steps: int | None, batch_size: int,
                   progress: bool, seed: int = 0, split: Split | None = None) -> list[dict]:
    """report["map_stability"]: one row per (stability attack, ε > 0), over the images x."""
    split = split or Split()
    positive = [e for e in grid if e > 0]
    if positive and names:
        check_map_cells(model, x, y, map_name, topk)
    bar = tqdm(total=len(positive) * len(names) * split.count(len(x), batch_size), desc="map stability",
               unit="batch", disable=not progress or not positive or not names)
    rows = []
    for a, name in enumerate(names):
        for eps in positive:
            t0 = time.perf_counter()
            bar.set_postfix_str(f"{name} eps={eps:g}")
            attack = stability_attack(name, eps, map_name, topk, steps)
            stats = measure_stability(model, x, y, attack, MAPS.get(map_name), topk, batch_size, bar,
                                      seed=batch_seed(seed, STABILITY_STREAM, a, round(eps * 1e9)), split=split)
            rows.append({"map": map_name, "attack": name, "eps": eps,
                         **{key: finite_or_none(v) for key, v in stats.items()},
                         "k": topk, "steps": attack.steps, "step_size": attack.step_size,
                         "seconds": round(time.perf_counter() - t0, 2)})
    bar.close()
    return rows


@register_section("stability")
class Stability(Section):
    order = 40
    title = "Interpretation-map stability"
    fields = {"map_stability": []}

    def wanted(self, ev: Evaluation) -> bool:
        return bool(ev.options.stability_attacks) and any(e > 0 for e in ev.grid)

    def prepare(self, ev: Evaluation) -> None:
        if self.wanted(ev) and ev.has_maps:
            check_map_cells(ev.model, ev.x, ev.y, ev.options.map, ev.options.topk)  # before the long attacks

    def run(self, ev: Evaluation) -> dict:
        opts = ev.options
        if opts.stability_attacks and not ev.has_maps:
            ev.note(NO_MAPS_NOTE.format(model=type(ev.model).__name__))
        if not self.wanted(ev) or not ev.has_maps:
            return {}
        torch.manual_seed(opts.seed)  # the stability numbers do not depend on which accuracy attacks ran before
        count = min(opts.stability_n, len(ev.x))
        rows = stability_rows(ev.model, ev.x[:count], ev.y[:count], ev.grid, opts.stability_attacks, opts.map,
                              opts.topk, opts.stability_steps, opts.batch_size, ev.progress, opts.seed, ev.split)
        return {"map_stability": rows}

    def text(self, report: dict) -> str:
        """Rows: stability attack × map; columns: ε; cells "τ / top-k (n used)"."""
        rows = report.get("map_stability") or []
        if not rows:
            return ""
        eps_cols = list(dict.fromkeys(f"{r['eps']:g}" for r in rows))
        keys = list(dict.fromkeys((r["attack"], r["map"]) for r in rows))
        by = {(r["attack"], r["map"], f"{r['eps']:g}"): r for r in rows}
        header = ["attack", "map", *(f"ε={e}" for e in eps_cols)]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for attack, map_name in keys:
            cells = [attack, map_name]
            for e in eps_cols:
                r = by.get((attack, map_name, e))
                cells.append("" if r is None else
                             f"{_number(r['kendall_tau'])} / {_number(r['topk_intersection'])} (n={r['n_used']})")
            lines.append("| " + " | ".join(cells) + " |")
        first = rows[0]
        legend = (f"Cells: mean Kendall τ-b / mean top-{first.get('k', 8)} intersection between the clean and the "
                  f"adversarial true-class map at feature resolution, over n of the {first['n_total']} images whose "
                  f"label the attack did not change (constant maps left out; – when none is left).")
        return legend + "\n\n" + "\n".join(lines)


def _number(value, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"
