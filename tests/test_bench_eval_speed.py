"""bench/eval_speed.py end to end on the shared small checkpoint: both settings leave every example's outcome the
same, and the JSON holds one row per (ε, attack) plus the torchattacks comparison."""
import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

PATH = Path(__file__).resolve().parents[1] / "bench" / "eval_speed.py"
spec = importlib.util.spec_from_file_location("bench_eval_speed", PATH)
eval_speed = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eval_speed)


def test_end_to_end(robustish_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval_speed.json"
    eval_speed.main(["--ckpt", f"tiny={robustish_checkpoint}", "--n", "24", "--eps", "0,0.1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    suite = [r for r in rows if "seconds_all" in r]
    assert [r["attack"] for r in suite] == ["pgd", "pgd_margin", "pgd_targeted"]  # ε 0 is skipped
    assert all(r["outcomes_differ"] == 0 and r["accuracy_all"] == r["accuracy_early_stop"] for r in suite)
    (ta,) = [r for r in rows if r["attack"] == "pgd100_constant"]
    assert 0 <= ta["accuracy_ours"] <= 1 and 0 <= ta["accuracy_torchattacks"] <= 1
    assert "early stopping against without" in capsys.readouterr().out


def test_switch_reaches_the_inner_pgd_of_multi_targeted():
    attack = eval_speed.with_early_stop(eval_speed.build_attack("pgd_targeted", 0.1), False)
    assert attack.pgd.early_stop is False
