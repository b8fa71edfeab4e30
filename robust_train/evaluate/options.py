"""Everything an evaluation can be asked, in one dataclass that checks itself once, when it is made: every mistake
is a ConfigError (one line, exit code 2 on the command line) before a checkpoint is read or an attack runs."""
from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import torch

from robust_train.attacks import ATTACKS
from robust_train.attacks.base import check_eps
from robust_train.errors import ConfigError
from robust_train.interpret import MAPS

STABILITY_ATTACKS = ("aai", "pgd_madry")
UNIVERSAL_NORMS = ("linf", "l2")
MIN_UNIVERSAL_IMAGES = 10
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")


def parse_eps(text: str) -> list[float]:
    """'0,0.1,8/255' -> [0.0, 0.1, 0.0313...]; fractions are parsed, never eval'ed."""
    values = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            values.append(float(Fraction(item)))
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"--eps {item!r} is not a number: give values like 0.3 or 8/255, comma-separated")
    if not values:
        raise ConfigError(f"--eps {text!r} names no budget: give values like 0,0.1,0.3 or 0,2/255,8/255")
    return [check_eps(v) for v in values]


def parse_budget(text: str, option: str) -> float:
    """'8/255' -> 0.0313...; one value, range checked by the caller (it depends on the norm)."""
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"{option} {text!r} is not a number: give a value like 0.3 or 8/255") from None


def parse_levels(text: str, option: str) -> list[float]:
    """'1,4,8' -> [1.0, 4.0, 8.0]; each probe checks its own range."""
    values = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            values.append(float(item))
        except ValueError:
            raise ConfigError(f"{option} {item!r} is not a number: give comma-separated levels like 1,4,8") from None
    if not values:
        raise ConfigError(f"{option} {text!r} names no level: give comma-separated levels like 1,4,8")
    return values


def parse_names(text: str, option: str) -> list[str]:
    """'pgd, pgd_margin' -> ['pgd', 'pgd_margin']; a list with no name in it is a mistake, not the default."""
    names = [a.strip() for a in text.split(",") if a.strip()]
    if not names:
        raise ConfigError(f"{option} {text!r} names no attack: give comma-separated names from "
                          "`python -m robust_train attacks`, or leave the option out for the default")
    return names


def parse_stability_attacks(text: str) -> list[str]:
    """'aai,pgd_madry' -> ['aai', 'pgd_madry']; 'none' (or nothing) -> []."""
    names = [a.strip() for a in text.split(",") if a.strip()]
    if [a.lower() for a in names] in ([], ["none"]):
        return []
    if any(a.lower() == "none" for a in names):
        raise ConfigError(f"--stability-attacks {text!r}: give attack names, or 'none' alone")
    return names


def _count(option: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        hint = " (or leave it out for each attack's default)" if allow_none else ""
        raise ConfigError(f"{option} {value!r} must be a positive integer{hint}")


def check_output_folder(out: Path) -> None:
    """The report folder can be made and written: its nearest existing ancestor is a writable folder."""
    ancestor = out
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"--out {out}: {ancestor} is a file, not a folder; give a folder for the report")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {ancestor} is not writable; give a folder you can write")


