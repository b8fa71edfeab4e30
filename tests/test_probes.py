"""Shape-bias probes (Zhang & Zhu, ICML 2019): the transforms (saturation, patch shuffling) and the `probes` section
of `evaluate` end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from robust_train.errors import ConfigError
from robust_train.evaluate.probes import PROBES, PatchShuffle, Saturation

pytestmark = pytest.mark.usefixtures("one_thread")


def images(n=3, c=1, side=28, seed=0):
    return torch.rand(n, c, side, side, generator=torch.Generator().manual_seed(seed))


def distinct_images(n=2, c=1, side=28):
    """Every pixel of every image a different value, so a patch is found again by its values alone."""
    return torch.arange(n * c * side * side, dtype=torch.float32).reshape(n, c, side, side) / (n * c * side * side)


def shuffle(x, k, seed=0):
    return PROBES.get("patch_shuffle")()(x, k, torch.Generator().manual_seed(seed))


def cells(side, k):
    """(start, stop) of each row (or column) of patches: the first side mod k one pixel larger."""
    base, extra = divmod(side, k)
    sizes = [base + 1] * extra + [base] * (k - extra)
    starts = [sum(sizes[:i]) for i in range(k)]
    return [(s, s + n) for s, n in zip(starts, sizes)]


def patches(image, k):
    """{(row cell, col cell): patch} of one (C, H, W) image."""
    rows, cols = cells(image.shape[-2], k), cells(image.shape[-1], k)
    return {(i, j): image[:, r0:r1, c0:c1] for i, (r0, r1) in enumerate(rows) for j, (c0, c1) in enumerate(cols)}


# ------------------------------------------------------------------------------------------------------ saturation
def test_saturation_at_p2_is_the_identity():
    x = images()
    assert PROBES.get("saturation") is Saturation
    assert torch.allclose(Saturation()(x, 2), x, atol=1e-6, rtol=0)
    assert torch.allclose(Saturation()(x, 2.0), x, atol=1e-6, rtol=0)


def test_saturation_at_p1024_binarises():
    x = images(n=8)
    out = Saturation()(x, 1024)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    near_edge = torch.minimum(out, 1 - out) < 0.01
    assert near_edge.float().mean() > 0.99
    assert ((out > 0.5) == (x > 0.5)).all()  # each pixel goes to the side of ½ it was on
    assert (Saturation()(x, 1) - 0.5).abs().mean() < (x - 0.5).abs().mean()  # p < 2 desaturates instead


def test_saturation_is_monotone_in_v_and_in_p():
    v = (torch.arange(1001, dtype=torch.float32) / 1000).reshape(1, 1, 1, -1)  # 0.5 exactly at 500
    previous = None
    for p in (1, 2, 4, 8, 16, 64, 1024):
        out = Saturation()(v, p)
        assert (out.diff(dim=-1) >= 0).all(), p  # a brighter pixel stays at least as bright
        assert out[..., 0].item() == pytest.approx(0) and out[..., -1].item() == pytest.approx(1)
        assert out[..., 500].item() == pytest.approx(0.5)
        distance = (out - 0.5).abs()
        if previous is not None:  # larger p: every pixel at least as far from ½
            assert (distance >= previous - 1e-6).all(), p
        previous = distance
    assert (previous.flatten()[[100, 900]] > 0.49).all()  # p = 1024: 0.1 and 0.9 are (almost) 0 and 1


# --------------------------------------------------------------------------------------------------- patch shuffle
@pytest.mark.parametrize("k", [2, 4, 7, 8, 28])
def test_patch_shuffle_keeps_every_images_pixels(k):
    x = images(n=4)
    out = shuffle(x, k)
    assert out.shape == x.shape
    for a, b in zip(out, x):  # per image, not pooled over the batch
        assert torch.equal(a.flatten().sort().values, b.flatten().sort().values)


@pytest.mark.parametrize("k", [2, 4, 7])
def test_patch_shuffle_moves_whole_patches_where_k_divides_the_side(k):
    x = distinct_images(n=3)
    out = shuffle(x, k)
    assert not torch.equal(out, x)
    for a, b in zip(out, x):
        sources = {tuple(p.flatten().tolist()): cell for cell, p in patches(b, k).items()}
        found = [sources.get(tuple(p.flatten().tolist())) for p in patches(a, k).values()]
        assert None not in found  # every patch of the output is a whole patch of the same image ...
        assert sorted(found) == sorted(sources.values())  # ... and each source patch is used once


def test_patch_shuffle_with_uneven_k_keeps_shapes_and_the_grid_of_sizes():
    x = distinct_images(n=2)
    out = shuffle(x, 8)  # 28 = 4 + 4 + 4 + 4 + 3 + 3 + 3 + 3
    assert out.shape == x.shape and not torch.equal(out, x)
    for a, b in zip(out, x):
        assert torch.equal(a.flatten().sort().values, b.flatten().sort().values)
        by_values = {tuple(p.flatten().tolist()): p.shape for p in patches(b, 8).values()}
        for cell, p in patches(a, 8).items():
            assert by_values.get(tuple(p.flatten().tolist())) == p.shape, cell  # a patch of its own size


def test_patch_shuffle_moves_the_channels_together():
    base = distinct_images(n=2, c=1, side=32)
    x = torch.cat([base, base + 1, base + 2], dim=1) / 3  # channel c = channel 0 + c/3 at every pixel
    out = shuffle(x, 4)
    assert out.shape == (2, 3, 32, 32) and not torch.equal(out, x)
    assert torch.allclose(out[:, 1] - out[:, 0], torch.full_like(out[:, 0], 1 / 3), atol=1e-6)
    assert torch.allclose(out[:, 2] - out[:, 0], torch.full_like(out[:, 0], 2 / 3), atol=1e-6)


def test_patch_shuffle_is_reproducible_from_the_generator():
    x = images(n=6)
    assert torch.equal(shuffle(x, 4, seed=3), shuffle(x, 4, seed=3))
    assert not torch.equal(shuffle(x, 4, seed=3), shuffle(x, 4, seed=4))
    out = shuffle(x, 4, seed=3)
    assert not torch.equal(out[0], out[1]) or not torch.equal(x[0], x[1])  # one permutation per image ...
    perms = [[next(c for c, q in patches(x[i], 4).items() if torch.equal(p, q)) for p in patches(out[i], 4).values()]
             for i in range(len(x))]
    assert len({tuple(p) for p in perms}) > 1  # ... not one for the whole batch


@pytest.mark.parametrize("level", [0, -1, math.nan, math.inf, "two", True])
def test_saturation_levels_out_of_range_are_refused(level):
    with pytest.raises(ConfigError, match="saturation level .* is out of range"):
        Saturation().check_level(level)


@pytest.mark.parametrize("level,side", [(1, None), (0, None), (1.5, None), (-4, None), (math.inf, None),
                                        ("k", None), (True, None), (29, 28), (33, 32)])
def test_patch_levels_out_of_range_are_refused(level, side):
    with pytest.raises(ConfigError, match="patch_shuffle level .* is out of range"):
        PatchShuffle().check_level(level, side)


def test_levels_in_range_are_accepted():
    assert Saturation().check_level(2) == 2.0 and Saturation().check_level("1024") == 1024.0
    assert PatchShuffle().check_level(8.0, 28) == 8 and PatchShuffle().check_level(28, 28) == 28
    assert isinstance(PatchShuffle().check_level(4.0), int)


# --------------------------------------------------------------------------------------------- evaluate, end to end
def read_json(path):
    def refuse(name):
        raise ValueError(f"{name} in report.json")

    return json.loads(path.read_text(), parse_constant=refuse)


FLAGS = ["--n", "40", "--eps", "0,0.1", "--attacks", "fgsm", "--stability-attacks", "none", "--no-checks"]


@pytest.fixture(scope="module")
def probed(robustish_checkpoint, tmp_path_factory):
    """evaluate --probes (both) at saturation 2,1024 and shuffling 2,4,8, with pictures and an active (fake) wandb
    run: (report, folder, stdout, what wandb was given)."""
    import contextlib
    import io
    import sys
    import types

    from robust_train.cli import main as cli_main

    out = tmp_path_factory.mktemp("probes") / "report"
    printed, logged = io.StringIO(), []
    fake = types.SimpleNamespace(run=types.SimpleNamespace(log=logged.append), Table=lambda columns, data: None,
                                 Image=lambda array, caption=None: ("image", array.shape, caption))
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setitem(sys.modules, "wandb", fake)
        rc = cli_main(["evaluate", "--ckpt", str(robustish_checkpoint), *FLAGS, "--probes", "--saturation-levels",
                       "2,1024", "--shuffle-levels", "2,4,8", "--out", str(out)])
    assert rc == 0
    return read_json(out / "report.json"), out, printed.getvalue(), logged


def test_report_has_a_row_per_probe_and_level(probed):
    report, _, printed, _ = probed
    rows = report["probes"]
    assert [(r["probe"], r["level"]) for r in rows] == [
        ("clean", None), ("saturation", 2.0), ("saturation", 1024.0), ("patch_shuffle", 2), ("patch_shuffle", 4),
        ("patch_shuffle", 8)]
    assert all(set(r) == {"probe", "level", "accuracy"} for r in rows)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert all(round(r["accuracy"] * 40) == pytest.approx(r["accuracy"] * 40) for r in rows)  # a count of 40
    by = {(r["probe"], r["level"]): r["accuracy"] for r in rows}
    assert by[("clean", None)] == report["clean_accuracy"] > 0.5
    assert by[("saturation", 2.0)] == report["clean_accuracy"]  # p = 2 is the image itself
    # 64 patches of 3-4 pixels shuffled leave no digit: far below clean (chance is 0.1)
    assert by[("patch_shuffle", 8)] <= report["clean_accuracy"] - 0.3
    settings = report["probe_settings"]
    assert settings["seed"] == 0 and settings["n"] == 40 and settings["image_size"] == [28, 28]
    assert settings["levels"] == {"saturation": [2.0, 1024.0], "patch_shuffle": [2, 4, 8]}
    assert settings["picture"] == "probes.png" and settings["seconds"] >= 0
    assert "Shape-bias probes" in printed and "| patch_shuffle | k = 8 |" in printed
    assert f"| saturation | p = 2 | {report['clean_accuracy']:.4f} | +0.0000 |" in printed


def test_probes_png_is_written_listed_linked_and_logged(probed):
    report, out, printed, logged = probed
    assert sorted(report["pictures"]) == ["gallery.png", "probes.png", "transition.png"]  # joins, replaces none
    with Image.open(out / "probes.png") as image:
        image.verify()
        assert image.format == "PNG"
    with Image.open(out / "probes.png") as image:
        width, height = image.size
    assert width > 2 * height  # two rows of 1 plot + 4 images
    md = (out / "report.md").read_text()
    assert "## Shape-bias probes" in md and "](probes.png)" in md and "| saturation | p = 1024 |" in md
    assert "](probes.png)" not in printed and "probes.png" in printed  # named as written, not linked
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    (payload,) = logged  # one wandb log call, with every picture of the report
    kind, shape, caption = payload["evaluate/probes"]
    assert kind == "image" and caption == "probes.png" and shape == (height, width, 3)
    assert {"evaluate/gallery", "evaluate/transition"} <= set(payload)


def test_one_probe_without_pictures_gives_the_same_numbers(probed, robustish_checkpoint, tmp_path, capsys):
    from robust_train.cli import main as cli_main

    report, _, _, _ = probed
    out = tmp_path / "report"
    rc = cli_main(["evaluate", "--ckpt", str(robustish_checkpoint), *FLAGS, "--probes", "saturation",
                   "--saturation-levels", "1024,2", "--no-pictures", "--out", str(out)])
    assert rc == 0
    again = read_json(out / "report.json")
    assert {r["probe"] for r in again["probes"]} == {"clean", "saturation"}
    assert [r["level"] for r in again["probes"]] == [None, 1024.0, 2.0]
    assert sorted(map(json.dumps, again["probes"])) == sorted(json.dumps(r) for r in report["probes"]
                                                              if r["probe"] in ("clean", "saturation"))
    assert again["probe_settings"]["picture"] is None and again["pictures"] == []
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]
    assert "Shape-bias probes" in capsys.readouterr().out


def test_shuffling_does_not_depend_on_the_batch_size(probed, robustish_checkpoint):
    from robust_train.evaluate import evaluate

    report, _, _, _ = probed
    again = evaluate(str(robustish_checkpoint), ["fgsm"], [0.0], n=40, batch_size=7, probes=["patch_shuffle"],
                     shuffle_levels=[8, 2], stability_attacks=(), checks=False, pictures=False, progress=False)
    ours = {r["level"]: r["accuracy"] for r in again["probes"] if r["probe"] == "patch_shuffle"}
    theirs = {r["level"]: r["accuracy"] for r in report["probes"] if r["probe"] == "patch_shuffle"}
    assert ours == {2: theirs[2], 8: theirs[8]}
    other_seed = evaluate(str(robustish_checkpoint), ["fgsm"], [0.0], n=40, probes=["patch_shuffle"],
                          shuffle_levels=[4], seed=1, stability_attacks=(), checks=False, pictures=False,
                          progress=False)
    assert other_seed["probe_settings"]["seed"] == 1
    assert 0.0 <= other_seed["probes"][1]["accuracy"] <= 1.0


def test_no_probes_keeps_the_defaults(robustish_checkpoint):
    from robust_train.evaluate import evaluate

    report = evaluate(str(robustish_checkpoint), ["fgsm"], [0.0], n=8, stability_attacks=(), checks=False,
                      pictures=False, progress=False)
    assert report["probes"] == [] and report["probe_settings"] == {}


def test_a_patch_level_above_the_image_side_fails_before_the_attacks(robustish_checkpoint, tmp_path, capsys,
                                                                     monkeypatch):
    from robust_train.evaluate.sections import suite
    from robust_train.cli import main as cli_main

    monkeypatch.setattr(suite, "correct_under", lambda *a, **k: pytest.fail("an attack ran before the check"))
    rc = cli_main(["evaluate", "--ckpt", str(robustish_checkpoint), *FLAGS, "--probes", "--shuffle-levels", "4,29",
                   "--out", str(tmp_path / "r")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "%|" not in ln]
    assert rc == 2
    assert len(err) == 1 and "patch_shuffle level 29" in err[0] and "only 28 pixels" in err[0], err
    assert not (tmp_path / "r").exists()


def test_text_is_a_table_and_empty_without_rows():
    from robust_train.evaluate.sections.probes import Probes

    assert Probes().text({"probes": [], "probe_settings": {}}) == ""
    text = Probes().text({"probes": [{"probe": "clean", "level": None, "accuracy": 0.9},
                                     {"probe": "saturation", "level": 64.0, "accuracy": 0.75},
                                     {"probe": "patch_shuffle", "level": 4, "accuracy": None}],
                          "probe_settings": {"n": 10, "seed": 0}})
    assert "| clean |  | 0.9000 |  |" in text
    assert "| saturation | p = 64 | 0.7500 | -0.1500 |" in text
    assert "| patch_shuffle | k = 4 | – | |" in text
