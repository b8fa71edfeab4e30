"""The pathway math and its cache (robust_train/explore/pathways.py), on small random models and images."""
import dataclasses
import hashlib
import json
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from robust_train.explore import pathways as P
from robust_train.models.registry import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

N_REF = 21  # N - 1 divides 100, so the i-th smallest reference value sits exactly at percentile 5 i


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = create_model("small_cnn", in_channels=1, num_classes=10).eval()
    x = torch.rand(N_REF, 1, 28, 28)
    y = torch.tensor([0] * 7 + [1] * 8 + [2] * 6)  # classes 3..9 have no images
    agg = P.build_aggregates(model, x, y, 10, batch_size=8)  # three batches: the running top-n merge is used
    return model, x, y, agg


def manual_outputs(model, x):
    with torch.no_grad():
        a0 = model.body[0](model.normalize(x))
        a1 = model.body[2](a0.relu())
        return [a0, a1, model.body[4](a1.relu())]


def distinct_channels(acts):
    """Channels whose reference activations are all different (ties would make ranks ambiguous)."""
    ordered = acts.sort(dim=0).values
    return [c for c in range(acts.shape[1]) if bool((ordered[1:, c] > ordered[:-1, c]).all())]


def test_channel_layers_small_cnn(small):
    model = small[0]
    layers = P.channel_layers(model)
    assert [n for n, _ in layers] == ["body.0", "body.2", "body.4"]
    assert [m for _, m in layers] == [model.body[0], model.body[2], model.body[4]]


def test_channel_layers_deep_and_bodyless():
    model = create_model("preact_resnet18", in_channels=3, num_classes=10)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    names = [n for n, _ in P.channel_layers(model)]
    assert len(convs) == 20 and len(names) == 8
    assert names[0] == "body.0" and names[-1] == convs[-1]
    assert [convs.index(n) for n in names] == [0, 3, 5, 8, 11, 14, 16, 19]  # evenly spaced, in order
    assert [n for n, _ in P.channel_layers(model, max_layers=1)] == [convs[-1]]
    bare = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 3, 3))
    assert [n for n, _ in P.channel_layers(bare)] == ["0", "2"]


def test_record_matches_manual_forward_and_removes_hooks(small):
    model, x, _, _ = small
    layers = P.channel_layers(model)
    outs = P.record(model, x, layers, batch_size=5)
    for out, ref, shape in zip(outs, manual_outputs(model, x), [(16, 14, 14), (32, 7, 7), (100, 7, 7)]):
        assert out.shape == (N_REF, *shape) and not out.requires_grad
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    kept = P.record(model, x[:2], layers, keep_graph=True)
    assert all(o.grad_fn is not None for o in kept)
    with pytest.raises(RuntimeError):
        P.record(model, torch.rand(2, 3, 28, 28), layers)  # wrong channel count: the forward fails
    assert all(not m._forward_hooks for m in model.modules())


def test_percentile_table(small):
    model, x, _, agg = small
    for li, out in enumerate(P.record(model, x, P.channel_layers(model))):
        acts = P.channel_activation(out)
        pct = P.percentile(agg, li, acts)
        chans = distinct_channels(acts)
        assert len(chans) >= acts.shape[1] // 2
        ranks = acts.argsort(dim=0).argsort(dim=0).float()
        torch.testing.assert_close(pct[:, chans], 5 * ranks[:, chans], rtol=0, atol=1e-3)
        lo, hi = agg.quantiles[li][0], agg.quantiles[li][100]
        probe = torch.stack([lo - 1, lo, torch.quantile(acts, 0.5, dim=0), hi, hi + 1]
                            + list(torch.linspace(0, 1, 50)[:, None] * (hi - lo) + lo))
        p = P.percentile(agg, li, probe)
        assert p[0].eq(0).all() and p[1, chans].eq(0).all() and p[3, chans].eq(100).all() and p[4].eq(100).all()
        torch.testing.assert_close(p[2, chans], torch.full((len(chans),), 50.0), rtol=0, atol=1e-3)
        assert (p[5:].diff(dim=0) >= 0).all()


def test_percentile_of_a_constant_channel_is_the_middle():
    agg = P.Aggregates(["a"], [1], [torch.zeros(101, 1)], [torch.zeros(1, 1)], [torch.zeros(1, 1, 3).long()])
    assert P.percentile(agg, 0, torch.tensor([[-1.0], [0.0], [1.0]])).flatten().tolist() == [0.0, 50.0, 100.0]


