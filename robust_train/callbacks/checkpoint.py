"""ModelCheckpoint whose `last.ckpt` is the latest state after every validation.

Lightning 2.6 refreshes last.ckpt only when a top-k checkpoint is saved in the same step, so with a monitor that
stops improving (robust accuracy of a standard model stays 0) last.ckpt silently stays at an old epoch, and
`evaluate last.ckpt` or a resume would use stale weights.
"""
from __future__ import annotations

import os

from lightning.pytorch.callbacks import ModelCheckpoint


class RobustCheckpoint(ModelCheckpoint):
    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if (self.save_last and self.dirpath and not trainer.sanity_checking and not trainer.fast_dev_run
                and self._last_global_step_saved != trainer.global_step):
            last = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
            trainer.save_checkpoint(last)
            self.last_model_path = last
