"""benchmarks/gpu-check.sh, the one pass over the GPU paths, runs only where a GPU is lent
and then for minutes at most: its stage selection and bookkeeping are checked here, on
stages that need no GPU, so that a mistake in the script costs no GPU time."""

from __future__ import annotations

import random
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


WHEELS_SCRIPT = SCRIPT.parent / "gpu-wheels.sh"


def wheels_env(tmp_path: Path) -> dict:
    """Small parts, and the GPU machine's folders under tmp_path."""
    return {"PART_BYTES": "64000", "PARTS_DIR": str(tmp_path / "parts"),
            "JOINED_DIR": str(tmp_path / "joined")}  # fmt: skip


def gpu_wheels(cwd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(WHEELS_SCRIPT), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin", **env})  # fmt: skip


def test_wheels_travel_in_parts_and_come_back_whole(tmp_path):
    """The path DALI's wheels take to a GPU machine: split here, each part moved out of the
    tree there in a call of its own, joined and checked."""
    wheels, here, there = tmp_path / "wheels", tmp_path / "here", tmp_path / "there"
    for d in (wheels, here, there):
        d.mkdir()
    rng = random.Random(0)
    sizes = {"a-1.0-py3-none-any.whl": 150_000, "b-2.0-py3-none-any.whl": 50_000}
    for name, size in sizes.items():
        (wheels / name).write_bytes(rng.randbytes(size))
    env = wheels_env(tmp_path)
    packed = gpu_wheels(here, env, "pack", str(wheels))
    assert packed.returncode == 0, packed.stderr
    parts = sorted((here / ".gpuwheels").iterdir())
    assert len(parts) == 4 and all(p.stat().st_size <= 64_000 for p in parts)  # 200 kB + tar
    for part in parts:  # as the calls carry them: one part each, into the tree there
        (there / ".gpuwheels").mkdir(exist_ok=True)
        part.rename(there / ".gpuwheels" / part.name)
        assert gpu_wheels(there, env, "stash", f".gpuwheels/{part.name}").returncode == 0
    joined = gpu_wheels(there, env, "join")
    assert joined.returncode == 0, joined.stderr
    assert joined.stdout.strip().splitlines()[-1] == f"WHEELS={tmp_path / 'joined'}"
    for name in sizes:
        assert (tmp_path / "joined" / name).read_bytes() == (wheels / name).read_bytes()


def test_a_damaged_part_fails_the_join(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "a-1.0-py3-none-any.whl").write_bytes(random.Random(1).randbytes(100_000))
    env = wheels_env(tmp_path)
    assert gpu_wheels(tmp_path, env, "pack", str(wheels)).returncode == 0
    first = tmp_path / ".gpuwheels" / "part-00"
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a byte inside the compressed archive
    first.write_bytes(bytes(data))
    parts = [str(p) for p in (tmp_path / ".gpuwheels").iterdir()]
    assert gpu_wheels(tmp_path, env, "stash", *parts).returncode == 0
    joined = gpu_wheels(tmp_path, env, "join")
    assert joined.returncode != 0 and "WHEELS=" not in joined.stdout
