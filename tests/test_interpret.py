"""Interpretation maps: closed forms on linear and single-pixel models, CAM/Grad-CAM identities on the GAP-linear
small_cnn, IG completeness, exact agreement with captum, differentiability (gradcheck in float64), model state left
alone, the registry, and shapes. Tiny models with fixed seeds; float64 wherever numbers are compared tightly."""
from __future__ import annotations

import pytest
import torch
from captum.attr import IntegratedGradients, LayerGradCam, Saliency
from torch import nn

from robust_train.errors import ConfigError
from robust_train.interpret import (MAPS, all_class_cams, cam, grad_cam, grad_cam_pp, integrated_gradients,
                                    interpretation_map, saliency, smoothgrad)
from robust_train.models import Classifier, create_model

NUM_CLASSES = 5


pytestmark = pytest.mark.usefixtures("one_thread")


def small_cnn(seed=0, in_channels=1, softplus=False, dtype=torch.float64, **kwargs):
    """small_cnn (GAP + linear, 28x28 -> 7x7) with few channels; ReLU -> Softplus gives a smooth model."""
    torch.manual_seed(seed)
    model = create_model("small_cnn", num_classes=NUM_CLASSES, in_channels=in_channels, widths=(4, 6, 8), **kwargs)
    if softplus:
        for i, m in enumerate(model.body):
            if isinstance(m, nn.ReLU):
                model.body[i] = nn.Softplus()
    return model.to(dtype).eval()


class LinearNet(Classifier):
    """logits = W·vec(x) + b: the features are the image flattened into a 1x1 map with C·H·W channels."""

    def __init__(self, shape=(2, 5, 5), num_classes=NUM_CLASSES):
        super().__init__()
        dim = shape[0] * shape[1] * shape[2]
        self.body = nn.Sequential(nn.Flatten(), nn.Unflatten(1, (dim, 1, 1)))
        self.head = nn.Linear(dim, num_classes)


class PixelNet(Classifier):
    """Features = the (N, K, 1, 1) input itself: a single-pixel feature map, so Grad-CAM++ is computable by hand."""

    def __init__(self, weight):
        super().__init__()
        self.body = nn.Identity()
        self.head = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.fill_(0.3)


