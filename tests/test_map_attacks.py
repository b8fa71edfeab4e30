"""Every registered interpretation map under the attack against interpretability, wherever AAI gets its map: the
attack itself, the MapStability callback and `evaluate --map NAME`. Maps made of gradients (Grad-CAM, saliency,
SmoothGrad, IG) must reach AAI with their graph kept (`interpret.differentiable_map`), or AAI has nothing to
differentiate and the first stability epoch, or the end of a whole evaluation, fails."""
from __future__ import annotations

import pytest
import torch

from robust_train.attacks import AAI
from robust_train.callbacks import MapStability
from robust_train.data import MNISTData
from robust_train.evaluate import evaluate
from robust_train.interpret import MAPS, differentiable_map
from robust_train.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")
MNIST = {"num_classes": 10, "in_channels": 1, "mean": [0.1307], "std": [0.3081]}
ARCH_FOR_MAP = {"attention": "attention_pool", "prototype": "protopnet", "prototype_top": "protopnet"}


def arch_for(map_name: str) -> str:
    return ARCH_FOR_MAP.get(map_name, "small_cnn")


def model_for(map_name: str):
    torch.manual_seed(0)
    kwargs = {"prototypes_per_class": 2, "prototype_dim": 16} if arch_for(map_name) == "protopnet" else {}
    return create_model(arch_for(map_name), **MNIST, **kwargs).eval()


@pytest.fixture(scope="module")
def images():
    return MNISTData().test_tensors(4)


@pytest.mark.parametrize("map_name", MAPS.names())
def test_the_map_aai_descends_keeps_its_graph(map_name, images):
    model, (x, y) = model_for(map_name), images
    xg = x.clone().requires_grad_(True)
    maps = differentiable_map(map_name)(model, xg, y)
    (grad,) = torch.autograd.grad(maps.sum(), xg, allow_unused=True)
    assert grad is not None and grad.shape == x.shape


@pytest.mark.parametrize("map_name", MAPS.names())
def test_aai_runs_on_every_map(map_name, images):
    model, (x, y) = model_for(map_name), images
    torch.manual_seed(0)
    x_adv = AAI(0.1, steps=2, k=4, map_fn=map_name)(model, x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert AAI(0.1, map_fn=map_name).describe()["map_fn"] == map_name


@pytest.mark.parametrize("map_name", MAPS.names())
def test_map_stability_callback_runs_aai_on_every_map(map_name, images):
    model, (x, y) = model_for(map_name), images
    callback = MapStability(attacks=["aai"], steps=2, map=map_name, topk=4)
    result = callback.stability(model, [(x, y)], [0.1])
    assert result[("aai", 0.1)]["n_total"] == len(x)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A checkpoint of each architecture a map needs (untrained: AAI only has to run)."""
    folder = tmp_path_factory.mktemp("map_ckpts")
    spec = MNISTData().spec
    paths = {}
    for arch in sorted({arch_for(m) for m in MAPS.names()}):
        model = model_for({"small_cnn": "cam"}.get(arch, next(m for m in MAPS.names() if arch_for(m) == arch)))
        kwargs = {"prototypes_per_class": 2, "prototype_dim": 16} if arch == "protopnet" else {}
        torch.save({"robust_train": {"format": 1, "method": "StandardTraining", "arch": arch, "arch_kwargs": kwargs,
                                     "data_spec": spec, "eps": 0.1},
                    "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, folder / f"{arch}.ckpt")
        paths[arch] = folder / f"{arch}.ckpt"
    return paths


@pytest.mark.parametrize("map_name", MAPS.names())
def test_evaluate_measures_stability_under_aai_on_every_map(map_name, checkpoints):
    report = evaluate(checkpoints[arch_for(map_name)], ["fgsm"], [0.0, 0.1], n=4, progress=False,
                      stability_attacks=["aai"], stability_steps=2, map=map_name, topk=4, checks=False,
                      pictures=False)
    (row,) = report["map_stability"]
    assert row["map"] == map_name and row["attack"] == "aai" and row["n_total"] == 4
