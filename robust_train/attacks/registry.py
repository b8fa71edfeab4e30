"""Attacks by name: `create_attack("pgd", eps=0.3)`, `evaluate --attacks pgd,pgd_margin`, the callbacks' `attack:`.

A name is a preset: an attack class with the settings the name stands for, everywhere (the evaluation suite, the
validation callback, map stability). Decorating a class registers it under its own name, with the defaults of that
preset; `register_attack(name, Class, ...)` adds another preset of an already registered class. Keyword arguments
of `create_attack` override the preset's; `steps` and `restarts` are overrides that apply where the attack has them
and are ignored where it has none (FGSM has no steps), so `evaluate --steps 200` can apply to a whole suite.
"""
from __future__ import annotations

import inspect
from typing import Callable

from robust_train.errors import ConfigError
from robust_train.registry import Registry

ATTACKS: Registry = Registry("attack")
ITERATION_OPTIONS = ("steps", "restarts")


class EpsTimes:
    """A preset value proportional to the attack's ε (e.g. the step size α = ε of the evaluation's PGD)."""

    def __init__(self, factor: float = 1.0):
        self.factor = factor

    def __call__(self, eps: float) -> float | None:
        # At ε = 0 an attack returns x unchanged; None keeps the class's own default, which is valid at ε = 0.
        return self.factor * eps if eps > 0 else None

    def __repr__(self) -> str:
        return f"{self.factor:g}·ε"


class AttackPreset:
    """A registered name: an attack class and the defaults the name stands for."""

    def __init__(self, cls: type, summary: str | None, defaults: dict):
        self.cls, self.defaults = cls, defaults
        self.summary = summary or (cls.__doc__ or "").strip().splitlines()[0]
        self.takes = set(ITERATION_OPTIONS) & accepted_options(cls)

    def __call__(self, eps: float, *, steps: int | None = None, restarts: int | None = None, **overrides):
        kwargs = {k: (v(eps) if isinstance(v, EpsTimes) else v) for k, v in self.defaults.items()}
        iterations = {"steps": steps, "restarts": restarts}
        kwargs.update({k: v for k, v in iterations.items() if v is not None and k in self.takes})
        kwargs.update(overrides)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        try:
            return self.cls(eps, **kwargs)
        except TypeError as e:
            raise ConfigError(f"attack {self.cls.name!r}: {e}") from None


def accepted_options(cls: type) -> set[str]:
    """The keyword arguments the class's constructor takes, including those it passes on to its bases through
    **kwargs (PrototypePGD takes PGD's steps that way)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def register_attack(name: str, cls: type | None = None, *, summary: str | None = None,
                    **defaults) -> Callable[[type], type]:
    """`@register_attack("fgsm")` on a class, or `register_attack("pgd_margin", PGD, loss="margin")` for another
    preset of a class already registered; `summary` is the line `python -m robust_train attacks` shows."""

    def add(attack_cls: type) -> type:
        if cls is None:
            attack_cls.name = name  # the class's own name, written once
        ATTACKS.register(name, AttackPreset(attack_cls, summary, defaults))
        return attack_cls

    return add if cls is None else add(cls)


def create_attack(name: str, eps: float, **kwargs):
    """The attack `name` at budget ε; keyword arguments override the preset's settings."""
    return ATTACKS.get(name)(eps, **kwargs)
