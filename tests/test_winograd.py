"""The Winograd F(2x2, 3x3) convolution on AVX512-BF16 CPUs (fastcifar._C's
winograd_conv3x3, fastcifar.models.winograd) against plain PyTorch: the same arithmetic
in torch ops, and F.conv2d in float64."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcifar.config import TrainConfig
from fastcifar.errors import UserError
from fastcifar.models import create_model
from fastcifar.models.winograd import (
    WinogradConv2d,
    takes,
    use_winograd,
    use_winograd_weight_grad,
    winograd_available,
)
from fastcifar.ops.winograd import (
    packed_weight_tiles,
    reference_conv,
    reference_weight_grad,
    weight_grad,
    winograd_conv3x3,
)

from .tensors import conv3x3_weights
from .tensors import random_channels_last as channels_last

pytestmark = pytest.mark.skipif(
    not winograd_available()[0], reason="needs fastcifar._C and a CPU with AVX512-BF16"
)


def relative_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item()


# cerberus's channels at small sizes; one image, a single tile, a non-square image;
# output channels of one, two and three 16-lane vectors (the kernel's narrower blocks);
# tile counts off the kernel's six-row blocks, and several chunks of tiles
SHAPES = [
    (2, 64, 64, 8, 8),
    (1, 16, 16, 2, 2),
    (2, 16, 32, 4, 6),
    (3, 48, 16, 6, 6),
    (1, 32, 48, 10, 4),
    (3, 16, 16, 32, 32),
    (2, 128, 256, 4, 4),
]


# F(4x4, 3x3)'s forward (the input gradient's, with `input_grad_tile=4`; input channels
# in multiples of 16): one tile, a non-square image with output channels of three 16-lane
# vectors, several chunks of tiles, cerberus's channels both ways at 8 x 8
F4_SHAPES = [
    (1, 16, 16, 4, 4),
    (1, 32, 48, 4, 12),
    (3, 16, 16, 32, 32),
    (2, 128, 256, 8, 8),
    (2, 256, 128, 8, 8),
]


@pytest.mark.parametrize(
    ("tile", "n", "c_in", "c_out", "h", "w"),
    [(2, *shape) for shape in SHAPES] + [(4, *shape) for shape in F4_SHAPES],
)
def test_the_op_is_the_reference_arithmetic(tile, n, c_in, c_out, h, w):
    """With the transformed operands rounded to bf16 as the op rounds them, the op and
    the torch-op reference differ only in the fp32 sums' order and the output's rounding:
    F(2x2, 3x3), and F(4x4, 3x3) given 36 weight tiles (whose larger coefficients
    magnify those differences)."""
    x = channels_last(n, c_in, h, w)
    weight, bias = conv3x3_weights(c_out, c_in)
    tiles = packed_weight_tiles(weight, torch.bfloat16, tile=tile)
    assert tiles.shape == ((tile + 2) ** 2, c_in // 2, c_out, 2)
    got = torch.ops.fastcifar.winograd_conv3x3(x, tiles, bias)
    want = reference_conv(x, weight, bias, operands=torch.bfloat16, tile=tile)
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    atol = (1e-3 if tile == 2 else 2e-3) * want.abs().max().item()
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=atol)


@pytest.mark.parametrize(("n", "c_in", "c_out", "h", "w"), F4_SHAPES[2:])
def test_the_f4_input_gradient_against_float64(n, c_in, c_out, h, w):
    """Through autograd with `input_grad_tile=4`: the input's gradient within 4% of
    float64's (F(4x4, 3x3) in bf16 strays about 2%, six times F(2x2)'s:
    benchmarks/NOTES.md); the output and the weight's gradient are F(2x2)'s."""
    x = channels_last(n, c_in, h, w)
    weight, bias = conv3x3_weights(c_out, c_in)
    grad = channels_last(n, c_out, h, w, seed=2)
    outs, grads = [], []
    for tile in (2, 4):
        ours = [t.clone().requires_grad_() for t in (x, weight, bias)]
        out = winograd_conv3x3(*ours, winograd_weight_grad=True, input_grad_tile=tile)
        out.backward(grad)
        outs.append(out)
        grads.append([t.grad for t in ours])
    exact = [t.double().requires_grad_() for t in (x, weight, bias)]
    F.conv2d(*exact, padding=1).backward(grad.double())
    (f2, f4), exact_x = grads, exact[0].grad
    assert relative_rms(f4[0], exact_x) < 0.04 and f4[0].dtype == torch.bfloat16
    assert relative_rms(f4[0], exact_x) > relative_rms(f2[0], exact_x)  # not F(2x2)'s again
    assert torch.equal(outs[1], outs[0])
    assert torch.equal(f4[1], f2[1]) and torch.equal(f4[2], f2[2])


@pytest.mark.parametrize(("n", "c_in", "c_out", "h", "w"), SHAPES)
def test_values_and_gradients_against_float64(n, c_in, c_out, h, w):
    """Output and input gradient within 3x the error of the direct bf16 convolution (both
    against float64); the weight's gradient is the direct one's, the bias's a sum."""
    x = channels_last(n, c_in, h, w)
    weight, bias = conv3x3_weights(c_out, c_in)
    grad = channels_last(n, c_out, h, w, seed=2)
    ours = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = winograd_conv3x3(*ours)
    out.backward(grad)
    exact = [t.double().requires_grad_() for t in (x, weight, bias)]
    want = F.conv2d(*exact, padding=1)
    want.backward(grad.double())
    direct = [t.clone().requires_grad_() for t in (x, weight.bfloat16(), bias.bfloat16())]
    plain = F.conv2d(*direct, padding=1)
    plain.backward(grad)
    assert relative_rms(out, want) < 3 * relative_rms(plain, want)
    assert relative_rms(ours[0].grad, exact[0].grad) < 3 * relative_rms(
        direct[0].grad, exact[0].grad
    )
    assert relative_rms(ours[1].grad, exact[1].grad) < 2e-2
    torch.testing.assert_close(ours[1].grad, direct[1].grad.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours[2].grad, exact[2].grad.float(), rtol=1e-4, atol=1e-4)
    assert ours[1].grad.dtype == torch.float32 and ours[0].grad.dtype == torch.bfloat16


