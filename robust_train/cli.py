"""The command line: `python -m robust_train` / `robust-train`.

    fit|validate|test ...     LightningCLI, plus `--recipe NAME` (a file in recipes/ or a path to a YAML file)
    evaluate --ckpt PATH      accuracy under attack over the data set's ε grid (robust_train/evaluate/)
    compare REPORT...         robustness curves and minimal-perturbation medians of several evaluations
    explore --ckpt PATH       a local page: drag ε and watch scores, maps and channels change (robust_train/explore/)
    recipes                   every recipe with one line on what it trains
    models|methods|attacks|maps|data
                              the names each registry knows, with one line on each

Mistakes (unknown names, out-of-range values, missing files) end with one line on stderr and exit code 2.
"""
from __future__ import annotations

import importlib
import logging
import netrc
import os
import secrets
import sys
import time
from argparse import ArgumentError
from pathlib import Path

from robust_train.errors import ConfigError

REPO_RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
REGISTRIES = {"models": ("robust_train.models", "MODELS"), "methods": ("robust_train.methods", "METHODS"),
              "attacks": ("robust_train.attacks", "ATTACKS"), "maps": ("robust_train.interpret", "MAPS"),
              "data": ("robust_train.data", "DATA")}


def recipe_dirs() -> list[Path]:
    return [d for d in (Path.cwd() / "recipes", REPO_RECIPES) if d.is_dir()]


def available_recipes() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in reversed(recipe_dirs()):  # the working directory's recipes win over the repository's
        found.update({p.stem: p for p in sorted(d.glob("*.yaml"))})
    return dict(sorted(found.items()))


