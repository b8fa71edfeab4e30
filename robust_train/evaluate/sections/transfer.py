"""Black-box transfer (`--transfer-from CKPT`, report.json `transfer`): the suite's `pgd` crafted on another
checkpoint of the same data at the main ε, then evaluated on this one. Examples that fool this model only when
crafted elsewhere point at gradients that mislead the white-box attacks (the masking checks' black-box check)."""
from __future__ import annotations

import time
from pathlib import Path

from torch import nn

from robust_train.attacks import create_attack
from robust_train.checkpoint import classifier_from_checkpoint, read_checkpoint
from robust_train.errors import ConfigError
from robust_train.evaluate.accuracy import correct_under, predictions
from robust_train.evaluate.evaluation import Evaluation
from robust_train.evaluate.sections.base import Section, register_section
from robust_train.evaluate.sections.suite import worst_at

TRANSFER_STREAM = 1  # random stream of batch_seed, apart from the suite's


def read_transfer_source(path: str | Path, info: dict) -> nn.Module:
    """The classifier of the --transfer-from checkpoint; ConfigError (one line) when it cannot be read or was
    trained on other data than the evaluated one."""
    try:
        source = read_checkpoint(path)
        theirs, ours = source["robust_train"]["data_spec"], info["data_spec"]
        for key in ("name", "num_classes", "in_channels"):
            if theirs.get(key) is not None and ours.get(key) is not None and theirs.get(key) != ours.get(key):
                raise ConfigError(f"checkpoint {path} has {key} {theirs.get(key)!r}, the evaluated one "
                                  f"{ours.get(key)!r}: transfer needs a model of the same data")
        return classifier_from_checkpoint(source)
    except ConfigError as e:
        raise ConfigError(f"--transfer-from: {e}") from None


@register_section("transfer")
class Transfer(Section):
    order = 20
    title = "Black-box transfer"
    fields = {"transfer": None}

    def prepare(self, ev: Evaluation) -> None:
        if ev.options.transfer_from is not None:  # a bad file fails now, not after the suite
            ev.results["transfer_source"] = read_transfer_source(ev.options.transfer_from, ev.info).to(ev.device)

    def run(self, ev: Evaluation) -> dict:
        source = ev.results.get("transfer_source")
        if source is None:
            return {}
        opts, eps, t0 = ev.options, ev.main_eps, time.perf_counter()
        # The highest-loss example on the source transfers best, not the first one that fools it.
        attack = create_attack("pgd", eps, steps=opts.steps, restarts=opts.restarts, early_stop=False)
        correct = correct_under(ev.model, ev.x, ev.y, lambda _, xb, yb: attack(source, xb, yb), opts.batch_size,
                                ev.split, seed=(opts.seed, TRANSFER_STREAM))
        ev.results["transfer_correct"] = correct
        transfer = {"source": str(opts.transfer_from), "eps": eps, "attack": attack.describe(), "n": len(ev.x),
                    "accuracy": correct.float().mean().item(),
                    "source_accuracy": (predictions(source, ev.x, opts.batch_size) == ev.y).float().mean().item(),
                    "seconds": round(time.perf_counter() - t0, 2)}
        white = worst_at(ev, eps)
        if white is not None:
            transfer["white_box_accuracy"] = white.float().mean().item()
        return {"transfer": transfer}

    def text(self, report: dict) -> str:
        transfer = report.get("transfer")
        if not transfer:
            return ""
        white = transfer.get("white_box_accuracy")
        return (f"Transfer (black box) from `{transfer['source']}`: PGD crafted on it at ε = {transfer['eps']:g} "
                f"leaves accuracy "
                f"**{transfer['accuracy']:.4f}** on {transfer['n']} images"
                + (f" (white-box worst case {white:.4f})." if white is not None else "."))
