"""Readers for the CIFAR-10 distributions fastcifar accepts.

- the official `cifar-10-python.tar.gz` (md5 checked) or its extracted
  `cifar-10-batches-py/` directory (torchvision's layout);
- an image-folder layout `train/<class>/*.{png,jpg}`, `test/<class>/*`, as a
  directory or a `.zip` (optionally under one top-level folder).

Each reader returns `CifarArrays`: uint8 images (N, 32, 32, 3) and int64 labels in the
official class order.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import pickle
import tarfile
import zipfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastcifar.errors import UserError

CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
OFFICIAL_TARBALL = "cifar-10-python.tar.gz"
OFFICIAL_URL = f"https://www.cs.toronto.edu/~kriz/{OFFICIAL_TARBALL}"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
HOW_TO_GET = (
    f"pass --data PATH (cifar-10-python.tar.gz, cifar-10-batches-py/, or an image-folder "
    f"directory or .zip), set FASTCIFAR_DATA, or add --download to fetch {OFFICIAL_URL}"
)


@dataclass(frozen=True)
class CifarArrays:
    train_images: np.ndarray  # uint8 (N, 32, 32, 3)
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray
    test_labels: np.ndarray


def read_source(path: Path) -> CifarArrays:
    """Read any supported CIFAR-10 source; a one-line UserError when it is not one."""
    read = source_reader(path)
    try:
        return read()
    except UserError:
        raise
    except (
        OSError,
        EOFError,
        ValueError,
        KeyError,
        pickle.UnpicklingError,
        tarfile.TarError,
        zipfile.BadZipFile,
    ) as exc:
        raise UserError(f"cannot read CIFAR-10 from {path}: {exc}") from None


def source_reader(path: Path) -> Callable[[], CifarArrays]:
    """What reads `path`, found from its layout without decoding anything (a quick check
    before a long decode); a one-line UserError when it is no CIFAR-10 source."""
    if not path.exists():
        raise UserError(f"data not found: {path}; {HOW_TO_GET}")
    if path.is_dir():
        if (path / "cifar-10-batches-py").is_dir():
            path = path / "cifar-10-batches-py"
        if (path / "data_batch_1").exists():
            return lambda: _read_batches(lambda name: (path / name).read_bytes())
        if (path / "train").is_dir() and (path / "test").is_dir():
            return lambda: _read_image_folder(_DirFiles(path))
        if (path / OFFICIAL_TARBALL).is_file():  # a --download folder, or torchvision's
            return lambda: _read_tarball(path / OFFICIAL_TARBALL)
        raise UserError(
            f"{path} holds neither cifar-10-batches-py, {OFFICIAL_TARBALL} nor train/ and test/"
        )
    if path.name.endswith((".tar.gz", ".tgz")):
        return lambda: _read_tarball(path)
    if zipfile.is_zipfile(path):
        return lambda: _read_image_folder(_ZipFiles(path))
    if path.suffix == ".zip":
        raise UserError(f"{path} is not a readable zip file (truncated or damaged?)")
    raise UserError(f"{path} is not a CIFAR-10 source; {HOW_TO_GET}")


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _read_tarball(path: Path) -> CifarArrays:
    if md5sum(path) != OFFICIAL_MD5:
        raise UserError(f"{path} is not the official cifar-10-python.tar.gz (md5 mismatch)")
    with tarfile.open(path, "r:gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        return _read_batches(lambda name: tar.extractfile(members[name]).read())


def _read_batches(read) -> CifarArrays:
    """The pickled batches: data_batch_1..5 for training, test_batch for test."""

    def load(names):
        images, labels = [], []
        for name in names:
            batch = pickle.loads(read(name), encoding="bytes")
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
        return np.ascontiguousarray(np.concatenate(images).transpose(0, 2, 3, 1)), np.concatenate(
            labels
        )

    train = load([f"data_batch_{i}" for i in range(1, 6)])
    test = load(["test_batch"])
    return CifarArrays(*train, *test)


class _DirFiles:
    """File access for an image-folder directory."""

    def __init__(self, root: Path):
        self.root = root

    def names(self) -> list[str]:
        return [p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()]

    def reader(self):
        return lambda name: (self.root / name).read_bytes()


class _ZipFiles:
    """File access for an image-folder zip; each worker process opens its own handle."""

    def __init__(self, path: Path):
        self.path = path

    def names(self) -> list[str]:
        with zipfile.ZipFile(self.path) as z:
            return [n for n in z.namelist() if not n.endswith("/")]

    def reader(self):
        handle = zipfile.ZipFile(self.path)
        return handle.read


def _list_image_folder(files) -> dict[str, list[tuple[str, int]]]:
    """(file name, label) per split, in sorted name order: the order of the arrays."""
    by_split: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for name in sorted(files.names()):
        if not name.lower().endswith(IMAGE_SUFFIXES):
            continue
        parts = name.split("/")
        if len(parts) == 4:
            parts = parts[1:]  # one top-level folder around train/ and test/
        if len(parts) != 3 or parts[0] not in by_split:
            continue
        split, cls, _ = parts
        if cls not in CLASSES:
            raise UserError(
                f"unknown class folder {cls!r} in {name}; expected {', '.join(CLASSES)}"
            )
        by_split[split].append((name, CLASSES.index(cls)))
    for split, items in by_split.items():
        if not items:
            raise UserError(f"no images under {split}/<class>/ in the image folder")
    return by_split


def _read_image_folder(files) -> CifarArrays:
    arrays = []
    for items in _list_image_folder(files).values():
        names = [n for n, _ in items]
        arrays += [_decode_all(files, names), np.array([c for _, c in items], np.int64)]
    return CifarArrays(*arrays)


@dataclass(frozen=True)
class EncodedFiles:
    """The undecoded image files of an image folder, in the order of its CifarArrays."""

    train_files: list[np.ndarray]  # each a 1-D uint8 array: one file's bytes
    train_labels: np.ndarray
    test_files: list[np.ndarray]
    test_labels: np.ndarray


def read_encoded(path: Path) -> EncodedFiles:
    """The image files of an image-folder directory or zip, for decoding elsewhere (DALI)."""
    if path.is_dir() and (path / "train").is_dir() and (path / "test").is_dir():
        files = _DirFiles(path)
    elif path.is_file() and zipfile.is_zipfile(path):
        files = _ZipFiles(path)
    else:
        raise UserError(f"decoding with DALI needs an image-folder directory or .zip, not {path}")
    read = files.reader()
    parts = []
    for items in _list_image_folder(files).values():
        parts += [[np.frombuffer(read(n), np.uint8) for n, _ in items],
                  np.array([c for _, c in items], np.int64)]  # fmt: skip
    return EncodedFiles(*parts)


def _decode_all(files, names: list[str]) -> np.ndarray:
    chunks = [names[i : i + 2500] for i in range(0, len(names), 2500)]
    if len(chunks) == 1:
        return _decode_chunk(files, chunks[0])
    # Spawned, not forked: a forked worker inherits the parent's objects but not their
    # threads, and one that garbage-collects such an object (a DALI pipeline) crashes.
    with ProcessPoolExecutor(mp_context=multiprocessing.get_context("spawn")) as pool:
        return np.concatenate(list(pool.map(_decode_chunk, [files] * len(chunks), chunks)))


def _decode_chunk(files, names: list[str]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    read = files.reader()
    out = np.empty((len(names), 32, 32, 3), np.uint8)
    for i, name in enumerate(names):
        try:
            with Image.open(io.BytesIO(read(name))) as img:
                rgb = img.convert("RGB")
        except UnidentifiedImageError:
            raise UserError(
                f"cannot decode image {name}: not an image format Pillow reads"
            ) from None
        except OSError as exc:
            raise UserError(f"cannot decode image {name}: {exc}") from None
        if rgb.size != (32, 32):
            raise UserError(
                f"image {name} is {rgb.size[0]}x{rgb.size[1]}, CIFAR-10 images are 32x32"
            )
        out[i] = np.asarray(rgb)
    return out
