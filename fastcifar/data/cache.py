"""The decoded-array cache: a source is decoded once, later runs memory-map the arrays.

Entries live in `$FASTCIFAR_CACHE` (default `~/.cache/fastcifar`) under the source's
content hash. An entry is a directory of `.npy` files and a `manifest.json` holding each
file's size and BLAKE2 digest; it is built in a temporary directory and renamed into
place, so a reader never sees half an entry. A truncated or tampered entry fails the
check and is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from fastcifar.atomic import replace_folder
from fastcifar.data.sources import CifarArrays, read_source, source_reader
from fastcifar.errors import UserError

ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")
FORMAT = 1


def cache_root() -> Path:
    return Path(os.environ.get("FASTCIFAR_CACHE", Path.home() / ".cache" / "fastcifar"))


def _make_cache_root() -> Path:
    """The cache folder, created if needed; a clear error before any decoding if it cannot be."""
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create the cache folder {root} ({exc.strerror or exc}); "
            "set FASTCIFAR_CACHE to a writable folder"
        ) from None
    return root


def content_hash(path: Path) -> str:
    """SHA-256 of a file, or of every file's relative path and bytes under a directory."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def load_cached(source: Path, log=print) -> CifarArrays:
    """Arrays for `source`, from the cache when a valid entry exists, else decoded and cached."""
    source_reader(source)  # no source (or none at all): say so before hashing or decoding
    entry = _make_cache_root() / content_hash(source)
    arrays = read_entry(entry)
    if arrays is not None:
        return arrays
    if entry.exists():
        log(f"cache entry {entry} is damaged; rebuilding it")
    log(f"decoding {source} once into {entry}")
    write_entry(entry, read_source(source), source)
    # another process (a sweep's workers) may be replacing the same entry just now
    for wait in (0.0, 0.1, 0.5, 2.0):
        time.sleep(wait)
        arrays = read_entry(entry)
        if arrays is not None:
            return arrays
    raise OSError(f"cache entry {entry} failed its check right after writing")


def entry_source(entry: Path) -> str | None:
    """The source a cache entry was decoded from, as its manifest records it."""
    try:
        return json.loads((entry / "manifest.json").read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None


def default_entry() -> Path | None:
    """The cache entry a run given no --data uses: the newest one whose source still
    exists, else the newest one (an entry left by a since-deleted download still counts)."""
    root = cache_root()
    entries = [p for p in root.glob("*") if (p / "manifest.json").exists()] if root.is_dir() else []

    def rank(entry: Path) -> tuple[bool, float]:
        source = entry_source(entry)
        return (bool(source) and Path(source).exists(), (entry / "manifest.json").stat().st_mtime)

    return max(entries, key=rank, default=None)


def is_entry(path: Path) -> bool:
    """Whether `path` is an entry of the cache (what a run given no --data records)."""
    return (path / "manifest.json").is_file() and path.resolve().parent == cache_root().resolve()


def read_entry(entry: Path) -> CifarArrays | None:
    """Memory-map a cache entry's arrays; None when missing, truncated or tampered."""
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        if manifest.get("format") != FORMAT:
            return None
        arrays = {}
        for name in ARRAYS:
            file = entry / f"{name}.npy"
            expected = manifest["files"][name]
            if (
                file.stat().st_size != expected["bytes"]
                or _file_digest(file) != expected["blake2b"]
            ):
                return None
            arrays[name] = np.load(file, mmap_mode="r")
        return CifarArrays(**arrays)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_entry(entry: Path, arrays: CifarArrays, source: Path) -> None:
    """Write an entry atomically: build it beside the target, then rename it into place."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=entry.parent))
    try:
        files = {}
        for name in ARRAYS:
            file = tmp / f"{name}.npy"
            np.save(file, np.ascontiguousarray(getattr(arrays, name)))
            files[name] = {"bytes": file.stat().st_size, "blake2b": _file_digest(file)}
        manifest = {
            "format": FORMAT,
            "source": str(source.resolve()),
            "created": time.time(),
            "files": files,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if read_entry(entry) is not None:
            return  # another process wrote the same source's entry first: keep it
        replace_folder(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
