"""The networks of the paper: sections 2 (lenet), 3.1 (conv4 family), 4.1 (conv3),
4.2 (conv5) and 4.3 (cerberus).

Parameter counts match the paper's figures 2, 4, 6 and 8 exactly (checked by tests).
Every factory takes `activation` (one name for every activation of the network, overriding
the paper's choice) and, where the network has dropout, `dropout`. Where the paper leaves a
detail open (dropout rates, the four-conv family's head widths) the docstring says what
was chosen.
"""

from __future__ import annotations

from torch import nn

from fastcifar.models.layers import make_activation, mlp_head
from fastcifar.models.registry import register_model


def conv_unit(
    c_in: int, c_out: int, act: str, batchnorm: bool = False, order: str = "bn_act"
) -> list[nn.Module]:
    """3x3 padded convolution, activation and optional BatchNorm in `order`.

    order "act_bn" is conv -> act -> BN (the paper's CerberusNet unit);
    order "bn_act" is conv -> BN -> act (the usual one).
    """
    if order not in ("act_bn", "bn_act"):
        raise ValueError(f"order must be 'act_bn' or 'bn_act', not {order!r}")
    conv = nn.Conv2d(c_in, c_out, 3, padding=1)
    if not batchnorm:
        return [conv, make_activation(act)]
    bn = nn.BatchNorm2d(c_out)
    tail = [make_activation(act), bn] if order == "act_bn" else [bn, make_activation(act)]
    return [conv, *tail]


@register_model
def lenet(activation: str = "relu") -> nn.Module:
    """Section 2, figure 2: the laboratory's two-conv network, 62,006 parameters."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 5),
        make_activation(activation),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        make_activation(activation),
        nn.MaxPool2d(2),
        *mlp_head(16 * 5 * 5, [120, 84, 10], activation),
    )


@register_model
def conv3(activation: str | None = None, dropout: float = 0.25) -> nn.Module:
    """Section 4.1, figure 4: three unpadded convs, ReLU convs and GELU head, 110,598
    parameters. Dropout follows the first two hidden linear layers (rate not given in the
    paper; 0.25 here)."""
    conv_act, head_act = activation or "relu", activation or "gelu"
    layers: list[nn.Module] = []
    for c_in, c_out in [(3, 32), (32, 64), (64, 64)]:
        layers += [nn.Conv2d(c_in, c_out, 3), make_activation(conv_act), nn.MaxPool2d(2)]
    head = mlp_head(64 * 2 * 2, [128, 96, 84, 10], head_act, dropout, dropout_hidden=2)
    return nn.Sequential(*layers, *head)


@register_model
def conv5(activation: str | None = None, dropout: float = 0.3) -> nn.Module:
    """Section 4.2, figure 6: five padded conv -> ReLU -> BN units, GELU head, 3,154,982
    parameters. Dropout precedes the head and follows its first two hidden layers (rate
    not given in the paper; 0.3 here)."""
    conv_act, head_act = activation or "relu", activation or "gelu"
    plan = [(3, 32, False), (32, 64, True), (64, 128, True), (128, 256, False), (256, 256, True)]
    layers: list[nn.Module] = []
    for c_in, c_out, pool_after in plan:
        layers += conv_unit(c_in, c_out, conv_act, batchnorm=True, order="act_bn")
        if pool_after:
            layers.append(nn.MaxPool2d(2))
    head = mlp_head(
        256 * 4 * 4, [512, 128, 84, 10], head_act, dropout, dropout_input=True, dropout_hidden=2
    )
    return nn.Sequential(*layers, *head)


@register_model
def cerberus(
    activation: str = "relu", dropout: float = 0.5, order: str = "act_bn", fused: bool = False
) -> nn.Module:
    """Section 4.3, figure 8: CerberusNet. Three macro blocks of four conv -> ReLU -> BN
    units (64, 128, 256 filters), a max-pool after each, then Linear(4096, 128) -> ReLU ->
    Dropout -> Linear(128, 10). 3,223,882 parameters, 379.78 M mult-adds. `order="bn_act"`
    gives the usual conv -> BN -> ReLU unit with the same parameters; `fused` builds each
    unit as one Triton-fused block (ReLU only)."""
    if fused and activation != "relu":
        raise ValueError("the fused unit supports ReLU only")
    layers: list[nn.Module] = []
    c_in = 3
    for width in (64, 128, 256):
        for _ in range(4):
            if fused:
                from fastcifar.models.fused import FusedConvBNReLU

                layers.append(FusedConvBNReLU(c_in, width, order))
            else:
                layers += conv_unit(c_in, width, activation, batchnorm=True, order=order)
            c_in = width
        layers.append(nn.MaxPool2d(2))
    head = mlp_head(256 * 4 * 4, [128, 10], activation, dropout)
    return nn.Sequential(*layers, *head)


@register_model
def conv4(
    conv_activation: str = "relu",
    head_activation: str = "relu",
    batchnorm: bool = False,
    dropout: float = 0.0,
    activation: str | None = None,
) -> nn.Module:
    """Section 3.1: the grid-search family. Four padded 3x3 convs with 3, 32, 64 and 128
    input channels (32, 64, 128, 256 filters), each followed by a 2x2 max-pool, then three
    linear layers (1024 -> 256 -> 128 -> 10; the paper does not give the widths).
    Options: conv/head activation, BatchNorm after the conv activations, head dropout."""
    conv_act, head_act = activation or conv_activation, activation or head_activation
    layers: list[nn.Module] = []
    for c_in, c_out in [(3, 32), (32, 64), (64, 128), (128, 256)]:
        layers += conv_unit(c_in, c_out, conv_act, batchnorm=batchnorm, order="act_bn")
        layers.append(nn.MaxPool2d(2))
    head = mlp_head(256 * 2 * 2, [256, 128, 10], head_act, dropout)
    return nn.Sequential(*layers, *head)


@register_model
def conv4_relu(**overrides) -> nn.Module:
    """Table 1 'relu, no normalization'."""
    return conv4(**overrides)


@register_model
def conv4_relu_bn(**overrides) -> nn.Module:
    """Table 1 'relu, batch normaliz.'."""
    return conv4(**{"batchnorm": True, **overrides})


@register_model
def conv4_leaky(**overrides) -> nn.Module:
    """Table 1 'leaky relu, no dropout': ReLU + BN convs, leaky-ReLU head."""
    return conv4(**{"batchnorm": True, "head_activation": "leaky_relu", **overrides})


@register_model
def conv4_leaky_dropout(**overrides) -> nn.Module:
    """Table 1 'leaky relu, dropout': as conv4_leaky with 0.2 dropout in the head."""
    options = {"batchnorm": True, "head_activation": "leaky_relu", "dropout": 0.2}
    return conv4(**{**options, **overrides})
