"""The report's pictures and stability table, logged to the active wandb run when there is one."""
from __future__ import annotations

import sys


def log_to_wandb(report: dict, figures: dict) -> bool:
    """Log the pictures and the stability table to the active wandb run, if there is one; never starts a run.
    A run can only be active if wandb was imported, so wandb is looked up in sys.modules, never imported here."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return False
    from robust_train.figures import figure_to_array

    # A section hands over a matplotlib Figure or an RGB array of it.
    payload = {f"evaluate/{name.rsplit('.', 1)[0]}": wandb.Image(
        fig if hasattr(fig, "shape") else figure_to_array(fig), caption=name) for name, fig in figures.items()}
    if report.get("map_stability"):
        columns = ["map", "attack", "eps", "kendall_tau", "topk_intersection", "n_used", "n_total", "n_constant",
                   "steps", "step_size"]
        payload["evaluate/map_stability"] = wandb.Table(
            columns=columns, data=[[row.get(c) for c in columns] for row in report["map_stability"]])
    if payload:
        run.log(payload)
    return True