@dataclass
class EvaluateOptions:
    """What to evaluate and how (the command line's options, `python -m robust_train evaluate --help`).

    attacks: registered attack names (None: the default suite, see sections/suite.py); eps: the ε grid (None: the
    data set's); n: test images; steps/restarts: override every attack's iterations (None: each attack's own);
    stability_attacks: attacks under which map stability is measured on the first `stability_n` images, with
    `stability_steps` iterations, the map `map` and k = `topk` (empty: none); pictures: save `n_pictures` images
    as gallery.png and a transition.png into `out` (None: no pictures; the command line's default is a folder
    beside the checkpoint, where it writes the report); checks: the gradient-masking
    checks on the first `checks_n` images; transfer_from: a checkpoint of the same data whose PGD examples are
    evaluated on this model (black box); devices/accelerator/num_nodes: processes sharing the work; probes: the
    shape-bias probes to run (names of `evaluate.probes.PROBES`) at `saturation_levels` and `shuffle_levels`;
    universal: a universal perturbation of norm `universal_norm` ≤ `universal_eps` (None: the main ε) computed on
    `universal_n` training images; type1: an `svae` checkpoint for the Type-I attack.
    """

    ckpt: str | Path
    attacks: Sequence[str] | None = None
    eps: Sequence[float] | None = None
    n: int = 1000
    batch_size: int = 250
    device: str | None = None
    data_root: str | None = None
    steps: int | None = None
    restarts: int | None = None
    seed: int = 0
    stability_attacks: Sequence[str] = STABILITY_ATTACKS
    stability_n: int = 200
    stability_steps: int | None = None
    map: str = "cam"
    topk: int = 8
    pictures: bool = True
    n_pictures: int = 6
    out: str | Path | None = None
    checks: bool = True
    checks_n: int = 200
    transfer_from: str | Path | None = None
    devices: int | str = 1
    accelerator: str = "auto"
    num_nodes: int = 1
    probes: Sequence[str] = ()
    saturation_levels: Sequence[float] = (1, 4, 8, 16, 64, 1024)
    shuffle_levels: Sequence[int] = (2, 4, 8)
    universal: bool = False
    universal_eps: float | None = None
    universal_norm: str = "linf"
    universal_n: int = 1000
    type1: str | Path | None = None
    progress: bool = field(default=True, compare=False)

    def __post_init__(self):
        self.ckpt = Path(self.ckpt)
        for option, value in (("--n", self.n), ("--batch-size", self.batch_size), ("--stability-n", self.stability_n),
                              ("--topk", self.topk), ("--n-pictures", self.n_pictures),
                              ("--checks-n", self.checks_n), ("--num-nodes", self.num_nodes)):
            _count(option, value)
        for option, value in (("--steps", self.steps), ("--restarts", self.restarts),
                              ("--stability-steps", self.stability_steps)):
            _count(option, value, allow_none=True)  # 0 would otherwise silently mean "each attack's default"
        if self.attacks is not None:
            self.attacks = list(self.attacks)
            if not self.attacks:
                raise ConfigError("attacks is empty: name at least one attack, or None for the default suite")
            for name in self.attacks:
                ATTACKS.get(name)  # unknown names fail with the known ones listed
        if self.eps is not None:
            self.eps = [check_eps(e) for e in self.eps]
            if not self.eps:
                raise ConfigError("eps is empty: give at least one budget, or None for the data set's grid")
        self.stability_attacks = list(self.stability_attacks or ())
        for name in self.stability_attacks:
            ATTACKS.get(name)
        MAPS.get(self.map)
        if self.out is not None:
            self.out = Path(self.out)
            check_output_folder(self.out)
        self._check_probes()
        if self.universal_norm not in UNIVERSAL_NORMS:
            raise ConfigError(f"--universal-norm {self.universal_norm!r}: use linf or l2")
        if self.universal_eps is not None:
            self.universal_eps = check_eps(self.universal_eps, self.universal_norm)
        if isinstance(self.universal_n, bool) or not isinstance(self.universal_n, numbers.Integral) or \
                self.universal_n < MIN_UNIVERSAL_IMAGES:
            raise ConfigError(f"--universal-n {self.universal_n!r}: a universal perturbation needs at least "
                              f"{MIN_UNIVERSAL_IMAGES} training images")
        if self.type1 is not None:
            self._check_type1()
        self.devices = self._devices(self.devices)
        if self.accelerator not in ACCELERATORS:
            raise ConfigError(f"--accelerator {self.accelerator!r}: use one of {', '.join(ACCELERATORS)}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ConfigError(f"--device {self.device!r} is not a device: use cpu, cuda or cuda:1, ...") from None

    def _check_probes(self) -> None:
        from robust_train.evaluate.probes import PROBES

        self.probes = list(self.probes or ())
        for name in self.probes:
            PROBES.get(name)
        self.saturation_levels = [PROBES.get("saturation")().check_level(p) for p in self.saturation_levels]
        self.shuffle_levels = [PROBES.get("patch_shuffle")().check_level(k) for k in self.shuffle_levels]
        if not self.saturation_levels or not self.shuffle_levels:
            raise ConfigError("--saturation-levels and --shuffle-levels need at least one level each")

    def _check_type1(self) -> None:
        from robust_train.checkpoint import read_checkpoint

        self.type1 = Path(self.type1)
        try:
            arch = read_checkpoint(self.type1)["robust_train"].get("arch")
        except ConfigError as e:
            raise ConfigError(f"--type1: {e}") from None
        if arch != "svae":
            raise ConfigError(f"--type1 {self.type1} holds a {arch!r} model, not an svae: train one with "
                              "`python -m robust_train fit --recipe svae` and pass its checkpoint")

    @staticmethod
    def _devices(devices) -> int | str:
        """--devices as Fabric takes it: a positive count, or "auto"."""
        if devices == "auto":
            return devices
        try:
            count = int(devices)
        except (TypeError, ValueError):
            count = 0
        if count <= 0 or isinstance(devices, bool):
            raise ConfigError(f"--devices {devices!r} must be a positive number of processes (or auto)")
        return count
