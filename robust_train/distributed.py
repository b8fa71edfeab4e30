"""Splitting an evaluation over processes so that its numbers equal a single process's on the same examples.

The examples are cut into batches exactly as one process would cut them; batch b goes to rank b mod world size,
and every random draw of an attack on batch b comes from a seed made of (seed, what is measured, b), never from the
state the process happens to be in. Each rank fills the entries of its own batches in a full-length tensor of
zeros and a sum over ranks assembles the whole (adding zeros is exact, in floats too). So per-example results, and
every mean over them, are the same whether one process or sixteen did the work.

Launching goes through Lightning Fabric: `--devices N` starts N-1 more processes on this machine (the command is
re-run with the rank in its environment), and under torchrun or SLURM the launcher's processes are joined instead.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch


def batch_seed(*parts: int) -> int:
    """A 63-bit seed from integers, different for every tuple (SeedSequence hashes them), same on every rank."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32).view(np.uint64)[0]
               >> np.uint64(1))


class Split:
    """This process's share of an evaluation: which batches it runs, and how the ranks' results are summed."""

    def __init__(self, fabric=None):
        self.fabric = fabric
        self.rank = fabric.global_rank if fabric is not None else 0
        self.world = fabric.world_size if fabric is not None else 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def batches(self, n: int, batch_size: int) -> Iterator[tuple[int, slice]]:
        """(batch index, slice) of this rank's batches among the ceil(n / batch_size) of the whole set."""
        for b, start in enumerate(range(0, n, batch_size)):
            if b % self.world == self.rank:
                yield b, slice(start, min(start + batch_size, n))

    def count(self, n: int, batch_size: int) -> int:
        return sum(1 for _ in self.batches(n, batch_size))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of `tensor` (each rank holds zeros outside its own batches); bool and integer tensors
        come back in their dtype."""
        if self.world == 1:
            return tensor
        wide = tensor.to(torch.float64 if tensor.is_floating_point() else torch.int64)
        return self.fabric.all_reduce(wide, reduce_op="sum").to(tensor.dtype)

    def barrier(self) -> None:
        if self.world > 1:
            self.fabric.barrier()


def launched_externally() -> tuple[int, int] | None:
    """(processes per node, nodes) when torchrun or a similar launcher started this process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "LOCAL_RANK" not in os.environ:
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return local, max(1, world // local)


def launch(devices: int | str = 1, accelerator: str = "auto", num_nodes: int = 1) -> tuple[Split, torch.device]:
    """Start (or join) the processes of a distributed evaluation; one process and no Fabric when there is one."""
    external = launched_externally()
    if external is not None:
        devices, num_nodes = external
    elif devices in (1, "1") and num_nodes == 1:
        return Split(None), None
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy="ddp")
    fabric.launch()
    return Split(fabric), fabric.device