# the weight gradient's shapes (channels in multiples of 16): an odd number of tiles (the
# last pair half zero), one tile, several chunks of tiles with a partial last one
WEIGHT_GRAD_SHAPES = [
    (2, 64, 64, 8, 8),
    (3, 16, 32, 2, 2),
    (1, 32, 16, 4, 6),
    (9, 128, 128, 16, 16),
    (2, 128, 256, 4, 4),
]


# F(4x4, 3x3)'s: one tile, an odd number (the last pair half zero) on a non-square image,
# several chunks of tiles with a partial last one
F4_WEIGHT_GRAD_SHAPES = [
    (1, 16, 16, 4, 4),
    (1, 32, 16, 4, 12),
    (3, 64, 64, 8, 8),
    (9, 128, 128, 16, 16),
    (2, 128, 256, 8, 8),
]


@pytest.mark.parametrize(
    ("tile", "n", "c_in", "c_out", "h", "w"),
    [(2, *shape) for shape in WEIGHT_GRAD_SHAPES]
    + [(4, *shape) for shape in F4_WEIGHT_GRAD_SHAPES],
)
def test_the_weight_gradient_is_the_reference_arithmetic(tile, n, c_in, c_out, h, w):
    """F(2x2, 3x3) and F(4x4, 3x3): the native sums and the torch-op reference, with the
    same bf16 operands, differ only in the fp32 sums' order."""
    x = channels_last(n, c_in, h, w).relu()
    grad = channels_last(n, c_out, h, w, seed=2, scale=1e-3)
    got, got_bias = weight_grad(grad, x, tile=tile)
    want = reference_weight_grad(grad, x, tile=tile)
    assert got.shape == (c_out, c_in, 3, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    want_bias = grad.double().sum((0, 2, 3))
    assert got_bias.shape == (c_out,) and got_bias.dtype == torch.float32
    torch.testing.assert_close(got_bias.double(), want_bias, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(("n", "c_in", "c_out", "h", "w"), F4_WEIGHT_GRAD_SHAPES[2:])
def test_the_f4_weight_gradient_against_float64(n, c_in, c_out, h, w):
    """Through autograd: F(4x4, 3x3)'s weight gradient within 4% of float64's (it strays
    about 2%, six times F(2x2)'s: benchmarks/NOTES.md); the input's gradient is F(2x2)'s."""
    x = channels_last(n, c_in, h, w)
    weight, bias = conv3x3_weights(c_out, c_in)
    grad = channels_last(n, c_out, h, w, seed=2)
    grads = []
    for tile in (2, 4):
        ours = [t.clone().requires_grad_() for t in (x, weight, bias)]
        winograd_conv3x3(*ours, winograd_weight_grad=True, weight_grad_tile=tile).backward(grad)
        grads.append([t.grad for t in ours])
    exact = [t.double().requires_grad_() for t in (x, weight, bias)]
    F.conv2d(*exact, padding=1).backward(grad.double())
    f2, f4 = grads
    assert relative_rms(f4[1], exact[1].grad) < 0.04
    assert torch.equal(f4[0], f2[0])
    torch.testing.assert_close(f4[2].double(), exact[2].grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("n", "c_in", "c_out", "h", "w"), WEIGHT_GRAD_SHAPES[:3])
def test_the_winograd_weight_gradient_against_float64(n, c_in, c_out, h, w):
    """Through autograd, within 3x the error of oneDNN's bf16 weight gradient (both
    against float64); the input's gradient is the same as without it."""
    x = channels_last(n, c_in, h, w)
    weight, bias = conv3x3_weights(c_out, c_in)
    grad = channels_last(n, c_out, h, w, seed=2)
    grads = []
    for winograd_grad in (False, True):
        ours = [t.clone().requires_grad_() for t in (x, weight, bias)]
        winograd_conv3x3(*ours, winograd_weight_grad=winograd_grad).backward(grad)
        grads.append([t.grad for t in ours])
    exact = [t.double().requires_grad_() for t in (x, weight, bias)]
    F.conv2d(*exact, padding=1).backward(grad.double())
    onednn, winograd = grads
    assert relative_rms(winograd[1], exact[1].grad) < 3 * relative_rms(onednn[1], exact[1].grad)
    assert winograd[1].dtype == torch.float32 and winograd[2].dtype == torch.float32
    assert torch.equal(winograd[0], onednn[0])
    # the bias's gradient, the op's own sum (Winograd) and torch's (oneDNN), against float64
    torch.testing.assert_close(winograd[2].double(), exact[2].grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(onednn[2].double(), exact[2].grad, rtol=1e-5, atol=1e-6)


def test_the_weight_gradient_refuses_what_it_cannot_compute():
    op = torch.ops.fastcifar.winograd_conv3x3_weight_grad
    with pytest.raises(RuntimeError, match="multiples of 16"):
        op(channels_last(1, 16, 4, 4), channels_last(1, 24, 4, 4))
    with pytest.raises(RuntimeError, match="batch and size"):
        op(channels_last(1, 16, 4, 4), channels_last(2, 16, 4, 4))
    with pytest.raises(RuntimeError, match="bf16 channels-last"):
        op(channels_last(1, 16, 4, 4, dtype=torch.float32), channels_last(1, 16, 4, 4))
    with pytest.raises(RuntimeError, match="tile must be 2 or 4"):
        op(channels_last(1, 16, 4, 4), channels_last(1, 16, 4, 4), 3)
    with pytest.raises(RuntimeError, match="multiples of 4"):
        op(channels_last(1, 16, 6, 4), channels_last(1, 16, 6, 4), 4)


def test_the_op_refuses_what_it_cannot_compute():
    packed = packed_weight_tiles(conv3x3_weights(16, 16)[0])
    with pytest.raises(RuntimeError, match="even height and width"):
        torch.ops.fastcifar.winograd_conv3x3(channels_last(1, 16, 5, 4), packed, None)
    four = packed_weight_tiles(conv3x3_weights(16, 16)[0], tile=4)
    with pytest.raises(
        RuntimeError, match="36 weight tiles needs a height and width in multiples of 4"
    ):
        torch.ops.fastcifar.winograd_conv3x3(channels_last(1, 16, 6, 4), four, None)
    eight = packed_weight_tiles(conv3x3_weights(16, 8)[0], tile=4)
    with pytest.raises(RuntimeError, match="input channels in multiples of 16"):
        torch.ops.fastcifar.winograd_conv3x3(channels_last(1, 8, 4, 4), eight, None)
    with pytest.raises(RuntimeError, match="fp32 weight tiles"):  # fp32 input, bf16 tiles
        torch.ops.fastcifar.winograd_conv3x3(
            channels_last(1, 16, 4, 4, dtype=torch.float32), packed, None
        )
    with pytest.raises(RuntimeError, match="bf16 channels-last"):
        torch.ops.fastcifar.winograd_conv3x3(
            channels_last(1, 16, 4, 4, dtype=torch.half), packed, None
        )
    with pytest.raises(RuntimeError, match="weight tiles"):
        torch.ops.fastcifar.winograd_conv3x3(channels_last(1, 32, 4, 4), packed, None)


def test_opcheck():
    weight, bias = conv3x3_weights(16, 32)
    torch.library.opcheck(
        torch.ops.fastcifar.winograd_conv3x3.default,
        (channels_last(2, 32, 4, 6), packed_weight_tiles(weight), bias),
    )


@pytest.mark.parametrize("tile", [2, 4])
def test_opcheck_of_the_weight_gradient(tile):
    torch.library.opcheck(
        torch.ops.fastcifar.winograd_conv3x3_weight_grad.default,
        (channels_last(2, 16, 4, 8, seed=2), channels_last(2, 32, 4, 8), tile),
    )


def test_only_plain_3x3_convolutions_are_replaced():
    model = nn.Sequential(
        nn.Conv2d(16, 32, 3, padding=1), nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False)),
        nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 24, 3, padding=1), nn.Conv2d(32, 32, 3),
        nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.Conv2d(32, 32, 5, padding=2),
        nn.Conv2d(32, 32, 3, padding=1, groups=2), nn.Conv2d(32, 32, 3, padding=1, dilation=2),
    )  # fmt: skip
    before = model.state_dict()
    params = list(model.parameters())
    assert [takes(m) for m in (model[0], model[1][0], model[2], model[3])] == [
        True,
        True,
        False,
        False,
    ]
    assert use_winograd(model) == 2
    assert type(model[0]) is WinogradConv2d and type(model[1][0]) is WinogradConv2d
    assert all(type(m) is nn.Conv2d for m in model[2:])
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    assert model.state_dict().keys() == before.keys()
    assert use_winograd(model) == 0  # already replaced


