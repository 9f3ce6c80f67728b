"""The Triton-fused conv -> ReLU -> BN unit (or conv -> BN -> ReLU) as an nn.Module with
the same parameters, buffers and names as the eager unit's Conv2d and BatchNorm2d."""

from __future__ import annotations

import torch
from torch import nn


class FusedConvBNReLU(nn.Module):
    def __init__(self, c_in: int, c_out: int, order: str = "act_bn"):
        super().__init__()
        from fastcifar.ops import conv_bn_relu  # noqa: F401  (registers the custom ops)

        if order not in conv_bn_relu.ORDERS:
            raise ValueError(f"order must be one of {conv_bn_relu.ORDERS}, not {order!r}")
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.bn = nn.BatchNorm2d(c_out)
        self.order = order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        if self.training:
            out, _, mean, var = torch.ops.fastcifar.conv_bn_relu_train(
                x, self.conv.weight, self.conv.bias, bn.weight, bn.bias, bn.eps, self.order
            )
            with torch.no_grad():  # running statistics exactly as nn.BatchNorm2d keeps them
                count = x.shape[0] * x.shape[2] * x.shape[3]
                bn.running_mean.lerp_(mean, bn.momentum)
                bn.running_var.lerp_(var * count / max(count - 1, 1), bn.momentum)
                bn.num_batches_tracked.add_(1)
            return out
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        return torch.ops.fastcifar.conv_bn_relu_eval(
            x, self.conv.weight, self.conv.bias, scale, shift, self.order
        )
