"""Training throughput on the GPU fast path: images/s of PGD-10 AT and FGSM-RS ("fast" AT) of PreAct ResNet-18 on
CIFAR-10-shaped data, robust_train (Lightning + PGDTraining / FastFGSMTraining) against a plain PyTorch loop of the
same math (eval-mode attack with autograd.grad, then an SGD step), in the same run, for each variant:

    fp32               float32 (TF32 matmuls/convolutions allowed on GPUs: torch.set_float32_matmul_precision("high"))
    bf16               bf16 autocast (ours: --trainer.precision bf16-mixed; plain: torch.autocast)
    bf16+cl            bf16 and channels_last model and inputs (ours: --model.channels_last true)
    bf16+cl+compile    the same, the model torch.compile'd in place (ours: --model.compile true); added by --compile

Random uint8 images (3x32x32, 10 classes) in memory, loaded by the same DataLoader for both loops, with pinned memory
and non_blocking copies on CUDA (ours: `--data.pin_memory true`; Lightning copies pinned batches non_blocking).
The first --warmup steps (cuDNN autotuning, compilation) are excluded; the timed steps include data loading.
Known differences that are part of the measurement: Lightning's bf16 autocast runs with cache_enabled=False (the
bf16 weight copies are re-cast at every forward, also at every attack step), robust_train checks that the loss is
finite (one device sync per step) and updates a training-accuracy metric; the plain loop does neither.

    python bench/gpu_throughput.py [--device cuda] [--batch-size 128] [--steps 50] [--warmup 10] [--compile]
    python bench/gpu_throughput.py --device cpu --batch-size 16 --steps 3 --warmup 1     # smoke run, any machine
"""
from __future__ import annotations

import argparse
import logging
import time
import warnings

import lightning
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from common import device_name, write_result
from robust_train.data.base import TensorImageDataset, collate
from robust_train.methods import FastFGSMTraining, PGDTraining
from robust_train.models import create_model

SPEC = {"name": "cifar10_shaped", "num_classes": 10, "in_channels": 3, "image_size": [32, 32],
        "mean": [0.4914, 0.4822, 0.4465], "std": [0.2471, 0.2435, 0.2616]}
EPS, ALPHA, PGD_STEPS, FGSM_RATIO = 8 / 255, 2 / 255, 10, 1.25
OPTIM = {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}  # constant lr: the schedule costs nothing either way
METHODS = {"pgd10": "PGD-10 AT", "fgsm_rs": "FGSM-RS"}
DEFAULT_VARIANTS = "fp32,bf16,bf16+cl"


def parse_variant(name: str) -> dict:
    parts = name.split("+")
    if parts[0] not in ("fp32", "bf16") or not set(parts[1:]) <= {"cl", "compile"}:
        raise SystemExit(f"unknown variant {name!r}: fp32 or bf16, optionally +cl and/or +compile")
    return {"bf16": parts[0] == "bf16", "channels_last": "cl" in parts, "compile": "compile" in parts}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_loader(args, device: torch.device) -> DataLoader:
    n = args.batch_size * (args.warmup + args.steps)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorImageDataset(images, labels), batch_size=args.batch_size, shuffle=False,
                      collate_fn=collate, pin_memory=device.type == "cuda", drop_last=True)


