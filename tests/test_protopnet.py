"""ProtoPNet (Chen et al., NeurIPS 2019): the model, its losses and phases, the prototype push, the prototype maps,
and the CPU tests of methods.md §1.6 (distance expansion = brute force, push lands on a latent patch of the class
at distance 0, last-layer init +1/−0.5 and the L1 mask, Clst/Sep against a loop, phase freezing)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from robust_train.attacks import PGD, PrototypePGD, create_attack
from robust_train.attacks.aai import mass_on, top_cells
from robust_train.callbacks import AttackAccuracy, MapStability, PrototypePush
from robust_train.callbacks.prototype_push import push_prototypes, without_augmentation
from robust_train.data import MNISTData
from robust_train.data.base import TensorImageDataset, random_crop_flip
from robust_train.errors import ConfigError
from robust_train.evaluate import has_feature_map
from robust_train.interpret import MAPS, interpretation_map, prototype_map, top_prototype_map, top_prototypes
from robust_train.methods.protopnet import ProtoPNetTraining, cluster_separation, phase_plan
from robust_train.models import create_model
from robust_train.models.protopnet import ProtoPNet
from tests.conftest import quiet_trainer

REPO = Path(__file__).resolve().parents[1]
MNIST = {"in_channels": 1, "mean": (0.1307,), "std": (0.3081,)}


def tiny(num_classes: int = 2, m: int = 2, dim: int = 8, **kwargs) -> ProtoPNet:
    """methods.md §1.6's toy: a small CNN body, 2 classes x 2 prototypes (7x7 latent map at 28x28)."""
    torch.manual_seed(0)
    return create_model("protopnet", num_classes=num_classes, prototypes_per_class=m, prototype_dim=dim,
                        widths=(4, 8, 8), **MNIST, **kwargs)


@pytest.fixture(scope="module")
def mnist():
    dm = MNISTData(batch_size=32, val_size=32)
    dm.setup("fit")
    return dm


# -- model -----------------------------------------------------------------------------------------------------------
def test_distance_expansion_matches_brute_force():
    model = tiny().double()
    z = torch.rand(3, 8, 5, 4, dtype=torch.float64)
    d = model.distances_from_latent(z)
    p = model.prototype_vectors.flatten(1)  # (P, D)
    brute = ((z[:, None] - p[None, :, :, None, None]) ** 2).sum(2)
    assert d.shape == (3, 4, 5, 4) and torch.allclose(d, brute, atol=1e-12)
    assert (model.distances_from_latent(p[:1, :, None, None]) >= 0).all()  # d(p, p) clamped, not negative
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    assert torch.allclose(model.prototype_distances(x), model.distances_from_latent(model.latent_features(x)))
    assert torch.allclose(model.min_distances(x), model.prototype_distances(x).amin(dim=(2, 3)))


def test_similarity_decreases_in_distance_and_is_bounded():
    model = tiny()
    d = torch.linspace(0, 50, 1001)
    s = model.distance_to_similarity(d)
    assert (s[1:] < s[:-1]).all() and (s > 0).all()
    assert math.isclose(s[0].item(), math.log(1e4), rel_tol=1e-5)
    assert torch.equal(tiny(activation="linear").distance_to_similarity(d), -d)


def test_last_layer_init_class_identity_and_l1_mask():
    model = tiny(num_classes=3, m=2)
    identity = model.prototype_class_identity
    assert identity.shape == (6, 3) and torch.equal(identity.sum(1), torch.ones(6))
    assert model.prototype_classes.tolist() == [0, 0, 1, 1, 2, 2]
    w = model.last_layer.weight
    assert model.last_layer is model.head and model.head.bias is None and w.shape == (3, 6)
    assert torch.equal(w, torch.where(identity.t().bool(), torch.tensor(1.0), torch.tensor(-0.5)))
    mask = model.off_class_mask()
    assert torch.equal(mask * identity.t(), torch.zeros(3, 6)) and mask.sum() == 6 * 2
    assert tiny(incorrect_class_connection=0.0).head.weight.min() == 0.0
    p = model.prototype_vectors
    assert p.shape == (6, 8, 1, 1) and 0 <= p.min() and p.max() < 1  # U[0, 1)


