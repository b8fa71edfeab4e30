"""Surviving faults: a run killed with SIGKILL mid-epoch resumes with `--ckpt_path last` and ends exactly where an
uninterrupted run ends; a NaN loss stops training with one clear line and keeps the last good checkpoint; an
interrupted checkpoint write never replaces a good file."""
from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

import robust_train
from robust_train.callbacks.checkpoint import AtomicCheckpointIO
from robust_train.checkpoint import read_checkpoint
from tests.test_cli import run

# fgsm_rs draws a random start for every training batch and the data order is shuffled: a resume that lost the
# random generators' states would end with other weights.
SHORT = ["fit", "--recipe", "fgsm_rs", "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "5",
         "--trainer.deterministic", "true", "--trainer.logger", "false", "--data.init_args.val_size", "64",
         "--data.init_args.batch_size", "32", "--attack_accuracy.attack", "fgsm", "--map_stability.every_n_epochs",
         "0", "--trainer.enable_progress_bar", "false"]


def env_for(folder: Path) -> dict:
    return {"OMP_NUM_THREADS": "1", "ROBUST_TRAIN_OUTPUT": str(folder)}


def only_run(folder: Path) -> Path:
    (run_dir,) = (folder / "fgsm_rs").iterdir()
    return run_dir


def test_sigkill_mid_epoch_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    whole = run(*SHORT, env=env_for(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed_env = env_for(tmp_path / "killed")
    killed = run(*SHORT, "--trainer.callbacks+=tests.faults.KillAt", "--trainer.callbacks.step=12", env=killed_env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]  # killed in the third epoch (steps 10-14)
    run_dir = only_run(tmp_path / "killed")
    assert read_checkpoint(run_dir / "last.ckpt")["global_step"] == 10  # the end of the second epoch

    resumed = run(*SHORT, "--ckpt_path", "last", env=killed_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert only_run(tmp_path / "killed") == run_dir  # continued in place, not in a new run folder
    ours, theirs = (read_checkpoint(d / "last.ckpt") for d in (run_dir, only_run(tmp_path / "whole")))
    assert ours["global_step"] == theirs["global_step"] == 15
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    for key, value in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][key], value), key


def test_resume_without_an_earlier_run_starts_a_new_one(tmp_path):
    res = run(*SHORT, "--trainer.max_epochs", "1", "--ckpt_path", "last", env=env_for(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (only_run(tmp_path) / "last.ckpt").is_file()


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    res = run(*SHORT, "--trainer.callbacks+=tests.faults.PoisonAt", "--trainer.callbacks.step=7",
              env=env_for(tmp_path))
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("robust-train: error:")]
    assert len(errors) == 1 and "nan" in errors[0] and "step 7" in errors[0], res.stderr[-3000:]
    last = only_run(tmp_path) / "last.ckpt"
    assert f"the last good checkpoint is {last}" in errors[0]
    assert read_checkpoint(last)["global_step"] == 5  # saved after the first epoch, before the NaN
    model = robust_train.load(last)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_checkpoint_write_that_dies_halfway_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the job is stopped in the middle of the write

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left behind
