"""How long the explorer makes a user wait when they pick an image: the whole ε grid in one batched pass against the
same attack run once per ε, and the full request (grid, both maps, saliency difference, PNGs) the page makes.

    python bench/explore_latency.py [--out bench/out/explore_latency.json] [--quick] [--points 21] [--device cpu]

For each model (the Int paper's small CNN on MNIST; PreAct ResNet-18 on 32×32 CIFAR-sized input unless --quick),
random weights (the cost of an attack does not depend on what the weights learnt: early stopping is off in both
ways), one image, and each attack of the page's menu (FGSM, PGD-20, targeted PGD-20, AAI-20 on CAM), it times:

* batched: `attack.per_example_eps(grid)` on the image repeated over the grid, one call (what the explorer runs);
* loop:    the same attack built at each ε > 0 and run on the one image, one call per ε (what a naive page runs);
* request: `Explorer.grid_view` (the attack, the class scores, the map at x and at every x', the saliency
           difference and every PNG), on the small CNN only, whose data is bundled.

Medians of --repeats runs after a warm-up. After the request, moving the slider costs no server time at all: the
page looks the values up. Goal: a picked image ready in under 2 s for the small CNN on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import common
from common import ROOT, write_result
from robust_train.attacks import create_attack
from robust_train.checkpoint import checkpoint_metadata, save_classifier
from robust_train.models import create_model

ATTACKS = {  # page name -> (registered attack, options)
    "fgsm": ("fgsm", {}),
    # early_stop off in the loop too: the grid keeps each ε's strongest iterate, so must the comparison
    "pgd": ("pgd", {"steps": 20, "restarts": 1, "early_stop": False}),
    "pgd_target": ("pgd", {"steps": 20, "restarts": 1, "targeted": True, "loss": "margin", "early_stop": False}),
    "aai": ("aai", {"steps": 20, "map_fn": "cam"}),
}
MODELS = {  # name -> (arch, in_channels, size, eps_max)
    "small_cnn (MNIST)": ("small_cnn", 1, 28, 0.4),
    "preact_resnet18 (CIFAR)": ("preact_resnet18", 3, 32, 10 / 255),
}
GOAL_SECONDS = 2.0


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def grid_times(model, x, y, name: str, options: dict, eps_max: float, points: int, repeats: int) -> tuple[float, float]:
    eps = torch.linspace(0, eps_max, points, device=x.device)
    base = create_attack(name, eps_max, **options)
    target = torch.full((points,), (int(y) + 1) % 10, device=x.device) if options.get("targeted") else None
    batched = base.per_example_eps(eps)

    def one_pass():
        batched(model, x.expand(points, -1, -1, -1), y.expand(points), target)

    def per_eps():
        for e in eps.tolist()[1:]:
            single = create_attack(name, e, **options, step_size=base.step_size * e / eps_max)
            single(model, x, y, target[:1] if target is not None else None)

    return median_time(one_pass, repeats), median_time(per_eps, repeats)


def request_time(model, points: int, repeats: int, folder: Path) -> dict:
    from robust_train.data import MNISTData
    from robust_train.explore.server import create_app
    from robust_train.explore.session import Explorer

    path = folder / "small_cnn.ckpt"
    save_classifier(model, checkpoint_metadata("standard", "small_cnn", {}, MNISTData().spec, 0.0), path)
    explorer = Explorer(str(path), n=50, points=points, log=lambda m: None)
    client = create_app(explorer).test_client()
    out = {}
    for page_name in ATTACKS:
        query = f"/api/grid?image=t0&attack={page_name}&map=cam&steps=20&target=9"

        def fetch(query=query):
            explorer.grids.clear()  # a fresh pick each time: the attack runs again
            response = client.get(query)
            assert response.status_code == 200, response.json
            return response

        seconds = median_time(fetch, repeats)
        out[page_name] = {"seconds": seconds, "json_kb": len(fetch().data) / 1024}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "explore_latency.json"))
    p.add_argument("--quick", action="store_true", help="the small CNN only, 2 repeats")
    p.add_argument("--points", type=int, default=21)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    repeats = 2 if args.quick else args.repeats
    torch.manual_seed(0)
    result = {"points": args.points, "repeats": repeats, "machine_info": common.machine_info(args.device),
              "goal_seconds": GOAL_SECONDS, "rows": []}
    models = list(MODELS.items())[:1] if args.quick else list(MODELS.items())
    with tempfile.TemporaryDirectory() as folder:
        for label, (arch, channels, size, eps_max) in models:
            model = create_model(arch, num_classes=10, in_channels=channels).to(args.device).eval()
            x = torch.rand(1, channels, size, size, device=args.device)
            y = torch.tensor([3], device=args.device)
            requests = request_time(model.cpu(), args.points, repeats, Path(folder)) \
                if arch == "small_cnn" and args.device == "cpu" else {}
            model.to(args.device)
            for page_name, (name, options) in ATTACKS.items():
                common.log(f"{label}: {page_name}")
                batched, loop = grid_times(model, x, y, name, options, eps_max, args.points, repeats)
                row = {"model": label, "attack": page_name, "batched_s": batched, "loop_s": loop,
                       "speedup": loop / batched, "request_s": requests.get(page_name, {}).get("seconds"),
                       "json_kb": requests.get(page_name, {}).get("json_kb")}
                result["rows"].append(row)
    print(f"\nexplorer: one image's ε grid of {args.points} points, {common.device_name(args.device)}, "
          f"median of {repeats}")
    print(f"{'model':<25} {'attack':<11} {'batched s':>9} {'loop s':>8} {'speedup':>8} {'request s':>10} {'JSON KB':>8}")
    for r in result["rows"]:
        request = f"{r['request_s']:.2f}" if r["request_s"] is not None else "–"
        size = f"{r['json_kb']:.0f}" if r["json_kb"] is not None else "–"
        print(f"{r['model']:<25} {r['attack']:<11} {r['batched_s']:>9.3f} {r['loop_s']:>8.3f} "
              f"{r['speedup']:>7.1f}× {request:>10} {size:>8}")
    slowest = max((r["request_s"] for r in result["rows"] if r["request_s"] is not None), default=None)
    if slowest is not None:
        print(f"slowest small-CNN request {slowest:.2f} s (goal < {GOAL_SECONDS} s): "
              f"{'met' if slowest < GOAL_SECONDS else 'NOT met'}")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
