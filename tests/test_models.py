import pytest
import torch
import torchvision
from torch import nn

from robust_train.errors import ConfigError
from robust_train.models import MODELS, Classifier, create_model

# Per-name overrides that keep the test fast while still exercising the entry's keyword arguments.
FAST_KWARGS = {"wide_resnet": dict(depth=10, widen=2)}
SIZE = {"small_cnn": (1, 28), "fast_mnist_cnn": (1, 28)}  # (in_channels, image side); the rest are 32x32 RGB
HEAVY = {"wide_resnet34_10", "wide_resnet28_10"}


def _build(name, **kwargs):
    in_channels, _ = SIZE.get(name, (3, 32))
    return create_model(name, num_classes=7, in_channels=in_channels, **{**FAST_KWARGS.get(name, {}), **kwargs})


def _check_contract(model: Classifier, x: torch.Tensor, num_classes: int) -> None:
    model.eval()
    with torch.no_grad():
        logits = model(x)
        fmap = model.features(x)
        assert logits.shape == (x.shape[0], num_classes)
        assert fmap.dim() == 4 and fmap.shape[0] == x.shape[0]
        assert torch.allclose(model.logits_from_features(fmap), logits, atol=1e-5)
    assert isinstance(model.head, nn.Linear) and model.head.in_features == fmap.shape[1]


# The supervised VAE classifies from its latent code and has no feature map (tests/test_type1.py checks its own contract).
NOT_FEATURE_CLASSIFIERS = {"svae"}


@pytest.mark.parametrize("name", [n for n in MODELS.names() if n not in NOT_FEATURE_CLASSIFIERS])
def test_registered_model_contract(name):
    torch.manual_seed(0)
    in_channels, side = SIZE.get(name, (3, 32))
    x = torch.rand(1 if name in HEAVY else 2, in_channels, side, side)
    _check_contract(_build(name), x, 7)


@pytest.mark.parametrize("name, expected", [
    ("preact_resnet18", 11.17e6), ("wide_resnet34_10", 46.16e6), ("wide_resnet28_10", 36.48e6)])
def test_parameter_counts(name, expected):
    n = sum(p.numel() for p in create_model(name, num_classes=10).parameters())
    assert abs(n - expected) / expected < 0.01


def test_fast_mnist_cnn_is_wong_et_als_network():
    model = create_model("fast_mnist_cnn", num_classes=10, in_channels=1)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(16, 1, 4, 4), (16,), (32, 16, 4, 4), (32,), (100, 1568), (100,), (10, 100), (10,)]
    assert sum(p.numel() for p in model.parameters()) == 166_406
    assert model.features(torch.rand(3, 1, 28, 28)).shape == (3, 100, 1, 1)


def test_feature_map_sizes_on_32x32():
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert create_model("preact_resnet18").eval().features(x).shape == (1, 512, 4, 4)
        assert create_model("vgg16_bn").eval().features(x).shape == (1, 512, 2, 2)
        assert create_model("wide_resnet", depth=10, widen=2).eval().features(x).shape == (1, 128, 8, 8)


def test_normalisation_is_inside_the_model():
    torch.manual_seed(0)
    a = create_model("small_cnn", in_channels=1, mean=(0.5,), std=(0.5,))
    b = create_model("small_cnn", in_channels=1, mean=(0.0,), std=(1.0,))
    b.body.load_state_dict(a.body.state_dict())
    b.head.load_state_dict(a.head.state_dict())
    assert torch.equal(a.mean, torch.full((1, 1, 1, 1), 0.5))
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(a(x), b(2 * x - 1), atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_grayscale(name):
    model = create_model(f"tv_{name}", num_classes=5, in_channels=1)
    assert model.mean.shape == (1, 1, 1, 1)
    _check_contract(model, torch.rand(2, 1, 32, 32), 5)


@pytest.mark.parametrize("name", ["resnet18", "regnet_x_400mf", "shufflenet_v2_x0_5", "densenet121",
                                  "mobilenet_v2", "efficientnet_b0", "mnasnet0_5"])
def test_torchvision_split_matches_torchvision_forward(name):
    torch.manual_seed(0)
    ours = create_model(f"tv_{name}", num_classes=10).eval()
    torch.manual_seed(0)
    ref = torchvision.models.get_model(name, num_classes=10).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(ours.normalize(x)), atol=1e-4)
    assert torch.allclose(ours.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))


def test_unknown_names_suggest_the_closest():
    with pytest.raises(ConfigError, match="Did you mean 'preact_resnet18'"):
        create_model("preact_resnet19")
    with pytest.raises(ConfigError, match=r"Did you mean 'tv_resnet18'.*list_models"):
        create_model("tv_resnet19")


@pytest.mark.parametrize("name", ["tv_mobilenet_v3_small", "tv_convnext_tiny", "tv_vit_b_16"])
def test_torchvision_non_gap_linear_models_are_refused(name):
    with pytest.raises(ConfigError, match="not a GAP\\+linear model"):
        create_model(name)


def test_torchvision_weights_errors(monkeypatch):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(ConfigError, match="could not load weights 'DEFAULT'"):
        create_model("tv_resnet18", weights="DEFAULT")
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        create_model("tv_resnet18", weights="NOPE")


def test_torchvision_pretrained_path_replaces_head_and_adapts_stem(monkeypatch):
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18().state_dict()
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", lambda *a, **k: imagenet)
    model = create_model("tv_resnet18", num_classes=10, in_channels=1, weights="DEFAULT")
    assert model.head.out_features == 10
    assert torch.allclose(model.body.conv1.weight, imagenet["conv1.weight"].sum(1, keepdim=True), atol=1e-6)
    assert torch.equal(model.body.layer4[1].conv2.weight, imagenet["layer4.1.conv2.weight"])
    _check_contract(model, torch.rand(2, 1, 32, 32), 10)


def test_wide_resnet_rejects_bad_depth():
    with pytest.raises(ConfigError, match="6n\\+4"):
        create_model("wide_resnet", depth=30)
