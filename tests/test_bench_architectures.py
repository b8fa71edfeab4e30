"""bench/architectures.py run as a program on its smoke budget (a backbone trained one epoch on a few images, then
a ProtoPNet on it): the schedule, the attacks' settings, the worst case and the printed table. The numbers of such
a model mean nothing; what is checked is how they are made and reported."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10-subset" / "cifar10_subset.npz"  # the script's default --data
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"the CIFAR-10 subset is not at {DATA}")
MARGIN_STEPS = 3


def run_bench(script, *args, check=True):
    """bench/<script> from the repository root, with one intra-op thread: on a shared CPU a descheduled OpenMP
    thread stalls every parallel region."""
    done = subprocess.run([sys.executable, f"bench/{script}", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """(the JSON, what was printed) of one smoke run on a ProtoPNet."""
    tmp = tmp_path_factory.mktemp("architectures")
    out = tmp / "architectures.json"
    printed = run_bench("architectures.py", "--models", "protopnet", "--epochs", 1, "--head-epochs", 3,
                        "--max-train", 64, "--batch-size", 32, "--n", 8, "--eval-batch-size", 8,
                        "--margin-steps", MARGIN_STEPS, "--checks-n", 8, "--ckpt-dir", tmp / "ckpt",
                        "--out", out).stdout
    return json.loads(out.read_text()), printed


@needs_data
def test_attacks_have_the_documented_settings(smoke):
    attacks = smoke[0]["settings"]["attacks"]
    e = 8 / 255
    assert list(attacks) == ["fgsm_2", "fgsm_8", "bim_2", "bim_8", "pgd_2", "pgd_8", "mim_2", "mim_8",
                             "pgd_margin_8", "pgd_prototype_2", "pgd_prototype_8"]
    assert attacks["fgsm_8"]["step_size"] == pytest.approx(e) and attacks["fgsm_8"]["steps"] == 1
    assert attacks["bim_8"]["step_size"] == pytest.approx(e / 10) and attacks["bim_8"]["steps"] == 10
    assert attacks["pgd_8"]["step_size"] == pytest.approx(2.5 * e / 10) and attacks["pgd_8"]["random_start"]
    assert attacks["mim_8"]["step_size"] == pytest.approx(e / 10) and attacks["mim_8"]["steps"] == 10
    assert attacks["pgd_margin_8"]["steps"] == MARGIN_STEPS and attacks["pgd_margin_8"]["loss"] == "margin"
    assert attacks["pgd_prototype_8"]["logits"].startswith("head(-min_distance)")


@needs_data
def test_worst_case_covers_every_attack_at_its_eps_including_pgdp(smoke):
    result, _ = smoke
    row = result["models"]["protopnet"]
    acc, worst_of = row["accuracy"], row["worst_of"]
    assert set(worst_of) == {"2", "8"}
    assert "pgd_prototype_8" in worst_of["8"] and "pgd_prototype_2" in worst_of["2"]
    assert "pgd_margin_8" in worst_of["8"] and "pgd_margin_8" not in worst_of["2"]
    for tag, keys in worst_of.items():
        assert set(keys) == {k for k in result["settings"]["attacks"] if k.rsplit("_", 1)[1] == tag}
        for key in ["clean", *keys]:
            assert acc[f"worst_{tag}"] <= acc[key], key
    assert isinstance(row["iterative_weaker_than_fgsm"], list)


@needs_data
def test_protopnet_warms_pushes_once_and_ends_on_the_last_layer(smoke):
    training = smoke[0]["models"]["protopnet"]["training"]
    phases, pushes = training["phases"], training["push_epochs"]
    last_layer_epochs = training["settings"]["kwargs"]["last_layer_epochs"]
    assert len(phases) == 3 and phases[0] == "warm" and "joint" in phases and phases[-1] == "last"
    assert len(pushes) == 1 and pushes[0] == len(phases) - 1 - last_layer_epochs and phases[pushes[0]] == "joint"
    assert training["settings"]["max_epochs"] == 3  # no epochs on top of --head-epochs: the same budget
    assert training["settings"]["backbone"]["checkpoint"].endswith("backbone/final.ckpt")
    assert training["push_callback"] and training["pushed_prototypes"] > 0


@needs_data
def test_masking_checks_and_the_printed_table(smoke):
    result, printed = smoke
    row = result["models"]["protopnet"]
    checks = {c["check"] for c in row["masking_checks"]}
    assert {"iterative_not_weaker", "monotone_in_steps", "large_eps_breaks", "noise_not_stronger"} <= checks
    assert row["masking_suspected"] == (any(not c["passed"] for c in row["masking_checks"])
                                        or bool(row["iterative_weaker_than_fgsm"]))
    assert result["complete"] and result["settings"]["smoke"] and result["orderings"] == {}  # one model: no ranking
    assert {"device_name", "torch", "lightning"} <= set(result["machine"])
    assert "SMOKE SETTINGS" in printed and "published, CUB-12" in printed and "76.92" in printed
    assert f"PGDm (8,{MARGIN_STEPS})" in printed and "PGDp (8," in printed and "worst (8)" in printed


def test_protopnet_needs_three_head_epochs():
    done = run_bench("architectures.py", "--models", "protopnet", "--head-epochs", 2, check=False)
    assert done.returncode == 2 and "at least 3" in done.stderr
