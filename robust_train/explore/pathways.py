"""Activation pathways of an adversarial attack, after Bluff (Das et al., IEEE VIS 2020): the math and the cache.

Bluff draws a network as columns of layers whose nodes are channels ("neurons"); a node's value is where the
channel's activation (spatial mean of ReLU of the conv output) falls among a reference set of images, as a
percentile 0-100. For one image x and its adversarial x_adv, each node carries:

- original / target: the median percentile of the channel over reference images of the original / target class;
- clean / adversarial: the percentile of x / x_adv; change = adversarial - clean, "excited" if positive,
  "inhibited" if negative;
- role, Bluff's colours: "both" (orange) if the channel is in the top k of the original class and of the target
  class, "original" (green) or "target" (blue) if in one only, "adversarial" (red) if in neither, i.e. shown only
  because of the chosen ranking (by default the adversarial image's activation).

An edge joins two shown channels of adjacent columns; its weight is the influence of the source channel on the
target channel at x_adv: Σ_space A_src · ∂ mean(ReLU(A_dst)) / ∂ A_src, the first-order share of the target's
activation due to the source (A_src the source conv's output). Bluff instead convolves the source's spatial max
with the connecting weights and takes the median over images; ours is per image, signed, and still defined when
columns are not directly connected (deep nets show only 8 evenly spaced convs, and residual paths skip layers).
Weights are scaled per column pair so the largest |weight| is 1.

Aggregates over the reference images (percentile tables, class medians, most exciting examples) cost a pass over
the data, so they are cached beside the checkpoint; the cache is read with weights_only=True, checked against the
model and the caller's key, and rebuilt whenever anything is off.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from robust_train.checkpoint import atomic_torch_save
from robust_train.modes import model_mode

CACHE_VERSION = 1
RANKINGS = ("original", "target", "adversarial", "change")
# Positions in float64 so that, when N - 1 divides 100, the percentile knots fall exactly on the data.
_PERCENTS = torch.arange(101, dtype=torch.float64) / 100


@dataclass
class Aggregates:
    layers: list[str]
    channels: list[int]
    quantiles: list[torch.Tensor]      # (101, C_l): the channel's 0..100th percentile over the reference images
    class_median: list[torch.Tensor]   # (num_classes, C_l): median percentile per class, NaN for an absent class
    top_examples: list[torch.Tensor]   # (C_l, n_top, 3) long: (image index, row, col) of the strongest responses
    key: dict = field(default_factory=dict)


def channel_layers(model: nn.Module, max_layers: int = 8) -> list[tuple[str, nn.Module]]:
    """The convs of the model's body (or of the whole model), at most `max_layers` evenly spaced, last included.

    Registration order stands for forward order: true for sequential bodies; a projection shortcut comes after its
    block's convs, which only matters if it is picked, and then its edges are merely zero."""
    if max_layers < 1:
        raise ValueError(f"max_layers={max_layers}: show at least one layer")
    body = getattr(model, "body", None)
    inside = {id(m) for m in (body if isinstance(body, nn.Module) else model).modules()}
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and id(m) in inside]
    if len(convs) > max_layers:
        last = len(convs) - 1
        picks = [round(i * last / (max_layers - 1)) for i in range(max_layers)] if max_layers > 1 else [last]
        convs = [convs[i] for i in picks]
    return convs


def _device(model: nn.Module, fallback: torch.device) -> torch.device:
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return fallback if tensor is None else tensor.device


def record(model: nn.Module, x: torch.Tensor, layers, *, keep_graph: bool = False,
           batch_size: int = 256) -> list[torch.Tensor]:
    """The outputs (N, C_l, H_l, W_l) of the `layers` (from `channel_layers`) for images x, model in eval mode."""
    modules = [m for _, m in layers]
    x = x.to(_device(model, x.device))
    with model_mode(model, "eval", grad=keep_graph):
        if keep_graph:  # one pass: the caller differentiates through it
            return _hooked_forward(model, x, modules, detach=False)
        chunks = [_hooked_forward(model, xb, modules, detach=True) for xb in x.split(batch_size)]
    return [torch.cat(c) for c in zip(*chunks)]


def _hooked_forward(model, x, modules, detach):
    outs: list = [None] * len(modules)

    def hook_for(i):
        def hook(_module, _inputs, output):
            if outs[i] is None:  # a module called twice in a forward: its first call is the layer's column
                outs[i] = output.detach() if detach else output
        return hook

    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    if any(o is None for o in outs):
        raise ValueError("a layer to record did not run in the model's forward pass")
    return outs