def test_class_median_by_hand(small):
    model, x, y, agg = small
    for li, out in enumerate(P.record(model, x, P.channel_layers(model))):
        acts = P.channel_activation(out)
        chans = distinct_channels(acts)
        pct = 5 * acts.argsort(dim=0).argsort(dim=0).numpy()
        for k in range(3):
            expected = np.median(pct[(y == k).numpy()], axis=0)
            np.testing.assert_allclose(agg.class_median[li][k, chans].numpy(), expected[chans], atol=1e-3)
        assert agg.class_median[li][3:].isnan().all()


def test_top_examples(small):
    model, x, y, agg = small
    for li, out in enumerate(P.record(model, x, P.channel_layers(model))):
        vals, pos = out.flatten(2).max(dim=2)  # (N, C)
        assert agg.top_examples[li].shape == (out.shape[1], 6, 3) and agg.top_examples[li].dtype == torch.long
        for c in range(out.shape[1]):
            idx, row, col = agg.top_examples[li][c, 0].tolist()
            assert idx == int(vals[:, c].argmax())
            assert (row, col) == divmod(int(pos[idx, c]), out.shape[3])
            assert agg.top_examples[li][c, :, 0].tolist() == vals[:, c].topk(6).indices.tolist()
    one_batch = P.build_aggregates(model, x, y, 10)
    assert all(torch.equal(a, b) for a, b in zip(agg.top_examples, one_batch.top_examples))


def test_graph_has_k_nodes_per_layer(small):
    model, x, _, agg = small
    for k in (1, 3, 5):
        graph = P.pathway_graph(model, x[:1], x[1:2], 0, 1, agg, k=k)
        assert [len(layer["nodes"]) for layer in graph["layers"]] == [k, k, k]
        assert [layer["channels"] for layer in graph["layers"]] == [16, 32, 100]
        assert len(graph["edges"]) == 2 * k * k and graph["k"] == k
    graph = P.pathway_graph(model, x[:1], x[1:2], 0, 1, agg, k=20)
    assert [len(layer["nodes"]) for layer in graph["layers"]] == [16, 20, 20]  # a 16-channel layer shows 16


def test_graph_shape_preact_resnet18():
    torch.manual_seed(1)
    model = create_model("preact_resnet18", in_channels=3, num_classes=10)
    x = torch.rand(8, 3, 32, 32)
    agg = P.build_aggregates(model, x, torch.arange(8), 10)
    graph = P.pathway_graph(model, x[:1], x[1:2], 0, 1, agg, k=2, rank_by="change")
    assert [len(layer["nodes"]) for layer in graph["layers"]] == [2] * 8
    assert [layer["channels"] for layer in graph["layers"]] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert len(graph["edges"]) == 7 * 4
    json.dumps(graph, allow_nan=False)


def test_roles_follow_the_top_k_sets(small):
    model, x, _, agg = small
    x_adv = (x[:1] + 0.2 * torch.randn_like(x[:1])).clamp(0, 1)
    full = P.pathway_graph(model, x[:1], x_adv, 0, 1, agg, k=100)
    medians = []
    for li, layer in enumerate(full["layers"]):
        order = [n["channel"] for n in layer["nodes"]]  # every channel, by adversarial percentile
        a, b = order[-3:], order[-5:-2]  # the original's and the target's top 3 share order[-3]
        med = agg.class_median[li].clone()
        med[0], med[1] = 0.0, 0.0
        med[0, a], med[1, b] = torch.tensor([70.0, 80.0, 90.0]), torch.tensor([70.0, 80.0, 90.0])
        medians.append(med)
    custom = dataclasses.replace(agg, class_median=medians)
    for li, layer in enumerate(full["layers"]):
        order = [n["channel"] for n in layer["nodes"]]
        graphs = {r: P.pathway_graph(model, x[:1], x_adv, 0, 1, custom, k=3, rank_by=r)["layers"][li]["nodes"]
                  for r in ("original", "target", "adversarial")}
        assert [(n["channel"], n["role"]) for n in graphs["original"]] == [
            (order[-1], "original"), (order[-2], "original"), (order[-3], "both")]
        assert [(n["channel"], n["role"]) for n in graphs["target"]] == [
            (order[-3], "both"), (order[-4], "target"), (order[-5], "target")]
        assert [(n["channel"], n["role"]) for n in graphs["adversarial"]] == [(c, "adversarial") for c in order[:3]]
        assert graphs["original"][0]["original"] == 90.0 and graphs["original"][0]["target"] == 0.0
    absent = P.pathway_graph(model, x[:1], x_adv, 5, 1, agg, k=3, rank_by="original")  # class 5: no images
    nodes = [n for layer in absent["layers"] for n in layer["nodes"]]
    assert all(n["original"] is None and n["role"] in ("target", "adversarial") for n in nodes)
    json.dumps(absent, allow_nan=False)


