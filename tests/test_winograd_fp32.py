"""The fp32 Winograd F(2x2, 3x3) and F(4x4, 3x3) convolutions on CPUs with AVX2 and FMA
(kernels/winograd_fp32_cpu.cpp through fastcifar._C's winograd_conv3x3 and its weight
gradient) against plain PyTorch: F.conv2d and its gradients in float64."""

import pytest
import torch
import torch.nn.functional as F

from fastcifar.config import TrainConfig
from fastcifar.errors import UserError
from fastcifar.models.winograd import WinogradConv2d, winograd_available
from fastcifar.ops.winograd import packed_weight_tiles, weight_grad, winograd_conv3x3

from .tensors import conv3x3_weights, random_channels_last

pytestmark = pytest.mark.skipif(
    not winograd_available("none")[0], reason="needs fastcifar._C and a CPU with AVX2 and FMA"
)


def channels_last(*shape, seed=0):
    return random_channels_last(*shape, dtype=torch.float32, seed=seed)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


# one tile; a non-square image; output channels of one 8-lane vector and of one and a half
# 16-wide panels; tile counts off the kernel's six-row blocks; several chunks of tiles
# with a partial last one; CerberusNet's widest layer
SHAPES = [
    (1, 8, 8, 2, 2),
    (2, 16, 24, 4, 6),
    (3, 24, 40, 6, 6),
    (1, 32, 16, 10, 4),
    (5, 64, 64, 16, 16),
    (2, 256, 256, 8, 8),
]


# F(4x4, 3x3)'s (sizes in multiples of 4): one tile, a non-square image, several chunks
F4_SHAPES = [(1, 8, 8, 4, 4), (2, 16, 24, 4, 12), (3, 24, 40, 8, 8), (5, 64, 64, 16, 16),
             (2, 256, 256, 8, 8)]  # fmt: skip


@pytest.mark.parametrize(
    ("tile", "grad_tile", "n", "c_in", "c_out", "h", "w"),
    [(2, 2, *shape) for shape in SHAPES]
    + [(4, grad_tile, *shape) for shape in F4_SHAPES for grad_tile in (2, 4)],
)
def test_values_and_gradients_against_float64(tile, grad_tile, n, c_in, c_out, h, w):
    """Output, input, weight and bias gradients of the layer with Winograd's weight
    gradient (F(`grad_tile` x `grad_tile`, 3x3)), against F.conv2d's in float64: F(2x2,
    3x3) within a few fp32 roundings, F(4x4, 3x3) (its matrices' larger coefficients)
    within 1e-4, a hundredth of bf16's rounding."""
    x = channels_last(n, c_in, h, w)
    weight, bias = conv3x3_weights(c_out, c_in)
    grad = channels_last(n, c_out, h, w, seed=2)
    ours = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = winograd_conv3x3(*ours, winograd_weight_grad=True, weight_grad_tile=grad_tile, tile=tile)
    out.backward(grad)
    exact = [t.double().requires_grad_() for t in (x, weight, bias)]
    want = F.conv2d(*exact, padding=1)
    want.backward(grad.double())
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    bound = 1e-5 if tile == 2 else 1e-4
    assert relative_error(out, want) < bound
    for got, expected in zip(ours, exact, strict=True):
        assert got.grad.dtype == torch.float32
        assert relative_error(got.grad, expected.grad) < bound


@pytest.mark.parametrize(("tile", "h", "w", "bound"), [(2, 6, 8, 1e-5), (4, 8, 12, 1e-4)])
def test_the_weight_gradient_op_against_float64(tile, h, w, bound):
    """`weight_grad` alone, F(2x2, 3x3) and F(4x4, 3x3): the weights' and the bias's
    gradients from the op's sums."""
    x, grad = channels_last(3, 16, h, w), channels_last(3, 32, h, w, seed=2)
    got_w, got_b = weight_grad(grad, x, tile=tile)
    _, want_w, want_b = torch.ops.aten.convolution_backward(
        grad.double(), x.double(), torch.zeros(32, 16, 3, 3, dtype=torch.float64), [32],
        [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, True],
    )  # fmt: skip
    assert relative_error(got_w, want_w) < bound and relative_error(got_b, want_b) < bound


def test_the_ops_refuse_what_they_cannot_compute():
    tiles = packed_weight_tiles(conv3x3_weights(16, 16)[0], torch.float32)
    conv, grad_op = (
        torch.ops.fastcifar.winograd_conv3x3,
        torch.ops.fastcifar.winograd_conv3x3_weight_grad,
    )
    with pytest.raises(RuntimeError, match="even height and width"):
        conv(channels_last(1, 16, 5, 4), tiles, None)
    with pytest.raises(RuntimeError, match="fp32 weight tiles"):
        conv(channels_last(1, 16, 4, 4), packed_weight_tiles(conv3x3_weights(16, 16)[0]), None)
    with pytest.raises(RuntimeError, match="multiples of 8"):
        conv(
            channels_last(1, 12, 4, 4),
            packed_weight_tiles(conv3x3_weights(16, 12)[0], torch.float32),
            None,
        )
    with pytest.raises(RuntimeError, match="float channels-last"):
        conv(torch.randn(1, 16, 4, 4), tiles, None)
    f4_tiles = packed_weight_tiles(conv3x3_weights(16, 16)[0], torch.float32, tile=4)
    with pytest.raises(RuntimeError, match="multiples of 4"):
        conv(channels_last(1, 16, 6, 4), f4_tiles, None)
    with pytest.raises(RuntimeError, match="multiples of 8"):
        grad_op(channels_last(1, 16, 4, 4), channels_last(1, 12, 4, 4))
    with pytest.raises(RuntimeError, match="tile 4 needs a height and width in multiples of 4"):
        grad_op(channels_last(1, 16, 6, 4), channels_last(1, 16, 6, 4), 4)
    with pytest.raises(RuntimeError, match="tile must be 2 or 4, not 3"):
        grad_op(channels_last(1, 16, 6, 6), channels_last(1, 16, 6, 6), 3)