# ------------------------------------------------------------------------------------------------ plain loop
def plain_run(method: str, variant: dict, loader, args, device: torch.device) -> float:
    """What a careful researcher would write by hand; returns the seconds of the timed steps."""
    torch.manual_seed(0)
    model = create_model(args.arch, num_classes=10, in_channels=3, mean=SPEC["mean"], std=SPEC["std"]).to(device)
    fmt = torch.channels_last if variant["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if variant["compile"]:
        model.compile()
    opt = torch.optim.SGD(model.parameters(), **OPTIM)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant["bf16"])
    steps, alpha = (PGD_STEPS, ALPHA) if method == "pgd10" else (1, FGSM_RATIO * EPS)
    start = None
    for i, (x, y) in enumerate(loader):
        if i == args.warmup:
            synchronize(device)
            start = time.perf_counter()
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
        y = y.to(device, non_blocking=True)
        lo, hi = (x - EPS).clamp(0, 1), (x + EPS).clamp(0, 1)
        model.eval()
        x_adv = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
        with amp:
            for _ in range(steps):
                x_adv.requires_grad_(True)
                (g,) = torch.autograd.grad(F.cross_entropy(model(x_adv).float(), y, reduction="sum"), x_adv)
                x_adv = torch.clamp(x_adv.detach() + alpha * g.sign(), lo, hi)
        model.train()
        with amp:
            loss = F.cross_entropy(model(x_adv).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    synchronize(device)
    return time.perf_counter() - start


# -------------------------------------------------------------------------------------------------- robust_train
class StepTimer(pl.Callback):
    """From the end of the last warm-up step to the end of the last step, the device synchronised at both ends."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total, self.start, self.seconds = warmup, total, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.warmup - 1:
            synchronize(pl_module.device)
            self.start = time.perf_counter()
        elif batch_idx == self.total - 1:
            synchronize(pl_module.device)
            self.seconds = time.perf_counter() - self.start


def ours_run(method: str, variant: dict, loader, args, device: torch.device) -> float:
    torch.manual_seed(0)
    common = dict(arch=args.arch, data_spec=SPEC, eps=EPS, optimizer="sgd", **OPTIM,
                  channels_last=variant["channels_last"], compile=variant["compile"])
    if method == "pgd10":
        module = PGDTraining(steps=PGD_STEPS, step_size=ALPHA, **common)
    else:
        module = FastFGSMTraining(step_ratio=FGSM_RATIO, **common)
    total = args.warmup + args.steps
    timer = StepTimer(args.warmup, total)
    trainer = pl.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_steps=total,
                         precision="bf16-mixed" if variant["bf16"] else "32-true", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer])
    trainer.fit(module, train_dataloaders=loader)
    return timer.seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50, help="timed training steps per measurement")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first (at least 1)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated (default {DEFAULT_VARIANTS})")
    ap.add_argument("--compile", action="store_true", help="also measure bf16+cl+compile")
    ap.add_argument("--methods", default="pgd10,fgsm_rs", help="comma-separated: pgd10, fgsm_rs")
    ap.add_argument("--arch", default="preact_resnet18", help="model registry name (3x32x32 inputs, 10 classes)")
    ap.add_argument("--out", default="bench/out/gpu_throughput.json")
    args = ap.parse_args()
    if args.warmup < 1 or args.steps < 1 or args.batch_size < 1:
        raise SystemExit("--warmup, --steps and --batch-size must be >= 1")
    variants = [v for v in args.variants.split(",") if v]
    if args.compile and "bf16+cl+compile" not in variants:
        variants.append("bf16+cl+compile")
    methods = [m for m in args.methods.split(",") if m]
    if not set(methods) <= set(METHODS):
        raise SystemExit(f"--methods: choose from {', '.join(METHODS)}")
    for v in variants:
        parse_variant(v)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # both loops alike (Lightning leaves the session's setting as it is)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 on both loops (Lightning suggests it anyway)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available" banner per Trainer
    warnings.filterwarnings("ignore", ".*does not have many workers.*")  # in-memory data: workers would not help
    warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")  # training throughput only
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning's own deprecation noise under this torch
    loader = make_loader(args, device)
    images = args.steps * args.batch_size

    rows = []
    for method in methods:
        for name in variants:
            variant = parse_variant(name)
            # Plain first, then ours: both see the same warm device; each builds its own model and optimiser.
            plain = plain_run(method, variant, loader, args, device)
            ours = ours_run(method, variant, loader, args, device)
            row = {"method": method, "variant": name, "ours_seconds": ours, "plain_seconds": plain,
                   "ours_img_s": images / ours, "plain_img_s": images / plain, "ratio": plain / ours}
            rows.append(row)
            print(f"{METHODS[method]:>9} {name:<16} ours {row['ours_img_s']:9.1f} img/s   plain "
                  f"{row['plain_img_s']:9.1f} img/s   ratio {row['ratio']:.3f}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print(f"\n{args.arch}, batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up, "
          f"on {device_name(device)} (ratio = ours / plain img/s; 1.00 = no framework overhead)\n")
    print("| method | variant | ours img/s | plain img/s | ratio |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {METHODS[r['method']]} | {r['variant']} | {r['ours_img_s']:.1f} | {r['plain_img_s']:.1f} | "
              f"{r['ratio']:.3f} |")
    result = {"benchmark": "gpu_throughput", "arch": args.arch, "batch_size": args.batch_size, "steps": args.steps,
              "warmup": args.warmup, "eps": EPS, "pgd_steps": PGD_STEPS, "pgd_step_size": ALPHA,
              "fgsm_step": FGSM_RATIO * EPS, "device": device_name(device), "lightning": lightning.__version__,
              "cuda": torch.version.cuda if device.type == "cuda" else None, "pin_memory": device.type == "cuda",
              "results": rows}  # write_result adds the machine, torch and the date
    print()
    write_result(args.out, result)


if __name__ == "__main__":
    main()