def test_identical_images_change_nothing(small):
    model, x, _, agg = small
    for rank_by in P.RANKINGS:
        graph = P.pathway_graph(model, x[3:4], x[3:4].clone(), 0, 2, agg, k=4, rank_by=rank_by)
        for node in (n for layer in graph["layers"] for n in layer["nodes"]):
            assert node["change"] == 0.0 and node["effect"] == "unchanged"
            assert node["adversarial"] == node["clean"]


def test_edges(small):
    model, x, _, agg = small
    model.train()
    model.body[2].eval()  # half in eval mode on purpose: must come back as found
    modes = [m.training for m in model.modules()]
    model.head.weight.grad = torch.full_like(model.head.weight, 3.0)
    x_adv = (x[:1] + 0.1 * torch.randn_like(x[:1])).clamp(0, 1)
    try:
        graph = P.pathway_graph(model, x[:1], x_adv, 0, 1, agg, k=3, rank_by="change")
        assert [m.training for m in model.modules()] == modes
        assert model.head.weight.grad.eq(3.0).all()
        assert all(p.grad is None for n, p in model.named_parameters() if n != "head.weight")
    finally:
        model.head.weight.grad = None
        model.eval()
    json.dumps(graph, allow_nan=False)
    shown = [[n["channel"] for n in layer["nodes"]] for layer in graph["layers"]]
    assert len(graph["edges"]) == 2 * 3 * 3
    for e in graph["edges"]:
        (ls, cs), (lt, ct) = e["source"], e["target"]
        assert lt == ls + 1 and cs in shown[ls] and ct in shown[lt]
    for li in range(2):
        weights = [abs(e["weight"]) for e in graph["edges"] if e["source"][0] == li]
        assert max(weights) == pytest.approx(1.0)
    # By hand: influence of the shown channels of body.0 on those of body.2 at x_adv, activation x gradient.
    xa = x_adv.clone().requires_grad_(True)
    a0 = model.body[0](model.normalize(xa))
    a1 = model.body[2](a0.relu())
    raw = {}
    for ct in shown[1]:
        (g,) = torch.autograd.grad(a1[0, ct].relu().mean(), a0, retain_graph=True)
        for cs in shown[0]:
            raw[cs, ct] = float((a0[0, cs].detach() * g[0, cs]).sum())
    scale = max(abs(w) for w in raw.values())
    assert scale > 0
    for e in graph["edges"]:
        if e["source"][0] == 0:
            assert e["weight"] == pytest.approx(raw[e["source"][1], e["target"][1]] / scale, abs=1e-5)


def test_graph_validation(small):
    model, x, _, agg = small
    for k in (0, -1, 2.5):
        with pytest.raises(ValueError, match="at least one channel"):
            P.pathway_graph(model, x[:1], x[:1], 0, 1, agg, k=k)
    with pytest.raises(ValueError, match="rank_by='bogus'"):
        P.pathway_graph(model, x[:1], x[:1], 0, 1, agg, rank_by="bogus")
    with pytest.raises(ValueError, match="class 10"):
        P.pathway_graph(model, x[:1], x[:1], 10, 1, agg)
    other = dataclasses.replace(agg, layers=["a", "b", "c"])
    with pytest.raises(ValueError, match="built for layers"):
        P.pathway_graph(model, x[:1], x[:1], 0, 1, other)


def same_aggregates(a, b):
    assert a.layers == b.layers and a.channels == b.channels
    for field in ("quantiles", "class_median", "top_examples"):
        for s, t in zip(getattr(a, field), getattr(b, field)):
            torch.testing.assert_close(s, t, rtol=0, atol=0, equal_nan=True)


def test_cache_built_loaded_stale(small, tmp_path):
    model, x, y, agg = small
    path = P.cache_path_for(tmp_path / "last.ckpt")
    assert path == tmp_path / "last.ckpt.pathways.pt"
    key = {"sha256": "abc", "images": "mnist test[:21]", "count": 21, "layers": ("body.0", "body.2", "body.4")}
    built, status = P.load_or_build_aggregates(model, x, y, 10, path, key, batch_size=8)
    assert status == "built" and path.is_file()
    same_aggregates(built, agg)
    loaded, status = P.load_or_build_aggregates(model, x, y, 10, path, key)
    assert status == "loaded" and loaded.key == json.loads(json.dumps(key))
    same_aggregates(loaded, agg)
    assert P.load_or_build_aggregates(model, x, y, 10, path, {**key, "sha256": "def"})[1] == "rebuilt (stale)"
    assert P.load_or_build_aggregates(model, x, y, 10, path, {**key, "sha256": "def"})[1] == "loaded"
    assert P.load_or_build_aggregates(model, x, y, 10, path, key, n_top=3)[1] == "rebuilt (stale)"
    assert os.listdir(tmp_path) == [path.name]  # the atomic writes left no temporary files


