"""Attentional pooling (Girdhar & Ramanan, NIPS 2017) as a model head, its attention map, and the CPU tests of
methods.md §2.4: the score is the spatial mean of a_c ⊙ b = Tr(Xᵀ X b a_cᵀ)/n, a constant bottom-up map gives
GAP + linear, spatial permutations leave the score alone, and gradients reach both factors at init."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_train.attacks.aai import AAI, mass_on, top_cells
from robust_train.callbacks import AttackAccuracy, MapStability
from robust_train.data import MNISTData
from robust_train.errors import ConfigError
from robust_train.evaluate import has_feature_map
from robust_train.interpret import (MAPS, all_class_cams, attention_map, cam, grad_cam, interpretation_map,
                                    select_classes)
from robust_train.methods import StandardTraining
from robust_train.models import create_model
from robust_train.models.attention_pool import AttentionPoolClassifier
from tests.conftest import quiet_trainer

MNIST = {"in_channels": 1, "mean": (0.1307,), "std": (0.3081,)}


@pytest.fixture(scope="module")
def mnist():
    dm = MNISTData(batch_size=16, val_size=32)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def batch(mnist):
    return next(iter(mnist.train_dataloader()))


def randomised(model: AttentionPoolClassifier, std: float = 0.1) -> AttentionPoolClassifier:
    """Attention weights and biases all clearly non-zero (the official init leaves biases at 0 and logits ~1e-7)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in (model.bottom_up.weight, model.bottom_up.bias, model.head.weight):
            p.normal_(0.0, std)
    return model


def small(**kwargs) -> AttentionPoolClassifier:
    torch.manual_seed(0)
    return create_model("attention_pool", backbone="small_cnn", **{**MNIST, **kwargs})


# -- methods.md §2.4 ------------------------------------------------------------------------------------------------
def test_score_is_the_mean_of_the_rank1_product_and_the_trace_formula():
    model = randomised(small()).double().eval()
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
        X = model.backbone_features(x)
        n = X.shape[2] * X.shape[3]
        # Positions × features, with a ones column so that the conv biases are part of b and a_c.
        Xt = torch.cat([X.flatten(2).transpose(1, 2), torch.ones(3, n, 1, dtype=X.dtype)], dim=2)  # (N, n, K+1)
        b = torch.cat([model.bottom_up.weight.flatten(), model.bottom_up.bias])                    # (K+1,)
        A = model.head.weight                                                       # (C, K+1): [W_c | β_c] rows
        gram = Xt.transpose(1, 2) @ Xt                                                            # (N, K+1, K+1)
        trace = torch.stack([torch.stack([torch.trace(g @ torch.outer(b, a)) for a in A]) for g in gram]) / n
        product = ((Xt @ A.T) * (Xt @ b)[:, :, None]).mean(1)                     # mean_ij (X a_c)(X b)
        official = (F.conv2d(X, A[:, :-1, None, None], A[:, -1]) * model.bottom_up(X)).mean((2, 3))
    torch.testing.assert_close(trace, logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(product, logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(official, logits, rtol=1e-10, atol=1e-12)
    assert logits.abs().max() > 1e-3  # the identities were checked on non-trivial numbers


def test_constant_bottom_up_map_reproduces_gap_and_linear():
    model = randomised(small()).double().eval()
    with torch.no_grad():
        model.bottom_up.weight.zero_()
        model.bottom_up.bias.fill_(1.0)
    linear = nn.Linear(100, 10).double()
    with torch.no_grad():
        linear.weight.copy_(model.head.weight[:, :-1])
        linear.bias.copy_(model.head.weight[:, -1])
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), linear(model.backbone_features(x).mean((2, 3))), rtol=1e-10, atol=1e-12)


def test_score_is_invariant_to_permuting_spatial_positions():
    model = randomised(small()).eval()
    with torch.no_grad():
        X = model.backbone_features(torch.rand(2, 1, 28, 28))
        perm = torch.randperm(49)
        Xp = X.flatten(2)[:, :, perm].view_as(X)
        torch.testing.assert_close(model.attention_maps_from_backbone(Xp).mean((2, 3)),
                                   model.attention_maps_from_backbone(X).mean((2, 3)), rtol=1e-5, atol=1e-7)


def test_official_init_and_gradients_reach_both_factors_at_init(batch):
    model = small()
    assert model.bottom_up.weight.std().item() == pytest.approx(1e-3, rel=0.3)
    assert model.bottom_up.bias.abs().max() == 0 and model.head.weight[:, -1].abs().max() == 0  # zero biases
    assert model.head.bias is None  # the official score has no bias beyond the two convs'
    x, y = batch
    logits = model(x)
    assert logits.shape == (len(x), 10)
    grads = torch.autograd.grad(F.cross_entropy(logits, y), [model.bottom_up.weight, model.head.weight])
    assert all(g.abs().sum() > 0 for g in grads), "a factor gets no gradient at the official init"


# -- shapes, the Classifier contract and the maps --------------------------------------------------------------------
@pytest.mark.parametrize("backbone, shape, side, channels", [
    ("small_cnn", (1, 28, 28), 7, 100), ("small_cnn", (3, 32, 32), 8, 100),
    ("preact_resnet18", (1, 28, 28), 4, 512), ("preact_resnet18", (3, 32, 32), 4, 512)])
