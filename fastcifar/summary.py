"""Per-layer model summaries (the paper's figures 2, 4, 6 and 8), counted by PyTorch:
output shapes from forward hooks, mult-adds from `torch.utils.flop_counter`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class LayerRow:
    name: str  # e.g. "Conv2d-1"
    output_shape: tuple[int, ...]  # with the batch dimension as -1
    params: int
    mult_adds: int


@dataclass
class ModelSummary:
    layers: list[LayerRow]
    total_params: int
    trainable_params: int
    mult_adds: int  # per image: FLOPs / 2


def summarize(model: torch.nn.Module, input_size=(3, 32, 32)) -> ModelSummary:
    """Per-leaf-layer output shapes, parameters and mult-adds for one image."""
    model = model.eval()
    leaves = [(name, m) for name, m in model.named_modules() if not list(m.children())]
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        m.register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape))
        )
        for name, m in leaves
    ]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_size))
    finally:
        for hook in hooks:
            hook.remove()
    flops = counter.get_flop_counts()
    prefix = type(model).__name__
    rows = []
    for index, (name, module) in enumerate(leaves, 1):
        if name not in shapes:
            continue
        layer_flops = sum(flops.get(f"{prefix}.{name}", {}).values())
        rows.append(
            LayerRow(
                f"{type(module).__name__}-{index}",
                (-1, *shapes[name][1:]),
                sum(p.numel() for p in module.parameters(recurse=False)),
                layer_flops // 2,
            )
        )
    params = list(model.parameters())
    return ModelSummary(
        rows,
        sum(p.numel() for p in params),
        sum(p.numel() for p in params if p.requires_grad),
        counter.get_total_flops() // 2,
    )


def count_mult_adds(model: torch.nn.Module, input_size=(3, 32, 32)) -> int:
    """Mult-adds of one forward pass of one image."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, *input_size))
    return counter.get_total_flops() // 2
