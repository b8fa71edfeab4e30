"""The explorer's server and session, through Flask's test client (no browser): what each request returns, that the
ε grid is what the slider needs, and that bad requests and uploads get a message while the server keeps serving.
tests/test_explore_browser.py drives the page itself in Chromium."""
import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from robust_train.cli import main as cli_main
from robust_train.explore.images import MAX_UPLOAD_BYTES, UploadError, decode_upload

pytestmark = pytest.mark.usefixtures("one_thread")
POINTS = 9


@pytest.fixture(scope="module")
def explorer(explore_checkpoints):
    from robust_train.explore.session import Explorer

    a, b = explore_checkpoints
    return Explorer(str(a), str(b), n=60, points=POINTS, log=lambda m: None)


@pytest.fixture(scope="module")
def client(explorer):
    from robust_train.explore.server import create_app

    return create_app(explorer).test_client()


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_uri(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))


def grid(client, **params):
    query = "&".join(f"{k}={v}" for k, v in {"image": "t0", "attack": "fgsm", "map": "cam", **params}.items())
    response = client.get(f"/api/grid?{query}")
    assert response.status_code == 200, response.json
    return response.json


def test_info_lists_attacks_maps_and_compare(client):
    info = client.get("/api/info").json
    assert [a["name"] for a in info["attacks"]] == ["fgsm", "pgd", "pgd_target", "aai", "deepfool"]
    assert info["model"]["maps"][:2] == ["cam", "grad_cam"] and "saliency" in info["model"]["maps"]
    assert "prototype" not in info["model"]["maps"]  # a plain CNN has no prototypes
    assert info["compare"]["path"].endswith("b.ckpt") and info["classes"] == [str(d) for d in range(10)]
    assert info["points"] == POINTS and info["eps_max"] == pytest.approx(0.4)


def test_gallery_filters(client, explorer):
    everything = client.get("/api/images").json
    assert everything["count"] == 60 and everything["images"][0]["id"] == "t0"
    sevens = client.get("/api/images?class=7").json
    assert sevens["count"] == int((explorer.gallery.y == 7).sum()) and all(i["label"] == 7 for i in sevens["images"])
    wrong = client.get("/api/images?show=misclassified").json
    assert all(i["pred"] != i["label"] for i in wrong["images"])
    fragile = client.get("/api/images?show=fragile").json
    assert fragile["count"] > 0
    assert all(0 < i["broken_eps"] <= explorer.small_eps for i in fragile["images"])
    assert client.get("/api/images?show=everything").status_code == 400


def test_fgsm_grid_is_the_slider(client, explorer):
    g = grid(client)
    a = g["models"]["a"]
    assert g["eps"][0] == 0 and g["eps"][-1] == pytest.approx(0.4) and len(g["eps"]) == POINTS
    assert len(g["adversarial"]) == len(a["top5"]) == len(a["map"]["adversarial"]) == POINTS
    assert a["map"]["tau"][0] == pytest.approx(1.0)  # x' = x at ε 0
    assert g["linf"][0] == 0 and all(l <= e + 1e-6 for l, e in zip(g["linf"], g["eps"]))
    assert g["linf"][-1] == pytest.approx(0.4, abs=1e-6)  # FGSM moves (almost) every pixel by ε
    assert a["top5"][0][0]["class"] == g["original"] == g["label"] == int(explorer.gallery.y[0])
    assert a["p_original"][-1] < a["p_original"][0] - 0.5  # the attack works on a standard model
    assert a["map"]["adversarial"][0] != a["map"]["adversarial"][-1]
    assert min(t for t in a["map"]["tau"] if t is not None) < 0.9
    # What the page shows is the grid: the PNG of x' is x' itself (to 1/255).
    _, _, held = explorer.adversarial("t0", explorer.choice("fgsm"))
    shown = decode_uri(g["adversarial"][-1]).astype(np.float32) / 255
    assert np.abs(shown - held.x_adv[-1, 0].cpu().numpy()).max() <= 1 / 255 + 1e-6
    assert decode_uri(a["map"]["clean"]).shape == (112, 112, 4)
    assert decode_uri(g["saliency_difference"][3]).shape == (112, 112, 4)
    b = g["models"]["b"]
    assert len(b["top5"]) == POINTS and b["map"]["name"] == "cam" and b["map"]["tau"][0] == pytest.approx(1.0)


