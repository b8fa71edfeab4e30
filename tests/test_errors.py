"""Every user mistake ends with one line on stderr that names the problem, exit code 2, and no traceback."""
from __future__ import annotations

import pickle

import pytest
import torch

from tests.test_cli import run


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
    return d


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


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_line_and_exit_code_2(case, bad_files):
    args, expected = CASES[case]
    res = run(*[a.replace("{bad}", str(bad_files)) for a in args])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len(lines) == 1, res.stderr[-2000:]
    assert lines[0].startswith("robust-train: error:") and expected in lines[0], lines[0]
    assert "ran code on load" not in res.stdout + res.stderr
