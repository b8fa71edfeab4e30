"""Interpretation maps, batch-first in torch: CAM (used in training), Grad-CAM, Grad-CAM++, saliency, SmoothGrad,
Integrated Gradients, the attention map of attention-pooling models and the prototype maps of ProtoPNet; by name
through `interpretation_map(name, model, x, classes, **kwargs)`. None changes the model's train/eval mode or parameter
.grad (gradients come from torch.autograd.grad, never .backward())."""
from robust_train.interpret.registry import MAPS, differentiable_map, interpretation_map, register_map
from robust_train.interpret.cam import all_class_cams, cam, cam_from_features, select_classes
from robust_train.interpret.grad_cam import grad_cam
from robust_train.interpret.grad_cam_pp import grad_cam_pp
from robust_train.interpret.saliency import saliency
from robust_train.interpret.smoothgrad import smoothgrad
from robust_train.interpret.integrated_gradients import integrated_gradients
from robust_train.interpret.attention import attention_map
from robust_train.interpret.prototype import prototype_map, top_prototype_map, top_prototypes

__all__ = ["MAPS", "all_class_cams", "attention_map", "cam", "cam_from_features", "differentiable_map", "grad_cam",
           "grad_cam_pp", "integrated_gradients", "interpretation_map", "prototype_map", "register_map", "saliency",
           "select_classes", "smoothgrad", "top_prototype_map", "top_prototypes"]
