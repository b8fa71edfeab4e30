"""robust_train: robust (adversarial) and interpretability-aware training on PyTorch Lightning.

    robust_train.load(path)   the classifier of a checkpoint, a plain nn.Module in eval mode ([0, 1] in, logits out)
"""
from robust_train.checkpoint import load

__version__ = "0.1.0"
__all__ = ["load", "__version__"]
