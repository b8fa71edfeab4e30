"""Attacks by name: `create_attack("pgd", eps=0.3, steps=40)`."""
from robust_train.registry import Registry

ATTACKS: Registry = Registry("attack")
register_attack = ATTACKS.register


def create_attack(name: str, **kwargs):
    return ATTACKS.create(name, **kwargs)
