"""Shared fixtures: small CIFAR-10 sources in every supported layout, built by the tests,
and the real data set from ../shared when it is there."""

from __future__ import annotations

import os

# Without a GPU, Triton kernels run in its interpreter; it must be chosen before triton
# is imported anywhere in the test process.
if not os.path.exists("/dev/nvidia0") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastcifar.data.sources import CLASSES

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.zip"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets the session's private cache and no inherited FASTCIFAR_DATA."""
    monkeypatch.setenv("FASTCIFAR_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.delenv("FASTCIFAR_DATA", raising=False)


def make_arrays(n_train: int = 60, n_test: int = 20, seed: int = 0):
    """Random images, every class present, labels cycling 0..9."""
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8)
    return train, np.arange(n_train) % 10, test, np.arange(n_test) % 10


def write_batches_dir(root: Path, arrays) -> Path:
    """torchvision's cifar-10-batches-py layout: five train pickles and test_batch."""
    train, train_y, test, test_y = arrays
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def dump(name, images, labels):
        data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
        batch = {b"data": data, b"labels": [int(v) for v in labels]}
        (folder / name).write_bytes(pickle.dumps(batch))

    for i, part in enumerate(np.array_split(np.arange(len(train)), 5), 1):
        dump(f"data_batch_{i}", train[part], train_y[part])
    dump("test_batch", test, test_y)
    return folder


def write_image_folder(root: Path, arrays, fmt: str = "PNG") -> Path:
    train, train_y, test, test_y = arrays
    for split, images, labels in (("train", train, train_y), ("test", test, test_y)):
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i:05d}.{fmt.lower()}", format=fmt)
    return root


def write_zip(path: Path, arrays, prefix: str = "") -> Path:
    train, train_y, test, test_y = arrays
    with zipfile.ZipFile(path, "w") as z:
        for split, images, labels in (("train", train, train_y), ("test", test, test_y)):
            for i, (img, label) in enumerate(zip(images, labels, strict=True)):
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="PNG")
                z.writestr(f"{prefix}{split}/{CLASSES[label]}/{i:05d}.png", buf.getvalue())
    return path


@pytest.fixture
def arrays():
    return make_arrays()


@pytest.fixture
def batches_dir(tmp_path, arrays):
    return write_batches_dir(tmp_path, arrays)


@pytest.fixture
def png_folder(tmp_path, arrays):
    return write_image_folder(tmp_path / "folder", arrays)


@pytest.fixture
def png_zip(tmp_path, arrays):
    return write_zip(tmp_path / "cifar.zip", arrays)


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL_DATA.exists():
        pytest.skip(f"real CIFAR-10 not found at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(scope="session")
def fast_threads():
    """Tests on the 2-core machine run torch single-threaded unless they say otherwise."""
    return int(os.environ.get("FASTCIFAR_TEST_THREADS", "0"))