def test_other_inputs_go_to_f_conv2d():
    """NCHW memory, an odd size: nn.Conv2d's own result (fp32 channels-last without
    autocast goes to the fp32 op: tests/test_winograd_fp32.py)."""
    for dtype, x in (
        (torch.float32, torch.randn(2, 16, 6, 6)),
        (torch.bfloat16, torch.randn(2, 16, 6, 6).bfloat16()),
        (torch.bfloat16, channels_last(2, 16, 5, 6)),
    ):
        conv = nn.Conv2d(16, 16, 3, padding=1).to(dtype)
        ours = WinogradConv2d(16, 16, 3, padding=1).to(dtype)
        ours.load_state_dict(conv.state_dict())
        assert torch.equal(ours(x), conv(x))


def test_under_autocast_fp32_input_goes_through_the_op():
    ours = WinogradConv2d(16, 32, 3, padding=1)
    x = channels_last(2, 16, 6, 6, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours(x)
    want = torch.ops.fastcifar.winograd_conv3x3(
        x.bfloat16(), packed_weight_tiles(ours.weight), ours.bias
    )
    assert torch.equal(got, want)


def test_traced_by_torch_compile():
    ours = WinogradConv2d(16, 16, 3, padding=1)
    x = channels_last(2, 16, 8, 8).requires_grad_()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    got = compiled(x)
    got.sum().backward()
    assert torch.equal(got, ours(x.detach()))
    assert x.grad is not None and ours.weight.grad is not None


@pytest.mark.parametrize(("winograd", "expected"), [("on", 11), ("auto", 11), ("off", 0)])
def test_the_cpu_model_uses_it_unless_it_is_off(winograd, expected):
    from fastcifar.train.build import build_model

    cfg = TrainConfig(arch="cerberus", amp="bf16", winograd=winograd)
    model = build_model(cfg, torch.device("cpu"))
    assert sum(type(m) is WinogradConv2d for m in model.modules()) == expected
    with_grad = sum(getattr(m, "winograd_weight_grad", False) for m in model.modules())
    assert with_grad == expected  # where Winograd runs, its weight gradient runs by default


@pytest.mark.parametrize(("weight_grad", "expected"), [("auto", 4), ("off", 0)])
def test_the_winograd_weight_gradient_unless_it_is_off(weight_grad, expected):
    """`auto` and `off`; `on` is `test_the_winograd_weight_gradient_is_asked_for`."""
    from fastcifar.train.build import build_model

    cfg = TrainConfig(arch="conv5", amp="bf16", winograd_weight_grad=weight_grad)
    model = build_model(cfg, torch.device("cpu"))
    assert sum(type(m) is WinogradConv2d for m in model.modules()) == 4
    assert sum(getattr(m, "winograd_weight_grad", False) for m in model.modules()) == expected


def test_the_winograd_weight_gradient_is_asked_for():
    from fastcifar.train.build import build_model, native_layers

    cfg = TrainConfig(arch="conv5", amp="bf16", winograd_weight_grad="on")
    model = build_model(cfg, torch.device("cpu"))
    layers = [m for m in model.modules() if type(m) is WinogradConv2d]
    assert len(layers) == 4 and all(m.winograd_weight_grad for m in layers)
    assert native_layers(model)["Winograd conv (and weight gradient)"] == 4
    with pytest.raises(UserError, match="--winograd-weight-grad on needs Winograd convolutions"):
        build_model(cfg.replace(winograd="off"), torch.device("cpu"))


def test_the_f4_weight_gradient_is_asked_for():
    """`--winograd-grad-tile 4` gives every Winograd layer F(4x4, 3x3)'s weight gradient,
    and the run records it; without Winograd's weight gradient it is a user error."""
    from fastcifar.train.build import build_model, native_layers

    cfg = TrainConfig(arch="conv5", amp="bf16", winograd_grad_tile=4)
    model = build_model(cfg, torch.device("cpu"))
    layers = [m for m in model.modules() if type(m) is WinogradConv2d]
    assert len(layers) == 4 and all(m.weight_grad_tile == 4 for m in layers)
    counts = native_layers(model)
    assert counts["Winograd conv (and F(4x4) weight gradient)"] == 4
    assert "Winograd conv (and weight gradient)" not in counts
    for change in ({"winograd_weight_grad": "off"}, {"winograd": "off"}, {"arch": "lenet"}):
        with pytest.raises(UserError, match="--winograd-grad-tile 4 needs Winograd's weight"):
            build_model(cfg.replace(**change), torch.device("cpu"))
    with pytest.raises(UserError, match="--winograd-grad-tile must be 2 or 4, not 3"):
        cfg.replace(winograd_grad_tile=3)


def test_the_f4_input_gradient_is_asked_for():
    """`--winograd-input-grad-tile 4` gives every Winograd layer F(4x4, 3x3)'s input
    gradient in bf16, and the run records it (and `compare` reads it back); in fp32 or
    without Winograd it is a user error."""
    from fastcifar.train.build import build_model, native_layers, winograd_layer_name

    cfg = TrainConfig(arch="conv5", amp="bf16", winograd_input_grad_tile=4)
    model = build_model(cfg, torch.device("cpu"))
    layers = [m for m in model.modules() if type(m) is WinogradConv2d]
    assert len(layers) == 4 and all(m.input_grad_tile == 4 for m in layers)
    name = "Winograd conv (and weight gradient and F(4x4) input gradient)"
    assert winograd_layer_name(layers[0]) == name

    def winograd_layers(model):
        return {k: v for k, v in native_layers(model).items() if k.startswith("Winograd")}

    assert winograd_layers(model) == {name: 4}
    default = build_model(cfg.replace(winograd_input_grad_tile=2), torch.device("cpu"))
    assert winograd_layers(default) == {"Winograd conv (and weight gradient)": 4}
    for change in ({"amp": "none"}, {"winograd": "off"}):
        with pytest.raises(UserError, match="--winograd-input-grad-tile 4 is for Winograd"):
            build_model(cfg.replace(**change), torch.device("cpu"))
    with pytest.raises(UserError, match="--winograd-input-grad-tile must be 2 or 4, not 3"):
        cfg.replace(winograd_input_grad_tile=3)


def test_compare_reads_the_input_gradients_tile_from_the_run(tmp_path):
    from fastcifar.compare import winograd_ran

    run = tmp_path / "run"
    run.mkdir()
    config = {"winograd": "auto", "winograd_weight_grad": "auto"}
    layers = {"Winograd conv (and F(4x4) weight gradient and F(4x4) input gradient)": 11}
    (run / "env.json").write_text(json.dumps({"native_layers": layers}))
    assert winograd_ran(config, run) == ("on", "on", 4, 4)
    (run / "env.json").write_text(json.dumps({"native_layers": {"Winograd conv": 4}}))
    assert winograd_ran(config, run) == ("on", "off", 2, 2)
    (run / "env.json").write_text(json.dumps({"native_layers": {"ReLU-BatchNorm": 3}}))
    assert winograd_ran(config, run) == ("off", "off", 2, 2)


@pytest.mark.parametrize("change", [{"channels_last": False}, {"amp": "fp16"}])
def test_on_outside_channels_last_cpu_training_is_a_user_error(change):
    from fastcifar.train.build import build_model

    cfg = TrainConfig(**{"arch": "cerberus", "amp": "bf16", "winograd": "on"} | change)
    with pytest.raises(UserError, match="runs bf16 or fp32 channels-last CPU training only"):
        build_model(cfg, torch.device("cpu"))


def test_a_cerberus_training_step_is_as_close_to_fp32_as_direct_bf16():
    """One batch, bf16 autocast, from fp32's weights: against the fp32 step, every
    convolution's weight gradient strays at most 1.6x as far with Winograd as with the
    direct bf16 convolutions (at initialisation bf16 alone moves them by 30% to 50%, and
    gradients that had nothing to do with the fp32 ones would stray 3x as far); and as
    far with Winograd's weight gradient too."""
    torch.manual_seed(0)
    fp32 = create_model("cerberus").to(memory_format=torch.channels_last)
    direct, ours, full = copy.deepcopy(fp32), copy.deepcopy(fp32), copy.deepcopy(fp32)
    assert use_winograd(ours) == 11 and use_winograd(full) == 11
    assert use_winograd_weight_grad(full) == 11
    x = channels_last(8, 3, 32, 32, dtype=torch.float32)
    y = torch.randint(0, 10, (8,))
    losses = []
    for model, amp in ((fp32, False), (direct, True), (ours, True), (full, True)):
        torch.manual_seed(1)  # the same dropout masks
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.item())
    assert losses[2] == pytest.approx(losses[0], rel=1e-2) and losses[3] == losses[2]
    convs = [(n, p) for n, p in fp32.named_parameters() if p.dim() == 4]
    assert len(convs) == 12
    for (name, want), a, b, c in zip(convs, _conv_weights(direct), _conv_weights(ours),
                                     _conv_weights(full), strict=True):  # fmt: skip
        bound = 1.6 * relative_rms(a.grad, want.grad.double())
        assert relative_rms(b.grad, want.grad.double()) < bound, name
        assert relative_rms(c.grad, want.grad.double()) < bound, name


