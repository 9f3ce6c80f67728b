import os
import shutil
import tarfile

import numpy as np
import pytest

from fastcifar.data import cache, sources
from fastcifar.data.cache import cache_root, content_hash, load_cached
from fastcifar.data.dataset import resolve_arrays
from fastcifar.data.sources import read_source
from fastcifar.data.split import validation_split
from fastcifar.errors import UserError
from fastcifar.results import data_name

from .conftest import make_arrays, write_batches_dir, write_zip


def assert_same_arrays(got, arrays):
    train, train_y, test, test_y = arrays
    np.testing.assert_array_equal(got.train_images, train)
    np.testing.assert_array_equal(got.train_labels, train_y)
    np.testing.assert_array_equal(got.test_images, test)
    np.testing.assert_array_equal(got.test_labels, test_y)


def folder_order(arrays):
    """An image folder is read class by class, file names sorted within a class."""
    train, train_y, test, test_y = arrays
    tr, te = np.argsort(train_y, kind="stable"), np.argsort(test_y, kind="stable")
    return train[tr], train_y[tr], test[te], test_y[te]


def test_batches_dir(batches_dir, arrays):
    assert_same_arrays(read_source(batches_dir), arrays)
    assert_same_arrays(read_source(batches_dir.parent), arrays)  # the folder around it


def test_png_folder_and_zip(png_folder, png_zip, arrays):
    assert_same_arrays(read_source(png_folder), folder_order(arrays))
    assert_same_arrays(read_source(png_zip), folder_order(arrays))


def test_zip_with_top_level_folder(tmp_path, arrays):
    assert_same_arrays(
        read_source(write_zip(tmp_path / "c.zip", arrays, prefix="cifar10/")), folder_order(arrays)
    )


def test_jpeg_folder_decodes_close_to_original(tmp_path, arrays):
    from .conftest import write_image_folder

    got = read_source(write_image_folder(tmp_path / "jpg", arrays, fmt="JPEG"))
    assert got.train_images.shape == arrays[0].shape
    np.testing.assert_array_equal(got.train_labels, folder_order(arrays)[1])


def test_official_tarball(tmp_path, batches_dir, arrays, monkeypatch):
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(batches_dir, arcname="cifar-10-batches-py")
    with pytest.raises(UserError, match="md5 mismatch"):
        read_source(tarball)
    monkeypatch.setattr(sources, "OFFICIAL_MD5", sources.md5sum(tarball))
    assert_same_arrays(read_source(tarball), arrays)


def test_download_fetches_into_the_data_path_once(tmp_path, batches_dir, arrays, monkeypatch):
    """`--data PATH --download` puts the official tarball at PATH (a folder, or the
    tarball's own path), as torchvision's root; a failed download leaves nothing."""
    import io
    import urllib.error

    from fastcifar.data import dataset

    tarball = tmp_path / "served.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(batches_dir, arcname="cifar-10-batches-py")
    for module in (sources, dataset):
        monkeypatch.setattr(module, "OFFICIAL_MD5", sources.md5sum(tarball))
    fetched = []

    def urlopen(url, timeout):
        fetched.append(url)
        return io.BytesIO(tarball.read_bytes())

    monkeypatch.setattr(dataset.urllib.request, "urlopen", urlopen)
    folder, named = tmp_path / "data", tmp_path / "elsewhere" / "c.tar.gz"
    for where in (folder, named):
        for _ in range(2):  # the second time it is there already
            got, source = resolve_arrays(str(where), download=True, log=lambda _: None)
            assert_same_arrays(got, arrays)
            assert source == str(where)
    assert fetched == [sources.OFFICIAL_URL] * 2
    assert sorted(p.name for p in folder.iterdir()) == ["cifar-10-python.tar.gz"]

    def unreachable(url, timeout):
        raise urllib.error.URLError("no route")

    monkeypatch.setattr(dataset.urllib.request, "urlopen", unreachable)
    with pytest.raises(UserError, match="cannot download CIFAR-10 from .*no route"):
        resolve_arrays(str(tmp_path / "offline"), download=True, log=lambda _: None)
    assert list((tmp_path / "offline").iterdir()) == []  # no partial file left
    monkeypatch.setattr(dataset.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"x"))
    with pytest.raises(UserError, match="fails its md5 check"):  # an empty folder is fetched into
        resolve_arrays(str(tmp_path / "offline"), download=True, log=lambda _: None)
    assert list((tmp_path / "offline").iterdir()) == []


def test_bad_sources(tmp_path):
    with pytest.raises(UserError, match="data not found"):
        read_source(tmp_path / "nope.zip")
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(UserError, match="bad.zip is not a readable zip file"):
        read_source(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="neither"):
        read_source(empty)
    notes = []  # found out before a decode is announced (or a large file hashed)
    with pytest.raises(UserError, match="neither"):
        load_cached(empty, log=notes.append)
    assert notes == []