def images(n=3, channels=1, size=28, seed=1, dtype=torch.float64):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def classes_of(n, seed=2):
    return torch.randint(0, NUM_CLASSES, (n,), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ CAM/Grad-CAM
def test_cam_completeness_all_classes():
    model = small_cnn(dtype=torch.float32)
    maps, logits = all_class_cams(model, images(dtype=torch.float32))
    assert maps.shape == (3, NUM_CLASSES, 7, 7)
    torch.testing.assert_close(maps.mean((2, 3)) + model.head.bias, logits, atol=1e-5, rtol=0)


def test_grad_cam_without_relu_is_cam_over_hw():
    model, x = small_cnn(), images()
    for c in range(NUM_CLASSES):
        classes = torch.full((3,), c)
        torch.testing.assert_close(grad_cam(model, x, classes, relu=False), cam(model, x, classes) / 49)
        torch.testing.assert_close(grad_cam(model, x, classes), (cam(model, x, classes) / 49).relu())


def test_default_class_is_the_prediction_and_grad_mode_off_is_fine():
    model, x = small_cnn(), images()
    pred = model(x).argmax(1)
    for fn in (grad_cam, grad_cam_pp, saliency, integrated_gradients):
        expected = fn(model, x, pred)
        torch.testing.assert_close(fn(model, x), expected)
        with torch.no_grad():
            torch.testing.assert_close(fn(model, x), expected)


def test_grad_cam_pp_single_pixel_by_hand():
    # class 0 weights g = (0.5, -1, 2); with a 1x1 map ΣA = A, so w_k = ReLU(g)·g²/(2g² + A·g³ + 1e-6).
    model = PixelNet(torch.tensor([[0.5, -1.0, 2.0], [1.0, 1.0, 1.0]], dtype=torch.float64)).double()
    x = torch.tensor([[4.0, 2.0, 0.5], [-1.0, 1.0, -0.5]], dtype=torch.float64).view(2, 3, 1, 1)
    classes = torch.tensor([0, 0])
    # image 1: w0 = 0.5·0.25/(0.5 + 4·0.125) = 0.125, w1 = 0 (g < 0), w2 = 2·4/(8 + 0.5·8) = 2/3 -> 0.5 + 1/3
    # image 2: w0 = 0.5·0.25/(0.5 − 0.125) = 1/3, w2 = 2·4/(8 − 4) = 2 -> −1/3 − 1 = −4/3
    expected = torch.tensor([0.125 * 4 + (2 / 3) * 0.5, -1 / 3 - 1.0], dtype=torch.float64).view(2, 1, 1)
    torch.testing.assert_close(grad_cam_pp(model, x, classes, relu=False), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad_cam_pp(model, x, classes), expected.relu(), atol=1e-5, rtol=0)


def test_grad_cam_pp_on_gap_linear_uses_the_channel_sum_of_activations():
    """On GAP + linear, g = W_ck/(HW) everywhere, so a_k = g²/(2g² + g³·Σ_ij A_k): the per-pixel A_ij·g³ bug
    gives a different map (asserted too, so this test can tell them apart)."""
    model, x = small_cnn(), images()
    classes = classes_of(3)
    fmap = model.features(x).detach()
    g = (model.head.weight[classes] / 49).detach()[:, :, None, None].expand_as(fmap)  # same at every pixel
    a = g ** 2 / (2 * g ** 2 + fmap.sum((2, 3), keepdim=True) * g ** 3 + 1e-6)
    expected = ((a * g.relu()).sum((2, 3), keepdim=True) * fmap).sum(1)
    torch.testing.assert_close(grad_cam_pp(model, x, classes, relu=False), expected)
    buggy_a = g ** 2 / (2 * g ** 2 + fmap * g ** 3 + 1e-6)
    buggy = ((buggy_a * g.relu()).sum((2, 3), keepdim=True) * fmap).sum(1)
    assert not torch.allclose(buggy, expected)


# ------------------------------------------------------------------------------------------------ closed forms
def test_linear_model_closed_forms():
    torch.manual_seed(0)
    model = LinearNet().double().eval()
    x, baseline = images(3, 2, 5), images(3, 2, 5, seed=7)
    classes = classes_of(3)
    w = model.head.weight[classes].detach().view(3, 2, 5, 5)
    for method in ("riemann_right", "gausslegendre", "riemann_trapezoid"):
        ig = integrated_gradients(model, x, classes, baseline=baseline, steps=7, method=method)
        torch.testing.assert_close(ig, (x - baseline) * w, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(integrated_gradients(model, x, classes), x * w, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(saliency(model, x, classes, reduce=None), w.abs())
    torch.testing.assert_close(saliency(model, x, classes), w.abs().amax(1))
    torch.testing.assert_close(saliency(model, x, classes, reduce="sum"), w.abs().sum(1))
    for sigma in (0.0, 0.15, 2.0):
        sg = smoothgrad(model, x, classes, samples=7, noise_level=sigma, reduce=None)
        torch.testing.assert_close(sg, w)
        torch.testing.assert_close(smoothgrad(model, x, classes, samples=7, noise_level=sigma), w.sum(1))


# ------------------------------------------------------------------------------------------------ IG
def test_ig_completeness_on_a_smooth_model():
    model, x = small_cnn(softplus=True), images()
    classes = model(x).argmax(1)
    gap = (model(x) - model(torch.zeros_like(x))).gather(1, classes.view(-1, 1)).squeeze(1).detach()
    assert (gap.abs() > 1e-3).all()
    attr, delta = integrated_gradients(model, x, steps=300, return_delta=True)
    torch.testing.assert_close(delta, attr.sum((1, 2, 3)) - gap)
    assert (delta.abs() <= 0.01 * gap.abs()).all(), (delta, gap)
    _, delta10 = integrated_gradients(model, x, steps=10, return_delta=True)
    assert (delta.abs() < delta10.abs()).all(), (delta, delta10)


def test_ig_chunking_does_not_change_the_result():
    model, x = small_cnn(softplus=True), images()
    full = integrated_gradients(model, x, steps=9, internal_batch_size=1000)
    torch.testing.assert_close(integrated_gradients(model, x, steps=9, internal_batch_size=1), full)
    torch.testing.assert_close(integrated_gradients(model, x, steps=9, internal_batch_size=7), full)


# ------------------------------------------------------------------------------------------------ captum
@pytest.mark.parametrize("method", ["riemann_right", "gausslegendre", "riemann_trapezoid"])
def test_ig_matches_captum(method):
    model, x = small_cnn(in_channels=3, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25)), images(2, 3)
    classes = classes_of(2)
    ours, delta = integrated_gradients(model, x, classes, steps=20, method=method, return_delta=True)
    theirs, their_delta = IntegratedGradients(model).attribute(x, target=classes, n_steps=20, method=method,
                                                              return_convergence_delta=True)
    if method == "riemann_trapezoid":
        # captum's trapezoid weights are (1/n)·[1/2, 1, ..., 1, 1/2] on linspace(0, 1, n): they sum to (n − 1)/n,
        # not 1 (the node spacing is 1/(n − 1)), so captum's attributions are ours scaled by (n − 1)/n.
        torch.testing.assert_close(ours * 19 / 20, theirs, rtol=1e-5, atol=1e-10)
        return
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(delta, their_delta, rtol=1e-5, atol=1e-10)


@pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")
def test_saliency_matches_captum():
    model, x = small_cnn(in_channels=3, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25)), images(2, 3)
    classes = classes_of(2)
    theirs = Saliency(model).attribute(x, target=classes, abs=True)
    torch.testing.assert_close(saliency(model, x, classes, reduce=None), theirs, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(saliency(model, x, classes), theirs.amax(1), rtol=1e-5, atol=1e-12)
    signed = Saliency(model).attribute(x, target=classes, abs=False)
    torch.testing.assert_close(saliency(model, x, classes, abs=False, reduce=None), signed, rtol=1e-5, atol=1e-12)


def test_grad_cam_matches_captum_layer_grad_cam():
    model, x = small_cnn(dtype=torch.float32), images(dtype=torch.float32)
    classes = classes_of(3)
    theirs = LayerGradCam(model, model.body).attribute(x, target=classes, relu_attributions=False)
    torch.testing.assert_close(grad_cam(model, x, classes, relu=False), theirs[:, 0], rtol=1e-5, atol=1e-6)
    theirs = LayerGradCam(model, model.body).attribute(x, target=classes, relu_attributions=True)
    torch.testing.assert_close(grad_cam(model, x, classes), theirs[:, 0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ smoothgrad
def test_smoothgrad_is_the_mean_of_noisy_gradients_and_reproducible():
    model, x = small_cnn(softplus=True), images(2)
    classes = classes_of(2)
    sg = smoothgrad(model, x, classes, samples=4, noise_level=0.2, reduce=None,
                    generator=torch.Generator().manual_seed(5), internal_batch_size=1)
    # internal_batch_size=1 -> one copy of the batch per pass, noise drawn as randn((1, *x.shape)) each time
    gen = torch.Generator().manual_seed(5)
    noisy = [x + 0.2 * torch.randn((1, *x.shape), generator=gen, dtype=x.dtype)[0] for _ in range(4)]
    expected = torch.stack([saliency(model, xn, classes, abs=False, reduce=None) for xn in noisy]).mean(0)
    torch.testing.assert_close(sg, expected)
    again = smoothgrad(model, x, classes, samples=4, noise_level=0.2, reduce=None,
                       generator=torch.Generator().manual_seed(5), internal_batch_size=1)
    torch.testing.assert_close(sg, again, rtol=0, atol=0)
    assert not torch.allclose(sg, saliency(model, x, classes, abs=False, reduce=None))  # the noise does something


# ------------------------------------------------------------------------------------------------ differentiability
def test_create_graph_gives_maps_differentiable_in_x():
    relu_model, smooth = small_cnn(), small_cnn(softplus=True)
    x = images().requires_grad_(True)
    classes = classes_of(3)
    cases = [(cam, relu_model, {}), (grad_cam, relu_model, {"create_graph": True}),
             (saliency, smooth, {"create_graph": True}),
             (integrated_gradients, smooth, {"create_graph": True, "steps": 5})]
    for fn, model, kwargs in cases:
        out = fn(model, x, classes, **kwargs)
        assert out.grad_fn is not None, fn.__name__
        (gx,) = torch.autograd.grad(out.sum(), x)
        assert gx.abs().sum() > 0, fn.__name__
    assert saliency(smooth, x, classes).grad_fn is None  # no graph unless asked for


def test_create_graph_gradients_are_correct():
    """gradcheck (float64 finite differences) on a tiny smooth model and 1x8x8 images."""
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=3, widths=(2, 3, 4))
    for i, m in enumerate(model.body):
        if isinstance(m, nn.ReLU):
            model.body[i] = nn.Softplus()
    model = model.double().eval()
    x = images(1, 1, 8).requires_grad_(True)
    classes = torch.tensor([1])
    for fn, kwargs in [(saliency, {"abs": False, "reduce": None}), (grad_cam, {"relu": False}),
                       (integrated_gradients, {"steps": 3})]:
        assert torch.autograd.gradcheck(lambda t: fn(model, t, classes, create_graph=True, **kwargs), (x,)), fn


# ------------------------------------------------------------------------------------------------ model state
def test_maps_leave_mode_and_parameter_grads_alone():
    model, x = small_cnn(), images()
    for name in MAPS.names():
        if name in ("attention", "prototype", "prototype_top"):  # need their own models: see their test files
            continue
        for training in (True, False):
            model.train(training)
            for p in model.parameters():
                p.grad = torch.full_like(p, 0.25)
            interpretation_map(name, model, x, **({"steps": 3} if name == "integrated_gradients" else
                                                  {"samples": 3} if name == "smoothgrad" else {}))
            assert model.training is training, name
            for p in model.parameters():
                assert torch.equal(p.grad, torch.full_like(p, 0.25)), name


# ------------------------------------------------------------------------------------------------ registry/shapes
def test_registry():
    model, x = small_cnn(), images()
    classes = classes_of(3)
    assert MAPS.names() == sorted(["attention", "cam", "grad_cam", "grad_cam_pp", "saliency", "smoothgrad",
                                   "integrated_gradients", "prototype", "prototype_top"])
    torch.testing.assert_close(interpretation_map("cam", model, x, classes), cam(model, x, classes))
    torch.testing.assert_close(interpretation_map("grad_cam", model, x, classes, relu=False),
                               grad_cam(model, x, classes, relu=False))
    with pytest.raises(ConfigError, match="grad_cam"):
        interpretation_map("grad_cma", model, x)


@pytest.mark.parametrize("n", [1, 3])
def test_shapes(n):
    model, x = small_cnn(in_channels=3), images(n, 3)
    expected = {"cam": (n, 7, 7), "grad_cam": (n, 7, 7), "grad_cam_pp": (n, 7, 7), "saliency": (n, 28, 28),
                "smoothgrad": (n, 28, 28), "integrated_gradients": (n, 3, 28, 28)}
    kwargs = {"smoothgrad": {"samples": 3}, "integrated_gradients": {"steps": 4}}
    for name, shape in expected.items():
        out = interpretation_map(name, model, x, **kwargs.get(name, {}))
        assert out.shape == shape, name
        assert torch.isfinite(out).all(), name
