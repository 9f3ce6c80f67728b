"""The two designs the paper cites in section 4.3, for comparison."""

from __future__ import annotations

from torch import nn

from fastcifar.models.layers import make_activation, mlp_head
from fastcifar.models.registry import register_model


@register_model
def wide4(activation: str = "relu", dropout: float = 0.25) -> nn.Module:
    """Ref. [2] (jameschengpeng, PyTorch-CNN-on-CIFAR10): four padded 3x3 convs (48, 96,
    192, 256 filters) in two pairs, each pair followed by a 2x2 max-pool and dropout, then
    three large linear layers (16384 -> 512 -> 64 -> 10): about 9.07 M parameters, most of
    them in the first linear layer."""
    layers: list[nn.Module] = []
    for pair in [[(3, 48), (48, 96)], [(96, 192), (192, 256)]]:
        for c_in, c_out in pair:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), make_activation(activation)]
        layers += [nn.MaxPool2d(2), nn.Dropout(dropout)]
    head = mlp_head(256 * 8 * 8, [512, 64, 10], activation, dropout, dropout_hidden=0)
    # The reference applies dropout only after the last hidden layer.
    head.insert(-1, nn.Dropout(dropout))
    return nn.Sequential(*layers, *head)


@register_model
def sinha14(activation: str = "relu", filters: int = 28, kernel: int = 5) -> nn.Module:
    """Ref. [3] (Sinha, Verma, Haidar, SSCI 2017): their best CIFAR-10 network, a stack of
    14 conv -> ReLU blocks with 28 filters of 5x5. The paper gives no pooling plan; here a
    2x2 max-pool follows blocks 4, 9 and 14, then one linear classifier (28*4*4 -> 10).

    With no normalisation in 14 layers, PyTorch's default conv init shrinks the signal's
    mean square about sixfold per block, so the classifier sees little but the biases'
    noise and training stayed at chance; the convs get He (Kaiming normal) init instead,
    which keeps the activations' scale through the stack."""
    layers: list[nn.Module] = []
    c_in = 3
    for block in range(1, 15):
        conv = nn.Conv2d(c_in, filters, kernel, padding=kernel // 2)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, make_activation(activation)]
        if block in (4, 9, 14):
            layers.append(nn.MaxPool2d(2))
        c_in = filters
    return nn.Sequential(*layers, *mlp_head(filters * 4 * 4, [10], activation))
