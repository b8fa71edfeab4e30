"""ModelCheckpoint whose `last.ckpt` is the latest state after every validation, written atomically.

Lightning 2.6 refreshes last.ckpt only when a top-k checkpoint is saved in the same step, so with a monitor that
stops improving (robust accuracy of a standard model stays 0) last.ckpt silently stays at an old epoch, and
`evaluate last.ckpt` or a resume would use stale weights.

Lightning's own save writes a temporary file in the system's temp folder and then moves it; where that folder is
on another file system than the checkpoints (a local /tmp, checkpoints on NFS), the move is a copy, and a job
killed during it leaves half a last.ckpt. Here the temporary file sits beside the checkpoint and a rename puts it
in place, which is atomic on one file system.
"""
from __future__ import annotations

import os

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from robust_train.checkpoint import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)


class RobustCheckpoint(ModelCheckpoint):
    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a user's own CheckpointIO is left alone
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if (self.save_last and self.dirpath and not trainer.sanity_checking and not trainer.fast_dev_run
                and self._last_global_step_saved != trainer.global_step):
            last = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
            trainer.save_checkpoint(last, weights_only=self.save_weights_only)
            self.last_model_path = last
