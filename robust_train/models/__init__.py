"""Models in a registry by name; each maps [0, 1] images to logits and exposes `features` and `head`."""
from robust_train.models.base import Classifier
from robust_train.models.registry import MODELS, create_model, register_model
from robust_train.models import fast_mnist_cnn, preact_resnet, small_cnn, vgg, wide_resnet  # noqa: F401  (register)
from robust_train.models import attention_pool  # noqa: F401  (register; wraps the backbones above)
from robust_train.models import protopnet  # noqa: F401  (register; wraps the backbones above)
from robust_train.models import svae  # noqa: F401  (register)

__all__ = ["Classifier", "MODELS", "create_model", "register_model"]
