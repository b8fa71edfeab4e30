"""Pictures for reports and loggers: what an attack does to the image and to the model's evidence. A robust-accuracy
number says *how often* an attack succeeds; these figures show *what* succeeds. Needs matplotlib, so import it only
where pictures are made."""
from robust_train.figures.base import (DPI, PANEL_INCHES, cam_overlay, figure_to_array, image_to_rgb, new_figure,
                                       normalized_cam, save_png)
from robust_train.figures.gallery import attack_gallery
from robust_train.figures.prototypes import prototype_figure
from robust_train.figures.transition import transition_figure

__all__ = ["DPI", "PANEL_INCHES", "attack_gallery", "cam_overlay", "figure_to_array", "image_to_rgb", "new_figure",
           "normalized_cam", "prototype_figure", "save_png", "transition_figure"]
