"""Training methods by name (`python -m robust_train methods`): a recipe's `model.class_path` names the class, so a
method is registered under its class name."""
from robust_train.registry import Registry

METHODS: Registry = Registry("training method")
register_method = METHODS.register()  # decorator: the class's own name
