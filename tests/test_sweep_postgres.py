"""Two sweep workers sharing one study on a real PostgreSQL server on loopback."""

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from fastcifar.sweep import run_sweep
from fastcifar.sweep_spec import read_sweep

from .conftest import make_arrays, write_batches_dir

optuna = pytest.importorskip("optuna")
pytest.importorskip("psycopg2")


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL is not installed (Debian package postgresql)")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="fastcifar-pg-"))
    if as_user:
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "fastcifar"],
                   check=True, capture_output=True)  # fmt: skip
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-o", options, "-w", "-l", str(root / "log"), "start"],
                   check=True, capture_output=True)  # fmt: skip
    try:
        yield f"postgresql+psycopg2://fastcifar@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_a_postgres_study(tmp_path, postgres_url):
    data = str(write_batches_dir(tmp_path / "data", make_arrays(n_train=300, n_test=100)))
    path = tmp_path / "pg.toml"
    path.write_text('[search]\narch = "lenet"\nlr = [0.01, 0.02, 0.05]\nepochs = 1\nbatch_size = 50\n'
                    'val = 50\namp = "none"\nthreads = 1\n')  # fmt: skip
    rows = run_sweep(read_sweep(path), storage=postgres_url, workers=2, resume=False, out=tmp_path / "out",
                     data=data, track=False, log=lambda _: None)  # fmt: skip
    assert sorted(r["lr"] for r in rows) == [0.01, 0.02, 0.05]
    study = optuna.load_study(study_name="pg", storage=postgres_url)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3 and len({t.params["lr"] for t in complete}) == 3
    assert len({t.user_attrs["run_dir"] for t in complete}) == 3


def test_unreachable_storage_is_one_line(tmp_path, capsys):
    from fastcifar.cli import main

    path = tmp_path / "u.toml"
    path.write_text('[search]\narch = "lenet"\nlr = [0.01]\n')
    url = f"postgresql+psycopg2://nobody@127.0.0.1:{_free_port()}/none"
    assert (
        main(["sweep", str(path), "--storage", url, "--no-track", "--out", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot open sweep storage" in err[0]