def test_opcheck():
    weight, bias = conv3x3_weights(16, 24)
    for tile in (2, 4):
        torch.library.opcheck(
            torch.ops.fastcifar.winograd_conv3x3.default,
            (channels_last(2, 24, 4, 8), packed_weight_tiles(weight, torch.float32, tile), bias),
        )
    for tile in (2, 4):
        torch.library.opcheck(
            torch.ops.fastcifar.winograd_conv3x3_weight_grad.default,
            (channels_last(2, 16, 4, 8, seed=2), channels_last(2, 24, 4, 8), tile),
        )


def test_the_layer_takes_fp32_batches_and_leaves_the_rest_to_f_conv2d():
    """fp32 channels-last without autocast goes through the fp32 op, as F(4x4, 3x3) where
    the size is a multiple of 4, else F(2x2, 3x3); NCHW memory and an odd size give
    nn.Conv2d's own result."""
    ours = WinogradConv2d(16, 16, 3, padding=1)
    for size, tile in ((6, 2), (8, ours.fp32_tile)):
        x = channels_last(2, 16, size, size)
        tiles = packed_weight_tiles(ours.weight, torch.float32, tile)
        assert torch.equal(ours(x), torch.ops.fastcifar.winograd_conv3x3(x, tiles, ours.bias))
    for other in (torch.randn(2, 16, 6, 6), channels_last(2, 16, 5, 6)):
        assert torch.equal(ours(other), F.conv2d(other, ours.weight, ours.bias, padding=1))


def test_traced_by_torch_compile():
    ours = WinogradConv2d(16, 16, 3, padding=1)
    ours.winograd_weight_grad = True
    x = channels_last(2, 16, 8, 8).requires_grad_()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    got = compiled(x)
    got.sum().backward()
    assert torch.equal(got, ours(x.detach()))
    assert x.grad is not None and ours.weight.grad is not None


def fp32_model(monkeypatch, instructions: str, **settings):
    """`build_model` of a fp32 CerberusNet as if on a CPU whose widest instructions are
    `instructions`; its Winograd layers, and how many have Winograd's weight gradient."""
    from fastcifar.train import device
    from fastcifar.train.build import build_model

    monkeypatch.setattr(device, "cpu_instructions", lambda: instructions)
    cfg = TrainConfig(**{"arch": "cerberus", "amp": "none", "channels_last": True} | settings)
    model = build_model(cfg, torch.device("cpu"))
    layers = [m for m in model.modules() if type(m) is WinogradConv2d]
    grad_tiles = {m.weight_grad_tile for m in layers if m.winograd_weight_grad}
    return len(layers), sum(m.winograd_weight_grad for m in layers), grad_tiles


def test_auto_turns_it_on_for_fp32_on_an_avx2_cpu(monkeypatch):
    """Forward and both gradients, the weight's as F(4x4, 3x3) unless asked otherwise."""
    assert fp32_model(monkeypatch, "AVX2") == (11, 11, {4})
    assert fp32_model(monkeypatch, "AVX2", winograd_weight_grad="off")[:2] == (11, 0)
    assert fp32_model(monkeypatch, "AVX2", winograd="off")[:2] == (0, 0)


def test_on_an_avx512_cpu_fp32_winograd_is_asked_for(monkeypatch):
    """Where the CPU has AVX-512 (oneDNN's fp32 at twice AVX2's width) `auto` keeps the
    direct convolutions; `--winograd on` runs the fp32 kernel."""
    for instructions in ("AVX512", "AVX512-BF16", "AMX"):
        assert fp32_model(monkeypatch, instructions)[:2] == (0, 0)
    assert fp32_model(monkeypatch, "AVX512", winograd="on")[:2] == (11, 11)


def test_the_weight_gradient_tile_in_fp32(monkeypatch):
    """`--winograd-grad-tile` picks the fp32 weight gradient's tile; 4 without Winograd's
    weight gradient is a user error."""
    for tile in (2, 4):
        assert fp32_model(monkeypatch, "AVX2", winograd_grad_tile=tile) == (11, 11, {tile})
    with pytest.raises(UserError, match="--winograd-grad-tile 4 needs Winograd's weight"):
        fp32_model(monkeypatch, "AVX2", winograd="off", winograd_grad_tile=4)
