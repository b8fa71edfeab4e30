"""bench/mnist_table.py run as a program with nothing to evaluate: a row without a checkpoint is skipped under
--no-train, and the result still says which goals were not evaluated (no training, no attack: a few seconds)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_checkpoint_and_no_train_skips_the_row(tmp_path):
    out = tmp_path / "mnist_table.json"
    done = subprocess.run([sys.executable, "bench/mnist_table.py", "--only", "int2_adv", "--no-train",
                           "--ckpt-dir", str(tmp_path), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["rows"] == {} and result["skipped"] == {"Int2-Adv": "no checkpoint and --no-train"}
    assert result["complete"] and set(result["goals"].values()) == {None}
    assert {"machine", "threads", "torch", "date", "device_name"} <= set(result)
    assert "Skipped: Int2-Adv" in done.stdout and "NOT EVALUATED" in done.stdout and f"wrote {out}" in done.stdout
