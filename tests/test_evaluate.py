"""The evaluation: ε parsing, per-example worst case, agreement of the default suite with AutoAttack, and the
interpretation-map stability rows and pictures of the report."""
from __future__ import annotations

import copy
import json
import sys
import types

import pytest
import torch
from PIL import Image
from torch import nn

import robust_train.evaluate.evaluation as evaluation_module
from robust_train.checkpoint import classifier_from_checkpoint, read_checkpoint
from robust_train.cli import main as cli_main
from robust_train.data import MNISTData
from robust_train.errors import ConfigError
from robust_train.evaluate import DEFAULT_SUITE, evaluate, json_safe, parse_eps, write_report
from robust_train.evaluate.sections.stability import Stability, measure_stability, stability_rows
from robust_train.evaluate.sections.suite import Suite
from robust_train.evaluate.wandb_log import log_to_wandb
from robust_train.interpret.cam import cam

ROW_KEYS = {"map", "attack", "eps", "kendall_tau", "topk_intersection", "n_used", "n_total", "n_constant", "steps",
            "step_size"}


def test_parse_eps_reads_fractions_without_eval():
    assert parse_eps("0, 0.1,8/255") == pytest.approx([0.0, 0.1, 8 / 255])
    for bad in ("abc", "__import__('os')", "1/0"):
        with pytest.raises(ConfigError):
            parse_eps(bad)
    with pytest.raises(ConfigError):
        parse_eps("0.5,1.5")


def test_worst_case_is_per_example_and_below_every_attack(robustish_checkpoint):
    report = evaluate(str(robustish_checkpoint), ["fgsm", "pgd", "pgd_margin"], [0.0, 0.1, 0.2], n=100,
                      steps=20, progress=False, stability_attacks=())
    assert report["robust_accuracy"]["0"] == pytest.approx(report["clean_accuracy"])
    for eps in ("0.1", "0.2"):
        accs = [r["accuracy"] for r in report["attacks"] if f"{r['eps']:g}" == eps]
        worst = report["robust_accuracy"][eps]
        assert worst <= min(accs) + 1e-9
        assert worst >= report["clean_accuracy"] - sum(report["clean_accuracy"] - a for a in accs) - 1e-9
    assert 0.05 < report["robust_accuracy"]["0.1"] < report["clean_accuracy"]
    assert report["robust_accuracy"]["0.2"] <= report["robust_accuracy"]["0.1"]
    assert "worst case" in Suite().text(report)
    # a partly robust model trained without masking raises no gradient-masking flag (checks at its training ε)
    assert report["checks_settings"] == {**report["checks_settings"], "eps": 0.1, "n": 100}
    assert report["masking_suspected"] is False, [r["detail"] for r in report["checks"] if not r["passed"]]


def test_default_suite_agrees_with_autoattack(robustish_checkpoint):
    pytest.importorskip("pyautoattack")
    ours = evaluate(str(robustish_checkpoint), DEFAULT_SUITE, [0.1], n=100, progress=False, stability_attacks=(),
                    checks=False)
    aa = evaluate(str(robustish_checkpoint), ["autoattack"], [0.1], n=100, progress=False, stability_attacks=(),
                  checks=False)
    ours_acc, aa_acc = ours["robust_accuracy"]["0.1"], aa["robust_accuracy"]["0.1"]
    assert 0.05 < aa_acc < 0.95, "the model must be partly robust for the comparison to mean anything"
    # 100 images: one image is 1 point; bench/mnist_pgd.py checks 1.5 points on 1,000 images.
    assert abs(ours_acc - aa_acc) <= 0.03, (ours_acc, aa_acc)


# ------------------------------------------------------------------------------------ map stability and pictures
def strict_json(text: str):
    """json.loads that refuses NaN and ±Infinity, which json.dumps writes by default but JSON does not allow."""
    def refuse(name):
        raise ValueError(f"{name} in report.json")

    return json.loads(text, parse_constant=refuse)


