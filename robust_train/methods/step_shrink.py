"""The one remedy the OverfitGuard applies to a method: a smaller attack step (Wong et al. 2020 avoid catastrophic
overfitting with one). FGSM-based methods mix this in; the total shrink is kept in checkpoints, so a resumed run
goes on with the step it had, applied to the configured `step_ratio` (which the user may have changed)."""
from __future__ import annotations

from robust_train.attacks.base import check_positive

CHECKPOINT_KEY = "fgsm_step_shrink"


class ShrinkableStep:
    """For a RobustModule with a `step_ratio` that is read when its training attack is built; the class says how
    to rebuild that attack (`rebuild_training_attack`)."""

    step_shrink = 1.0  # the product of shrink_step's factors

    def rebuild_training_attack(self) -> None:
        raise NotImplementedError

    def shrink_step(self, factor: float) -> None:
        """step_ratio ← factor·step_ratio from the next batch on (the cached training attack is rebuilt)."""
        factor = float(check_positive("factor", factor))
        self.step_ratio *= factor
        self.step_shrink *= factor
        self.rebuild_training_attack()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY] = self.step_shrink

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        shrink = float(checkpoint.get(CHECKPOINT_KEY, 1.0))
        if shrink != self.step_shrink:
            self.shrink_step(shrink / self.step_shrink)
