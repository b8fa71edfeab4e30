"""The GPU fast path, checked on CPU: attacks under bf16 autocast (float32 loss, x' exactly in the ε-ball and [0, 1],
input gradients that point the same way as in float32), bf16-mixed training steps, channels_last (same numbers as
contiguous) and torch.compile (in place: checkpoint keys unchanged, `robust_train.checkpoint.load` still works)."""
from __future__ import annotations

import shutil

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from robust_train.attacks import FGSM, MIM, PGD
from robust_train.attacks.base import input_gradient
from robust_train.checkpoint import load as load_checkpoint
from robust_train.methods import FastFGSMTraining, PGDTraining, RobustModule

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 8 / 255
SPEC = {"name": "random", "num_classes": 10, "in_channels": 3, "image_size": [16, 16], "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25]}


class ConvNet(nn.Module):
    """conv-BN-ReLU ×2 (one strided), global average pool, linear: 3x16x16 -> 10 logits."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.net(x).mean(dim=(2, 3)))


def batch(n: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


# ------------------------------------------------------------------------------------------ attacks under bf16
ATTACKS = {
    "pgd": lambda: PGD(EPS, steps=5, step_size=2 / 255),
    "pgd_margin_keep_best": lambda: PGD(EPS, steps=3, step_size=2 / 255, loss="margin", keep_best=True),
    "fgsm": lambda: FGSM(EPS),
    "fgsm_rs": lambda: FGSM(EPS, step_size=1.25 * EPS, random_start=True),
    "mim": lambda: MIM(EPS, steps=5),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_under_bf16_autocast_stays_in_the_ball_and_returns_float32(name):
    torch.manual_seed(0)
    model = ConvNet()
    x, y = batch()
    with bf16():
        assert model(x).dtype == torch.bfloat16  # the forward really runs in bf16
        x_adv = ATTACKS[name]()(model, x, y)
    assert x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max() <= EPS + 1e-7, "x' left the ε-ball"
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, x)
    assert all(p.grad is None for p in model.parameters())


def test_attack_loss_and_gradient_are_float32_and_agree_in_sign_with_fp32():
    torch.manual_seed(0)
    model = ConvNet().eval()
    x, y = batch(64)
    grad32, logits32, loss32 = input_gradient(model, x, y)
    with bf16():
        grad16, logits16, loss16 = input_gradient(model, x, y)
    assert grad16.dtype == logits16.dtype == loss16.dtype == torch.float32
    agree = (grad16.sign() == grad32.sign()).float().mean().item()
    assert agree > 0.9, f"bf16 gradient sign agrees with fp32 on only {agree:.1%} of the pixels"
    torch.testing.assert_close(loss16, loss32, rtol=0.05, atol=0.05)


def test_bf16_input_is_attacked_in_float32():
    torch.manual_seed(0)
    model = ConvNet()
    x, y = batch()
    x16 = x.bfloat16()
    x_adv = PGD(EPS, steps=3, step_size=2 / 255)(model, x16, y)
    assert x_adv.dtype == torch.float32
    assert (x_adv - x16.float()).abs().max() <= EPS + 1e-7 and x_adv.min() >= 0 and x_adv.max() <= 1


# -------------------------------------------------------------------------------------- Lightning and options
def loader(n: int = 32, batch_size: int = 16):
    x, y = batch(n, seed=1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(**{"accelerator": "cpu", "max_steps": 2, "logger": False, "enable_checkpointing": False,
                         "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
                         "num_sanity_val_steps": 0, **kwargs})


def make(cls, **kwargs) -> RobustModule:
    torch.manual_seed(0)
    extra = {"steps": 3, "step_size": 2 / 255} if cls is PGDTraining else {}
    return cls(arch="small_cnn", arch_kwargs={"widths": [8, 16, 16]}, data_spec=SPEC, eps=EPS, lr=1e-3,
               **{**extra, **kwargs})


@pytest.mark.parametrize("cls", [FastFGSMTraining, PGDTraining])
def test_bf16_mixed_training_steps_run_with_finite_loss(cls):
    module = make(cls)
    before = [p.detach().clone() for p in module.parameters()]
    t = trainer(precision="bf16-mixed")
    t.fit(module, train_dataloaders=loader())
    assert t.global_step == 2
    assert torch.isfinite(t.callback_metrics["train/loss"])
    assert all(p.dtype == torch.float32 for p in module.parameters())  # mixed precision: float32 master weights
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters())), "no parameter moved"


class RecordLoss(pl.Callback):
    def __init__(self):
        self.losses, self.layouts = [], []

    def on_train_start(self, trainer, pl_module):
        # the layout of the first convolution's output, i.e. of every activation after it
        pl_module.model.body[0].register_forward_hook(
            lambda module, args, out: self.layouts.append(out.is_contiguous(memory_format=torch.channels_last)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def test_channels_last_training_gives_the_same_loss_as_contiguous():
    results = {}
    for channels_last in (False, True):
        module = make(PGDTraining, channels_last=channels_last)
        conv = module.model.body[0].weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        record = RecordLoss()
        torch.manual_seed(1)  # the same random starts in both runs
        trainer(callbacks=[record]).fit(module, train_dataloaders=loader())
        results[channels_last] = (record, {k: v.clone() for k, v in module.state_dict().items()})
    (contiguous, state), (nhwc, state_cl) = results[False], results[True]
    assert nhwc.layouts and all(nhwc.layouts) and not any(contiguous.layouts)
    assert contiguous.losses == pytest.approx(nhwc.losses, abs=1e-5)
    assert state.keys() == state_cl.keys()
    for k in state:
        torch.testing.assert_close(state[k], state_cl[k], rtol=1e-4, atol=1e-5)


def test_attacks_take_channels_last_inputs():
    torch.manual_seed(0)
    model = ConvNet()
    x, y = batch()
    torch.manual_seed(2)
    ref = PGD(EPS, steps=3, step_size=2 / 255)(model, x, y)
    model_cl = model.to(memory_format=torch.channels_last)
    torch.manual_seed(2)
    out = PGD(EPS, steps=3, step_size=2 / 255)(model_cl, x.contiguous(memory_format=torch.channels_last), y)
    assert (out - x).abs().max() <= EPS + 1e-7 and out.min() >= 0 and out.max() <= 1
    assert (out == ref).float().mean() > 0.99  # a sign can flip where the gradient is ~0 in float32


def compile_unavailable() -> str | None:
    """Why torch.compile cannot run here (no C++ compiler for inductor on CPU), or None."""
    if shutil.which("g++") is None and shutil.which("c++") is None and shutil.which("clang++") is None:
        return "torch.compile on CPU needs a C++ compiler (inductor), none on PATH"
    return None


def test_compile_keeps_state_dict_keys_and_checkpoints_load(tmp_path):
    plain, compiled = make(PGDTraining), make(PGDTraining, compile=True)
    assert compiled.model.state_dict().keys() == plain.model.state_dict().keys()
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    assert not any("_orig_mod" in k for k in compiled.state_dict())
    # The checkpoint `fit` would write, read back by robust_train.load into an eager model.
    ckpt = {"state_dict": compiled.state_dict()}
    compiled.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "c.ckpt")
    model = load_checkpoint(tmp_path / "c.ckpt")
    x, _ = batch(4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain.model.eval()(x))  # same seed, same weights

    reason = compile_unavailable()
    if reason:
        pytest.skip(reason)
    # The compiled forward and input gradient (what an attack needs) match eager ones.
    compiled.model.eval()
    # With a compiler on PATH a failure of the compiled forward is a regression, never a skip.
    xg = x.clone().requires_grad_(True)
    out = compiled.model(xg)
    (g,) = torch.autograd.grad(out.sum(), xg)
    xe = x.clone().requires_grad_(True)
    out_e = plain.model(xe)
    (g_e,) = torch.autograd.grad(out_e.sum(), xe)
    torch.testing.assert_close(out, out_e, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g, g_e, rtol=1e-4, atol=1e-6)
