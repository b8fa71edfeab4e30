"""bench/defences.py without training: its claims on hand-made rows, and one end-to-end run on the shared small
checkpoint standing in for every target."""
import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

PATH = Path(__file__).resolve().parents[1] / "bench" / "defences.py"
spec = importlib.util.spec_from_file_location("bench_defences", PATH)
defences = importlib.util.module_from_spec(spec)
spec.loader.exec_module(defences)


def row(clean, pgd, margin, aa, black_box, failed=()):
    return {"clean": clean, "fgsm": pgd, "pgd": pgd, "pgd_margin": margin, "autoattack": aa,
            "worst": min(pgd, margin, aa), "black_box": black_box, "masking_suspected": bool(failed),
            "failed_checks": list(failed)}


def rows(distillation):
    return {"standard": row(0.98, 0.0, 0.0, 0.0, 0.0), "distillation": distillation,
            "ensemble_adv": row(0.95, 0.0, 0.0, 0.0, 0.42), "pgd": row(0.96, 0.78, 0.75, 0.74, 0.93)}


def test_masked_distillation_is_exposed_and_an_honest_one_is_not():
    masked = defences.findings(rows(row(0.85, 0.73, 0.0, 0.0, 0.1, ["zero_gradients"])))
    assert masked["distillation_masking_exposed"]["holds"]
    assert masked["ensemble_black_box_above_standard"]["holds"]
    assert not masked["ensemble_black_box_vs_pgd_at"]["holds"]  # 0.42 < 0.93
    assert masked["no_masking_flagged_on_pgd_at"]["holds"]
    honest = defences.findings(rows(row(0.85, 0.05, 0.0, 0.0, 0.1)))  # CE-PGD already breaks it: nothing hidden
    assert not honest["distillation_masking_exposed"]["holds"]
    unflagged = defences.findings(rows(row(0.85, 0.73, 0.0, 0.0, 0.1)))  # exposed by numbers, but no check fired
    assert not unflagged["distillation_masking_exposed"]["holds"]


def test_bad_ckpt_argument_names_the_choices():
    with pytest.raises(SystemExit, match="NAME one of standard"):
        defences.parse_ckpts(["teacher=/x.ckpt"])


def test_end_to_end_on_one_checkpoint(robustish_checkpoint, tmp_path, capsys):
    ckpt = str(robustish_checkpoint)
    out = tmp_path / "defences.json"
    defences.main(["--n", "16", "--eps", "0.1", "--checks-n", "16", "--source-ckpt", ckpt, "--out", str(out),
                   *[f"--ckpt={name}={ckpt}" for name in defences.TARGETS]])
    result = json.loads(out.read_text())
    assert set(result["rows"]) == set(defences.TARGETS) and result["trained_minutes"] == {}
    r = result["rows"]["pgd"]
    assert r["worst"] <= min(r["fgsm"], r["pgd"], r["pgd_margin"], r["autoattack"]) <= r["clean"]
    # The same model as source and target: the "black-box" examples are white-box PGD ones, no weaker than its
    # worst case over the suite, and the identical rows make every row's numbers equal.
    assert r["black_box"] >= r["worst"]
    assert len({json.dumps(v, sort_keys=True) for v in result["rows"].values()}) == 1
    printed = capsys.readouterr().out
    assert "| ensemble_adv |" in printed and "distillation_masking_exposed" in printed
