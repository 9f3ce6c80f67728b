"""Random activations for the native kernels' tests: seeded, channels-last."""

from __future__ import annotations

import torch


def random_channels_last(
    *shape, dtype=torch.bfloat16, seed=0, scale=1.0, shift=0.0, levels=None
) -> torch.Tensor:
    """Normal values times `scale` plus `shift`, or with `levels` integers 0 .. levels - 1
    (so that pooling windows hold ties), in `dtype`, channels-last."""
    g = torch.Generator().manual_seed(seed)
    if levels:
        x = torch.randint(0, levels, shape, generator=g)
    else:
        x = torch.randn(shape, generator=g) * scale + shift
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


def conv3x3_weights(c_out: int, c_in: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded 3x3 convolution's weight (He-scaled, so outputs keep the inputs' scale)
    and bias, fp32."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g) * (2 / (9 * c_in)) ** 0.5
    return weight, torch.randn(c_out, generator=g)
