"""benchmarks/gpu-check.sh, the one pass over the GPU paths, runs only where a GPU is lent
and then for minutes at most: its stage selection and bookkeeping are checked here, on
stages that need no GPU, so that a mistake in the script costs no GPU time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu-check.sh"


def gpu_check(tmp_path, stages: str) -> tuple[int, str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "STAGES": stages,
           "PYTHON": sys.executable, "FASTCIFAR_CACHE": str(tmp_path / "cache")}  # fmt: skip
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), str(tmp_path / "data.zip")],
                          cwd=SCRIPT.parents[1], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    return proc.returncode, (tmp_path / "out" / "log.txt").read_text()


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_only_the_named_stages_run_and_each_reports_its_status(tmp_path):
    code, log = gpu_check(tmp_path, "doctor native-l*")  # a name and a glob pattern
    assert code == 0
    ran = [
        line.split()[1] for line in log.splitlines() if line.startswith("=== ") and "(limit" in line
    ]
    assert ran == ["doctor", "native-link"]
    assert "=== doctor: rc=0" in log and "=== native-link: rc=0" in log
    assert "libstdc++ stream and locale functions defined in it: 0" in log
    assert (tmp_path / "out" / "results-cuda.tgz").exists()  # packed after every stage


def test_a_selection_without_the_native_tests_skips_their_crash_follow_up(tmp_path):
    code, log = gpu_check(tmp_path, "throughput-b1024-vs-nothing")  # matches no stage
    assert code == 0 and "=== " not in log