def _conv_weights(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.dim() == 4]


def _winograd_run(tmp_path, capsys):
    """A one-epoch conv4 run trained with --winograd on (bf16, CPU; a constant schedule,
    so that a resume may add epochs)."""
    from fastcifar.cli import main

    from .conftest import make_arrays, write_batches_dir

    data = write_batches_dir(tmp_path / "data", make_arrays(n_train=200, n_test=50))
    run = tmp_path / "run"
    argv = ["train", "--arch", "conv4", "--data", str(data), "--out", str(run), "--epochs", "1",
            "--batch-size", "50", "--val", "50", "--no-track", "--quiet", "--amp", "bf16",
            "--winograd", "on", "--schedule", "constant"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    return run


def test_a_winograd_checkpoint_loads_where_winograd_cannot_run(tmp_path, capsys, monkeypatch):
    """eval and predict build the model without it (same weights); a resume may turn it off."""
    from fastcifar.cli import main
    from fastcifar.inference import load_trained
    from fastcifar.train import build

    run = _winograd_run(tmp_path, capsys)
    model, cfg = load_trained(run / "best.pt")
    assert cfg.winograd == "on" and any(type(m) is WinogradConv2d for m in model.modules())
    monkeypatch.setattr(build, "winograd_available", lambda amp="bf16": (False, "no AVX512-BF16"))
    model, cfg = load_trained(run / "best.pt")
    assert cfg.winograd == "off" and not any(type(m) is WinogradConv2d for m in model.modules())
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    assert "--winograd on, but no AVX512-BF16" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--epochs", "2", "--winograd", "off"]) == 0