def test_cache_corrupt_files_are_rebuilt(small, tmp_path):
    model, x, y, agg = small
    path, key = tmp_path / "m.ckpt.pathways.pt", {"sha256": "abc"}
    P.load_or_build_aggregates(model, x, y, 10, path, key)
    good = path.read_bytes()
    payload = torch.load(path, weights_only=True)
    wrong_shape = {**payload, "quantiles": [torch.zeros(101, 3)] + payload["quantiles"][1:]}
    unsorted = {**payload, "quantiles": [payload["quantiles"][0].flip(0)] + payload["quantiles"][1:]}
    out_of_range = {**payload, "top_examples": [payload["top_examples"][0] + 100] + payload["top_examples"][1:]}
    missing = {k: v for k, v in payload.items() if k != "top_examples"}
    breakages = [lambda: path.write_bytes(b"\x00garbage" * 50), lambda: path.write_bytes(good[: len(good) // 2]),
                 lambda: path.write_bytes(b""), lambda: torch.save([1, 2], path)]
    breakages += [lambda p=p: torch.save(p, path) for p in (wrong_shape, unsorted, out_of_range, missing)]
    for breakage in breakages:
        breakage()
        rebuilt, status = P.load_or_build_aggregates(model, x, y, 10, path, key)
        assert status == "rebuilt (corrupt)"
        same_aggregates(rebuilt, agg)
        assert P.load_or_build_aggregates(model, x, y, 10, path, key)[1] == "loaded"
    assert os.listdir(tmp_path) == [path.name]


def writes_blocked(folder) -> bool:
    try:
        (folder / ".probe").write_bytes(b"")
    except OSError:
        return True
    (folder / ".probe").unlink()
    return False


def test_cache_in_read_only_folder(small, tmp_path):
    model, x, y, agg = small
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if not writes_blocked(folder):
            pytest.skip("chmod does not stop writes here (running as root)")
        built, status = P.load_or_build_aggregates(model, x, y, 10, folder / "c.pt", {"a": 1})
        assert status.startswith("built (not cached: ")
        same_aggregates(built, agg)
        assert os.listdir(folder) == []
    finally:
        folder.chmod(0o755)


def test_cache_where_no_folder_can_be(small, tmp_path):
    model, x, y, agg = small
    (tmp_path / "file").write_text("")  # a file where the cache's folder should be: unwritable even for root
    built, status = P.load_or_build_aggregates(model, x, y, 10, tmp_path / "file" / "c.pt", {"a": 1})
    assert status.startswith("built (not cached: ") and len(status) > len("built (not cached: )")
    same_aggregates(built, agg)


def test_file_sha256(tmp_path):
    data = os.urandom(3 << 20)
    (tmp_path / "f").write_bytes(data)
    assert P.file_sha256(tmp_path / "f", chunk_size=1 << 20) == hashlib.sha256(data).hexdigest()


def test_channel_examples(small):
    model, x, _, agg = small
    for channel in (0, 7):
        crops = P.channel_examples(model, x, agg, 0, channel)
        assert len(crops) == 6
        for crop, (idx, row, col) in zip(crops, agg.top_examples[0][channel].tolist()):
            # kernel 4, stride 2, padding 1: the unit sees input rows 2r-1 .. 2r+2, clipped to the image
            r0, c0 = max(0, 2 * row - 1), max(0, 2 * col - 1)
            assert crop.shape[0] == 1 and crop.shape[1] <= 4 and crop.shape[2] <= 4
            assert torch.equal(crop, x[idx, :, r0:min(28, 2 * row + 3), c0:min(28, 2 * col + 3)])
    crops = P.channel_examples(model, x, agg, 2, 5, n=3)
    assert len(crops) == 3 and all(c.shape[0] == 1 and c.shape[1] <= 28 and c.shape[2] <= 28 for c in crops)
    assert max(c.shape[1] for c in crops) > 4  # deeper units see more


def test_channel_curve(small):
    model, x, _, agg = small
    grid = torch.stack([x[0]] * 3 + [x[1], x[2]])
    curve = P.channel_curve(model, grid, 1, 4)
    assert len(curve) == 5 and curve[0] == curve[1] == curve[2]
    expected = manual_outputs(model, grid)[1][:, 4].relu().mean(dim=(1, 2))
    np.testing.assert_allclose(curve, expected.numpy(), rtol=1e-5)
    pct = P.channel_curve(model, grid, 1, 4, agg)
    assert len(pct) == 5 and pct[0] == pct[1] == pct[2] and all(0 <= v <= 100 for v in pct)
    assert not any(math.isnan(v) for v in pct)
