"""bench/architectures.py without training: the attack table on a tiny random model, the ProtoPNet schedule, the
printed table."""
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from robust_train.methods.protopnet import phase_plan
from robust_train.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

PATH = Path(__file__).resolve().parents[1] / "bench" / "architectures.py"
spec = importlib.util.spec_from_file_location("bench_architectures", PATH)
arch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(arch)


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 10)).eval()


def data(model, n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = pred.clone()
    y[::4] = (pred[::4] + 1) % 10  # a quarter misclassified, so clean accuracy is 0.75
    return x, y


def test_attack_table_on_tiny_model():
    model = tiny()
    x, y = data(model)
    eps = (0.0, 0.1)
    t = arch.attack_table(model, x, y, eps_list=eps, steps=3, margin_eps=(0.1,), margin_steps=3, batch_size=8)
    acc, correct = t["accuracy"], t["correct"]
    assert t["n"] == 16
    expected = {"clean", "fgsm_0", "fgsm_25.5", "bim_0", "bim_25.5", "pgd_0", "pgd_25.5", "mim_0", "mim_25.5",
                "pgd_margin_25.5", "worst_0", "worst_25.5"}
    assert set(acc) == expected and set(correct) == expected
    assert all(0.0 <= v <= 1.0 for v in acc.values())
    assert acc["clean"] == pytest.approx(0.75)
    for name in ("fgsm", "bim", "pgd", "mim"):  # ε = 0 changes nothing
        assert torch.equal(correct[f"{name}_0"], correct["clean"])
    for tag in ("0", "25.5"):
        worst = correct[f"worst_{tag}"]
        for key, c in correct.items():
            if key == "clean" or key.rsplit("_", 1)[1] == tag:
                assert not (worst & ~c).any(), key  # worst is correct only where every column is
                assert acc[f"worst_{tag}"] <= acc[key]
    assert acc["worst_25.5"] < acc["clean"]  # a large ε breaks something even on a random model
    assert isinstance(t["iterative_weaker_than_fgsm"], list)
    assert t["attacks"]["pgd_margin_25.5"]["loss"] == "margin"


def test_default_attacks_match_the_documented_step_sizes():
    attacks = arch.build_attacks()
    assert list(attacks) == ["fgsm_2", "fgsm_8", "bim_2", "bim_8", "pgd_2", "pgd_8", "mim_2", "mim_8",
                             "pgd_margin_8"]
    e = 8 / 255
    assert attacks["fgsm_8"].step_size == pytest.approx(e) and attacks["fgsm_8"].steps == 1
    assert attacks["bim_8"].step_size == pytest.approx(e / 10) and attacks["bim_8"].steps == 10
    assert attacks["pgd_8"].step_size == pytest.approx(2.5 * e / 10) and attacks["pgd_8"].random_start
    assert not attacks["pgd_8"].keep_best and not attacks["bim_8"].keep_best
    assert attacks["mim_8"].step_size == pytest.approx(e / 10) and attacks["mim_8"].decay == 1.0
    assert attacks["pgd_margin_8"].steps == 100 and attacks["pgd_margin_8"].loss == "margin"


def test_masking_rows_and_table_text():
    model = tiny()
    x, y = data(model)
    t = arch.attack_table(model, x, y, steps=2, margin_steps=2, batch_size=16)
    rows = arch.masking_rows(model, x, y, t, checks_n=8, batch_size=16, seed=0)
    assert {r["check"] for r in rows} >= {"iterative_not_weaker", "monotone_in_steps", "large_eps_breaks"}
    text = arch.format_table({"vgg16_bn": {"accuracy": t["accuracy"]}}, t["attacks"], t["n"])
    assert "published, CUB-12" in text and "88.96" in text and "PGDm (8,2)" in text and "worst (8)" in text
    assert "PGDp" not in text and "pgd_prototype_8" not in t["accuracy"]  # the adaptive attack: ProtoPNet only


def test_protopnet_gets_the_adaptive_attack_in_its_worst_case():
    torch.manual_seed(0)
    model = create_model("protopnet", num_classes=10, prototypes_per_class=1, prototype_dim=8, widths=(4, 8, 8),
                         in_channels=3).eval()
    x, y = torch.rand(16, 3, 28, 28), torch.arange(16) % 10
    t = arch.attack_table(model, x, y, steps=2, margin_steps=2, batch_size=16)
    assert {"pgd_prototype_2", "pgd_prototype_8"} <= set(t["attacks"])
    assert t["attacks"]["pgd_prototype_8"]["logits"].startswith("head(-min_distance)")
    assert not (t["correct"]["worst_8"] & ~t["correct"]["pgd_prototype_8"]).any()
    text = arch.format_table({"protopnet": {"accuracy": t["accuracy"]}}, t["attacks"], t["n"])
    assert "PGDp (8,2)" in text and "PGDp (2,2)" in text


@pytest.mark.parametrize("head_epochs", [3, 4, 5, 10, 12])
def test_protopnet_schedule_warms_pushes_once_and_ends_on_last_layer(head_epochs):
    s = arch.protopnet_schedule(head_epochs)
    phases, pushes = phase_plan(head_epochs, s["warm_epochs"], s["push_start"], s["push_every"],
                                s["last_layer_epochs"])
    assert len(phases) == head_epochs and phases[0] == "warm" and "joint" in phases
    assert phases[-1] == "last" and len(pushes) == 1  # the run ends on pushed prototypes
    assert max(pushes) == len(phases) - 1 - s["last_layer_epochs"] and phases[max(pushes)] == "joint"
    assert arch.method_config("protopnet", head_epochs)[2] == head_epochs  # no epochs on top: same budget


def test_protopnet_needs_three_head_epochs():
    with pytest.raises(ValueError, match="at least 3|>= 3"):
        arch.protopnet_schedule(2)


def fake_checkpoint(module, path):
    ckpt = {"state_dict": {f"model.{k}": v for k, v in module.model.state_dict().items()}}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("name", arch.MODELS)
def test_every_model_starts_from_the_backbone(name, tmp_path):
    from robust_train.methods import StandardTraining
    from robust_train.methods.protopnet import ProtoPNetTraining

    spec = {"name": "cifar10", "num_classes": 10, "in_channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
    torch.manual_seed(0)
    method, kwargs, _ = arch.backbone_config(1)
    backbone = StandardTraining(data_spec=spec, **kwargs)
    path = fake_checkpoint(backbone, tmp_path / "backbone.ckpt")
    method, kwargs, _ = arch.method_config(name, 5)
    torch.manual_seed(1)  # a different initialisation, so equality below means copied
    module = {"StandardTraining": StandardTraining, "ProtoPNetTraining": ProtoPNetTraining}[method](
        data_spec=spec, **kwargs)
    arch.load_backbone(module, path, whole=kwargs["arch"] == "vgg16_bn")
    for (k, v), w in zip(backbone.model.body.state_dict().items(), module.model.body.state_dict().values()):
        assert torch.equal(v, w), k
    if name == "vgg16_bn":
        assert torch.equal(module.model.head.weight, backbone.model.head.weight)
    else:  # a new head of another shape, left as initialised
        assert module.model.head.weight.shape != backbone.model.head.weight.shape


def test_orderings_group_ties():
    acc = {k: 0.5 for k in arch.PUBLISHED["VGG16"]}
    rows = {"vgg16_bn": {"accuracy": {**acc, "pgd_8": 0.1}}, "attention_pool": {"accuracy": {**acc, "pgd_8": 0.2}},
            "protopnet": {"accuracy": {**acc, "pgd_8": 0.0}}}
    o = arch.orderings(rows)
    assert o["pgd_8"]["ours"] == [["attention_pool"], ["vgg16_bn"], ["protopnet"]]
    assert o["pgd_8"]["same_order"] and o["pgd_8"]["same_best"]  # published: 14.72 > 2.01 > 0.33
    assert o["clean"]["ours"] == [["vgg16_bn", "attention_pool", "protopnet"]] and not o["clean"]["same_best"]
    assert arch.rank_text(o["clean"]["ours"]) == "vgg16_bn = attention_pool = protopnet"
