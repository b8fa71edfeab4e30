"""`evaluate` with minimal-perturbation attacks: the per-attack norm statistics, the robustness curve (alone and
combined with the fixed-ε suite), robustness_curve.png, and the `compare` command over report.json files."""
import json
import math

import pytest
import torch

from robust_train.cli import main as cli_main
from robust_train.evaluate.sections.minimal import curve, minimal_names, norm_statistics

pytestmark = pytest.mark.usefixtures("one_thread")


def test_norm_statistics_count_failures_as_infinite():
    norms = torch.tensor([0.0, 0.5, 1.0, 2.0, math.inf])
    stats = norm_statistics(norms)
    assert stats["median"] == 1.0 and stats["mean"] == pytest.approx(3.5 / 4)
    assert stats["n_success"] == 4 and stats["n"] == 5
    assert stats["quantiles"]["0.9"] is None  # lands on the image no attack broke
    assert norm_statistics(torch.tensor([math.inf, math.inf, 1.0]))["median"] is None


def test_curve_is_accuracy_of_the_unbroken():
    broken_at = torch.tensor([0.0, 0.1, 0.3, math.inf], dtype=torch.float64)
    clean = torch.tensor([False, True, True, True])
    c = curve(broken_at, clean, [0.0, 0.2])
    acc = dict(zip(c["eps"], c["accuracy"]))
    assert acc[0.0] == 0.75 and acc[0.2] == 0.5  # at 0.2 the image broken at 0.1 is gone
    assert c["accuracy"][-1] == 0.25 and c["eps"][-1] >= 0.3
    assert all(a >= b for a, b in zip(c["accuracy"], c["accuracy"][1:]))  # never rises


def test_minimal_names():
    assert minimal_names(["pgd", "deepfool", "fgsm", "deepfool_linf"]) == ["deepfool", "deepfool_linf"]
    assert minimal_names(None) == []


def evaluate(ckpt, out, attacks, *extra):
    rc = cli_main(["evaluate", "--ckpt", str(ckpt), "--n", "40", "--eps", "0,0.1,0.2", "--attacks", attacks,
                   "--stability-attacks", "none", "--no-checks", "--out", str(out), *extra])
    assert rc == 0
    return json.loads((out / "report.json").read_text())


def test_minimal_attacks_run_once_and_join_the_worst_case(robustish_checkpoint, tmp_path):
    report = evaluate(robustish_checkpoint, tmp_path / "a", "fgsm,deepfool,deepfool_linf", "--no-pictures")
    rows = {r["attack"]: r for r in report["minimal_perturbation"]}
    assert set(rows) == {"deepfool", "deepfool_linf"}
    assert rows["deepfool"]["norm"] == "l2" and rows["deepfool_linf"]["norm"] == "linf"
    for row in rows.values():
        assert row["n"] == 40 and 0 < row["n_success"] <= 40 and row["median"] >= 0
    # The suite ran only FGSM per ε; DeepFool L∞ joined its table and its worst case at each grid ε.
    names = [(r["name"], r["eps"]) for r in report["attacks"]]
    assert ("fgsm", 0.1) in names and ("deepfool_linf", 0.1) in names and all(n != "deepfool" for n, _ in names)
    for eps in ("0.1", "0.2"):
        by = {r["name"]: r["accuracy"] for r in report["attacks"] if f"{r['eps']:g}" == eps}
        assert report["robust_accuracy"][eps] <= min(by.values()) + 1e-9
    # The L∞ curve agrees with the worst case at the grid's ε; the L2 curve has its own axis.
    linf = dict(zip(report["robustness_curve"]["linf"]["eps"], report["robustness_curve"]["linf"]["accuracy"]))
    for eps in (0.1, 0.2):
        assert linf[eps] == pytest.approx(report["robust_accuracy"][f"{eps:g}"])
    assert linf[0.0] == pytest.approx(report["clean_accuracy"])
    l2 = report["robustness_curve"]["l2"]
    assert l2["accuracy"][0] == pytest.approx(report["clean_accuracy"]) and l2["accuracy"][-1] <= 1 - rows[
        "deepfool"]["n_success"] / 40 + 1e-9
    assert "robustness_curve.png" not in report["pictures"] and not (tmp_path / "a" / "robustness_curve.png").exists()


def test_curve_picture_and_compare(robustish_checkpoint, tmp_path, capsys):
    evaluate(robustish_checkpoint, tmp_path / "a", "deepfool")
    assert (tmp_path / "a" / "robustness_curve.png").stat().st_size > 1000
    evaluate(robustish_checkpoint, tmp_path / "b", "fgsm", "--no-pictures")  # no curve: fine beside one that has
    capsys.readouterr()
    out = tmp_path / "curves.png"
    assert cli_main(["compare", str(tmp_path / "a"), str(tmp_path / "b" / "report.json"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "deepfool" in printed and "l2" in printed and out.stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (["{tmp}/missing"], "no report.json there"),
    (["{tmp}/garbage.json"], "does not parse as JSON"),
    (["{tmp}/b"], "has a robustness curve"),
    (["{tmp}/a", "--out", "{tmp}/curves.txt"], ".png path"),
])
def test_compare_refuses_in_one_line(tmp_path, capsys, args, message):
    (tmp_path / "garbage.json").write_text("{not json")
    for name, curve_ in (("a", {"l2": {"eps": [0, 1], "accuracy": [1, 0]}}), ("b", {})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps({"checkpoint": f"{name}.ckpt",
                                                                  "robustness_curve": curve_}))
    assert cli_main(["compare", *[a.replace("{tmp}", str(tmp_path)) for a in args]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