def test_an_undecodable_image_is_named(png_folder):
    broken = next((png_folder / "train").glob("*/*.png"))
    broken.write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    with pytest.raises(UserError) as caught:
        read_source(png_folder)
    name = broken.relative_to(png_folder).as_posix()
    assert str(caught.value) == f"cannot decode image {name}: not an image format Pillow reads"


def test_cache_roundtrip_is_memory_mapped(png_zip, arrays):
    first = load_cached(png_zip, log=lambda _: None)
    assert_same_arrays(first, folder_order(arrays))
    second = load_cached(png_zip, log=lambda _: None)
    assert isinstance(second.train_images, np.memmap)
    assert_same_arrays(second, folder_order(arrays))


def test_a_read_that_finds_the_entry_mid_replacement_is_tried_again(png_zip, arrays, monkeypatch):
    """Two processes decoding the same source (a sweep's workers): the first read after
    writing may find the other one's replacement half done."""
    real_read, calls = cache.read_entry, []

    def racing_read(entry):
        calls.append(entry)  # the lookup, the writer's own check, then the first read
        return None if len(calls) <= 3 else real_read(entry)

    monkeypatch.setattr(cache, "read_entry", racing_read)
    got = load_cached(png_zip, log=lambda _: None)
    assert_same_arrays(got, folder_order(arrays))
    assert len(calls) == 4


def test_an_uncreatable_cache_folder_is_refused_before_decoding(png_zip, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FASTCIFAR_CACHE", str(blocker / "cache"))
    messages = []
    with pytest.raises(UserError, match="cannot create the cache folder .*FASTCIFAR_CACHE"):
        load_cached(png_zip, log=messages.append)
    assert messages == []  # nothing decoded first


@pytest.mark.parametrize("damage", ["truncate", "tamper", "manifest"])
def test_damaged_cache_is_rebuilt(png_zip, arrays, damage):
    load_cached(png_zip, log=lambda _: None)
    entry = cache_root() / content_hash(png_zip)
    target = entry / "train_images.npy"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "tamper":
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        (entry / "manifest.json").write_text("{not json")
    assert cache.read_entry(entry) is None
    messages = []
    assert_same_arrays(load_cached(png_zip, log=messages.append), folder_order(arrays))
    assert any("damaged" in m for m in messages)
    assert cache.read_entry(entry) is not None


def test_validation_split_is_balanced_and_seeded():
    labels = np.repeat(np.arange(10), 100)
    train, val = validation_split(labels, 50, seed=3)
    assert len(val) == 50 and len(train) == 950
    assert np.bincount(labels[val], minlength=10).tolist() == [5] * 10
    assert not set(train) & set(val)
    np.testing.assert_array_equal(val, validation_split(labels, 50, seed=3)[1])
    assert not np.array_equal(val, validation_split(labels, 50, seed=4)[1])
    assert len(validation_split(labels, 0, seed=0)[1]) == 0
    with pytest.raises(UserError):
        validation_split(labels, 1000, seed=0)


def test_real_zip_reads_fully(real_data):
    arrays = load_cached(real_data, log=lambda _: None)
    assert arrays.train_images.shape == (50000, 32, 32, 3)
    assert arrays.test_images.shape == (10000, 32, 32, 3)
    assert np.bincount(arrays.train_labels).tolist() == [5000] * 10
    assert np.bincount(arrays.test_labels).tolist() == [1000] * 10


def _cache_twice(tmp_path, monkeypatch, arrays):
    """A private cache with two entries: an older one whose source still exists and a
    newer one whose source was deleted. Returns (kept source, orphaned entry)."""
    monkeypatch.setenv("FASTCIFAR_CACHE", str(tmp_path / "cache"))
    kept = write_zip(tmp_path / "kept.zip", arrays)
    load_cached(kept, log=lambda _: None)
    os.utime(cache_root() / content_hash(kept) / "manifest.json", (1e9, 1e9))
    gone = write_batches_dir(tmp_path / "gone", make_arrays(n_train=30, n_test=10, seed=1))
    orphan = cache_root() / content_hash(gone)
    load_cached(gone, log=lambda _: None)
    shutil.rmtree(gone)
    return kept, orphan


def test_without_data_the_cached_copy_of_an_existing_source_wins(tmp_path, monkeypatch, arrays):
    kept, orphan = _cache_twice(tmp_path, monkeypatch, arrays)
    messages = []
    got, source = resolve_arrays(None, download=False, log=messages.append)
    assert source == str(kept)
    assert_same_arrays(got, folder_order(arrays))
    assert any(str(kept) in m and "1 other cached source" in m for m in messages)
    shutil.rmtree(cache_root() / content_hash(kept))
    got, source = resolve_arrays(None, download=False, log=lambda _: None)
    assert source == str(orphan) and len(got.train_labels) == 30
    assert data_name(source) == "cifar-10-batches-py"
    again, _ = resolve_arrays(source, download=False, log=lambda _: None)
    np.testing.assert_array_equal(again.train_images, got.train_images)


def test_validation_larger_than_the_data_names_its_size():
    with pytest.raises(UserError, match="the data has 60 training images"):
        validation_split(np.arange(60) % 10, 5000, seed=0)