def test_logits_features_and_classifier_contract():
    model = create_model("protopnet", **MNIST).eval()  # registry defaults: small_cnn, 10 x 10 prototypes, D 128
    assert (model.num_prototypes, model.prototype_dim, model.backbone_name) == (100, 128, "small_cnn")
    x = torch.rand(3, 1, 28, 28)
    logits = model(x)
    sim = model.features(x)
    assert logits.shape == (3, 10) and sim.shape == (3, 100, 7, 7)
    assert torch.allclose(model.logits_from_features(sim), logits, atol=1e-5)
    assert torch.allclose(model(x), logits) and torch.equal(model.similarity_maps(x), sim)
    assert has_feature_map(model)
    model.load_state_dict(create_model("protopnet", **MNIST).state_dict())  # push buffers are in the state dict
    for name in ("protopnet_preact_resnet18", "protopnet_vgg16_bn"):
        assert isinstance(create_model(name, num_classes=10, prototypes_per_class=1, prototype_dim=4), ProtoPNet)


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        create_model("protopnet", backbone="nope")
    with pytest.raises(ConfigError, match="itself a head"):
        create_model("protopnet", backbone="attention_pool")
    with pytest.raises(ConfigError, match="fixes the backbone"):
        create_model("protopnet_vgg16_bn", backbone="small_cnn")
    with pytest.raises(ConfigError, match="prototypes_per_class"):
        create_model("protopnet", prototypes_per_class=0)
    with pytest.raises(ConfigError, match="needs a ProtoPNet"):
        ProtoPNetTraining(arch="small_cnn")
    with pytest.raises(ConfigError, match="sep_weight.*subtracted"):
        ProtoPNetTraining(sep_weight=-0.08)
    with pytest.raises(ConfigError, match="lr=0.1 is not used"):
        ProtoPNetTraining(lr=0.1)
    with pytest.raises(ConfigError, match="adversarial"):
        ProtoPNetTraining(adversarial="fgsm")
    with pytest.raises(ConfigError, match="no prototypes"):
        prototype_map(create_model("small_cnn", in_channels=1), torch.rand(1, 1, 28, 28))


# -- losses ----------------------------------------------------------------------------------------------------------
def test_cluster_and_separation_against_a_loop_and_the_official_trick():
    torch.manual_seed(0)
    model = tiny(num_classes=3, m=2)
    identity = model.prototype_class_identity
    d = torch.rand(5, 6) * 10
    y = torch.tensor([0, 1, 2, 1, 0])
    clst, sep = cluster_separation(d, y, identity)
    classes = identity.argmax(1).tolist()
    own = [min(d[i, j] for j in range(6) if classes[j] == y[i]) for i in range(5)]
    other = [min(d[i, j] for j in range(6) if classes[j] != y[i]) for i in range(5)]
    assert torch.isclose(clst, torch.stack(own).mean()) and torch.isclose(sep, torch.stack(other).mean())
    for i in range(5):  # per image: the minimum is at most every own-class (other-class) distance
        assert all(own[i] <= d[i, j] for j in range(6) if classes[j] == y[i])
        assert all(other[i] <= d[i, j] for j in range(6) if classes[j] != y[i])
    max_dist = 10.0  # the official max_dist − max((max_dist − d)·mask) trick, valid since d <= max_dist here
    mask = identity.t()[y]
    official_clst = (max_dist - ((max_dist - d) * mask).amax(1)).mean()
    official_sep = (max_dist - ((max_dist - d) * (1 - mask)).amax(1)).mean()
    assert torch.isclose(clst, official_clst) and torch.isclose(sep, official_sep)


def test_total_loss_has_the_official_coefficients():
    module = ProtoPNetTraining(arch_kwargs={"prototypes_per_class": 2, "prototype_dim": 8, "widths": (4, 8, 8)})
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    loss, logits, parts = module.loss_terms(x, y)
    expected = parts["ce"] + 0.8 * parts["cluster"] - 0.08 * parts["separation"] + 1e-4 * parts["l1"]
    assert torch.isclose(loss, expected) and logits.shape == (4, 10)
    assert torch.isclose(parts["l1"], torch.tensor(0.5 * 9 * 20))  # 9 off-class weights of -0.5 per prototype


