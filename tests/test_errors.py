"""Every user mistake ends with one line on stderr that names the problem, exit code 2, and no traceback."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_cli import run, run_many


class _RunsCode:
    def __reduce__(self):
        return (print, ("this checkpoint ran code on load",))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "garbage.ckpt").write_bytes(b"this is not a checkpoint")
    (d / "empty.ckpt").write_bytes(b"")
    torch.save({"state_dict": {}, "robust_train": _RunsCode()}, d / "evil.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, d / "foreign.ckpt")
    write_bad_data(d)
    return d


def cifar_arrays(n_train: int = 8, n_test: int = 4) -> dict[str, np.ndarray]:
    """A tiny valid CIFAR-10 npz content, channels-last uint8 as torchvision keeps it."""
    rng = np.random.default_rng(0)
    return {"x_train": rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8), "y_train": np.arange(n_train) % 10,
            "x_test": rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8), "y_test": np.arange(n_test) % 10}


def write_bad_data(d):
    """Malformed data sets: CIFAR-10 npz files (each with one thing wrong), an image folder without images and a
    CIFAR-10 checkpoint to evaluate on them (untrained: the data must be refused before the model runs)."""
    ok = cifar_arrays()
    with_nan = (ok["x_train"] / 255).astype(np.float32)
    with_nan[0, 0, 0, 0] = np.nan
    with_inf = (ok["x_test"] / 255).astype(np.float32)
    with_inf[1, 2, 3, 1] = np.inf
    bad = {
        "nan": {"x_train": with_nan},
        "inf": {"x_test": with_inf},
        "gray": {"x_train": ok["x_train"][..., :1]},  # (N, 32, 32, 1)
        "small": {"x_train": ok["x_train"][:, :28, :28]},  # (N, 28, 28, 3)
        "label10": {"y_train": np.full(8, 10)},
        "label_minus1": {"y_test": np.array([0, 1, -1, 3])},
        "short_labels": {"y_train": ok["y_train"][:5]},
        "empty_train": {"x_train": ok["x_train"][:0], "y_train": ok["y_train"][:0]},
    }
    for name, change in bad.items():
        np.savez(d / f"{name}.npz", **{**ok, **change})
    (d / "no_images" / "train" / "cat").mkdir(parents=True)
    (d / "no_images" / "train" / "dog").mkdir()

    from robust_train.data import CIFAR10Data
    from robust_train.models import create_model

    spec = CIFAR10Data(root=str(d / "nan.npz")).spec
    model = create_model("small_cnn", num_classes=10, in_channels=3, mean=spec["mean"], std=spec["std"])
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "robust_train": {"arch": "small_cnn", "data_spec": spec, "eps": 0.0, "recipe": "standard"},
                "datamodule_hyper_parameters": {"_class_path": "robust_train.data.CIFAR10Data",
                                                "root": str(d / "nowhere")}}, d / "cifar.ckpt")
    whole = (d / "cifar.ckpt").read_bytes()
    (d / "truncated.ckpt").write_bytes(whole[:len(whole) // 2])  # a copy cut off halfway


CIFAR_NPZ = ["fit", "--recipe", "standard", "--data", "robust_train.data.CIFAR10Data", "--data.init_args.root"]


CASES = {
    "unknown recipe": (["fit", "--recipe", "no_such_recipe"], "unknown recipe"),
    "missing recipe file": (["fit", "--recipe", "missing/recipe.yaml"], "not found"),
    "unknown model": (["fit", "--recipe", "standard", "--model.init_args.arch", "resnet9000"], "unknown model"),
    "eps above 1": (["fit", "--recipe", "pgd", "--model.init_args.eps", "1.5"], "eps"),
    "eps negative": (["fit", "--recipe", "pgd", "--model.init_args.eps", "-0.1"], "eps"),
    "zero attack steps": (["fit", "--recipe", "pgd", "--model.init_args.steps", "0"], "steps"),
    "unknown validation attack": (["fit", "--recipe", "standard", "--attack_accuracy.attack", "nope"],
                                  "unknown attack"),
    "wrong type": (["fit", "--recipe", "standard", "--trainer.max_epochs", "many"], "max_epochs"),
    "missing data folder": (["fit", "--recipe", "standard", "--data.init_args.root", "/no/such/folder"], "MNIST"),
    "evaluate missing checkpoint": (["evaluate", "--ckpt", "/no/such.ckpt"], "not found"),
    "evaluate unknown attack": (["evaluate", "--ckpt", "{bad}/garbage.ckpt", "--attacks", "nope"], "unknown attack"),
    "evaluate eps out of range": (["evaluate", "--ckpt", "{bad}/garbage.ckpt", "--eps", "0,2"], "eps"),
    "evaluate eps not a number": (["evaluate", "--ckpt", "{bad}/garbage.ckpt", "--eps", "abc"], "not a number"),
    "evaluate corrupt checkpoint": (["evaluate", "--ckpt", "{bad}/garbage.ckpt"], "corrupt"),
    "evaluate empty checkpoint": (["evaluate", "--ckpt", "{bad}/empty.ckpt"], "corrupt"),
    "evaluate code-running checkpoint": (["evaluate", "--ckpt", "{bad}/evil.ckpt"], "refused"),
    "evaluate foreign checkpoint": (["evaluate", "--ckpt", "{bad}/foreign.ckpt"], "not written by robust_train"),
    "evaluate missing argument": (["evaluate"], "--ckpt"),
    "negative learning rate": (["fit", "--recipe", "standard", "--model.init_args.lr", "-1"], "lr"),
    "zero batch size": (["fit", "--recipe", "standard", "--data.init_args.batch_size", "0"], "batch_size"),
    "validation split larger than the data": (["fit", "--recipe", "standard", "--data.init_args.val_size",
                                               "99999999"], "val_size"),
    "image folder without train/": (["fit", "--recipe", "standard", "--data", "robust_train.data.ImageFolderData",
                                     "--data.init_args.root", "{bad}"], "train/"),
    "evaluate zero images": (["evaluate", "--ckpt", "{bad}/garbage.ckpt", "--n", "0"], "--n"),
    "evaluate zero steps": (["evaluate", "--ckpt", "{bad}/garbage.ckpt", "--steps", "0"], "--steps"),
    "validate corrupt checkpoint": (["validate", "--recipe", "standard", "--ckpt_path", "{bad}/garbage.ckpt"],
                                    "corrupt"),
    # Malformed data (issue 5, point 4): refused when the data is read, before the Trainer starts.
    "data with NaN pixels": ([*CIFAR_NPZ, "{bad}/nan.npz"], "nan.npz: x_train has 1 NaN pixel value(s)"),
    "data with infinite pixels": ([*CIFAR_NPZ, "{bad}/inf.npz"], "inf.npz: x_test has 1 infinite pixel value(s)"),
    "data with one channel": ([*CIFAR_NPZ, "{bad}/gray.npz"], "1-channel 32x32 images, but this data set needs "
                                                              "3-channel 32x32"),
    "data of the wrong size": ([*CIFAR_NPZ, "{bad}/small.npz"], "3-channel 28x28 images"),
    "data with label 10": ([*CIFAR_NPZ, "{bad}/label10.npz"], "8 of the 8 labels of the training set lie outside "
                                                              "0 .. 9"),
    "data with label -1": ([*CIFAR_NPZ, "{bad}/label_minus1.npz"], "labels of the test set lie outside 0 .. 9"),
    "data with fewer labels than images": ([*CIFAR_NPZ, "{bad}/short_labels.npz"],
                                           "8 training images but 5 training labels"),
    "data without training images": ([*CIFAR_NPZ, "{bad}/empty_train.npz"], "x_train is empty"),
    "image folder without images": (["fit", "--recipe", "standard", "--data", "robust_train.data.ImageFolderData",
                                     "--data.init_args.root", "{bad}/no_images"], "no images found under"),
    "evaluate truncated checkpoint": (["evaluate", "--ckpt", "{bad}/truncated.ckpt"], "corrupt"),
    "test truncated checkpoint": (["test", "--recipe", "standard", "--ckpt_path", "{bad}/truncated.ckpt"], "corrupt"),
    "validate another model's checkpoint": (["validate", "--recipe", "standard", "--ckpt_path", "{bad}/cifar.ckpt"],
                                            "another model"),
    # Fast methods (issue 16): negative or non-finite λ, noise and steps, a guard interval of 0, an unknown schedule.
    "negative GradAlign lambda": (["fit", "--recipe", "gradalign", "--model.init_args.lam", "-0.5"], "lam"),
    "infinite N-FGSM noise": (["fit", "--recipe", "n_fgsm", "--model.init_args.noise_ratio", "inf"], "noise_ratio"),
    "NaN PGD step size": (["fit", "--recipe", "pgd_awp", "--model.init_args.step_size", "nan"], "step_size"),
    "negative AWP gamma": (["fit", "--recipe", "pgd_awp", "--model.init_args.awp_gamma", "-0.01"], "awp_gamma"),
    "negative MART beta": (["fit", "--recipe", "mart", "--model.init_args.beta", "-1"], "beta"),
    "guard interval 0": (["fit", "--recipe", "fgsm_rs", "--overfit_guard.every_n_steps", "0"], "every_n_steps"),
    "unknown schedule": (["fit", "--recipe", "n_fgsm", "--model.init_args.lr_schedule", "triangle"], "lr_schedule"),
    "evaluate on infinite test images": (["evaluate", "--ckpt", "{bad}/cifar.ckpt", "--data-root", "{bad}/inf.npz",
                                     "--no-pictures", "--no-checks"], "x_test has 1 infinite"),
}


def test_an_unwritable_output_folder_is_reported_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    res = run("fit", "--recipe", "standard", env={"ROBUST_TRAIN_OUTPUT": str(blocker / "runs")})
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert lines[0].startswith("robust-train: error: cannot write the output folder"), lines[0]
    assert "Epoch" not in res.stdout + res.stderr  # nothing was trained
    assert blocker.read_text() == "not a folder"


def test_malformed_data_writes_nothing(bad_files, tmp_path):
    """A fit refused for its data leaves no checkpoint, config or log behind, and overwrites nothing."""
    out, ckpt_dir = tmp_path / "runs", tmp_path / "ckpts"
    ckpt_dir.mkdir()
    (ckpt_dir / "last.ckpt").write_bytes(b"an earlier run")
    res = run(*CIFAR_NPZ, str(bad_files / "nan.npz"), "--checkpoint.dirpath", str(ckpt_dir),
              env={"ROBUST_TRAIN_OUTPUT": str(out)})
    assert res.returncode == 2 and "NaN" in res.stderr, res.stderr[-2000:]
    assert (ckpt_dir / "last.ckpt").read_bytes() == b"an earlier run"
    written = [p for p in [*out.rglob("*"), *ckpt_dir.rglob("*")] if p.is_file()]
    assert written == [ckpt_dir / "last.ckpt"], written
    # into the default run folder: the folder made by the output check is removed again, being empty
    res = run(*CIFAR_NPZ, str(bad_files / "nan.npz"), env={"ROBUST_TRAIN_OUTPUT": str(out)})
    assert res.returncode == 2 and "NaN" in res.stderr, res.stderr[-2000:]
    assert not list(out.glob("*/*")), list(out.rglob("*"))


@pytest.fixture(scope="module")
def bad_input_runs(bad_files):
    cases = sorted(CASES)
    return dict(zip(cases, run_many(*[[a.replace("{bad}", str(bad_files)) for a in CASES[c][0]] for c in cases])))


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_line_and_exit_code_2(case, bad_input_runs):
    expected = CASES[case][1]
    res = bad_input_runs[case]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len(lines) == 1, res.stderr[-2000:]
    assert lines[0].startswith("robust-train: error:") and expected in lines[0], lines[0]
    assert "ran code on load" not in res.stdout + res.stderr