def test_shapes_and_contract(backbone, shape, side, channels):
    torch.manual_seed(0)
    model = randomised(create_model("attention_pool", backbone=backbone, num_classes=10, in_channels=shape[0]))
    model.eval()
    x = torch.rand(2, *shape)
    with torch.no_grad():
        logits, fmap, maps = model(x), model.features(x), model.attention_maps(x)
        assert model.backbone_features(x).shape == (2, channels, side, side)
        assert fmap.shape == (2, channels + 1, side, side)  # [X ⊙ b, b]
        assert maps.shape == (2, 10, side, side) and logits.shape == (2, 10)
        torch.testing.assert_close(model.logits_from_features(fmap), logits)
        torch.testing.assert_close(maps.mean((2, 3)), logits, rtol=1e-4, atol=1e-6)
    assert isinstance(model.head, nn.Linear) and model.head.in_features == channels + 1 and has_feature_map(model)


def test_fixed_backbone_names():
    assert create_model("attention_pool").backbone_name == "small_cnn"
    assert create_model("attention_pool_vgg16_bn").backbone_name == "vgg16_bn"
    assert isinstance(create_model("attention_pool_preact_resnet18").body[-1], nn.ReLU)


def test_cam_of_this_model_is_its_attention_map_and_the_maps_reproduce_the_logits():
    model = randomised(small()).eval()
    x, classes = torch.rand(4, 1, 28, 28), torch.tensor([0, 3, 3, 9])
    with torch.no_grad():
        maps, logits = model.attention_maps(x), model(x)
        cams, cam_logits = all_class_cams(model, x)
        torch.testing.assert_close(cams, maps, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(cam_logits, logits)
        # Completeness with no bias term: logit_c = mean_ij map_c(i, j).
        torch.testing.assert_close(maps.mean((2, 3)), logits, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(cam(model, x, classes), attention_map(model, x, classes), rtol=1e-4, atol=1e-6)
        # Grad-CAM (signed) on the attended features is the attention map / (H·W), as for any GAP + linear model.
        torch.testing.assert_close(grad_cam(model, x, classes, relu=False), select_classes(maps, classes) / 49,
                                   rtol=1e-4, atol=1e-7)


def test_interpretation_map_by_name():
    model = randomised(small()).eval()
    x = torch.rand(3, 1, 28, 28)
    assert MAPS.get("attention") is attention_map
    with torch.no_grad():
        maps, pred = model.attention_maps(x), model(x).argmax(1)
        torch.testing.assert_close(interpretation_map("attention", model, x), select_classes(maps, pred))
        classes = (pred + 1) % 10
        out = interpretation_map("attention", model, x, classes)
    assert out.shape == (3, 7, 7)
    torch.testing.assert_close(out, select_classes(maps, classes))


def test_attention_map_is_differentiable_in_x():
    model = randomised(small()).eval()
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    (grad,) = torch.autograd.grad(attention_map(model, x, torch.tensor([1, 2])).sum(), x)
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()
    assert all(p.grad is None for p in model.parameters())


def test_attention_map_leaves_mode_and_parameter_grads_alone():
    model, x = randomised(small(attention_dropout=0.5)), torch.rand(2, 1, 28, 28)
    for training in (True, False):
        model.train(training)
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.25)
        interpretation_map("attention", model, x)
        assert model.training is training
        assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())


def test_aai_on_the_attention_map_lowers_its_topk_mass(batch):
    model = randomised(small()).eval()
    x, y = batch[0][:8], batch[1][:8]
    with torch.no_grad():
        clean = attention_map(model, x, y)
    cells = top_cells(clean, 8)
    x_adv = AAI(0.3, k=8, steps=10, random_start=False, map_fn=attention_map)(model, x, y)
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    with torch.no_grad():
        before, after = mass_on(clean, cells), mass_on(attention_map(model, x_adv, y), cells)
    assert after.mean() < before.mean() and (after < before).float().mean() >= 0.75


def test_loss_decreases_on_a_fixed_batch(batch):
    x, y = batch
    for init_std, factor in ((0.1, 0.5), (1e-3, 0.95)):  # the recipes' init, then the official one (slow start)
        model = small(init_std=init_std)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(20):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < factor * losses[0], (init_std, losses)


def test_trains_three_steps_in_lightning_with_attention_map_stability(mnist, tmp_path):
    torch.manual_seed(0)
    module = StandardTraining(arch="attention_pool", arch_kwargs={"backbone": "small_cnn", "init_std": 0.1})
    before = [p.detach().clone() for p in module.parameters()]
    trainer = quiet_trainer(tmp_path, max_steps=3, limit_val_batches=1, val_check_interval=3,
                            callbacks=[AttackAccuracy(steps=2, max_batches=1),
                                    MapStability(every_n_epochs=1, steps=2, max_batches=1, map="attention",
                                                 log_images=False)])
    trainer.fit(module, datamodule=mnist)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters())), "no parameter moved"
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and 0 <= metrics["val/robust_acc"] <= 1
    assert "val/map_tau/aai@0.3" in metrics


# -- errors -----------------------------------------------------------------------------------------------------------
def test_config_errors():
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        create_model("attention_pool", backbone="nope")
    for head_model in ("attention_pool_vgg16_bn", "protopnet", "protopnet_vgg16_bn"):  # their body is not features
        with pytest.raises(ConfigError, match="itself a head on a backbone"):
            create_model("attention_pool", backbone=head_model, in_channels=1)
    with pytest.raises(ConfigError, match="fixes the backbone"):
        create_model("attention_pool_vgg16_bn", backbone="small_cnn")
    with pytest.raises(ConfigError, match="attention_dropout"):
        create_model("attention_pool", attention_dropout=1.0)
    plain = create_model("small_cnn", in_channels=1)
    with pytest.raises(ConfigError, match="attention_maps.*small_cnn|attention_maps.*SmallCNN"):
        attention_map(plain, torch.rand(1, 1, 28, 28))
    with pytest.raises(ConfigError, match="needs an attention-pooling model"):
        interpretation_map("attention", plain, torch.rand(1, 1, 28, 28))