# -- phases ----------------------------------------------------------------------------------------------------------
def test_phase_plan_follows_the_official_outer_epochs():
    phases, pushes = phase_plan(16, warm_epochs=2, push_start=3, push_every=3, last_layer_epochs=2)
    assert phases[:11] == ["warm", "warm", "joint", "joint", "last", "last", "joint", "joint", "joint", "last",
                           "last"]
    assert pushes == {3, 8, 13}
    assert phase_plan(4, 0, 0, 0, 1) == (["joint", "last", "joint", "joint"], {0})  # push_every 0: once
    module = ProtoPNetTraining(warm_epochs=0, push_start=5, push_every=5, last_layer_epochs=2)
    assert [module.phase_at(e) for e in (5, 6, 7, 8)] == ["joint", "last", "last", "joint"]
    assert module.push_due(5) and not module.push_due(6)
    # official StepLR(5, 0.1) stepped at the start of each joint epoch: x0.1 from the 5th joint epoch (index 4)
    assert [module.joint_lr_factor(e) for e in (0, 3, 4)] == [1.0, 1.0, pytest.approx(0.1)]


def test_phases_train_exactly_their_parameters():
    torch.manual_seed(0)
    module = ProtoPNetTraining(arch_kwargs={"prototypes_per_class": 2, "prototype_dim": 8, "widths": (4, 8, 8)})
    opts = dict(zip(("warm", "joint", "last"), module.configure_optimizers()))
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8)
    groups = module.param_groups()
    expected = {"warm": {"add_on", "prototypes"}, "joint": {"features", "add_on", "prototypes"},
                "last": {"last_layer"}}
    for phase in ("warm", "joint", "last"):
        module.set_phase(phase)
        before = {k: [p.detach().clone() for p in ps] for k, ps in groups.items()}
        loss, _ = module.training_loss(x, y, None)
        opts[phase].zero_grad(set_to_none=True)
        loss.backward()
        opts[phase].step()
        for name, params in groups.items():
            changed = any(not torch.equal(a, p) for a, p in zip(before[name], params))
            assert changed == (name in expected[phase]), (phase, name)
            if name not in expected[phase]:
                assert all(p.grad is None and not p.requires_grad for p in params), (phase, name)


@pytest.mark.parametrize("adversarial", ["pgd", "pgd_prototype"])
def test_pgd_variant_trains_on_examples_in_the_ball(adversarial):
    module = ProtoPNetTraining(adversarial=adversarial, steps=2, step_size=0.1, eps=0.3,
                               arch_kwargs={"prototypes_per_class": 1, "prototype_dim": 4, "widths": (4, 8, 8)})
    x, y = torch.rand(4, 1, 28, 28), torch.arange(4)
    torch.manual_seed(0)
    x_adv = module.adversarial_batch(x, y, 0.3)
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6 and not torch.equal(x_adv, x)
    assert ProtoPNetTraining(arch_kwargs={"prototypes_per_class": 1}).adversarial_batch(x, y, 0.3) is None
    # the examples are the named attack's last iterate (same random start), not the other attack's
    kinds = {"pgd": PGD, "pgd_prototype": PrototypePGD}
    for name, kind in kinds.items():
        torch.manual_seed(0)
        ref = kind(0.3, steps=2, step_size=0.1, keep_best=False)(module.model, x, y)
        assert torch.equal(ref, x_adv) == (name == adversarial), name


def test_adversarial_names_are_checked():
    with pytest.raises(ConfigError, match="pgd_prototype"):
        ProtoPNetTraining(adversarial="fgsm", arch_kwargs={"prototypes_per_class": 1})


# -- push ------------------------------------------------------------------------------------------------------------
def test_push_puts_each_prototype_on_a_latent_patch_of_its_class_at_distance_zero():
    model = tiny().train()
    torch.manual_seed(1)
    x, y = torch.rand(12, 1, 28, 28), torch.arange(12) % 2
    with torch.no_grad():
        model.eval()
        z = model.latent_features(x)
        own_min = [model.distances_from_latent(z)[y == c].amin(dim=(0, 2, 3)) for c in (0, 1)]
        model.train()
    result = push_prototypes(model, [(x[:5], y[:5]), (x[5:], y[5:])])
    assert model.training  # mode restored
    for j, c in enumerate(model.prototype_classes.tolist()):
        i, (h, w) = int(model.prototype_image_index[j]), model.prototype_patch_index[j].tolist()
        assert y[i] == c, "pushed onto an image of another class"
        assert torch.allclose(model.prototype_vectors[j].flatten(), z[i, :, h, w], rtol=0, atol=1e-6)
        assert torch.isclose(result["distance"][j], own_min[c][j])  # the nearest own-class patch
        with torch.no_grad():
            assert model.eval().min_distances(x[i:i + 1])[0, j] < 1e-5
    assert torch.equal(result["image_index"], model.prototype_image_index)


