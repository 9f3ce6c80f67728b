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
