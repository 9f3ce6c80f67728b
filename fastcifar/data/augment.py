"""Batch augmentation on the device, and the plain per-image reference it must match.

The dataset is normalised and zero-padded once (`prepare_images`), in the dtype the model
wants. A training batch is then one gather: the random crop offset and the horizontal
flip become the row and column indices read from the padded images, so crop, flip,
normalisation and cast cost a single pass over the batch. Cutout, when on, is one
masked fill more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MEAN = (0.4914, 0.4822, 0.4465)  # per-channel mean of the CIFAR-10 training set, 0..1
STD = (0.2470, 0.2435, 0.2616)  # per-channel standard deviation, 0..1


@dataclass(frozen=True)
class AugmentDraw:
    """The random choices for one batch: crop offsets in 0..2*pad, flips, cutout centres."""

    dy: torch.Tensor  # int64 (B,)
    dx: torch.Tensor  # int64 (B,)
    flip: torch.Tensor  # bool (B,)
    cut_y: torch.Tensor | None = None  # int64 (B,): cutout centre row, or None for no cutout
    cut_x: torch.Tensor | None = None


def draw(
    batch: int, pad: int, cutout: int, size: int, generator: torch.Generator, flip: bool = True
) -> AugmentDraw:
    """Draw one batch of augmentation choices from `generator` (on its device)."""
    device = generator.device
    dy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=device)
    dx = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=device)
    flips = torch.rand(batch, generator=generator, device=device) < 0.5
    if not flip:
        flips = torch.zeros_like(flips)
    if cutout <= 0:
        return AugmentDraw(dy, dx, flips)
    cy = torch.randint(0, size, (batch,), generator=generator, device=device)
    cx = torch.randint(0, size, (batch,), generator=generator, device=device)
    return AugmentDraw(dy, dx, flips, cy, cx)


def normalized_zero(dtype: torch.dtype, device) -> torch.Tensor:
    """What a black (zero) pixel becomes after normalisation, per channel."""
    mean, std = torch.tensor(MEAN, device=device), torch.tensor(STD, device=device)
    return (-mean / std).to(dtype)


def prepare_images(images: torch.Tensor, pad: int, dtype: torch.dtype) -> torch.Tensor:
    """uint8 NHWC -> zero-padded (by `pad` on each side of H and W), normalised, in `dtype`.

    Padding happens in pixel space, as torchvision's RandomCrop(padding=pad) does."""
    if pad:
        images = torch.nn.functional.pad(images, (0, 0, pad, pad, pad, pad))
    mean = torch.tensor(MEAN, device=images.device) * 255
    inv_std = 1 / (torch.tensor(STD, device=images.device) * 255)
    out = torch.empty(images.shape, dtype=dtype, device=images.device)
    for start in range(0, len(images), 4096):  # bounded float32 temporaries
        chunk = images[start : start + 4096].float()
        out[start : start + 4096] = torch.addcmul(-mean * inv_std, chunk, inv_std)
    return out


def crop_flip(
    prepared: torch.Tensor, index: torch.Tensor, d: AugmentDraw, size: int
) -> torch.Tensor:
    """Crops of `size` at (dy, dx) of the padded images `index`, mirrored where `flip`:
    one index_select of pixels from the flattened (N*H*W, C) images."""
    _, height, width, channels = prepared.shape
    ar = torch.arange(size, device=prepared.device)
    rows = d.dy[:, None] + ar  # (B, size)
    cols = d.dx[:, None] + torch.where(d.flip[:, None], size - 1 - ar, ar)
    pixel = (index[:, None, None] * height + rows[:, :, None]) * width + cols[:, None, :]
    picked = prepared.view(-1, channels).index_select(0, pixel.view(-1))
    return picked.view(len(index), size, size, channels)


def apply_cutout(images: torch.Tensor, d: AugmentDraw, cutout: int) -> torch.Tensor:
    """Black out a cutout x cutout square centred at (cut_y, cut_x), clipped at the borders."""
    if d.cut_y is None or cutout <= 0:
        return images
    ar = torch.arange(images.shape[1], device=images.device)
    lo_y, lo_x = d.cut_y - cutout // 2, d.cut_x - cutout // 2
    in_y = (ar[None] >= lo_y[:, None]) & (ar[None] < lo_y[:, None] + cutout)
    in_x = (ar[None] >= lo_x[:, None]) & (ar[None] < lo_x[:, None] + cutout)
    hole = (in_y[:, :, None] & in_x[:, None, :])[..., None]
    return torch.where(hole, normalized_zero(images.dtype, images.device), images)


def to_nchw(images: torch.Tensor) -> torch.Tensor:
    """NHWC -> NCHW as a view: the result is channels-last in memory, no copy."""
    return images.permute(0, 3, 1, 2)


def augment_batch(
    prepared: torch.Tensor, index: torch.Tensor, d: AugmentDraw, *, size: int, cutout: int
) -> torch.Tensor:
    """The training batch for rows `index` of the prepared images: crop, flip, cutout."""
    return to_nchw(apply_cutout(crop_flip(prepared, index, d, size), d, cutout))


def reference_augment(
    images: torch.Tensor, index: torch.Tensor, d: AugmentDraw, pad: int, cutout: int
) -> torch.Tensor:
    """Plain per-image reference, as torchvision's RandomCrop(padding) + flip + ToTensor +
    Normalize and a pixel-space cutout do it: uint8 NHWC in, float32 NCHW out. Slow; for
    tests and benchmarks."""
    size = images.shape[1]
    mean = torch.tensor(MEAN)[:, None, None]
    std = torch.tensor(STD)[:, None, None]
    out = []
    for b, i in enumerate(index.tolist()):
        img = images[i].permute(2, 0, 1).float() / 255  # CHW in 0..1
        img = torch.nn.functional.pad(img, (pad, pad, pad, pad))
        y, x = int(d.dy[b]), int(d.dx[b])
        img = img[:, y : y + size, x : x + size]
        if bool(d.flip[b]):
            img = img.flip(-1)
        if d.cut_y is not None and cutout > 0:
            y0, x0 = int(d.cut_y[b]) - cutout // 2, int(d.cut_x[b]) - cutout // 2
            img = img.clone()
            img[:, max(y0, 0) : max(y0 + cutout, 0), max(x0, 0) : max(x0 + cutout, 0)] = 0
        out.append((img - mean) / std)
    return torch.stack(out)
