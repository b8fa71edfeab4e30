"""How close is our PGD to the cost of its gradients, and is it faster than torchattacks?

    python bench/attack_speed.py [--out bench/out/attack_speed.json] [--quick] [--device cpu|cuda] [--profile]

For each model, in one run, on the same model (eval mode) and the same batch, it times per batch:

* ours, train config: PGD-k with keep_best=False (what adversarial training runs);
* ours, eval config:  PGD-k with keep_best=True and early_stop=False (evaluation's per-step cost: one extra forward
                      per restart; on this random model and labels early stopping would drop most examples at the
                      first step, so its effect is measured on trained checkpoints by bench/eval_speed.py);
* the limit:          k x (one forward + backward to the input with torch.autograd.grad, nothing else);
* torchattacks.PGD with the same eps, alpha, steps and random start.

Methods are interleaved (every repeat runs each once, in rotating order) after a warm-up, and the median is
reported. Efficiency = limit / ours (1.0 = no overhead beyond the gradients); speedup = torchattacks / ours.
Goal: efficiency >= 0.95 (train config) and faster than torchattacks.

`--profile` adds a torch.profiler breakdown of one PGD call next to one limit call (where the extra time goes).
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import os
import statistics
import time

import torch
import torch.nn.functional as F

import common
from common import ROOT, write_result
from robust_train.attacks import PGD
from robust_train.errors import ConfigError
from robust_train.models import create_model

GOAL_EFFICIENCY = 0.95

# name, registry name, module that registers it, constructor kwargs, input shape, batch, eps, alpha
# (alpha None: Madry et al.'s 2.5 eps / steps)
CONFIGS = [
    ("small_cnn (MNIST)", "small_cnn", "small_cnn", {"in_channels": 1}, (1, 28, 28), 128, 0.3, None),
    ("preact_resnet18 (CIFAR)", "preact_resnet18", "preact_resnet", {"in_channels": 3}, (3, 32, 32), 32,
     8 / 255, 2 / 255),
]


def load_model(name: str, module: str, kwargs: dict, wait_s: float):
    """create_model(name), waiting up to wait_s for robust_train/models/<module>.py to appear (it may be being
    written while this runs) and importing it if the package does not register it yet."""
    path = ROOT / "robust_train" / "models" / f"{module}.py"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return create_model(name, **kwargs)
        except ConfigError:
            if path.exists():
                try:
                    importlib.import_module(f"robust_train.models.{module}")
                    return create_model(name, **kwargs)
                except (ConfigError, ImportError, SyntaxError) as err:  # half-written file: try again
                    last = err
            else:
                last = FileNotFoundError(path)
            if time.monotonic() > deadline:
                raise RuntimeError(f"model {name!r} not available after {wait_s:.0f} s: {last}") from last
            print(f"waiting for {path.relative_to(ROOT)} ({last}) ...", flush=True)
            time.sleep(10)


def limit_fn(model, x, y, steps):
    """The floor for any k-step gradient attack: k x (forward + gradient w.r.t. the input), nothing else."""
    def run():
        with torch.enable_grad():
            for _ in range(steps):
                xr = x.detach().requires_grad_(True)
                torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    return run


def forward_fn(model, x):
    """One forward without autograd: what keep_best adds per restart (scoring the final iterate)."""
    def run():
        with torch.no_grad():
            model(x)
    return run


def timed(fn, sync) -> tuple[float, float]:
    """(wall ms, process CPU ms). With one intra-op thread the CPU time leaves out the time the process waited for
    a core, so on a shared machine it is the steadier measure of the work done (on a GPU only wall time counts)."""
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync()
    return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


def bench_model(label, model, shape, batch, eps, alpha, steps, repeats, warmup, device, profile):
    import torchattacks

    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, *shape, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    model = model.to(device).eval()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    ours_train = PGD(eps, steps=steps, step_size=alpha, keep_best=False)
    ours_eval = PGD(eps, steps=steps, step_size=alpha, keep_best=True, early_stop=False)
    ta = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
    methods = {
        "ours_train": lambda: ours_train(model, x, y),
        "ours_eval": lambda: ours_eval(model, x, y),
        "limit": limit_fn(model, x, y, steps),
        "torchattacks": lambda: ta(x, y),
        "forward": forward_fn(model, x),
    }
    names = list(methods)
    for _ in range(warmup):
        for n in names:
            methods[n]()
    times = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate so no method always runs first
        for n in order:
            wall_ms, cpu_ms = timed(methods[n], sync)
            times[n].append(wall_ms)
            cpu[n].append(cpu_ms)
    med = {n: statistics.median(v) for n, v in times.items()}
    med_cpu = {n: statistics.median(v) for n, v in cpu.items()}

    def paired(num, den):
        """Median over repeats of the ratio within a repeat (the methods of one repeat run back to back, so
        slow drifts of a shared machine's load cancel)."""
        return statistics.median(a / b for a, b in zip(times[num], times[den]))

    limit_eval = [a + b for a, b in zip(times["limit"], times["forward"])]
    row = {
        "model": label, "batch": batch, "input_shape": list(shape), "steps": steps, "eps": eps, "alpha": alpha,
        "params": sum(p.numel() for p in model.parameters()),
        "ours_train_ms": med["ours_train"], "ours_eval_ms": med["ours_eval"], "limit_ms": med["limit"],
        "torchattacks_ms": med["torchattacks"], "forward_ms": med["forward"],
        # ratio of medians (the table) and median of paired per-repeat ratios (steadier under load)
        "efficiency_train": med["limit"] / med["ours_train"], "efficiency_eval": med["limit"] / med["ours_eval"],
        "speedup_train": med["torchattacks"] / med["ours_train"],
        "speedup_eval": med["torchattacks"] / med["ours_eval"],
        "paired_efficiency_train": paired("limit", "ours_train"),
        "paired_speedup_train": paired("torchattacks", "ours_train"),
        "paired_efficiency_eval": paired("limit", "ours_eval"),
        # keep_best's own floor: k x (forward + input gradient) + the one forward that scores the last iterate
        "efficiency_eval_vs_its_floor": statistics.median(limit_eval) / med["ours_eval"],
        "overhead_per_step_ms": (med["ours_train"] - med["limit"]) / steps,
        "min_ms": {n: min(v) for n, v in times.items()},
        "cpu_median_ms": med_cpu,
        "cpu_efficiency_train": med_cpu["limit"] / med_cpu["ours_train"],
        "cpu_speedup_train": med_cpu["torchattacks"] / med_cpu["ours_train"],
        "cpu_efficiency_eval": med_cpu["limit"] / med_cpu["ours_eval"],
        "times_ms": times,
        "cpu_times_ms": cpu,
    }
    if profile:
        row["profile"] = profile_breakdown(methods, sync)
    return row


def profile_breakdown(methods, sync, top=12):
    """Self CPU time per op for one PGD (train config) call and one limit call."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for n in ("ours_train", "limit"):
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=acts) as prof:
            methods[n]()
            sync()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
        print(f"\n--- profile: {n} ---\n{table}")
        out[n] = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    diff = {k: out["ours_train"].get(k, 0.0) - out["limit"].get(k, 0.0) for k in out["ours_train"]}
    extra = dict(sorted(diff.items(), key=lambda kv: -kv[1])[:top])
    print("\n--- ops where PGD spends more self-CPU ms than the limit ---")
    for k, v in extra.items():
        print(f"  {k:<40} {v:8.2f} ms")
    return {"extra_self_cpu_ms": extra}


def machine_info(device: str) -> dict:
    """common.machine_info, plus what bears on this comparison: torchattacks' version and the load on the machine."""
    info = {**common.machine_info(device), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    try:
        import torchattacks
        info["torchattacks"] = torchattacks.__version__
    except Exception:  # noqa: BLE001
        pass
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = list(os.getloadavg())
    if device.startswith("cuda"):
        info["gpu"] = info["device_name"]
    return info


def print_table(rows, info):
    head = (f"PGD-{rows[0]['steps']} per batch, {info['device']}, torch {info['torch']}, {info['torch_threads']} threads"
            f" | goal: efficiency (limit/ours) >= {GOAL_EFFICIENCY} and faster than torchattacks")
    cols = f"{'model':<26}{'config':<18}{'batch':>6}{'ours ms':>10}{'limit ms':>10}{'t.attacks ms':>14}" \
           f"{'efficiency':>12}{'speedup':>9}  goal"
    print("\n" + head)
    print(cols)
    print("-" * len(cols))
    for r in rows:
        for cfg, key in (("train (last)", "train"), ("eval (keep_best)", "eval")):
            ok = r[f"efficiency_{key}"] >= GOAL_EFFICIENCY and r[f"speedup_{key}"] > 1
            goal = ("met" if ok else "MISSED") if key == "train" else "(n/a)"
            print(f"{r['model']:<26}{cfg:<18}{r['batch']:>6}{r[f'ours_{key}_ms']:>10.1f}{r['limit_ms']:>10.1f}"
                  f"{r['torchattacks_ms']:>14.1f}{r[f'efficiency_{key}']:>12.3f}{r[f'speedup_{key}']:>8.2f}x"
                  f"  {goal}")
    print("paired ratios (median over repeats of the within-repeat ratio; steadier on a loaded machine):")
    for r in rows:
        print(f"  {r['model']:<26} train: efficiency {r['paired_efficiency_train']:.3f}, speedup vs torchattacks "
              f"{r['paired_speedup_train']:.3f}x | eval: efficiency {r['paired_efficiency_eval']:.3f}, "
              f"vs its own floor (limit + 1 forward = {r['limit_ms'] + r['forward_ms']:.1f} ms) "
              f"{r['efficiency_eval_vs_its_floor']:.3f}")
    if not info["device"].startswith("cuda"):
        print("process CPU time (medians; excludes waiting for a core, meaningful with --threads 1):")
        for r in rows:
            c = r["cpu_median_ms"]
            print(f"  {r['model']:<26} ours {c['ours_train']:.1f} / limit {c['limit']:.1f} / torchattacks "
                  f"{c['torchattacks']:.1f} ms: train efficiency {r['cpu_efficiency_train']:.3f}, speedup "
                  f"{r['cpu_speedup_train']:.3f}x; eval efficiency {r['cpu_efficiency_eval']:.3f}")
    print("keep_best scores the final iterate with one extra forward per restart, by design; the goal is for the "
          "train config.")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "attack_speed.json"))
    p.add_argument("--quick", action="store_true", help="fewer repeats (3) and one warm-up round")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per method (default 7, quick 3)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="all", help="comma-separated registry names, or 'all'")
    p.add_argument("--wait", type=float, default=900, help="seconds to wait for a model file being written")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler breakdown per model")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice); 1 is steadier on a shared CPU, where a "
                        "descheduled OpenMP thread stalls every parallel region")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    warmup = 1 if args.quick else 2

    info = machine_info(args.device)
    rows = []
    for label, name, module, kwargs, shape, batch, eps, alpha in CONFIGS:
        if args.models != "all" and name not in args.models.split(","):
            continue
        if args.device.startswith("cuda") and name == "preact_resnet18":
            batch = 128  # the CPU batch of 32 is only a CPU-time concession
        alpha = 2.5 * eps / args.steps if alpha is None else alpha
        torch.manual_seed(0)
        model = load_model(name, module, kwargs, args.wait)
        print(f"{label}: batch {batch}, {repeats} repeats ...", flush=True)
        rows.append(bench_model(label, model, shape, batch, eps, alpha, args.steps, repeats, warmup, args.device,
                                args.profile))
    if hasattr(os, "getloadavg"):
        info["loadavg_end"] = list(os.getloadavg())
    print_table(rows, info)

    result = {"machine": info, "goal": {"efficiency_min": GOAL_EFFICIENCY, "faster_than_torchattacks": True},
              "repeats": repeats, "warmup_rounds": warmup, "results": rows,
              "goal_met_train": all(r["efficiency_train"] >= GOAL_EFFICIENCY and r["speedup_train"] > 1
                                    for r in rows)}
    print()
    write_result(args.out, result)


if __name__ == "__main__":
    main()
