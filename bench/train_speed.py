"""Framework overhead of a PGD-AT epoch: robust_train (Lightning + PGDTraining) against a plain PyTorch loop of the
same math (same model, data order, optimiser, PGD), in the same run. Goal: overhead under 5%.

    python bench/train_speed.py [--steps 10] [--batches 100] [--repeats 3] [--out bench/out/train_speed.json]
"""
from __future__ import annotations

import argparse
import statistics
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from common import write_result
from robust_train.data import MNISTData
from robust_train.methods import PGDTraining


def plain_epoch(dm, steps, step_size, eps, batches, seed):
    """What a careful researcher would write by hand: eval-mode PGD with autograd.grad, then a train step."""
    torch.manual_seed(seed)
    model = PGDTraining(eps=eps, steps=steps, step_size=step_size, data_spec=dm.spec).model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for i, (x, y) in enumerate(dm.train_dataloader()):
        if i == batches:
            break
        model.eval()
        x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y, reduction="sum"), x_adv)
            x_adv = torch.min(torch.max(x_adv.detach() + step_size * g.sign(), x - eps), x + eps).clamp(0, 1)
        model.train()
        loss = F.cross_entropy(model(x_adv), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


class EpochTimer(pl.Callback):
    """The epoch itself, from its first batch to its last: Trainer start-up is paid once per run, not per epoch."""

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def framework_epoch(dm, steps, step_size, eps, batches, seed):
    torch.manual_seed(seed)
    module = PGDTraining(eps=eps, steps=steps, step_size=step_size, data_spec=dm.spec, lr=1e-3)
    timer = EpochTimer()
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=batches, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, accelerator="cpu", callbacks=[timer])
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    return timer.seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batches", type=int, default=100, help="batches per timed epoch (0: the whole epoch)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/out/train_speed.json")
    args = ap.parse_args()
    dm = MNISTData(batch_size=args.batch_size)
    dm.setup("fit")
    batches = args.batches or len(dm.train_dataloader())
    eps, step_size = 0.3, 2.5 * 0.3 / args.steps
    plain_epoch(dm, args.steps, step_size, eps, 5, 0)  # warm-up both paths
    framework_epoch(dm, args.steps, step_size, eps, 5, 0)
    plain, ours = [], []
    for r in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        plain.append(plain_epoch(dm, args.steps, step_size, eps, batches, r))
        ours.append(framework_epoch(dm, args.steps, step_size, eps, batches, r))
    p, o = statistics.median(plain), statistics.median(ours)
    overhead = o / p - 1
    print(f"\nPGD-{args.steps} adversarial training, small_cnn on MNIST, {batches} batches of {args.batch_size}, "
          f"median of {args.repeats} (goal: overhead < 5%)\n")
    print(f"| loop | seconds | images/s |\n|---|---|---|")
    n = batches * args.batch_size
    print(f"| plain PyTorch | {p:.2f} | {n / p:.0f} |\n| robust_train (Lightning) | {o:.2f} | {n / o:.0f} |")
    print(f"\nframework overhead: {100 * overhead:+.1f}%  ->  {'MET' if overhead < 0.05 else 'NOT MET'}")
    result = {"benchmark": "train_speed", "steps": args.steps, "batches": batches, "batch_size": args.batch_size,
              "plain_seconds": plain, "robust_train_seconds": ours, "overhead": overhead,
              "goal_met": overhead < 0.05, "cpus": torch.get_num_threads()}
    write_result(args.out, result)


if __name__ == "__main__":
    main()
