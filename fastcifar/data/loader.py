"""The tensor loader: the dataset lives on the device as uint8 and is augmented in batches.

A loader is an iterable of `(images, labels)` batches with `len()` and `set_epoch()`;
other loaders (DALI, native) implement the same small interface.
"""

from __future__ import annotations

import torch

from fastcifar.data.augment import augment_batch, draw, prepare_images, to_nchw


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A distinct, reproducible seed per (run seed, epoch, stream)."""
    return (seed * 1_000_003 + epoch * 7919 + stream) % (2**63)


class EpochBatches:
    """The part of the loader interface every loader shares: batches per epoch under the
    drop-last policy, images per epoch, and the epoch whose order comes next. A loader
    sets `labels`, `batch_size`, `drop_last` and `epoch`."""

    labels: object  # anything with a length: a tensor or an array
    batch_size: int
    drop_last: bool
    epoch: int

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        """Images yielded per epoch."""
        return len(self) * self.batch_size if self.drop_last else len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class TensorLoader(EpochBatches):
    """Batches from a device-resident uint8 NHWC dataset.

    Training loaders shuffle per epoch and augment (crop with `pad`, flip, optional
    `cutout`); evaluation loaders keep order and only normalise. Every sample order and
    augmentation draw is a function of (seed, epoch), so a resumed run sees the same
    batches as an uninterrupted one.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        pad: int = 4,
        flip: bool = True,
        cutout: int = 0,
        dtype: torch.dtype = torch.float32,
        drop_last: bool | None = None,
        native: bool = False,
    ):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError("images must be uint8 (N, H, W, 3)")
        self.size = images.shape[1]
        self.native = native
        # native: the fused op reads the uint8 images; otherwise a prepared copy is gathered
        self.images = (
            images.contiguous() if native else prepare_images(images, pad if train else 0, dtype)
        )
        self.labels = labels
        self.batch_size = batch_size
        self.train, self.seed, self.pad, self.flip, self.cutout = train, seed, pad, flip, cutout
        self.dtype = dtype
        self.drop_last = train if drop_last is None else drop_last
        self.epoch = 0

    def __iter__(self):
        device = self.images.device
        n = len(self.labels)
        if not self.train:
            for start in range(0, n, self.batch_size):
                rows = slice(start, start + self.batch_size)
                if self.native:
                    index = torch.arange(start, min(start + self.batch_size, n), device=device)
                    no_aug = draw(len(index), 0, 0, self.size, torch.Generator(device), flip=False)
                    yield self._native_batch(index, no_aug, pad=0), self.labels[rows]
                else:
                    yield to_nchw(self.images[rows]), self.labels[rows]
            return
        order_gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, 0))
        order = torch.randperm(n, generator=order_gen).to(device)
        aug_gen = torch.Generator(device).manual_seed(epoch_seed(self.seed, self.epoch, 1))
        for b in range(len(self)):
            index = order[b * self.batch_size : (b + 1) * self.batch_size]
            d = draw(len(index), self.pad, self.cutout, self.size, aug_gen, self.flip)
            if self.native:
                x = self._native_batch(index, d, pad=self.pad)
            else:
                x = augment_batch(self.images, index, d, size=self.size, cutout=self.cutout)
            yield x, self.labels[index]

    def _native_batch(self, index: torch.Tensor, d, pad: int) -> torch.Tensor:
        from fastcifar.ops import native

        cutout = self.cutout if self.train else 0
        return native.augment_batch(self.images, index, d, pad=pad, cutout=cutout, dtype=self.dtype)