def test_report_has_map_stability_rows_and_pictures(robustish_checkpoint, tmp_path, capsys):
    out = tmp_path / "report"
    rc = cli_main(["evaluate", "--ckpt", str(robustish_checkpoint), "--n", "32", "--eps", "0,0.1,0.2", "--attacks",
                   "fgsm", "--stability-steps", "5", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    report = strict_json((out / "report.json").read_text())
    rows = report["map_stability"]
    assert {(r["attack"], r["eps"]) for r in rows} == {("aai", 0.1), ("aai", 0.2), ("pgd_madry", 0.1),
                                                       ("pgd_madry", 0.2)}
    assert len(rows) == 4
    for r in rows:
        assert ROW_KEYS <= set(r), r
        assert r["map"] == "cam" and r["steps"] == 5 and r["n_total"] == 32
        assert 0 <= r["n_used"] <= r["n_total"] and r["n_used"] + r["n_constant"] <= r["n_total"]
        for key in ("kendall_tau", "topk_intersection"):
            assert r[key] is None or -1.0 <= r[key] <= 1.0, r
        assert (r["kendall_tau"] is None) == (r["n_used"] == 0)
    assert report["pictures"] == ["gallery.png", "transition.png"]
    assert report["picture_settings"]["transition"]["label"] == 7  # MNIST: a 7 ...
    assert report["picture_settings"]["transition"]["target"] == 9  # ... driven to 9
    for name in report["pictures"]:
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG"
    md = (out / "report.md").read_text()
    assert "](gallery.png)" in md and "](transition.png)" in md and "Interpretation-map stability" in md
    assert "Interpretation-map stability" in printed and "| aai | cam |" in printed
    assert "](gallery.png)" not in printed and "gallery.png" in printed  # named as written, not linked
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_no_pictures_and_no_stability_attacks(robustish_checkpoint, tmp_path, capsys):
    out = tmp_path / "report"
    rc = cli_main(["evaluate", "--ckpt", str(robustish_checkpoint), "--n", "16", "--eps", "0,0.1", "--attacks",
                   "fgsm", "--stability-attacks", "none", "--no-pictures", "--out", str(out)])
    assert rc == 0
    report = strict_json((out / "report.json").read_text())
    assert report["map_stability"] == [] and report["pictures"] == []
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]
    assert "Interpretation-map stability" not in capsys.readouterr().out


BAD_OPTIONS = {
    "n 0": (["--n", "0"], "--n 0 must be a positive integer"),
    "num-images negative": (["--num-images", "-5"], "--n -5 must be a positive integer"),
    "batch-size 0": (["--batch-size", "0"], "--batch-size 0 must be a positive integer"),
    "steps 0": (["--steps", "0"], "--steps 0 must be a positive integer"),
    "restarts 0": (["--restarts", "0"], "--restarts 0 must be a positive integer"),
    "eps out of range": (["--eps", "0,2"], "out of range"),
    "eps names none": (["--eps", ","], "names no budget"),
    "attacks names none": (["--attacks", ","], "names no attack"),
    "unknown attack": (["--attacks", "fgsm,nope"], "unknown attack 'nope'"),
    "pgd_prototype on a plain model": (["--attacks", "pgd_prototype"], "needs a ProtoPNet checkpoint"),
    "out under a file": (["--out", "{file}/r"], "is a file, not a folder"),
    "seed not a number": (["--seed", "abc"], "--seed"),
    "device unknown": (["--device", "warp_drive"], "--device 'warp_drive'"),
    "devices 0": (["--devices", "0"], "--devices '0' must be a positive number"),
    "accelerator unknown": (["--accelerator", "abacus"], "--accelerator 'abacus'"),
    "num-nodes 0": (["--num-nodes", "0"], "--num-nodes 0 must be a positive integer"),
    "data-root missing": (["--data-root", "/no/such/folder"], "/no/such/folder"),
    "checks-n 0": (["--checks-n", "0"], "--checks-n 0 must be a positive integer"),
    "transfer-from missing": (["--transfer-from", "/no/such.ckpt"], "--transfer-from: checkpoint"),
    "n-pictures 0": (["--n-pictures", "0"], "--n-pictures 0 must be a positive integer"),
    "ckpt missing": (["--ckpt", "/no/such.ckpt"], "not found"),
    "unknown option": (["--epsilon", "0.3"], "unrecognized arguments"),
    "stability-n 0": (["--stability-n", "0"], "--stability-n 0 must be a positive integer"),
    "stability-n negative": (["--stability-n", "-3"], "--stability-n -3 must be a positive integer"),
    "stability-n not a number": (["--stability-n", "many"], "--stability-n"),
    "stability-steps 0": (["--stability-steps", "0"], "--stability-steps 0 must be a positive integer"),
    "unknown stability attack": (["--stability-attacks", "nope"], "unknown attack 'nope'"),
    "none among names": (["--stability-attacks", "aai,none"], "'none' alone"),
    "unknown map": (["--map", "no_such_map"], "unknown interpretation map"),
    "topk 0": (["--topk", "0"], "--topk 0 must be a positive integer"),
    "topk above the map size": (["--topk", "50"], "larger than the 49 cells"),
    "unknown probe": (["--probes", "blur"], "unknown probe 'blur'"),
    "probes names none": (["--probes", ","], "names no probe"),
    "saturation level 0": (["--probes", "--saturation-levels", "0"], "saturation level 0.0 is out of range"),
    "saturation level not a number": (["--saturation-levels", "lots"], "--saturation-levels 'lots'"),
    "shuffle level 1": (["--shuffle-levels", "1"], "patch_shuffle level 1.0 is out of range"),
    "shuffle level 1.5": (["--shuffle-levels", "2,1.5"], "patch_shuffle level 1.5 is out of range"),
    "universal on 5 images": (["--universal", "--universal-n", "5"], "at least 10 training images"),
    "universal eps out of range": (["--universal", "--universal-eps", "2"], "out of range"),
    "universal eps not a number": (["--universal-eps", "big"], "--universal-eps 'big'"),
    "universal norm unknown": (["--universal-norm", "l1"], "--universal-norm 'l1'"),
    "type1 missing": (["--type1", "/no/such.ckpt"], "--type1: checkpoint"),
    "type1 not an svae": (["--type1", "{ckpt}"], "not an svae"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_bad_options_give_one_line_and_exit_code_2(robustish_checkpoint, tmp_path, capsys, case):
    flags, expected = BAD_OPTIONS[case]
    (tmp_path / "file").write_text("not a folder")
    flags = [f.replace("{file}", str(tmp_path / "file")).replace("{ckpt}", str(robustish_checkpoint)) for f in flags]
    rc = cli_main(["evaluate", "--ckpt", str(robustish_checkpoint), "--n", "8", "--eps", "0,0.1", "--attacks", "fgsm",
                   "--out", str(tmp_path / "r"), *flags])
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip() and "%|" not in ln]  # not progress bars
    assert rc == 2
    assert len(lines) == 1 and lines[0].startswith("robust-train: error:") and expected in lines[0], captured.err
    assert not (tmp_path / "r").exists()


def test_every_option_of_evaluate_has_a_bad_input_case():
    from robust_train.evaluate.cli import parser

    flags = {f for case in BAD_OPTIONS.values() for f in case[0] if f.startswith("--")}
    options = {o for action in parser()._actions for o in action.option_strings if o not in ("-h", "--help")}
    switches = {"--no-pictures", "--no-checks"}  # on/off: nothing to get wrong
    assert options - switches - flags == set()


@pytest.fixture(scope="module")
def model_and_images(robustish_checkpoint):
    model = classifier_from_checkpoint(read_checkpoint(robustish_checkpoint))
    x, y = MNISTData().test_tensors(12)
    return model, x, y


def test_an_attack_that_returns_x_gives_tau_one(model_and_images):
    model, x, y = model_and_images
    stats = measure_stability(model, x, y, lambda m, xb, yb: xb.clone(), cam, 8, batch_size=5)
    assert stats["n_total"] == 12 and stats["n_used"] + stats["n_constant"] == 12 and stats["n_used"] > 0
    assert stats["kendall_tau"] == pytest.approx(1.0)
    assert stats["topk_intersection"] == pytest.approx(1.0)


def test_no_usable_image_is_null_in_json(model_and_images):
    model, x, y = model_and_images
    flat = copy.deepcopy(model)
    with torch.no_grad():
        flat.head.weight.zero_()  # every CAM is constant: τ is undefined for every image
    rows = stability_rows(flat, x, y, [0.0, 0.1], ["pgd"], "cam", 8, 2, 8, progress=False)
    assert len(rows) == 1
    assert rows[0]["n_used"] == 0 and rows[0]["n_constant"] == 12
    assert rows[0]["kendall_tau"] is None and rows[0]["topk_intersection"] is None
    text = json.dumps(json_safe({"map_stability": rows, "other": float("nan")}), allow_nan=False)
    assert strict_json(text)["other"] is None
    assert "– / – (n=0)" in Stability().text({"map_stability": rows})


def test_model_without_feature_map_is_skipped_with_a_note(robustish_checkpoint, tmp_path, monkeypatch):
    class LogitsOnly(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    load = evaluation_module.classifier_from_checkpoint
    monkeypatch.setattr(evaluation_module, "classifier_from_checkpoint", lambda ckpt: LogitsOnly(load(ckpt)))
    report = evaluate(str(robustish_checkpoint), ["fgsm"], [0.0, 0.1], n=16, progress=False, out=tmp_path)
    assert report["map_stability"] == [] and report["pictures"] == []
    assert len(report["notes"]) == 1 and "features" in report["notes"][0]
    write_report(report, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]
    assert "Note:" in (tmp_path / "report.md").read_text()


def test_wandb_gets_pictures_and_table_only_when_a_run_is_active(monkeypatch):
    from robust_train.figures import new_figure

    logged = []
    fake = types.SimpleNamespace(run=None, Image=lambda array, caption=None: ("image", array.shape),
                                 Table=lambda columns, data: ("table", columns, data))
    report = {"map_stability": [{"map": "cam", "attack": "aai", "eps": 0.1, "kendall_tau": 0.5,
                                 "topk_intersection": 0.25, "n_used": 3, "n_total": 4, "n_constant": 0,
                                 "steps": 5, "step_size": 0.01}]}
    figures = {"gallery.png": new_figure(1, 2)[0]}
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    assert not log_to_wandb(report, figures)  # wandb never imported: no run can be active
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert not log_to_wandb(report, figures)  # imported, but no run: nothing is started
    fake.run = types.SimpleNamespace(log=logged.append)
    assert log_to_wandb(report, figures)
    (payload,) = logged
    assert payload["evaluate/gallery"][0] == "image" and payload["evaluate/gallery"][1][2] == 3
    kind, columns, data = payload["evaluate/map_stability"]
    assert kind == "table" and data[0][columns.index("kendall_tau")] == 0.5
