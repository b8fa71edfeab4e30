"""One registry mechanism for every kind of named thing: each name registered once, meaning one thing, and listed by
its command (`python -m robust_train models|methods|attacks|maps|data`)."""
from __future__ import annotations

import pytest

from robust_train.attacks import ATTACKS, PGD, create_attack, register_attack
from robust_train.cli import REGISTRIES
from robust_train.cli import main as cli_main
from robust_train.data import DATA
from robust_train.errors import ConfigError
from robust_train.evaluate import SECTIONS
from robust_train.interpret import MAPS
from robust_train.methods import METHODS, RobustModule
from robust_train.models import MODELS
from robust_train.registry import Registry

ALL = {"models": MODELS, "methods": METHODS, "attacks": ATTACKS, "maps": MAPS, "data": DATA,
       "report sections": SECTIONS}


def test_a_name_is_registered_once():
    registry = Registry("thing")

    @registry.register("one")
    class One:
        pass

    assert One.name == "one"  # the class gets the name it was registered under: written once
    with pytest.raises(KeyError, match="registered twice"):
        registry.register("one")(type("Other", (), {}))
    with pytest.raises(ConfigError, match="Did you mean 'one'"):
        registry.get("onw")


def test_every_registered_class_carries_its_own_name():
    for kind, registry in ALL.items():
        for name in registry.names():
            entry = registry.get(name)
            if isinstance(entry, type) and kind != "methods":
                assert entry.name == name, (kind, name)
    for name in ATTACKS.names():  # presets: the class's own name is the one it was registered under first
        cls = ATTACKS.get(name).cls
        assert cls.name in ATTACKS and ATTACKS.get(cls.name).cls is cls


def test_every_method_is_registered_under_its_class_name():
    import robust_train.methods as methods

    subclasses = {obj for obj in vars(methods).values() if isinstance(obj, type) and issubclass(obj, RobustModule)
                  and obj is not RobustModule}
    assert {METHODS.get(n) for n in METHODS.names()} == subclasses
    assert all(METHODS.get(cls.__name__) is cls for cls in subclasses)
    assert "ProtoPNetTraining" in METHODS  # missed by the hand-kept dict this replaced


def test_an_attack_name_means_one_attack_everywhere():
    """The suite, the validation callback and the stability measurement all build "pgd" from the one preset."""
    from robust_train.attacks.aai import stability_attack
    from robust_train.callbacks import AttackAccuracy, MapStability

    suite = create_attack("pgd", 0.3).describe()
    assert (suite["steps"], suite["step_size"], suite["step_schedule"]) == (100, 0.3, "cosine")
    callback = AttackAccuracy(attack="pgd", steps=None, restarts=None)
    callback.eps = [0.3]
    callback._start(type("M", (), {"model": type("N", (), {"head": type("H", (), {"out_features": 10})})(),
                                   "device": "cpu", "eps": 0.3})())
    assert callback.attacks[0.3].describe() == suite
    assert stability_attack("pgd", 0.3).describe() == suite
    assert MapStability(attacks=["pgd"], steps=100).make_attack("pgd", 0.3).describe() == suite
    madry = create_attack("pgd_madry", 0.3)
    assert (madry.steps, madry.step_size, madry.keep_best) == (40, pytest.approx(2.5 * 0.3 / 40), False)


def test_preset_overrides_and_iteration_options():
    assert create_attack("pgd_margin", 0.1, steps=7).steps == 7
    assert create_attack("fgsm", 0.1, steps=7, restarts=3).steps == 1  # no steps to override: ignored
    assert create_attack("pgd", 0.0).step_size == 0  # α = ε at ε = 0 falls back to the class's default
    # options a class passes on to its base through **kwargs are overridable too
    assert create_attack("pgd_prototype", 0.1, steps=7, restarts=2).describe()["steps"] == 7
    assert create_attack("pgd_prototype", 0.1, restarts=2).restarts == 2
    assert create_attack("pgd_targeted", 0.1, early_stop=False).pgd.early_stop is False
    assert create_attack("pgd_targeted", 0.1, restarts=4).pgd.restarts == 1  # no restarts of its own: ignored
    with pytest.raises(ConfigError, match="attack 'fgsm'"):
        create_attack("fgsm", 0.1, momentum=0.9)  # other options must exist


def test_registering_a_new_attack_is_one_decorator():
    @register_attack("test_only_pgd_tiny", summary="a test preset")
    class TinyPGD(PGD):
        pass

    try:
        assert TinyPGD.name == "test_only_pgd_tiny" and isinstance(create_attack("test_only_pgd_tiny", 0.1), TinyPGD)
        assert ATTACKS.summary("test_only_pgd_tiny") == "a test preset"
    finally:
        ATTACKS._entries.pop("test_only_pgd_tiny")


@pytest.mark.parametrize("command", sorted(REGISTRIES))
def test_list_commands_print_every_name_with_a_summary(command, capsys):
    assert cli_main([command]) == 0
    lines = capsys.readouterr().out.splitlines()
    registry = ALL[command]
    assert [ln.split()[0] for ln in lines] == registry.names()
    described = [ln for ln in lines if len(ln.split()) > 1]
    assert len(described) == len(lines), [ln for ln in lines if len(ln.split()) == 1]


@pytest.mark.parametrize("command", sorted(REGISTRIES))
def test_list_commands_take_no_options(command, capsys):
    assert cli_main([command, "--all"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("robust-train: error:") and "takes no options" in err[0]
