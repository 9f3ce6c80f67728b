"""The tensor loader's batched augmentation against the per-image reference."""

import pytest
import torch

from fastcifar.data.augment import (
    AugmentDraw,
    augment_batch,
    crop_flip,
    draw,
    prepare_images,
    reference_augment,
    to_nchw,
)
from fastcifar.data.loader import TensorLoader

# bf16 keeps 8 bits of mantissa: values up to about 2.1 round by up to 2**-8 * 2
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float16: (2e-3, 2e-3),
}


def indexed_images(n: int) -> torch.Tensor:
    """Images whose pixels encode (index, row, col), so any mix-up is visible."""
    i = (torch.arange(n)[:, None, None] % 251).expand(n, 32, 32)
    r = (torch.arange(32)[None, :, None] * 8).expand(n, 32, 32)
    c = (torch.arange(32)[None, None, :] * 8 + 1).expand(n, 32, 32)
    return torch.stack([i, r, c], -1).to(torch.uint8)


def normalized(images: torch.Tensor) -> torch.Tensor:
    return to_nchw(prepare_images(images, 0, torch.float32))


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("cutout", [0, 8])
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_batched_augment_matches_reference(batch, cutout, dtype):
    images = torch.randint(0, 256, (100, 32, 32, 3), dtype=torch.uint8)
    index = torch.randperm(100)[:batch]
    d = draw(batch, 4, cutout, 32, torch.Generator().manual_seed(batch))
    got = augment_batch(prepare_images(images, 4, dtype), index, d, size=32, cutout=cutout)
    want = reference_augment(images, index, d, pad=4, cutout=cutout)
    assert got.dtype == dtype
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol)
    assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_loader_output_dtype_shape_and_range(dtype):
    images = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8)
    loader = TensorLoader(images, torch.arange(16), 8, train=True, dtype=dtype)
    for x, y in loader:
        assert x.shape == (8, 3, 32, 32) and x.dtype == dtype and y.shape == (8,)
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert x.float().abs().max() < 2.2  # (0..1 - mean) / std stays within about +-2.1


def test_crops_are_shifted_copies_and_flips_are_flips():
    images = indexed_images(50)
    prepared = prepare_images(images, 4, torch.float32)
    plain = prepare_images(images, 0, torch.float32)
    black = prepared[0, 0, 0]  # a padding pixel
    d = AugmentDraw(
        dy=torch.tensor([0, 4, 8, 4]), dx=torch.tensor([0, 4, 8, 2]),
        flip=torch.tensor([False, False, False, True]),
    )  # fmt: skip
    out = crop_flip(prepared, torch.tensor([3, 5, 7, 9]), d, 32)
    # offset (4, 4) is the identity; (0, 0) shifts the image down-right by 4, black above
    assert torch.equal(out[1], plain[5])
    assert torch.equal(out[0][4:, 4:], plain[3][:28, :28]) and (out[0][:4] == black).all()
    assert torch.equal(out[2][:28, :28], plain[7][4:, 4:]) and (out[2][28:] == black).all()
    # a flip mirrors the columns of the crop at (4, 2)
    unflipped = AugmentDraw(d.dy[3:], d.dx[3:], torch.tensor([False]))
    assert torch.equal(out[3], crop_flip(prepared, torch.tensor([9]), unflipped, 32)[0].flip(1))


def test_epoch_covers_every_image_once_with_aligned_labels():
    n = 103
    images = indexed_images(n)
    labels = torch.arange(n)
    loader = TensorLoader(
        images, labels, 10, train=True, seed=1, pad=0, flip=False, drop_last=False
    )
    seen = []
    for x, y in loader:
        torch.testing.assert_close(x, normalized(images[y]))  # each image travels with its label
        seen += y.tolist()
    assert sorted(seen) == list(range(n))


def test_drop_last_and_order_change_per_epoch():
    loader = TensorLoader(indexed_images(25), torch.arange(25), 10, train=True, seed=0)
    assert len(loader) == 2 and loader.num_samples == 20
    first = torch.cat([y for _, y in loader])
    loader.set_epoch(1)
    second = torch.cat([y for _, y in loader])
    assert not torch.equal(first, second)
    loader.set_epoch(0)
    assert torch.equal(first, torch.cat([y for _, y in loader]))  # a function of (seed, epoch)


def test_eval_loader_keeps_order_without_augmenting():
    images = indexed_images(25)
    loader = TensorLoader(images, torch.arange(25), 10, train=False)
    xs, ys = zip(*loader, strict=True)
    assert [len(y) for y in ys] == [10, 10, 5]
    torch.testing.assert_close(torch.cat(xs), normalized(images))


def test_offsets_uniform_and_flips_half():
    d = draw(90_000, 4, 0, 32, torch.Generator().manual_seed(0))
    counts = torch.bincount(d.dy, minlength=9).float()
    assert counts.min() / counts.max() > 0.95  # each of the 9 offsets about 10,000 times
    assert abs(d.flip.float().mean().item() - 0.5) < 0.01
    assert not draw(100, 4, 0, 32, torch.Generator().manual_seed(0), flip=False).flip.any()
