"""Reading checkpoints safely and turning them back into plain classifiers.

Checkpoints are read with `torch.load(weights_only=True)`: tensors and plain containers only, so a checkpoint
from a stranger cannot run code on load. One that needs arbitrary unpickling is refused.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch
from torch import nn

from robust_train.errors import ConfigError
from robust_train.models import create_model


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint dict; ConfigError with one line if the file is missing, corrupt, unsafe or not ours."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} not found: pass the path of a .ckpt file written by `fit` "
                          "(e.g. checkpoints/<recipe>/<run>/last.ckpt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = [ln.strip() for ln in str(e).splitlines() if "global" in ln.lower()]
        if not unsafe:  # torch reports garbage bytes as an unpickling error too
            raise ConfigError(f"checkpoint {path} is corrupt or truncated; use another checkpoint, e.g. last.ckpt "
                              "of the same run") from None
        raise ConfigError(f"checkpoint {path} was refused: loading it would run code ({unsafe[0][:100]}); "
                          "robust_train only loads weights (torch.load weights_only=True)") from None
    except Exception as e:  # noqa: BLE001  (truncated zips, garbage bytes, empty files all end up here)
        raise ConfigError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}); "
                          "use another checkpoint, e.g. last.ckpt of the same run") from None
    if not isinstance(ckpt, dict) or "robust_train" not in ckpt or "state_dict" not in ckpt:
        raise ConfigError(f"checkpoint {path} was not written by robust_train `fit` (no model description "
                          "inside); evaluate it with your own tools after building the model yourself")
    return ckpt


def classifier_from_checkpoint(ckpt: dict) -> nn.Module:
    info = ckpt["robust_train"]
    spec = info["data_spec"]
    model = create_model(info["arch"], num_classes=spec["num_classes"], in_channels=spec["in_channels"],
                         mean=spec["mean"], std=spec["std"], **info.get("arch_kwargs", {}))
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"checkpoint weights do not fit model {info['arch']!r}: "
                          f"{str(e).splitlines()[0]}") from None
    return model.eval()


def checkpoint_metadata(method: str, arch: str, arch_kwargs: dict | None, data_spec: dict, eps: float,
                        extra: dict | None = None) -> dict:
    """The `checkpoint["robust_train"]` dict that `classifier_from_checkpoint` reads: the format version, the
    writer (`method`), the model (`arch`, `arch_kwargs`), the data (`data_spec`), ε, then the `extra` entries.

    Plain containers and numbers only (callers pass plain values in `extra`), so it loads with weights_only=True.
    """
    return {"format": 1, "method": method, "arch": arch, "arch_kwargs": dict(arch_kwargs or {}),
            "data_spec": dict(data_spec), "eps": float(eps), **(extra or {})}


def save_classifier(model: nn.Module, metadata: dict, path: str | os.PathLike) -> None:
    """Write a bare classifier checkpoint atomically: `metadata` and the model's weights on the CPU, under the
    `model.` prefix of a training checkpoint, so `read_checkpoint` and `load` take it like one written by `fit`."""
    state = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({"robust_train": metadata, "state_dict": state}, path)


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The trained classifier of a robust_train checkpoint as a plain `torch.nn.Module` in eval mode.

    Input: images in [0, 1], NCHW (normalisation is inside the model). Output: logits.

    >>> model = robust_train.load("checkpoints/pgd/<run>/last.ckpt")   # doctest: +SKIP
    >>> x_adv = torchattacks.PGD(model, eps=0.3)(x, y)                 # doctest: +SKIP
    """
    return classifier_from_checkpoint(read_checkpoint(path)).to(device)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save through a temporary file in the same folder and a rename: never half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write through a temporary file in the same folder and rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
