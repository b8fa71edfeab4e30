"""Defensive distillation: the soft-label math, the frozen teacher, its reuse, and a short two-stage fit."""
import os

import pytest
import torch
import torch.nn.functional as F

from robust_train.methods.distillation import DistillationTraining, soft_cross_entropy, soft_labels
from tests.conftest import quiet_trainer


def test_soft_labels_sum_to_one_and_flatten_with_temperature():
    z = torch.tensor([[10.0, 2.0, -3.0]])
    assert torch.allclose(soft_labels(z, 1.0), F.softmax(z, 1))
    top = [soft_labels(z, t).max().item() for t in (1.0, 20.0, 100.0)]
    assert top == pytest.approx([0.9997, 0.456, 0.357], abs=1e-3)  # methods.md §6, checked there with numpy
    assert torch.allclose(soft_labels(z, 100.0).sum(1), torch.ones(1))


def test_soft_cross_entropy_gradient_is_softmax_minus_target_over_t():
    torch.manual_seed(0)
    z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    q = F.softmax(torch.randn(4, 5, dtype=torch.float64), 1)
    t = 7.0
    (g,) = torch.autograd.grad(soft_cross_entropy(z, q, t), z)
    expected = (F.softmax(z.detach() / t, 1) - q) / t / z.shape[0]  # the loss is a batch mean
    assert torch.allclose(g, expected, atol=1e-12)


def test_hard_labels_reduce_to_cross_entropy_at_t():
    z, y = torch.randn(6, 10), torch.randint(0, 10, (6,))
    assert torch.allclose(soft_cross_entropy(z, F.one_hot(y, 10).float(), 3.0), F.cross_entropy(z / 3.0, y), atol=1e-6)


@pytest.mark.parametrize("bad", [{"temperature": 0.0}, {"temperature": -1.0}, {"teacher_epochs": 0}])
def test_bad_arguments_are_config_errors(bad):
    from robust_train.errors import ConfigError
    with pytest.raises(ConfigError):
        DistillationTraining(**bad)


def fit(root, teacher_path, temperature=20.0, batches=4):
    from robust_train.data import MNISTData

    torch.manual_seed(0)
    module = DistillationTraining(temperature=temperature, teacher_path=str(teacher_path), teacher_epochs=1)
    trainer = quiet_trainer(root, max_epochs=1, limit_train_batches=batches, limit_val_batches=0)
    trainer.fit(module, datamodule=MNISTData(batch_size=32))
    return module, trainer


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("distillation")
    module, trainer = fit(root, root / "teacher.ckpt")
    return root, module, trainer


def test_two_stage_fit_keeps_the_teacher_frozen_and_out_of_the_student(fitted):
    root, module, trainer = fitted
    assert (root / "teacher.ckpt").is_file()
    teacher = module.teacher
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised.isdisjoint(id(p) for p in teacher.parameters())
    assert not any(k.startswith("teacher") for k in module.state_dict())
    saved = torch.load(root / "teacher.ckpt", weights_only=True)["state_dict"]
    for name, p in teacher.state_dict().items():  # the student's steps left the teacher as it was written
        assert torch.equal(saved[f"model.{name}"], p.cpu())


def test_the_student_checkpoint_references_the_teacher(fitted):
    root, module, trainer = fitted
    trainer.save_checkpoint(root / "student.ckpt")
    info = torch.load(root / "student.ckpt", weights_only=True)["robust_train"]
    assert info["teacher"]["path"] == str((root / "teacher.ckpt").resolve())
    assert len(info["teacher"]["sha256"]) == 64 and info["temperature"] == 20.0


def test_the_teacher_file_is_a_classifier_checkpoint_with_its_temperature(fitted):
    import robust_train
    from robust_train.methods.base import DEFAULT_SPEC
    root, module, _ = fitted
    ckpt = torch.load(root / "teacher.ckpt", weights_only=True)
    assert set(ckpt) == {"robust_train", "state_dict"}
    assert ckpt["robust_train"] == {"format": 1, "method": "DistillationTeacher", "arch": "small_cnn",
                                    "arch_kwargs": {}, "data_spec": DEFAULT_SPEC, "eps": 0.3, "temperature": 20.0}
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(robust_train.load(root / "teacher.ckpt")(x), module.teacher.cpu()(x))


def test_a_finished_teacher_is_reused(fitted):
    root, module, _ = fitted
    mtime = os.stat(root / "teacher.ckpt").st_mtime_ns
    again, _ = fit(root, root / "teacher.ckpt", batches=1)
    assert os.stat(root / "teacher.ckpt").st_mtime_ns == mtime
    for a, b in zip(again.teacher.parameters(), module.teacher.parameters()):
        assert torch.equal(a.cpu(), b.cpu())


def test_student_learns_the_teachers_soft_labels(fitted):
    from robust_train.data import MNISTData
    _, module, _ = fitted
    x, _ = MNISTData().test_tensors(64)
    with torch.no_grad():
        q = soft_labels(module.teacher(x), 20.0)
        torch.manual_seed(0)
        fresh = DistillationTraining(temperature=20.0).model.eval()
        assert soft_cross_entropy(module.model.eval()(x), q, 20.0) < soft_cross_entropy(fresh(x), q, 20.0)


def test_a_teacher_trained_at_another_temperature_is_refused(fitted):
    from robust_train.errors import ConfigError
    root, _, _ = fitted
    with pytest.raises(ConfigError, match="teacher"):
        fit(root, root / "teacher.ckpt", temperature=50.0, batches=1)
