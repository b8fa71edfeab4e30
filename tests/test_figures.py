"""Report figures: the CAM overlay puts red where the map is hot and never NaN; the gallery and the transition
figure have the promised layout, write a PNG that opens at the expected size, leave the model's mode alone; the
transition frames stay in the ε-ball and [0, 1] and move the prediction towards the target.

Models are small_cnn on MNIST-shaped inputs; the transition uses one trained for a few dozen steps on real (bundled)
MNIST so that "7 -> target" means something. The whole file runs in a few seconds on one thread.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image

from robust_train.attacks import create_attack
from robust_train.data import MNISTData
from robust_train.figures import DPI, PANEL_INCHES, attack_gallery, cam_overlay, figure_to_array, transition_figure
from robust_train.models import create_model

MNIST_NAMES = [str(d) for d in range(10)]


pytestmark = pytest.mark.usefixtures("one_thread")


def mnist_cnn(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("small_cnn", num_classes=10, in_channels=1)


@pytest.fixture(scope="module")
def trained_cnn_and_data():
    """small_cnn after 60 Adam steps on 2,048 bundled MNIST test images (cheap, and enough to be mostly right)."""
    x, y = MNISTData().test_tensors(2048 + 16)
    model = mnist_cnn(1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(0, 2048, (128,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, x[2048:], y[2048:]


def expected_png_size(rows: int, cols: int) -> tuple[int, int]:
    return round(cols * PANEL_INCHES * DPI), round(rows * PANEL_INCHES * DPI)


# --------------------------------------------------------------------------------------------------- overlay
def test_cam_overlay_is_rgb_in_unit_range():
    out = cam_overlay(torch.rand(1, 28, 28), torch.randn(7, 7))
    assert out.shape == (28, 28, 3) and out.dtype.kind == "f"
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert cam_overlay(torch.rand(3, 32, 32), torch.randn(8, 8)).shape == (32, 32, 3)


def test_hot_cam_cell_is_reddest_in_its_quadrant():
    cam_map = torch.zeros(7, 7)
    cam_map[0, 0] = 5.0  # top-left corner hot, everything else cold
    out = cam_overlay(torch.zeros(1, 28, 28), cam_map)  # black image: the colour is the heat map's alone
    redness = out[..., 0] - out[..., 2]
    quadrant_means = [redness[:14, :14].mean(), redness[:14, 14:].mean(), redness[14:, :14].mean(),
                      redness[14:, 14:].mean()]
    assert int(np.argmax(quadrant_means)) == 0
    r, g, b = out[0, 0]
    assert r > g and r > b  # the hottest pixel itself is red
    r, g, b = out[27, 27]
    assert b > r and b > g  # a cold pixel is blue


def test_constant_cam_gives_no_nan():
    image = torch.rand(1, 28, 28)
    for cam_map in (torch.zeros(7, 7), torch.full((7, 7), 3.0)):
        out = cam_overlay(image, cam_map)
        assert np.isfinite(out).all() and 0.0 <= out.min() and out.max() <= 1.0


# --------------------------------------------------------------------------------------------------- gallery
def test_attack_gallery_layout_png_and_mode(tmp_path):
    model = mnist_cnn()
    model.train()  # left in train mode on purpose: the gallery must hand it back that way
    torch.manual_seed(0)
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([7, 2, 1])
    eps_list = [0, 0.1, 0.3]
    path = tmp_path / "sub" / "gallery.png"

    fig = attack_gallery(model, x, y, eps_list, lambda eps: create_attack("pgd", eps=eps, steps=3),
                         MNIST_NAMES, path=path)

    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2 * 3 * 3
    assert all(m.training for m in model.modules())
    assert fig.axes[0].get_title().startswith("ε=0 · pred ")
    assert fig.axes[1].get_title().startswith("ε=0.1 · pred ")
    assert [p.name for p in path.parent.iterdir()] == ["gallery.png"]  # no temporary file left behind
    with Image.open(path) as im:
        assert im.format == "PNG"
        width, height = im.size
    exp_w, exp_h = expected_png_size(2 * 3, 3)
    assert abs(width - exp_w) <= 2 and abs(height - exp_h) <= 2


def test_gallery_titles_are_red_exactly_when_wrong():
    model = mnist_cnn()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = torch.stack([pred[0], (pred[1] + 1) % 10])  # first right, second wrong
    fig = attack_gallery(model, x, y, [0], lambda eps: None)
    axes = np.asarray(fig.axes).reshape(4, 1)
    assert axes[0, 0].title.get_color() == "black"
    assert axes[2, 0].title.get_color() == "tab:red"


def test_failed_save_keeps_the_old_png_and_leaves_no_temporary(tmp_path, monkeypatch):
    model = mnist_cnn()
    path = tmp_path / "gallery.png"
    path.write_bytes(b"old")

    def broken_savefig(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        attack_gallery(model, torch.rand(1, 1, 28, 28), torch.tensor([0]), [0], lambda eps: None, path=path)
    assert [p.name for p in tmp_path.iterdir()] == ["gallery.png"] and path.read_bytes() == b"old"


# --------------------------------------------------------------------------------------------------- transition
def test_transition_frames_stay_in_ball_and_move_to_target(trained_cnn_and_data, tmp_path):
    model, x_all, y_all = trained_cnn_and_data
    x, y = x_all[:1], y_all[:1]
    target, eps, n_frames = (int(y) + 2) % 10, 0.3, 4
    path = tmp_path / "transition.png"

    fig, frames = transition_figure(model, x, y, target, eps=eps, steps=15, class_names=MNIST_NAMES,
                                    n_frames=n_frames, path=path)

    assert isinstance(fig, Figure) and len(fig.axes) == 3 * n_frames
    assert frames.shape == (n_frames, 1, 28, 28)
    assert torch.equal(frames[0], x[0])
    assert (frames - x).abs().max() <= eps + 1e-6
    assert frames.min() >= 0 and frames.max() <= 1
    assert not model.training
    with torch.no_grad():
        p_target = model(frames).softmax(1)[:, target]
    assert p_target[-1] >= p_target[0]
    assert fig.axes[0].get_title().startswith("step 0 · pred ")
    assert fig.axes[n_frames - 1].get_title().startswith("step 15 · pred ")
    with Image.open(path) as im:
        width, height = im.size
    exp_w, exp_h = expected_png_size(3, n_frames)
    assert abs(width - exp_w) <= 2 and abs(height - exp_h) <= 2


def test_transition_rejects_a_batch():
    model = mnist_cnn()
    with pytest.raises(ValueError, match="one image"):
        transition_figure(model, torch.rand(2, 1, 28, 28), torch.tensor([1, 2]), target=3, eps=0.1, steps=2)


# --------------------------------------------------------------------------------------------------- array
def test_figure_to_array_shape_and_dtype():
    model = mnist_cnn()
    fig = attack_gallery(model, torch.rand(1, 1, 28, 28), torch.tensor([0]), [0], lambda eps: None)
    arr = figure_to_array(fig)
    exp_w, exp_h = expected_png_size(2, 1)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    assert abs(arr.shape[0] - exp_h) <= 2 and abs(arr.shape[1] - exp_w) <= 2
    assert arr.min() < arr.max()  # something was drawn
