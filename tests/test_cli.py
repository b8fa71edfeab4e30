"""The command line end to end, as a user runs it: fit a few batches, validate and evaluate the checkpoint, load it."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import robust_train
from robust_train.cli import available_recipes

REPO = Path(__file__).resolve().parents[1]
TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
        "--data.init_args.batch_size", "32", "--attack_accuracy.steps", "2", "--trainer.enable_progress_bar",
        "false", "--trainer.enable_model_summary", "false"]


def cli_env(env: dict | None = None) -> dict:
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONWARNINGS": "ignore", **(env or {})}


def run(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "robust_train", *args], capture_output=True, text=True,
                          env=cli_env(env), cwd=cwd or REPO, timeout=600)


def run_many(*command_lines: list[str]) -> list[subprocess.CompletedProcess]:
    """`run` of each command line, as separate processes forked after one start-up (tests/cli_batch.py)."""
    cases = [{"args": list(args), "env": cli_env(), "cwd": str(REPO)} for args in command_lines]
    done = subprocess.run([sys.executable, "-m", "tests.cli_batch"], input=json.dumps(cases), capture_output=True,
                          text=True, env=cli_env(), cwd=REPO, timeout=600 * len(cases))
    assert done.returncode == 0, done.stderr[-2000:]
    return [subprocess.CompletedProcess([sys.executable, "-m", "robust_train", *args], r["returncode"], r["stdout"],
                                        r["stderr"]) for args, r in zip(command_lines, json.loads(done.stdout))]


def test_console_script_is_installed():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "robust-train"]
    assert script.value == "robust_train.cli:main"


def test_recipes_command_lists_every_recipe_with_a_description():
    out = run("recipes")
    assert out.returncode == 0, out.stderr
    names = {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
    assert {"standard", "fgsm", "fgsm_rs", "pgd", "trades", "pgd_cifar10", "trades_cifar10"} <= names
    assert all(len(line.split(maxsplit=1)) == 2 for line in out.stdout.splitlines() if line.strip())


@pytest.fixture(scope="module")
def printed_configs():
    recipes = sorted(available_recipes())
    return dict(zip(recipes, run_many(*[["fit", "--recipe", recipe, "--print_config"] for recipe in recipes])))


@pytest.mark.parametrize("recipe", sorted(available_recipes()))
def test_every_recipe_parses(recipe, printed_configs):
    out = printed_configs[recipe]
    assert out.returncode == 0, out.stderr[-2000:]
    assert "class_path: robust_train.methods." in out.stdout
    assert "inference_mode: false" in out.stdout


def test_forked_command_lines_print_and_return_what_real_processes_do():
    """tests/cli_batch.py is a shortcut for `run`: the same output, error line and exit code, or it hides bugs."""
    lines = [["fit", "--recipe", "trades", "--print_config"], ["fit", "--recipe", "pgd", "--model.init_args.eps", "2"]]

    def same_run_name(text):  # each fit names its run <date>-<time>-<random>
        return re.sub(r"\d{8}-\d{6}-[0-9a-f]{4}", "<run>", text)

    for args, forked in zip(lines, run_many(*lines)):
        real = run(*args)
        assert (forked.returncode, same_run_name(forked.stdout), forked.stderr) == \
            (real.returncode, same_run_name(real.stdout), real.stderr)
    assert forked.returncode == 2 and forked.stderr.startswith("robust-train: error:"), forked.stderr


def test_flags_override_the_recipe():
    out = run("fit", "--recipe", "pgd", "--trainer.max_epochs", "3", "--data.init_args.batch_size", "16",
              "--print_config")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "max_epochs: 3" in out.stdout and "batch_size: 16" in out.stdout


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """`fit --recipe pgd` on a few batches with the default WandbLogger (offline): checkpoints and a wandb run."""
    out_dir = tmp_path_factory.mktemp("runs")
    res = run("fit", "--recipe", "pgd", *TINY, "--model.init_args.steps", "2",
              env={"ROBUST_TRAIN_OUTPUT": str(out_dir)})
    assert res.returncode == 0, res.stderr[-3000:]
    (run_dir,) = list((out_dir / "pgd").iterdir())
    return run_dir


def test_fit_writes_checkpoints_config_and_an_offline_wandb_run(trained_run):
    assert (trained_run / "last.ckpt").is_file()
    best = list(trained_run.glob("best-*.ckpt"))
    assert len(best) == 1
    assert (trained_run / "config.yaml").is_file()
    assert list((trained_run / "wandb").glob("offline-run-*")), "no offline wandb run was written"
    ckpt = torch.load(trained_run / "last.ckpt", weights_only=True)
    assert ckpt["robust_train"]["recipe"] == "pgd" and ckpt["robust_train"]["method"] == "PGDTraining"


def test_validate_reports_robust_accuracy(trained_run, tmp_path):
    res = run("validate", "--recipe", "pgd", "--ckpt_path", str(trained_run / "last.ckpt"),
              "--trainer.limit_val_batches", "2", "--data.init_args.batch_size", "32", "--attack_accuracy.steps",
              "2", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
              env={"ROBUST_TRAIN_OUTPUT": str(tmp_path)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "val/robust_acc" in res.stdout and "val/acc" in res.stdout


def test_test_subcommand_reports_robust_accuracy_with_default_inference_mode_override(trained_run, tmp_path):
    res = run("test", "--recipe", "pgd", "--ckpt_path", str(trained_run / "last.ckpt"),
              "--trainer.limit_test_batches", "2", "--data.init_args.batch_size", "32", "--attack_accuracy.steps",
              "2", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
              "--trainer.inference_mode", "true", env={"ROBUST_TRAIN_OUTPUT": str(tmp_path)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "test/robust_acc" in res.stdout


def test_evaluate_writes_a_report_with_per_example_worst_case(trained_run, tmp_path):
    res = run("evaluate", "--ckpt", str(trained_run / "last.ckpt"), "--n", "64", "--eps", "0,0.1,0.3",
              "--attacks", "pgd,pgd_margin,fgsm", "--steps", "3", "--stability-steps", "5",
              "--out", str(tmp_path / "report"))
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    for key in ("checkpoint", "recipe", "dataset", "n_examples", "clean_accuracy", "attacks", "robust_accuracy"):
        assert key in report
    assert report["recipe"] == "pgd" and report["dataset"] == "mnist" and report["n_examples"] == 64
    for row in report["attacks"]:
        assert {"attack", "norm", "eps", "steps", "step_size", "restarts", "accuracy"} <= set(row)
    assert set(report["robust_accuracy"]) == {"0", "0.1", "0.3"}
    assert report["robust_accuracy"]["0"] == pytest.approx(report["clean_accuracy"])
    for eps, worst in report["robust_accuracy"].items():
        per_attack = [r["accuracy"] for r in report["attacks"] if f"{r['eps']:g}" == eps]
        assert worst <= min(per_attack) + 1e-9
    assert (tmp_path / "report" / "report.md").read_text().count("|") > 10
    assert "worst case" in res.stdout


def test_load_returns_a_plain_eval_module_that_matches_the_checkpoint(trained_run):
    model = robust_train.load(trained_run / "last.ckpt")
    assert isinstance(model, torch.nn.Module) and not model.training
    ckpt = torch.load(trained_run / "last.ckpt", weights_only=True)
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    x = torch.rand(4, 1, 28, 28)
    logits = model(x)
    assert logits.shape == (4, 10)


def test_the_cli_overrides_only_public_lightning_hooks():
    """A private LightningCLI method overridden here could change or vanish in any Lightning release."""
    import ast
    import inspect

    from lightning.pytorch.cli import LightningCLI

    import robust_train.cli as cli

    (robust_cli,) = [node for node in ast.walk(ast.parse(inspect.getsource(cli))) if isinstance(node, ast.ClassDef)
                     and node.name == "RobustCLI"]
    methods = [node.name for node in robust_cli.body if isinstance(node, ast.FunctionDef)]
    assert methods, "RobustCLI defines its hooks as methods"
    private = [name for name in methods if name.startswith("_") and hasattr(LightningCLI, name)]
    assert private == []
    assert all(hasattr(LightningCLI, name) for name in methods if not name.startswith("_"))


def test_evaluate_refuses_bad_options_before_importing_lightning():
    """Lightning takes seconds to import: a mistake in evaluate's options is reported before it is needed."""
    code = ("import sys; from robust_train.cli import main\n"
            "assert main(['evaluate', '--ckpt', 'x.ckpt', '--n', '0']) == 2\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
