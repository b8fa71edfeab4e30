"""Fixtures shared by the test files."""
import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers share two cores: one thread each, in-process and in the subprocesses the tests start.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def quiet_trainer(root, **kwargs):
    """A Trainer for tests: CPU, no logger, checkpoints, progress bar, summary or sanity check, and inference mode
    off so that attacks run at validation; `kwargs` override any of it."""
    import lightning.pytorch as pl

    return pl.Trainer(**{"accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                         "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                         "inference_mode": False, "default_root_dir": root, **kwargs})


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU a descheduled OpenMP thread stalls
    every parallel region; restored afterwards. Files opt in with `pytestmark = pytest.mark.usefixtures(...)`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def robustish_checkpoint(tmp_path_factory):
    """A small CNN given a little fast-FGSM training at ε 0.1: robust accuracy neither 0 nor 1 at ε 0.1."""
    from robust_train.data import MNISTData
    from robust_train.methods import FastFGSMTraining

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small CNN: one thread is as fast alone and several times faster on a busy CPU
    try:
        torch.manual_seed(0)
        dm = MNISTData(batch_size=64, val_size=100)
        module = FastFGSMTraining(eps=0.1, lr=2e-3)
        trainer = quiet_trainer(tmp_path_factory.mktemp("fit"), max_steps=250, limit_val_batches=0)
        trainer.fit(module, datamodule=dm)
        path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
        trainer.save_checkpoint(path)
    finally:
        torch.set_num_threads(threads)
    return path


SMALL_WIDTHS = (8, 16, 32)  # a narrow small_cnn: trains in seconds on one thread


def _train_small_cnn(seed: int, steps: int):
    """A small CNN trained on 3,000 bundled MNIST images for `steps` Adam steps, without Lightning's Trainer."""
    from robust_train.data import MNISTData
    from robust_train.models import create_model

    dm = MNISTData(val_size=100)
    dm.prepare_data()
    dm.setup("fit")
    x, y = dm.train_set.__getitems__(range(3000))
    torch.manual_seed(seed)
    model = create_model("small_cnn", num_classes=10, in_channels=1, mean=dm.mean, std=dm.std, widths=SMALL_WIDTHS)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        rows = torch.randint(0, len(y), (32,))
        loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), dm.spec


@pytest.fixture(scope="session")
def explore_checkpoints(tmp_path_factory):
    """(A, B): two small MNIST CNNs written as bare classifier checkpoints, for the explorer's tests."""
    from robust_train.checkpoint import checkpoint_metadata, save_classifier

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = tmp_path_factory.mktemp("explore")
        paths = []
        for name, seed, steps in (("a.ckpt", 0, 200), ("b.ckpt", 1, 100)):
            model, spec = _train_small_cnn(seed, steps)
            path = folder / name
            save_classifier(model, checkpoint_metadata("standard", "small_cnn", {"widths": list(SMALL_WIDTHS)}, spec, 0.0),
                            path)
            paths.append(path)
    finally:
        torch.set_num_threads(threads)
    return tuple(paths)


class SmallMLP(torch.nn.Module):
    """784-64-10 with BatchNorm and Dropout, so a wrong train/eval mode would show; cheap enough to carry the
    comparisons of the minimal-perturbation attacks over many digits."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.1),
                                 nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)


def train_on_mnist(model: torch.nn.Module, keep: int):
    """300 Adam steps on 2,000 bundled MNIST digits (seconds on one core); the model in eval mode and the first
    `keep` of the first 300 test digits that it classifies correctly."""
    import torch.nn.functional as F

    from robust_train.data.mnist import _bundled

    x_train, y_train = _bundled("train")
    x_test, y_test = _bundled("t10k")
    x_train, y_train = x_train[:2000].float() / 255, y_train[:2000]
    x_test, y_test = x_test[:300].float() / 255, y_test[:300]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(x_train), (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        correct = model(x_test).argmax(1) == y_test
    assert correct.double().mean() > 0.85, "premise: the model is trained"
    rows = correct.nonzero().squeeze(1)[:keep]
    return model, x_test[rows], y_test[rows]


def train_recipe_briefly(name: str, root, steps: int = 2, **init_overrides):
    """The recipe's method, model and data exactly as recipes/<name>.yaml says (plus `init_overrides` on the
    method), trained for `steps` batches in-process, cheaper than the CLI's subprocess; returns the module."""
    import importlib
    from pathlib import Path

    import yaml

    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / f"{name}.yaml").read_text())

    def build(section: dict, **extra):
        module_name, _, class_name = section["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        return cls(**{**section.get("init_args", {}), **extra})

    data = build(recipe["data"], batch_size=16)
    data.setup("fit")
    torch.manual_seed(0)
    module = build(recipe["model"], data_spec=data.spec, **init_overrides)
    quiet_trainer(root, max_steps=steps, limit_val_batches=0).fit(module, datamodule=data)
    return module