def find_recipe(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.parent != Path("."):
        if path.is_file():
            return path.resolve()
        raise ConfigError(f"recipe file {name} not found: give an existing YAML path or a name from "
                          "`python -m robust_train recipes`")
    recipes = available_recipes()
    if name not in recipes:
        raise ConfigError(f"unknown recipe {name!r}: choose from {', '.join(recipes) or '(none found)'} "
                          "(`python -m robust_train recipes` describes them)")
    return recipes[name]


def recipe_summary(path: Path) -> str:
    """The first comment line of a recipe is its one-line description."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def expand_recipe(argv: list[str]) -> tuple[list[str], str]:
    """Turn `--recipe NAME` into `--config recipes/NAME.yaml` right after the subcommand, so flags given later
    override the recipe. Rewriting argv (rather than passing args=) keeps DDP's re-launch of the script working."""
    out, recipe, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--recipe" or arg.startswith("--recipe="):
            if "=" in arg:
                recipe = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                recipe, i = argv[i + 1], i + 1
            else:
                raise ConfigError("--recipe needs a name: see `python -m robust_train recipes`")
        else:
            out.append(arg)
        i += 1
    if recipe is None:
        return out, "custom"
    path = find_recipe(recipe)
    at = next((k + 1 for k, a in enumerate(out) if a in SUBCOMMANDS), 0)
    return out[:at] + ["--config", str(path)] + out[at:], path.stem


def print_registry(command: str, argv: list[str]) -> int:
    """`python -m robust_train models` (or methods, attacks, maps, data): every name with its one-line summary."""
    if argv:
        raise ConfigError(f"{command} takes no options (got {' '.join(argv)}): run `python -m robust_train {command}`")
    module, attribute = REGISTRIES[command]
    registry = getattr(importlib.import_module(module), attribute)
    width = max(map(len, registry.names()), default=0)
    for name in registry.names():
        print(f"{name:<{width}}  {registry.summary(name)}".rstrip())
    return 0


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_output_folder(path: Path) -> None:
    """Fail before training, not after an hour, when the run folder cannot be created or written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write the output folder {path} ({e.strerror or type(e).__name__}): set "
                          "ROBUST_TRAIN_OUTPUT or --checkpoint.dirpath to a folder you can write") from None


def resuming_last(argv: list[str]) -> bool:
    """`fit ... --ckpt_path last` (or `--ckpt_path=last`)."""
    if not argv or argv[0] != "fit":
        return False
    return any(a == "--ckpt_path=last" or (a == "--ckpt_path" and argv[i + 1:i + 2] == ["last"])
               for i, a in enumerate(argv))


def latest_run(recipe: str) -> Path | None:
    """The most recently written run folder of `recipe` that holds a last.ckpt, if any."""
    root = Path(os.environ.get("ROBUST_TRAIN_OUTPUT", "checkpoints")) / recipe
    lasts = [p for p in root.glob("*/last.ckpt") if p.is_file()]
    return max(lasts, key=lambda p: p.stat().st_mtime).parent if lasts else None


def run_dir_for(recipe: str, resume: bool = False) -> Path:
    """A new run folder, checkpoints/<recipe>/<date>-<time>-<random>; with `resume`, the recipe's latest run that
    has a last.ckpt, so that `fit --ckpt_path last` continues it in place (a new folder when there is none yet:
    a job script can pass it from the first submission on, as Lightning intends)."""
    # DDP re-launches this script once per extra rank: those processes must write into the same run folder.
    if os.environ.get("LOCAL_RANK", "0") != "0" and os.environ.get("ROBUST_TRAIN_RUN_DIR"):
        return Path(os.environ["ROBUST_TRAIN_RUN_DIR"])
    path = latest_run(recipe) if resume else None
    if path is None:
        run = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        path = Path(os.environ.get("ROBUST_TRAIN_OUTPUT", "checkpoints")) / recipe / run
    os.environ["ROBUST_TRAIN_RUN_DIR"] = str(path)
    return path


def check_same_model(ckpt: dict, module, path) -> None:
    """ConfigError when the checkpoint's weights do not fit `module` (another architecture, other channels or
    classes), instead of the traceback of a strict load_state_dict halfway into the run."""
    theirs, ours = ckpt.get("state_dict") or {}, module.state_dict()
    missing = [k for k in ours if k not in theirs]
    extra = [k for k in theirs if k not in ours]
    shapes = [k for k in ours if k in theirs and tuple(theirs[k].shape) != tuple(ours[k].shape)]
    if missing or extra or shapes:
        first = (f"{shapes[0]} is {tuple(theirs[shapes[0]].shape)} there, {tuple(ours[shapes[0]].shape)} here"
                 if shapes else f"{len(missing)} weights missing, {len(extra)} unexpected")
        raise ConfigError(f"checkpoint {path} holds another model than the one configured ({first}): give the "
                          "recipe and options it was trained with, or a checkpoint of this model")


def run_lightning(recipe: str, resume: bool = False) -> Path:
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.loggers import WandbLogger
    from jsonargparse import lazy_instance

    from robust_train.callbacks import AttackAccuracy, MapStability, OverfitGuard, RNGState, RobustCheckpoint
    from robust_train.checkpoint import read_checkpoint
    from robust_train.data import ImageDataModule
    from robust_train.methods import RobustModule

    run_dir = run_dir_for(recipe, resume)
    # "Seed set to 0" on stderr would precede a one-line error; the seed is in the saved config.yaml anyway.
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)

    class RobustCLI(LightningCLI):
        def add_arguments_to_parser(self, parser):
            parser.link_arguments("data.spec", "model.init_args.data_spec", apply_on="instantiate")
            parser.add_lightning_class_args(AttackAccuracy, "attack_accuracy")
            parser.add_lightning_class_args(MapStability, "map_stability")  # cheap defaults: every 5 epochs, 50 steps
            parser.add_lightning_class_args(OverfitGuard, "overfit_guard")  # off unless every_n_steps is set
            parser.add_lightning_class_args(RobustCheckpoint, "checkpoint")
            parser.add_lightning_class_args(RNGState, "rng_state")  # resumed runs draw what uninterrupted ones would
            parser.set_defaults({
                "model": {"class_path": "robust_train.methods.StandardTraining"},
                "data": {"class_path": "robust_train.data.MNISTData"},
                "checkpoint.dirpath": str(run_dir),
                "checkpoint.monitor": "val/robust_acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch:03d}-{val/robust_acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            })

        # Only LightningCLI's public hooks are overridden, so a new Lightning release cannot break them silently.
        def parse_arguments(self, parser, args):
            super().parse_arguments(parser, args)
            # Check the file before Lightning reads hyper-parameters from it (and before the Trainer prints
            # anything): a clear one-line error instead of a traceback from torch.load.
            if self.config.get("subcommand"):
                ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
                if ckpt_path and str(ckpt_path) not in ("last", "best", "hpc", "registry"):
                    read_checkpoint(ckpt_path)

        def before_instantiate_classes(self):
            if self.subcommand == "fit":  # before the Trainer prints anything or the data is read
                check_output_folder(Path(self.config.fit.get("checkpoint", {}).get("dirpath") or run_dir))

        def instantiate_trainer(self, **kwargs):
            # The data is read, and the checkpoint checked against the model, before the Trainer exists: a split
            # that cannot be made fails in one line, not after the Trainer and the logger have printed banners.
            if self.datamodule is not None:
                self.datamodule.setup(self.subcommand)
            ckpt_path = self.config[self.subcommand].get("ckpt_path") if self.subcommand else None
            if ckpt_path and Path(str(ckpt_path)).is_file():  # "last"/"best" are resolved by Lightning later
                check_same_model(read_checkpoint(ckpt_path), self.model, ckpt_path)
            return super().instantiate_trainer(**kwargs)

        def _before(self):
            sub = self.config_init[self.subcommand]
            if "weights_only" in sub and sub.get("weights_only") is None:
                sub["weights_only"] = True
            self.model.run_info = {"recipe": recipe, "run_dir": str(run_dir)}

        before_fit = before_validate = before_test = _before

    RobustCLI(
        RobustModule, ImageDataModule, subclass_mode_model=True, subclass_mode_data=True,
        trainer_defaults={
            "default_root_dir": str(run_dir),
            "inference_mode": False,  # attacks at validate/test time need gradients
            "logger": lazy_instance(WandbLogger, project="robust_train", name=f"{recipe}/{run_dir.name}",
                                    save_dir=str(run_dir), offline=not wandb_logged_in()),
        },
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,  # reproducible by default (and no "No seed found" warning); --seed_everything N
        parser_kwargs={"exit_on_error": False},
    )
    return run_dir


def config_error_in_chain(exc: BaseException) -> ConfigError | None:
    """jsonargparse wraps errors raised while instantiating classes; find ours among the causes."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        if isinstance(e, ConfigError):
            return e
        seen.add(id(e))
        todo += [e.__cause__, e.__context__]
    return None


