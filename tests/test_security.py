"""Security: checkpoints are only ever read as weights, no string is evaluated as code, and a wandb key in the
environment ends up in no file a run writes and in none of its output."""
from __future__ import annotations

import ast
import secrets
from pathlib import Path

from tests.test_cli import REPO, run

SOURCES = sorted([*(REPO / "robust_train").rglob("*.py"), *(REPO / "bench").glob("*.py")])


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            yield node, owner, name


def test_every_torch_load_is_weights_only_and_nothing_is_evaluated():
    assert len(SOURCES) > 40
    for path in SOURCES:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, owner, name in calls(tree):
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if owner == "torch" and name == "load":
                flags = {k.arg: k.value for k in node.keywords}
                assert isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True, \
                    f"{where}: torch.load without weights_only=True"
            builtin = isinstance(node.func, ast.Name)  # eval(...), not model.eval()
            assert not (builtin and name in ("eval", "exec")), f"{where}: {name}() of a string"
            assert not (owner in ("pickle", "dill", "yaml") and name in ("load", "loads", "unsafe_load")), \
                f"{where}: {owner}.{name} can run code"


def test_a_wandb_key_is_never_written_or_printed(tmp_path):
    key = secrets.token_hex(20)  # the shape of a wandb API key
    env = {"WANDB_API_KEY": key, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
           "ROBUST_TRAIN_OUTPUT": str(tmp_path)}
    res = run("fit", "--recipe", "standard", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
              "--data.init_args.val_size", "32", "--map_stability.every_n_epochs", "0", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    files = [p for p in Path(tmp_path).rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.suffix == ".ckpt" for p in files)
    assert any("wandb" in p.parts for p in files)  # the offline wandb run was written, and is searched too
    for p in files:
        assert key.encode() not in p.read_bytes(), p
    assert key not in res.stdout + res.stderr
