"""The run directory `runs/<name>/`: config, environment, per-epoch metrics, checkpoints
and the final summary. Every file in it is written atomically."""

from __future__ import annotations

import contextlib
import fcntl
import json
import platform
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

import fastcifar
from fastcifar import heap
from fastcifar.atomic import write_atomic, write_json_atomic, write_text_atomic
from fastcifar.errors import UserError
from fastcifar.train.device import device_name


def default_run_dir(arch: str) -> Path:
    return Path("runs") / f"{arch}-{time.strftime('%Y%m%d-%H%M%S')}"


def create_run_dir(path: Path, fresh: bool) -> Path:
    """Make (or, when resuming, check) a run directory, with a one-line error if unusable."""
    if path.exists() and not path.is_dir():
        raise UserError(f"run directory {path} is a file, not a directory")
    if is_training(path):
        raise UserError(IN_USE.format(path=path))
    if fresh and (path / "last.pt").exists():
        raise UserError(f"{path} already holds a run; use --resume {path} or another --out")
    if not fresh and not (path / "last.pt").exists():
        raise UserError(f"nothing to resume in {path}: no last.pt")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"run directory {path} is not writable: {exc.strerror}") from None
    return path


LOCK = ".lock"  # held (flock) by the process training in the run directory
IN_USE = "{path} is in use: another fastcifar process is training there"


@contextlib.contextmanager
def claimed(path: Path, made_for_it: bool = False):
    """Hold the run directory for one training process: a second one (a `--resume` of a
    run still training, or the same `--out` twice) stops with a one-line error. The
    operating system drops the lock when the process ends, however it ends. A directory
    `made_for_it` that holds nothing but the lock at the end (the run failed before
    writing a file) is removed."""
    try:
        with (path / LOCK).open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(IN_USE.format(path=path)) from None
            except OSError:  # a file system without locks: train unguarded, not not at all
                pass
            yield path
    finally:
        if made_for_it:
            _remove_if_empty(path)


def _remove_if_empty(path: Path) -> None:
    """Remove a run directory that holds nothing but its lock file."""
    try:
        if all(entry.name == LOCK for entry in path.iterdir()):
            (path / LOCK).unlink(missing_ok=True)
            path.rmdir()
    except OSError:  # gone already, or not ours to remove: leave it
        pass


def is_training(path: Path) -> bool:
    """Whether a process holds the run directory's lock now."""
    try:
        with (path / LOCK).open("r") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no lock file (never trained there), or no such directory
        return False
    return False


def read_json(path: Path) -> dict:
    """A run file's JSON object; {} when the run has not written it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def run_data(run: Path) -> str | None:
    """The data a run trained on: its --data, else the source its summary (or, before it
    finished, its env.json) recorded: an absolute path, so a --data given relative to
    another working directory is found."""
    given = read_json(run / "config.json").get("data")
    recorded = read_json(run / "summary.json").get("data_source") or read_json(
        run / "env.json"
    ).get("data_source")
    if given and not Path(given).expanduser().exists() and recorded and Path(recorded).exists():
        return recorded
    return given or recorded


def write_metrics(path: Path, history: list[dict]) -> None:
    """metrics.jsonl: one JSON object per epoch, rewritten whole so it always matches last.pt."""
    write_text_atomic(path / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))


def write_predictions(path: Path, probs: torch.Tensor, labels: torch.Tensor, epoch: int) -> None:
    """predictions.npz: the best model's test-set softmax outputs, for error analysis."""
    arrays = {"probs": probs.numpy(), "labels": labels.numpy(), "epoch": np.array(epoch)}
    write_atomic(path / "predictions.npz", lambda f: np.savez(f, **arrays))


def read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path / "predictions.npz") as data:
            return data["probs"], data["labels"]
    except FileNotFoundError:
        raise UserError(
            f"{path} has no predictions.npz; is it a fastcifar run directory?"
        ) from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:  # truncated, not ours
        raise UserError(f"cannot read {path / 'predictions.npz'}: {exc}") from None


def read_metrics(path: Path) -> list[dict]:
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, not a run directory")
    try:
        lines = (path / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    except FileNotFoundError:
        if not path.is_dir():
            raise UserError(f"run directory not found: {path}") from None
        if (path / "config.json").exists():
            raise UserError(f"{path} has not finished an epoch yet") from None
        raise UserError(f"{path} has no metrics.jsonl; is it a fastcifar run directory?") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path / 'metrics.jsonl'}: {exc}") from None


def write_json(path: Path, name: str, obj) -> None:
    write_json_atomic(path / name, obj)


def write_environment(path: Path, env: dict, resumed: bool) -> None:
    """env.json: what the run started on; each resume adds where it went on."""
    saved = path / "env.json"
    if resumed and saved.exists():
        first = json.loads(saved.read_text())
        env = {**first, "resumed": [*first.get("resumed", []), env]}
    write_json(path, "env.json", env)


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: torch.device) -> dict:
    """What the run ran on: device, versions, threads, git revision."""
    env = {
        "device": device.type,
        "device_name": device_name(device),
        "fastcifar": fastcifar.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "malloc": heap.state(),
        "git_revision": git_revision(),
        "hostname": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return env
