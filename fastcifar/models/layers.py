"""Small building blocks shared by the model families."""

from __future__ import annotations

from torch import nn

ACTIVATIONS = {
    "relu": lambda: nn.ReLU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
    "gelu": lambda: nn.GELU(),
}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name (relu, leaky_relu, gelu)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, not {name!r}")
    return ACTIVATIONS[name]()


def mlp_head(
    in_features: int,
    widths: list[int],
    act: str,
    dropout: float = 0.0,
    dropout_input: bool = False,
    dropout_hidden: int | None = None,
) -> list[nn.Module]:
    """Flatten, then linear layers `in -> widths[0] -> ... -> widths[-1]` with activations.

    Dropout precedes the first layer when `dropout_input`, and follows the first
    `dropout_hidden` hidden activations (all of them when None). The last layer is left
    bare so it returns logits.
    """
    hidden = len(widths) - 1
    with_dropout = hidden if dropout_hidden is None else dropout_hidden
    layers: list[nn.Module] = [nn.Flatten()]
    if dropout_input and dropout > 0:
        layers.append(nn.Dropout(dropout))
    width_in = in_features
    for i, width in enumerate(widths):
        layers.append(nn.Linear(width_in, width))
        if i < hidden:
            layers.append(make_activation(act))
            if dropout > 0 and i < with_dropout:
                layers.append(nn.Dropout(dropout))
        width_in = width
    return layers
