"""What a run is built from: its data splits, their loaders (tensor or DALI, native op,
prefetch thread) and its model (fused block, channels-last, native CPU pooling,
Winograd convolutions, torch.compile)."""

from __future__ import annotations

import os
import sys

import torch

from fastcifar.config import TrainConfig
from fastcifar.data.dataset import DataBundle, Split, prepare_data, prepare_encoded
from fastcifar.data.loader import TensorLoader
from fastcifar.data.prefetch import Prefetched
from fastcifar.errors import UserError
from fastcifar.models import create_model
from fastcifar.models.amx_conv import AmxGradConv2d, amx_conv_available, use_amx_conv
from fastcifar.models.pooling import MaxPool2x2, native_pooling_available, use_native_pooling
from fastcifar.models.relu_bn import (
    FoldedAmxGradConv2d,
    ReluBatchNorm2d,
    ReluBatchNormConv2d,
    ReluBatchNormMaxPool2d,
    relu_bn_by_default,
    use_relu_bn,
    use_relu_bn_pool,
)
from fastcifar.models.winograd import (
    WinogradConv2d,
    default_grad_tile,
    fp32_by_default,
    use_winograd,
    use_winograd_input_grad_tile,
    use_winograd_weight_grad,
    winograd_available,
)

# Graphs one process may compile for the code every compiled module shares (torch's
# default, 8, would leave a sweep's later trials running eager)
RECOMPILE_LIMIT = 64