def test_push_leaves_prototypes_without_images_of_their_class_alone():
    model = tiny()
    before = model.prototype_vectors.detach().clone()
    result = push_prototypes(model, [(torch.rand(3, 1, 28, 28), torch.zeros(3, dtype=torch.long))])
    assert result["image_index"].tolist()[2:] == [-1, -1] and torch.equal(model.prototype_vectors[2:], before[2:])
    assert (result["image_index"][:2] >= 0).all()


def test_push_bypasses_augmentation():
    images = torch.randint(0, 256, (4, 1, 6, 6), dtype=torch.uint8)
    augmented = TensorImageDataset(images, torch.zeros(4), augment=random_crop_flip)
    plain = without_augmentation(augmented)
    assert plain.augment is None and augmented.augment is random_crop_flip
    assert torch.equal(plain.__getitems__([0, 1, 2, 3])[0], images / 255)


# -- maps ------------------------------------------------------------------------------------------------------------
def test_prototype_maps_are_registered_differentiable_and_leave_the_model_alone():
    model = tiny(num_classes=3, m=2).train()
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    classes = torch.tensor([0, 2, 1, 2])
    maps = interpretation_map("prototype", model, x, classes)
    sim = model.similarity_maps(x)
    expected = torch.stack([sim[i, 2 * c:2 * c + 2].amax(0) for i, c in enumerate(classes.tolist())])
    assert maps.shape == (4, 7, 7) and torch.allclose(maps, expected)
    (grad,) = torch.autograd.grad(maps.sum(), x)
    assert grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters()) and model.training
    assert {"prototype", "prototype_top"} <= set(MAPS.names())
    top = top_prototype_map(model, x, classes)
    for i, c in enumerate(classes.tolist()):
        block = sim[i, 2 * c:2 * c + 2]
        assert torch.allclose(top[i], block[block.amax(dim=(1, 2)).argmax()])
    with torch.no_grad():
        pred = model(x).argmax(1)
        assert torch.allclose(prototype_map(model, x), prototype_map(model, x, pred))


def test_top_prototypes():
    model = tiny(num_classes=3, m=2)
    x = torch.rand(2, 1, 28, 28)
    idx, scores = top_prototypes(model, x, k=3)
    act = model.similarity_maps(x).amax(dim=(2, 3)).detach()
    assert idx.shape == scores.shape == (2, 3) and (scores[:, :-1] >= scores[:, 1:]).all()
    assert torch.allclose(act.gather(1, idx), scores)
    idx_c, _ = top_prototypes(model, x, k=2, classes=torch.tensor([1, 2]))
    assert sorted(idx_c[0].tolist()) == [2, 3] and sorted(idx_c[1].tolist()) == [4, 5]
    with pytest.raises(ConfigError, match="k=3"):
        top_prototypes(model, x, k=3, classes=torch.tensor([1, 2]))


def test_aai_runs_on_the_prototype_map_and_lowers_its_topk_mass():
    model = tiny().eval()
    torch.manual_seed(0)
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 0, 1])
    aai = create_attack("aai", eps=0.3, steps=3, map_fn=prototype_map, random_start=False)
    x_adv = aai(model, x, y)
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        cells = top_cells(prototype_map(model, x, y), 8)
        assert (mass_on(prototype_map(model, x_adv, y), cells) <= mass_on(prototype_map(model, x, y), cells)).all()


