"""Batch augmentation on the device, and the plain per-image reference it must match.

Random crop with zero padding, horizontal flip and cutout are expressed as one gather:
the crop offset and the flip become the row and column indices read from a dataset that
was padded once, so a batch costs one indexing op plus the normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MEAN = (0.4914, 0.4822, 0.4465)  # per-channel mean of the CIFAR-10 training set
STD = (0.2470, 0.2435, 0.2616)  # per-channel standard deviation


@dataclass(frozen=True)
class AugmentDraw:
    """The random choices for one batch: crop offsets in 0..2*pad, flips, cutout boxes."""

    dy: torch.Tensor  # int64 (B,)
    dx: torch.Tensor  # int64 (B,)
    flip: torch.Tensor  # bool (B,)
    cut_y: torch.Tensor | None = None  # int64 (B,): cutout centre row, or None for no cutout
    cut_x: torch.Tensor | None = None


def draw(batch: int, pad: int, cutout: int, size: int, generator: torch.Generator) -> AugmentDraw:
    """Draw one batch of augmentation choices from `generator` (on its device)."""
    device = generator.device
    dy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=device)
    dx = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=device)
    flip = torch.rand(batch, generator=generator, device=device) < 0.5
    if cutout <= 0:
        return AugmentDraw(dy, dx, flip)
    cy = torch.randint(0, size, (batch,), generator=generator, device=device)
    cx = torch.randint(0, size, (batch,), generator=generator, device=device)
    return AugmentDraw(dy, dx, flip, cy, cx)


def pad_images(images: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad uint8 NHWC images by `pad` pixels on each side of H and W."""
    return torch.nn.functional.pad(images, (0, 0, pad, pad, pad, pad)) if pad else images


def crop_flip(padded: torch.Tensor, index: torch.Tensor, d: AugmentDraw, size: int) -> torch.Tensor:
    """Gather crops of `size` at (dy, dx), flipped where `flip`, from padded uint8 NHWC images."""
    ar = torch.arange(size, device=padded.device)
    rows = d.dy[:, None] + ar  # (B, size)
    cols = d.dx[:, None] + torch.where(d.flip[:, None], size - 1 - ar, ar)
    return padded[index[:, None, None], rows[:, :, None], cols[:, None, :]]


def apply_cutout(images: torch.Tensor, d: AugmentDraw, cutout: int) -> torch.Tensor:
    """Zero a cutout x cutout square centred at (cut_y, cut_x), clipped at the borders."""
    if d.cut_y is None or cutout <= 0:
        return images
    ar = torch.arange(images.shape[1], device=images.device)
    lo_y, lo_x = d.cut_y - cutout // 2, d.cut_x - cutout // 2
    in_y = (ar[None] >= lo_y[:, None]) & (ar[None] < lo_y[:, None] + cutout)
    in_x = (ar[None] >= lo_x[:, None]) & (ar[None] < lo_x[:, None] + cutout)
    keep = ~(in_y[:, :, None] & in_x[:, None, :])
    return images * keep[..., None].to(images.dtype)


def normalize(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 NHWC -> normalised NCHW in `dtype`, channels-last in memory (a view, no copy)."""
    mean = torch.tensor(MEAN, device=images.device) * 255
    inv_std = 1 / (torch.tensor(STD, device=images.device) * 255)
    out = (images.float() - mean) * inv_std
    return out.to(dtype).permute(0, 3, 1, 2)


def augment_batch(
    padded: torch.Tensor,
    index: torch.Tensor,
    d: AugmentDraw,
    *,
    size: int,
    cutout: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The training batch for rows `index` of the padded dataset: crop, flip, cutout, normalise."""
    return normalize(apply_cutout(crop_flip(padded, index, d, size), d, cutout), dtype)


def reference_augment(
    images: torch.Tensor, index: torch.Tensor, d: AugmentDraw, pad: int, cutout: int
) -> torch.Tensor:
    """Plain per-image reference (as torchvision's RandomCrop(padding) + flip + cutout do it):
    uint8 NHWC images in, float32 normalised NCHW out. Slow; tests and benchmarks only."""
    size = images.shape[1]
    out = []
    for b, i in enumerate(index.tolist()):
        img = images[i].permute(2, 0, 1).float()  # CHW
        img = torch.nn.functional.pad(img, (pad, pad, pad, pad))
        y, x = int(d.dy[b]), int(d.dx[b])
        img = img[:, y : y + size, x : x + size]
        if bool(d.flip[b]):
            img = img.flip(-1)
        if d.cut_y is not None and cutout > 0:
            y0, x0 = int(d.cut_y[b]) - cutout // 2, int(d.cut_x[b]) - cutout // 2
            img = img.clone()
            img[:, max(y0, 0) : max(y0 + cutout, 0), max(x0, 0) : max(x0 + cutout, 0)] = 0
        mean = torch.tensor(MEAN)[:, None, None] * 255
        std = torch.tensor(STD)[:, None, None] * 255
        out.append((img - mean) / std)
    return torch.stack(out)
