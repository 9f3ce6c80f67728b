"""The prefetching wrapper: the same batches in the same order, errors raised in the
consumer, and no thread left behind when the consumer stops early."""

import threading

import pytest
import torch

from fastcifar.data.loader import TensorLoader
from fastcifar.data.prefetch import Prefetched


def loader():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 32, 32, 3), dtype=torch.uint8, generator=g)
    return TensorLoader(images, torch.arange(50), 8, train=True, seed=3)


def prefetch_threads() -> int:
    return sum(t.name == "fastcifar-prefetch" for t in threading.enumerate())


@pytest.mark.parametrize("epoch", [0, 2])
def test_same_batches_in_the_same_order(epoch):
    plain, ahead = loader(), Prefetched(loader(), depth=2)
    plain.set_epoch(epoch)
    ahead.set_epoch(epoch)
    got = list(ahead)
    want = list(plain)
    assert len(got) == len(want) == len(ahead) == 6 and ahead.num_samples == 48
    for (xa, ya), (xb, yb) in zip(got, want, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_errors_reach_the_consumer():
    def broken():
        yield torch.zeros(1), torch.zeros(1)
        raise RuntimeError("disk vanished")

    class Source:
        def __iter__(self):
            return broken()

    batches = iter(Prefetched(Source()))
    next(batches)
    with pytest.raises(RuntimeError, match="disk vanished"):
        next(batches)
    assert prefetch_threads() == 0


def test_stopping_early_ends_the_thread():
    batches = iter(Prefetched(loader(), depth=1))
    next(batches)
    assert prefetch_threads() == 1
    batches.close()
    assert prefetch_threads() == 0