@pytest.mark.parametrize("attack", ["pgd", "pgd_target", "aai"])
def test_iterative_attacks_stay_in_the_ball(client, explorer, attack):
    g = grid(client, attack=attack, steps=10, target=3)
    assert all(l <= e + 1e-6 for l, e in zip(g["linf"], g["eps"]))
    a = g["models"]["a"]
    if attack == "pgd_target":
        assert g["target"] == 3
        assert a["pred"][-1] == 3  # 0.4 is plenty to reach any class of a standard model
    elif attack == "pgd":
        assert a["pred"][-1] != g["original"]
    else:  # AAI moves the map, not necessarily the label
        assert a["map"]["tau"][-1] < 0.9


def test_deepfool_walks_along_its_minimal_perturbation(client):
    g = grid(client, attack="deepfool")
    a = g["models"]["a"]
    assert g["norm"] == "l2" and g["minimal_norm"] > 0
    assert g["eps"][-1] == pytest.approx(2 * g["minimal_norm"], rel=1e-5)
    assert a["pred"][0] == g["original"] and a["pred"][-1] != g["original"]
    half = (POINTS - 1) // 2
    assert g["l2"][half] <= g["minimal_norm"] + 1e-4


def test_map_class_and_map_choice(client):
    g = grid(client, map="saliency", **{"class": 2})
    assert g["map_class"] == 2 and g["models"]["a"]["map"]["name"] == "saliency"
    assert client.get("/api/grid?image=t0&attack=fgsm&map=prototype").status_code == 400
    assert "not available" in client.get("/api/grid?image=t0&attack=fgsm&map=prototype").json["error"]


@pytest.mark.parametrize("query, message", [
    ("image=t999&attack=fgsm&map=cam", "out of range"),
    ("image=u77&attack=fgsm&map=cam", "unknown image"),
    ("image=t0&attack=cw&map=cam", "unknown attack"),
    ("image=t0&attack=pgd&steps=0&map=cam", "out of range"),
    ("image=t0&attack=pgd_target&target=10&map=cam", "out of range"),
    ("image=t0&attack=fgsm&map=cam&class=x", "whole number"),
])
def test_bad_requests_are_400_with_a_message(client, query, message):
    response = client.get(f"/api/grid?{query}")
    assert response.status_code == 400 and message in response.json["error"]


def test_pathways_have_k_nodes_per_layer(client):
    for k in (1, 4):
        graph = client.get(f"/api/pathways?image=t0&attack=fgsm&map=cam&eps_index={POINTS - 1}&k={k}").json
        assert [len(layer["nodes"]) for layer in graph["layers"]] == [k, k, k]
        assert graph["original"] == 7 and graph["target_class"] != 7
    assert client.get("/api/pathways?image=t0&attack=fgsm&map=cam&eps_index=99").status_code == 400
    assert client.get("/api/pathways?image=t0&attack=fgsm&map=cam&rank_by=size").status_code == 400
    at_zero = client.get("/api/pathways?image=t0&attack=fgsm&map=cam&eps_index=0&k=3").json
    assert all(n["effect"] == "unchanged" for layer in at_zero["layers"] for n in layer["nodes"])


def test_channel_detail(client):
    detail = client.get("/api/channel?image=t0&attack=fgsm&map=cam&layer=0&channel=2").json
    assert len(detail["curve"]) == POINTS and all(0 <= v <= 100 for v in detail["curve"])
    assert 1 <= len(detail["examples"]) <= 6
    assert decode_uri(detail["examples"][0]).shape[0] <= 4  # first conv: kernel 4, so a patch of at most 4×4


def test_uploads(client, explorer):
    digit = (explorer.gallery.x[1, 0].numpy() * 255).astype(np.uint8)
    big = np.kron(digit, np.ones((3, 3), np.uint8))  # 84×84: resized to the model's 28×28
    response = client.post("/api/upload", data={"image": (io.BytesIO(png_bytes(big)), "digit.png")})
    assert response.status_code == 200
    image_id = response.json["id"]
    g = grid(client, image=image_id)
    assert g["label"] is None and g["original"] == int(explorer.gallery.y[1])  # unknown label: the prediction
    bad = [(b"not an image at all", "not a readable PNG or JPEG"),
           (png_bytes(np.zeros((20, 20, 3), np.uint8)), "convert it to grayscale"),
           (b"\x89PNG" + b"\0" * (MAX_UPLOAD_BYTES + 100_000), "MB")]
    for data, message in bad:
        response = client.post("/api/upload", data={"image": (io.BytesIO(data), "x.png")})
        assert response.status_code in (400, 413) and message in response.json["error"], response.json
        assert grid(client, image=image_id)["label"] is None  # and the server keeps serving
    assert client.post("/api/upload", data={}).status_code == 400


