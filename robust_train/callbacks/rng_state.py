"""Random-number-generator states in every checkpoint, so that a resumed run continues with the draws (data order,
random starts of the attacks, augmentation) the uninterrupted run would have made.

Lightning restores weights, optimiser, schedulers and loop counters, but not the generators: a run resumed with
`--ckpt_path last` would shuffle its next epoch differently and end with other numbers. The states are kept as
plain lists and tensors, so checkpoints still load with `torch.load(weights_only=True)`. They are applied at the
first training epoch after the restore, after Lightning's sanity-check validation (which draws random numbers the
uninterrupted run never drew). Under DDP rank 0's states are saved and every rank gets them back.
"""
from __future__ import annotations

import random

import lightning.pytorch as pl
import numpy as np
import torch


def collect_rng_states() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(state), gauss],
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))


class RNGState(pl.Callback):
    def __init__(self):
        self.pending: dict | None = None

    def state_dict(self) -> dict:
        return {"rng": collect_rng_states()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.pending = state_dict.get("rng")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.pending is not None:
            set_rng_states(self.pending)
            self.pending = None