def fail(message: str) -> int:
    """One line on stderr, exit code 2; a run folder this command created and left empty is removed."""
    run_dir = os.environ.get("ROBUST_TRAIN_RUN_DIR")
    if run_dir and os.environ.get("LOCAL_RANK", "0") == "0":
        try:
            Path(run_dir).rmdir()  # only succeeds when empty: nothing written is ever removed
        except OSError:
            pass
    print(f"robust-train: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "evaluate":
            from robust_train.evaluate.cli import main as evaluate_main

            return evaluate_main(argv[1:])
        if argv and argv[0] == "compare":
            from robust_train.evaluate.compare import main as compare_main

            return compare_main(argv[1:])
        if argv and argv[0] == "explore":
            from robust_train.explore.cli import main as explore_main

            return explore_main(argv[1:])
        if argv and argv[0] in REGISTRIES:
            return print_registry(argv[0], argv[1:])
        if argv and argv[0] == "recipes":
            recipes = available_recipes()
            width = max(map(len, recipes), default=0)
            for name, path in recipes.items():
                print(f"{name:<{width}}  {recipe_summary(path)}")
            return 0
        argv, recipe = expand_recipe(argv)
        sys.argv = [sys.argv[0], *argv]
        run_lightning(recipe, resume=resuming_last(argv))
        return 0
    except FloatingPointError as e:  # the loss went NaN or infinite: training stopped, earlier checkpoints are kept
        last = Path(os.environ.get("ROBUST_TRAIN_RUN_DIR", "")) / "last.ckpt"
        kept = f"; the last good checkpoint is {last}" if os.environ.get("ROBUST_TRAIN_RUN_DIR") and last.is_file() \
            else "; no checkpoint had been written yet"
        print(f"robust-train: error: training stopped: {e}{kept}", file=sys.stderr)
        return 1
    except ArgumentError as e:
        cause = config_error_in_chain(e)
        if cause is not None:
            return fail(str(cause))
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        return fail(" ".join(lines)[:400] + " (add --help for the accepted options)")
    except Exception as e:
        cause = config_error_in_chain(e)
        if cause is None:
            raise
        return fail(str(cause))


if __name__ == "__main__":
    sys.exit(main())