def test_decode_upload_rejects_huge_images():
    image = Image.new("L", (5000, 4000))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    with pytest.raises(UploadError, match="5000×4000"):
        decode_upload(buffer.getvalue(), 1, (28, 28))
    x = decode_upload(png_bytes(np.full((10, 10), 255, np.uint8)), 1, (28, 28))
    assert x.shape == (1, 1, 28, 28) and torch.allclose(x, torch.ones_like(x))


def test_headers_forbid_other_origins(client):
    response = client.get("/")
    assert response.status_code == 200 and b"explorer.js" in response.data
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "http" not in csp
    page = response.data.decode()
    assert "http://" not in page and "https://" not in page
    for name in ("explorer.js", "explorer.css"):
        text = client.get(f"/static/{name}").data.decode()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text


def test_class_statistics_cached_beside_the_checkpoint(explore_checkpoints, explorer):
    from robust_train.explore.pathways import cache_path_for

    assert cache_path_for(explore_checkpoints[0]).is_file()


@pytest.mark.parametrize("args, message", [
    (["--ckpt", "missing.ckpt"], "not found"),
    (["--ckpt", "{a}", "--compare", "missing.ckpt"], "not found"),
    (["--ckpt", "{a}", "--port", "70000"], "--port"),
    (["--ckpt", "{a}", "--eps-max", "2"], "--eps-max"),
    (["--ckpt", "{a}", "--points", "1"], "--points"),
    (["--ckpt", "{a}", "--n", "0"], "--n"),
])
def test_cli_refuses_bad_input_in_one_line(explore_checkpoints, capsys, args, message):
    args = [a.format(a=explore_checkpoints[0]) for a in args]
    assert cli_main(["explore", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_compare_must_take_the_same_inputs(explore_checkpoints, tmp_path, capsys):
    from robust_train.checkpoint import checkpoint_metadata, save_classifier
    from robust_train.models import create_model

    spec = {"name": "cifar10", "num_classes": 10, "in_channels": 3, "image_size": [32, 32], "mean": [0.5] * 3,
            "std": [0.25] * 3, "eps_grid": [0.0, 8 / 255], "class_names": None}
    other = tmp_path / "cifar.ckpt"
    save_classifier(create_model("small_cnn", in_channels=3, num_classes=10),
                    checkpoint_metadata("standard", "small_cnn", {}, spec, 8 / 255), other)
    assert cli_main(["explore", "--ckpt", str(explore_checkpoints[0]), "--compare", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "takes other inputs" in err and "in_channels" in err


def test_cli_without_the_extra_says_how_to_install(explore_checkpoints, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "flask", None)
    monkeypatch.delitem(__import__("sys").modules, "robust_train.explore.server", raising=False)
    assert cli_main(["explore", "--ckpt", str(explore_checkpoints[0])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install -e ".[explore]"' in err


def test_corrupt_checkpoint_refused(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"garbage")
    assert cli_main(["explore", "--ckpt", str(bad)]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_json_has_no_nan(client):
    text = client.get("/api/grid?image=t0&attack=fgsm&map=grad_cam").data.decode()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))


def test_image_folder_maps_folder_names_to_classes(tmp_path, explorer):
    from robust_train.errors import ConfigError
    from robust_train.explore.gallery import folder_images

    for name, value in (("3", 60), ("7", 200)):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("RGB", (40, 30), (value, value, value)).save(tmp_path / name / f"{i}.png")
    gallery = folder_images(str(tmp_path), 10, explorer.spec)
    assert gallery.x.shape == (4, 1, 28, 28) and gallery.y.tolist() == [3, 3, 7, 7]
    assert gallery.x[0].max().item() == pytest.approx(60 / 255, abs=1 / 255)  # RGB made grayscale, resized
    (tmp_path / "cat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "0.png")
    with pytest.raises(ConfigError, match="3 class folders and the model 10 classes"):
        folder_images(str(tmp_path), 10, explorer.spec)
    with pytest.raises(ConfigError, match="not a folder"):
        folder_images(str(tmp_path / "missing"), 10, explorer.spec)