def compiled(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """The model the training step calls: `torch.compile`d in the configured mode, or as is.
    Shapes stay static (a graph per batch size): a run's batch sizes are fixed, and
    automatic dynamic shapes, keyed on code every compiled module shares, would give a
    second model in the process (a benchmark's other side, a sweep's next trial) a
    symbolic batch dimension. Each model and batch size is then a graph of its own, so the
    limit on them is raised."""
    if not cfg.compile:
        return model
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
    mode = None if cfg.compile_mode == "default" else cfg.compile_mode
    return torch.compile(model, mode=mode, dynamic=False)


def build_model(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    if cfg.fused:
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise UserError(
                "--fused runs Triton kernels: it needs CUDA, or TRITON_INTERPRET=1 (slow) on the CPU"
            )
        if cfg.arch != "cerberus":
            raise UserError(f"--fused is for cerberus, not {cfg.arch!r}")
    overrides = {"fused": True} if cfg.fused else {}
    overrides |= {
        k: v for k, v in (("dropout", cfg.dropout), ("activation", cfg.activation)) if v is not None
    }
    model = create_model(cfg.arch, **overrides).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        if device.type == "cpu" and use_native(cfg.native, device):
            if native_pooling_available():
                use_native_pooling(model)  # bf16 max pooling (fp32 stays with ATen at run time)
            if relu_bn_by_default(cfg.arch):
                use_relu_bn(model)  # ReLU-BatchNorm pairs as one layer in training
                use_relu_bn_pool(model)  # with the 2x2 max pools that follow them
            if amx_conv_available():
                use_amx_conv(model)  # 3x3 convolutions' weight gradient on AMX tiles
    with_winograd_grad = 0
    winograd = winograd_wanted(cfg, device)
    if cfg.winograd_input_grad_tile == 4 and not (winograd and cfg.amp == "bf16"):
        raise UserError("--winograd-input-grad-tile 4 is for Winograd convolutions in bf16 (--amp "
                        "bf16 where Winograd runs; in fp32 the input's gradient takes the "
                        "forward's tile)")  # fmt: skip
    if winograd:
        use_winograd(model)
        use_winograd_input_grad_tile(model, cfg.winograd_input_grad_tile)
        if cfg.winograd_weight_grad != "off":
            # its rule held too (benchmarks/NOTES.md); F(4x4, 3x3)'s has not been put to one
            tile = cfg.winograd_grad_tile or default_grad_tile(cfg.amp)
            with_winograd_grad = use_winograd_weight_grad(model, tile)
    elif cfg.winograd_weight_grad == "on":
        raise UserError("--winograd-weight-grad on needs Winograd convolutions (--winograd auto "
                        "or on, for channels-last CPU training in bf16 on an AVX512-BF16 CPU "
                        "or in fp32)")  # fmt: skip
    if cfg.winograd_grad_tile == 4 and not with_winograd_grad:
        raise UserError("--winograd-grad-tile 4 needs Winograd's weight gradient (--winograd and "
                        "--winograd-weight-grad auto or on, where Winograd runs)")  # fmt: skip
    return model


# The layers `build_model` may swap in, as the run's log line and env.json name them
# (a Winograd layer's name adds the gradients it computes: `winograd_layer_name`)
WINOGRAD_LAYER = "Winograd conv"
WINOGRAD_WEIGHT_GRAD = "weight gradient"
WINOGRAD_F4_WEIGHT_GRAD = "F(4x4) weight gradient"
WINOGRAD_F4_INPUT_GRAD = "F(4x4) input gradient"
NATIVE_LAYERS = {
    AmxGradConv2d: "AMX weight-gradient conv",
    FoldedAmxGradConv2d: "AMX weight-gradient conv",
    ReluBatchNorm2d: "ReLU-BatchNorm",
    ReluBatchNormMaxPool2d: "ReLU-BatchNorm-max pool",
    ReluBatchNormConv2d: "ReLU-BatchNorm-conv",
    MaxPool2x2: "native max pool",
}


def native_layers(model: torch.nn.Module) -> dict[str, int]:
    """How many layers of each kind in `NATIVE_LAYERS`, and of each Winograd layer's
    `winograd_layer_name`, `model` holds (a layer's own submodules, such as a folded pool,
    are part of it), in the order first met; which native paths a run took depends on the
    CPU, so its files record them."""
    counts: dict[str, int] = {}

    def visit(module: torch.nn.Module) -> None:
        if type(module) is WinogradConv2d:
            name = winograd_layer_name(module)
        else:
            name = NATIVE_LAYERS.get(type(module))
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
            return
        for child in module.children():
            visit(child)

    visit(model)
    return counts


def winograd_layer_name(layer: WinogradConv2d) -> str:
    """The layer's name in a run's records: `WINOGRAD_LAYER`, with "(and ...)" naming the
    gradients it computes through Winograd beyond F(2x2, 3x3)'s input gradient: "Winograd
    conv (and F(4x4) weight gradient)"."""
    parts = []
    if layer.winograd_weight_grad:
        four = layer.weight_grad_tile == 4
        parts.append(WINOGRAD_F4_WEIGHT_GRAD if four else WINOGRAD_WEIGHT_GRAD)
    if layer.input_grad_tile == 4:
        parts.append(WINOGRAD_F4_INPUT_GRAD)
    return WINOGRAD_LAYER + (f" (and {' and '.join(parts)})" if parts else "")


def describe_layers(counts: dict[str, int]) -> str:
    """`native_layers`' counts as one phrase: "11 Winograd conv, 3 ReLU-BatchNorm"."""
    return ", ".join(f"{n} {name}" for name, n in counts.items())


def winograd_wanted(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether 3x3 convolutions run as Winograd (`models.winograd`): for channels-last CPU
    training where it is available, with `--winograd on`, or by default (`auto`) in bf16
    on an AVX512-BF16 CPU without AMX and in fp32 on an AVX2 one; `on` where it cannot run
    is a user error. Each default's rule held (benchmarks/NOTES.md: "Winograd's default on
    the AVX512-BF16 CPU": CerberusNet trained 1.15x faster, no model below 0.98x, conv5
    and CerberusNet to their recorded accuracy; "fp32 Winograd on the AVX2 CPU")."""
    if cfg.winograd == "off":
        return False
    refusal = winograd_refusal(cfg, device)
    if refusal and cfg.winograd == "on":
        raise UserError(f"--winograd on, but {refusal}")
    return refusal is None and (cfg.winograd == "on" or cfg.amp == "bf16" or fp32_by_default())


def winograd_refusal(cfg: TrainConfig, device: torch.device) -> str | None:
    """Why `--winograd on` cannot run with `cfg` on `device`; None when it can."""
    if (
        device.type != "cpu"
        or cfg.amp not in ("bf16", "none")
        or not cfg.channels_last
        or cfg.fused
    ):
        return "it runs bf16 or fp32 channels-last CPU training only"
    available, why = winograd_available(cfg.amp)
    return None if available else why


def load_data(cfg: TrainConfig, device: torch.device, log) -> DataBundle:
    """The splits the loaders read: uint8 arrays on the device for the tensor loader, on
    the host for DALI's external source, or with `--dali-decode` the undecoded files."""
    if cfg.dali_decode:
        return prepare_encoded(cfg.data, val=cfg.val, split_seed=cfg.split_seed, subset=cfg.subset)
    return prepare_data(
        cfg.data, val=cfg.val, split_seed=cfg.split_seed, subset=cfg.subset,
        device=torch.device("cpu") if cfg.loader == "dali" else device,
        download=cfg.download, log=log,
    )  # fmt: skip


def make_loaders(cfg: TrainConfig, data: DataBundle, device: torch.device, dtype: torch.dtype):
    """(train, val, test) loaders of the configured kind; val is None without a split."""
    train = make_loader(cfg, data.train, device, dtype, train=True)
    val = make_loader(cfg, data.val, device, dtype, train=False) if data.val else None
    return train, val, make_loader(cfg, data.test, device, dtype, train=False)


def make_loader(cfg: TrainConfig, split: Split, device: torch.device, dtype: torch.dtype, *,
                train: bool):  # fmt: skip
    """One loader of the configured kind over `split`: for training, shuffled, augmented
    and behind a prefetch thread when configured; for evaluation, in order."""
    if cfg.loader == "dali":
        from fastcifar.data.dali_loader import DaliLoader as Loader

        extra = {"device": device, "images_per_run": cfg.dali_images_per_run or None}
    else:
        Loader = TensorLoader
        extra = {"native": use_native(cfg.native, device)}
    if not train:
        return Loader(split.images, split.labels, cfg.eval_batch_size, train=False, dtype=dtype,
                      **extra)  # fmt: skip
    loader = Loader(
        split.images, split.labels, cfg.batch_size, train=True, seed=cfg.seed,
        pad=cfg.crop_pad, flip=cfg.flip, cutout=cfg.cutout, dtype=dtype, **extra,
    )  # fmt: skip
    return Prefetched(loader) if use_prefetch(cfg.prefetch, cfg.loader) else loader


def use_prefetch(switch: str, loader: str) -> bool:
    """Whether a thread makes the tensor loader's training batches ahead. `auto` leaves it
    off: on the 2-core CPU the tensor loader costs under the noise of a lenet step
    (benchmarks/test_loader_share.py), and the thread competes with the step's own; on
    CUDA the loader only enqueues kernels, and DALI prefetches itself."""
    return switch == "on" and loader == "tensor"


# Devices where `--native auto` uses fastcifar._C. On the CPU it measured faster than the
# torch-op gather (benchmarks/test_loaders.py --full: 525,000 against 338,000 images/s,
# bf16); on CUDA it is one kernel instead of a chain of ops, not yet timed against it.
NATIVE_BY_DEFAULT = ("cpu", "cuda")
_said: set[str] = set()


def use_native(switch: str, device: torch.device) -> bool:
    """Whether the tensor loader uses fastcifar._C. When `auto` would use it and it did not
    load, fastcifar says so once (on stderr) and uses the torch-op path."""
    if switch == "off":
        return False
    from fastcifar.ops import native

    available, why = native.load()
    if switch == "on" and not available:
        raise UserError(f"--native on, but {why}; rebuild with pip install -e .")
    wanted = switch == "on" or device.type in NATIVE_BY_DEFAULT
    if wanted and not available and why not in _said:
        _said.add(why)
        print(f"fastcifar: {why}; the loader uses torch ops instead", file=sys.stderr)
    return wanted and available
