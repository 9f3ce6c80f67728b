"""From `--data` to the loaders' inputs: resolve the source, load it through the cache,
split off validation, take the subset, and move everything to the device as uint8.
`prepare_encoded` is the same split of the undecoded image files, for DALI to decode."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastcifar.data.cache import (
    cache_root,
    default_entry,
    entry_source,
    is_entry,
    load_cached,
    read_entry,
)
from fastcifar.data.sources import (
    HOW_TO_GET,
    OFFICIAL_MD5,
    OFFICIAL_TARBALL,
    OFFICIAL_URL,
    CifarArrays,
    md5sum,
    read_encoded,
)
from fastcifar.data.split import validation_split
from fastcifar.errors import UserError


@dataclass
class Split:
    images: torch.Tensor | list[np.ndarray]  # uint8 (N, 32, 32, 3) on the device, or file bytes
    labels: torch.Tensor | np.ndarray  # int64 (N,): on the device, or on the host with files

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DataBundle:
    train: Split
    val: Split | None
    test: Split
    source: str


def resolve_arrays(data: str | None, download: bool, log=print) -> tuple[CifarArrays, str]:
    """The arrays for `--data`, `$FASTCIFAR_DATA`, a download, or the default cache entry,
    and a source that resolves to the same arrays again (what a run records)."""
    path = data or os.environ.get("FASTCIFAR_DATA") or None
    if path:
        given = Path(path).expanduser()
        if download and (not given.exists() or _empty_folder(given)):  # as torchvision's root
            download_official(given, log)
        arrays = _read_entry(given) if is_entry(given) else load_cached(given, log)
        return arrays, str(given.resolve())  # found again from any working directory
    if download:
        tarball = download_official(cache_root(), log)
        return load_cached(tarball, log), str(tarball)
    entry = default_entry()
    if entry is None:
        raise UserError(f"no CIFAR-10 data given; {HOW_TO_GET}")
    arrays = _read_entry(entry)
    source = entry_source(entry)
    others = sum(1 for p in cache_root().glob("*/manifest.json")) - 1
    choice = f"; {others} other cached source(s), --data picks one" if others else ""
    log(f"no --data given: using the cached copy of {source or entry} "
        f"({len(arrays.train_labels)} training images{choice})")  # fmt: skip
    return arrays, source if source and Path(source).exists() else str(entry)


def _empty_folder(path: Path) -> bool:
    return path.is_dir() and next(path.iterdir(), None) is None


def _read_entry(entry: Path) -> CifarArrays:
    arrays = read_entry(entry)
    if arrays is None:
        raise UserError(f"cache entry {entry} is damaged; pass --data to rebuild it")
    return arrays


def download_official(where: Path, log=print) -> Path:
    """Fetch the official tarball (once) to `where`, a tarball's path or a folder to hold
    `cifar-10-python.tar.gz`, and check its md5; written whole or not at all."""
    names_a_tarball = where.name.endswith((".tar.gz", ".tgz"))
    target = where if names_a_tarball else where / OFFICIAL_TARBALL
    if target.exists() and md5sum(target) == OFFICIAL_MD5:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {target.parent}: {exc.strerror}") from None
    partial = target.with_name(target.name + ".partial")
    log(f"downloading {OFFICIAL_URL} to {target}")
    try:
        with urllib.request.urlopen(OFFICIAL_URL, timeout=60) as response, partial.open("wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
        if md5sum(partial) != OFFICIAL_MD5:
            raise UserError("downloaded CIFAR-10 tarball fails its md5 check")
        os.replace(partial, target)
    except (urllib.error.URLError, OSError) as exc:
        raise UserError(f"cannot download CIFAR-10 from {OFFICIAL_URL}: {exc}") from None
    finally:
        partial.unlink(missing_ok=True)  # an interrupted or failed download leaves nothing
    return target


def split_rows(train_labels: np.ndarray, val: int, split_seed: int,
               subset: int | None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(train rows, validation rows) of the training set."""
    train_idx, val_idx = validation_split(train_labels, val, split_seed)
    if subset is not None:
        if subset > len(train_idx):
            raise UserError(
                f"--subset {subset} is more than the {len(train_idx):,} training images "
                f"left after --val {val}"
            )
        # Image folders come sorted by class: take the first N of a fixed shuffle instead.
        shuffled = np.random.default_rng(split_seed).permutation(train_idx)
        train_idx = np.sort(shuffled[:subset])
    return train_idx, val_idx


def prepare_encoded(
    data: str | None, *, val: int, split_seed: int, subset: int | None
) -> DataBundle:
    """The undecoded image files and host labels of each split, split exactly as
    `prepare_data` splits the decoded arrays. Nothing is decoded or cached."""
    path = data or os.environ.get("FASTCIFAR_DATA")
    if not path:
        raise UserError("decoding with DALI needs --data (an image-folder directory or .zip)")
    enc = read_encoded(Path(path).expanduser())
    train_idx, val_idx = split_rows(enc.train_labels, val, split_seed, subset)

    def rows(idx) -> Split:
        return Split([enc.train_files[i] for i in idx], enc.train_labels[idx])

    return DataBundle(train=rows(train_idx), val=rows(val_idx) if val else None,
                      test=Split(enc.test_files, enc.test_labels),
                      source=str(Path(path).expanduser().resolve()))  # fmt: skip


def prepare_data(
    data: str | None,
    *,
    val: int,
    split_seed: int,
    subset: int | None,
    device: torch.device,
    download: bool = False,
    log=print,
) -> DataBundle:
    arrays, source = resolve_arrays(data, download, log)
    train_idx, val_idx = split_rows(arrays.train_labels, val, split_seed, subset)

    def to_device(images: np.ndarray, labels: np.ndarray, rows=None) -> Split:
        if rows is not None:
            images, labels = images[rows], labels[rows]
        return Split(
            torch.from_numpy(np.array(images)).to(device),
            torch.from_numpy(np.array(labels)).to(device),
        )

    return DataBundle(
        train=to_device(arrays.train_images, arrays.train_labels, train_idx),
        val=to_device(arrays.train_images, arrays.train_labels, val_idx) if val else None,
        test=to_device(arrays.test_images, arrays.test_labels),
        source=source,
    )
