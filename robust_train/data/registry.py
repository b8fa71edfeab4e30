"""Data sets by name (`python -m robust_train data`); the name is also the `spec["name"]` checkpoints record."""
from robust_train.registry import Registry

DATA: Registry = Registry("data set")
register_data = DATA.register