def test_prototype_figure_with_sources(tmp_path):
    from robust_train.figures import prototype_figure
    from robust_train.interpret.prototype import prototype_sources

    model = tiny()
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([0, 1])
    dataset = TensorImageDataset((torch.rand(6, 1, 28, 28) * 255).to(torch.uint8), torch.arange(6) % 2)
    push_prototypes(model, [dataset.__getitems__(range(6))])
    sources = prototype_sources(model, dataset)
    assert all(s is not None and s.shape == (1, 28, 28) for s in sources)
    prototype_figure(model, x, y, x_adv=(x + 0.1).clamp(0, 1), k=2, sources=sources, path=tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


# -- Lightning -------------------------------------------------------------------------------------------------------
class Snapshot(pl.Callback):
    """The parameters at the start of each epoch (after the previous epoch's push)."""

    def __init__(self):
        self.states = {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.states[trainer.current_epoch] = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


def test_fit_joint_push_then_last_layer_in_lightning(mnist, tmp_path):
    torch.manual_seed(0)
    module = ProtoPNetTraining(warm_epochs=0, push_start=0, push_every=0, last_layer_epochs=1,
                               arch_kwargs={"prototypes_per_class": 2, "prototype_dim": 16})
    snap, push = Snapshot(), PrototypePush(max_batches=4)
    assert module.configure_callbacks()[0].__class__ is PrototypePush  # added when the Trainer has none
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_train_batches=3, limit_val_batches=1,
                            callbacks=[push, snap, AttackAccuracy(steps=2, max_batches=1),
                                    MapStability(every_n_epochs=1, steps=2, max_batches=1, map="prototype",
                                                 log_images=False)])
    trainer.fit(module, datamodule=mnist)
    assert sum(isinstance(cb, PrototypePush) for cb in trainer.callbacks) == 1
    assert push.last_push is not None and push.last_push["epoch"] == 0
    model = module.model
    after_push, final = snap.states[1], model.state_dict()
    assert not torch.equal(snap.states[0]["prototype_vectors"], after_push["prototype_vectors"])
    for key, value in final.items():  # epoch 1 is a last-layer epoch: only the head moves
        assert torch.equal(value, after_push[key]) != (key == "head.weight"), key
    assert all(p.requires_grad for p in model.parameters())  # unfrozen when fitting ends
    # every pushed prototype is the latent cell of the un-augmented training image it was taken from
    dataset = PrototypePush.dataset_for(mnist)
    model.eval()
    with torch.no_grad():
        for j in range(model.num_prototypes):
            i, (h, w) = int(model.prototype_image_index[j]), model.prototype_patch_index[j].tolist()
            image, label = dataset[i]
            assert label == model.prototype_classes[j]
            patch = model.latent_features(image[None])[0, :, h, w]  # batch of 1: equal up to conv rounding
            assert torch.allclose(patch, model.prototype_vectors[j].flatten(), rtol=0, atol=1e-6)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and "val/map_tau/aai@0.3" in metrics
    assert metrics["train/phase"] == 2.0  # last epoch was the last-layer phase

    # evaluate's report shows the top prototypes of clean and adversarial images beside their training patches
    from robust_train.evaluate import evaluate
    trainer.save_checkpoint(tmp_path / "protopnet.ckpt")
    report = evaluate(str(tmp_path / "protopnet.ckpt"), ["pgd"], [0.0, 0.3], n=4, steps=2, progress=False,
                      stability_attacks=(), checks=False, out=tmp_path / "eval", n_pictures=2)
    assert "prototypes.png" in report["pictures"] and (tmp_path / "eval" / "prototypes.png").is_file()
    assert report["picture_settings"]["prototypes"]["k"] == 3
    assert any("add pgd_prototype" in note for note in report["notes"])  # a named suite without it: say so
    default = evaluate(str(tmp_path / "protopnet.ckpt"), None, [0.3], n=4, steps=2, progress=False,
                       stability_attacks=(), checks=False, pictures=False)
    names = [row["name"] for row in default["attacks"]]
    assert names[-1] == "pgd_prototype" and names[:-1] == ["pgd", "pgd_margin", "pgd_targeted"]
    assert any("the worst case above includes it" in note for note in default["notes"])


def test_recipe_parses():
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "robust_train", "fit", "--recipe", "protopnet", "--print_config"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for text in ("class_path: robust_train.methods.protopnet.ProtoPNetTraining", "arch: protopnet",
                 "class_path: robust_train.callbacks.PrototypePush", "map: prototype"):
        assert text in out.stdout
