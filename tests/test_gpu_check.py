"""The prepared GPU check runs end to end on the CPU (--cpu-smoke): every step, one JSON report."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_cpu_smoke_writes_a_complete_report(tmp_path):
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--cpu-smoke", "--out", str(out),
                        "--recipes", "handbone-segformer"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["cpu_smoke"] and not report["cuda"]
    assert set(report["steps"]) == {"folds", "train_step/handbone-segformer", "inference/handbone-segformer",
                                    "mini_pipeline", "torchrun"}
    assert report["steps"]["mini_pipeline"]["score"].startswith("mean Dice")
    assert report["steps"]["torchrun"]["backend"] == "gloo"