def channel_activation(output: torch.Tensor) -> torch.Tensor:
    """(N, C) spatial mean of ReLU of a conv output (N, C, H, W)."""
    return output.relu().mean(dim=(2, 3))


def _quantiles(values: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """(Q, C) quantiles of (N, C) values, linear interpolation as torch.quantile but without its size limit."""
    ordered = values.double().sort(dim=0).values
    pos = qs.double() * (len(ordered) - 1)
    lo, hi = pos.floor().long(), pos.ceil().long()
    return torch.lerp(ordered[lo], ordered[hi], (pos - lo)[:, None]).float()


def percentile(aggregates: Aggregates, layer_index: int, acts: torch.Tensor) -> torch.Tensor:
    """(N, C_l) percentiles in [0, 100] of channel activations (N, C_l), by interpolation in the quantile table.

    A value equal to a run of equal table entries (ReLU zeros) gets the middle of the run, like scipy's
    percentileofscore(kind="mean"): a channel constant over the reference images reads 50 at that constant."""
    table = aggregates.quantiles[layer_index].to(acts.device, acts.dtype).T.contiguous()  # (C, 101)
    v = acts.T.contiguous()
    left = torch.searchsorted(table, v)
    right = torch.searchsorted(table, v, right=True)
    i = left.clamp(1, 100)
    lo, hi = table.gather(1, i - 1), table.gather(1, i)
    inside = (i - 1) + ((v - lo) / (hi - lo).clamp_min(torch.finfo(v.dtype).tiny)).clamp(0, 1)
    tie = (left + right - 1).to(v.dtype) / 2
    out = torch.where(left < right, tie, torch.where(left == 0, 0.0, torch.where(left == 101, 100.0, inside)))
    return out.T


def _merge_top(best, output, offset, n_top):
    """Running top n_top images per channel by spatial max: (values (C, n), info (C, n, 3))."""
    vals, pos = output.flatten(2).max(dim=2)  # (B, C)
    b, c = vals.shape
    index = (torch.arange(b) + offset)[:, None].expand(b, c)
    info = torch.stack([index, pos // output.shape[3], pos % output.shape[3]], dim=-1).transpose(0, 1)
    vals = vals.T
    if best is not None:
        vals, info = torch.cat([best[0], vals], 1), torch.cat([best[1], info], 1)
    top = vals.topk(min(n_top, vals.shape[1]), dim=1)
    return top.values, info.gather(1, top.indices[..., None].expand(-1, -1, 3))


def build_aggregates(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, *, n_top: int = 6,
                     batch_size: int = 256, progress: bool = False) -> Aggregates:
    """Percentile tables, per-class median percentiles and most exciting examples over reference images x, y."""
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"need reference images with one label each, got {len(x)} images and {len(y)} labels")
    layers = channel_layers(model)
    means: list[list[torch.Tensor]] = [[] for _ in layers]
    best: list = [None] * len(layers)
    for start in range(0, len(x), batch_size):
        for li, out in enumerate(record(model, x[start:start + batch_size], layers, batch_size=batch_size)):
            out = out.float().cpu()
            means[li].append(channel_activation(out))
            best[li] = _merge_top(best[li], out, start, n_top)
        if progress:
            print(f"pathway aggregates: {min(start + batch_size, len(x))}/{len(x)} images", file=sys.stderr)
    acts = [torch.cat(m) for m in means]
    agg = Aggregates([n for n, _ in layers], [a.shape[1] for a in acts], [_quantiles(a, _PERCENTS) for a in acts],
                     [], [info for _, info in best])
    y = y.cpu()
    for li, a in enumerate(acts):
        pct = percentile(agg, li, a)
        rows = [_quantiles(pct[y == k], torch.tensor([0.5]))[0] if (y == k).any()
                else torch.full((a.shape[1],), math.nan) for k in range(num_classes)]
        agg.class_median.append(torch.stack(rows))
    return agg


def cache_path_for(ckpt_path) -> Path:
    return Path(f"{ckpt_path}.pathways.pt")


def file_sha256(path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _check(cond, what):
    if not cond:
        raise ValueError(what)


def _validated(payload, model, x, num_classes, n_top) -> Aggregates:
    """The cached aggregates if every field fits the model and the reference images; ValueError otherwise."""
    layers = channel_layers(model)
    shapes = [o.shape[1:] for o in record(model, x[:1], layers)]
    agg = Aggregates(*(payload[f] for f in ("layers", "channels", "quantiles", "class_median", "top_examples")),
                     key=payload["key"])
    _check(agg.layers == [n for n, _ in layers], "layer names")
    _check(agg.channels == [s[0] for s in shapes], "channel counts")
    _check(all(len(t) == len(layers) for t in (agg.quantiles, agg.class_median, agg.top_examples)), "layer count")
    for (c, h, w), q, med, top in zip(shapes, agg.quantiles, agg.class_median, agg.top_examples):
        _check(all(isinstance(t, torch.Tensor) for t in (q, med, top)), "tensors")
        _check(q.shape == (101, c) and q.is_floating_point() and bool(q.isfinite().all())
               and bool((q.diff(dim=0) >= 0).all()), "quantile table")
        _check(med.shape == (num_classes, c) and med.is_floating_point()
               and bool((med.isnan() | ((med >= 0) & (med <= 100))).all()), "class medians")
        _check(top.shape == (c, min(n_top, len(x)), 3) and top.dtype == torch.long, "top examples shape")
        _check(bool((top >= 0).all()) and bool((top.amax(dim=(0, 1)) < torch.tensor([len(x), h, w])).all()),
               "top examples range")
    return agg


def load_or_build_aggregates(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, cache_path,
                             key: dict, **kw) -> tuple[Aggregates, str]:
    """Aggregates from the cache at `cache_path` if it is ours, intact, current and made from `key`; else built
    (keyword arguments go to `build_aggregates`) and written atomically. Returns (aggregates, status): "loaded",
    "built", "rebuilt (stale)", "rebuilt (corrupt)", or "built (not cached: <reason>)" when it cannot be written."""
    if not isinstance(key, dict):
        raise TypeError(f"key must be a dict, got {type(key).__name__}")
    key = json.loads(json.dumps(key, allow_nan=False))  # plain and comparable with what comes back from disk
    path = Path(cache_path)
    build = {"n_top": kw.get("n_top", 6), "num_classes": num_classes, "n_images": len(x)}
    status = "built"
    if path.exists():
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            _check(isinstance(payload, dict) and {"version", "key", "build"} <= payload.keys(), "not a cache")
            current = payload["version"] == CACHE_VERSION and payload["key"] == key and payload["build"] == build
        except Exception:  # noqa: BLE001  (truncated zips, garbage bytes, foreign pickles, odd types)
            status = "rebuilt (corrupt)"
        else:
            if current is not True:
                status = "rebuilt (stale)"
            else:
                try:
                    return _validated(payload, model, x, num_classes, build["n_top"]), "loaded"
                except Exception:  # noqa: BLE001  (a field of the wrong type or shape: never trust the file)
                    status = "rebuilt (corrupt)"
    agg = build_aggregates(model, x, y, num_classes, **kw)
    agg.key = key
    payload = {"version": CACHE_VERSION, "key": key, "build": build, "layers": agg.layers, "channels": agg.channels,
               **{f: [t.detach().cpu().clone() for t in getattr(agg, f)]
                  for f in ("quantiles", "class_median", "top_examples")}}
    try:
        atomic_torch_save(payload, path)
    except OSError as e:
        return agg, f"built (not cached: {e.strerror or e})"
    return agg, status


def _matching_layers(model, aggregates):
    layers = channel_layers(model)
    if [n for n, _ in layers] != list(aggregates.layers):
        raise ValueError(f"the aggregates were built for layers {aggregates.layers}, the model has "
                         f"{[n for n, _ in layers]}: rebuild them for this model")
    return layers


def _ranked(values: torch.Tensor, finite_only: bool = False) -> list[int]:
    """Channel indices by decreasing value, NaN last (or dropped); ties by channel index, for stable pictures."""
    order = torch.where(values.isnan(), -math.inf, values).sort(descending=True, stable=True).indices.tolist()
    return [c for c in order if not (finite_only and math.isnan(values[c]))]


def _plain(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def pathway_graph(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, original_class: int, target_class: int,
                  aggregates: Aggregates, *, k: int = 5, rank_by: str = "adversarial") -> dict:
    """Bluff's graph for one image x (1, C, H, W) and its adversarial x_adv, as plain JSON-able values."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r}: show at least one channel per layer (an int >= 1)")
    if rank_by not in RANKINGS:
        raise ValueError(f"rank_by={rank_by!r}: use one of {', '.join(RANKINGS)}")
    if x.shape[0] != 1 or x_adv.shape != x.shape:
        raise ValueError(f"one image and its adversarial of the same shape, got {tuple(x.shape)} and "
                         f"{tuple(x_adv.shape)}")
    num_classes = aggregates.class_median[0].shape[0]
    for c in (original_class, target_class):
        if not 0 <= c < num_classes:
            raise ValueError(f"class {c} is not one of the {num_classes} classes of the aggregates")
    layers = _matching_layers(model, aggregates)
    # Both images in one pass: identical inputs give identical activations, so change is exactly 0 for x_adv == x.
    both = torch.cat([x, x_adv]).detach().to(_device(model, x.device)).requires_grad_(True)
    out_layers, shown, edges = [], [], []
    with model_mode(model, "eval", grad=True):
        outs = record(model, both, layers, keep_graph=True)
        for li, (name, out) in enumerate(zip(aggregates.layers, outs)):
            clean, adv = percentile(aggregates, li, channel_activation(out.detach())).cpu()
            orig = aggregates.class_median[li][original_class].float()
            targ = aggregates.class_median[li][target_class].float()
            change = adv - clean
            rank = {"original": orig, "target": targ, "adversarial": adv, "change": change.abs()}[rank_by]
            kk = min(k, len(rank))
            chosen = _ranked(rank)[:kk]
            top_orig, top_targ = set(_ranked(orig, True)[:kk]), set(_ranked(targ, True)[:kk])
            nodes = []
            for c in chosen:
                role = ("both" if c in top_targ else "original") if c in top_orig else (
                    "target" if c in top_targ else "adversarial")
                d = float(change[c])
                nodes.append({"channel": c, "original": _plain(orig[c]), "target": _plain(targ[c]),
                              "adversarial": float(adv[c]), "clean": float(clean[c]), "change": d, "role": role,
                              "effect": "excited" if d > 0 else "inhibited" if d < 0 else "unchanged"})
            shown.append(chosen)
            out_layers.append({"name": name, "channels": len(rank), "nodes": nodes})
        for li in range(len(outs) - 1):
            src, pair = outs[li], []
            for dst in shown[li + 1]:
                score = outs[li + 1][1, dst].relu().mean()
                # allow_unused: a column on a parallel branch (projection shortcut) does not reach dst at all
                (grad,) = torch.autograd.grad(score, src, retain_graph=True, allow_unused=True)
                for s in shown[li]:
                    pair.append((s, dst, 0.0 if grad is None else float((src[1, s].detach() * grad[1, s]).sum())))
            scale = max(abs(w) for *_, w in pair) or 1.0
            edges += [{"source": [li, s], "target": [li + 1, d], "weight": w / scale} for s, d, w in pair]
    return {"layers": out_layers, "edges": edges, "rank_by": rank_by, "k": k}


def channel_curve(model: nn.Module, x_grid: torch.Tensor, layer_index: int, channel: int,
                  aggregates: Aggregates | None = None) -> list[float]:
    """The channel's activation (its percentile if `aggregates` are given) on each image of x_grid."""
    layers = channel_layers(model) if aggregates is None else _matching_layers(model, aggregates)
    (out,) = record(model, x_grid, [layers[layer_index]])
    if not 0 <= channel < out.shape[1]:
        raise ValueError(f"channel {channel}: layer {layers[layer_index][0]} has {out.shape[1]} channels")
    acts = channel_activation(out)
    if aggregates is not None:
        acts = percentile(aggregates, layer_index, acts)
    return [float(v) for v in acts[:, channel].cpu()]


def channel_examples(model: nn.Module, x_ref: torch.Tensor, aggregates: Aggregates, layer_index: int,
                     channel: int, n: int = 6) -> list[torch.Tensor]:
    """Crops (C, h, w) of the reference images that excite the channel most, each cut to the receptive field of
    its strongest unit: the bounding box of the pixels with nonzero gradient, so exact for this image (ReLUs that
    are off shrink it) whatever the architecture."""
    layer = _matching_layers(model, aggregates)[layer_index]
    crops = []
    with model_mode(model, "eval", grad=True):
        for idx, row, col in aggregates.top_examples[layer_index][channel][:n].tolist():
            image = x_ref[idx].detach()
            xi = image[None].to(_device(model, image.device)).requires_grad_(True)
            (out,) = record(model, xi, [layer], keep_graph=True)
            (grad,) = torch.autograd.grad(out[0, channel, row, col], xi)
            rows, cols = grad[0].abs().sum(dim=0).nonzero(as_tuple=True)
            if len(rows) == 0:  # no pixel reaches the unit through the open ReLUs: show the whole image
                crops.append(image.clone())
                continue
            crops.append(image[:, int(rows.min()):int(rows.max()) + 1, int(cols.min()):int(cols.max()) + 1].clone())
    return crops

