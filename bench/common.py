"""What the benchmarks share: timestamped log lines, the device and machine a run was on, training a recipe with
the CLI, and the JSON result. The scripts are programs, not a package: `python bench/<name>.py` puts bench/ first
on sys.path, so each does `import common` (or `from common import ...`)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # this checkout's package, also where it is not installed
    sys.path.insert(0, str(ROOT))

from robust_train.checkpoint import atomic_write_text  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def device_name(device: str | torch.device) -> str:
    """The GPU's name, or the CPU with torch's thread count (what bounds a CPU run)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def machine_info(device: str | torch.device) -> dict:
    """Enough about the machine and software to tell whether two runs' timings are comparable."""
    import lightning

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "lightning": lightning.__version__, "torch_threads": torch.get_num_threads(), "device": str(device),
            "device_name": device_name(device)}


def write_result(out: str | Path, result: dict, announce: bool = True) -> dict:
    """Write `result` to `out` as JSON, atomically (an interrupted run never leaves half a file), and return it.

    It is first stamped, in place, with the machine, threads, torch's version and the date wherever the script set
    none of its own, so a script that saves after each model keeps the stamp of its first save."""
    for key, value in (("machine", platform.platform()), ("threads", torch.get_num_threads()),
                       ("torch", torch.__version__), ("date", time.strftime("%Y-%m-%d %H:%M"))):
        result.setdefault(key, value)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    if announce:
        print(f"wrote {out}")
    return result


def train_recipe(recipe: str, runs: Path, extra: list[str]) -> Path:
    """Train `recipe` with the CLI in a subprocess (its full schedule, `extra` flags on top) into runs/<recipe>/;
    returns the new run's last.ckpt."""
    env = {**os.environ, "ROBUST_TRAIN_OUTPUT": str(runs), "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    start = time.time()
    log(f"training {recipe} with the CLI -> {runs / recipe}/ "
        + (f"(recipe schedule with {' '.join(extra)})" if extra else "(the recipe's full schedule)"))
    subprocess.run([sys.executable, "-m", "robust_train", "fit", "--recipe", recipe,
                    "--trainer.enable_progress_bar", "false", *extra], check=True, env=env)
    # Only runs made now: the folder may hold older runs, and other files (distillation's teacher, ensemble_adv's
    # static models).
    new = [p for p in (runs / recipe).glob("*/last.ckpt") if p.stat().st_mtime >= start - 1]
    if not new:
        raise RuntimeError(f"training {recipe} finished but wrote no last.ckpt under {runs / recipe}")
    ckpt = max(new, key=lambda p: p.stat().st_mtime)
    log(f"trained {recipe} in {(time.time() - start) / 60:.1f} min -> {ckpt}")
    return ckpt
