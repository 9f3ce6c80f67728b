"""The first layer's weight gradient on AVX2 (fastcifar._C's conv3x3_narrow_weight_grad,
fastcifar.models.narrow_conv) against ATen's convolution backward in float64."""

import functools

import pytest
import torch
from torch import nn

from fastcifar.models import create_model
from fastcifar.models.narrow_conv import (
    NarrowGradConv2d,
    narrow_conv_available,
    takes,
    use_narrow_conv,
)

from .tensors import conv3x3_weights, random_channels_last

pytestmark = pytest.mark.skipif(
    not narrow_conv_available(), reason="needs fastcifar._C and a CPU with AVX2 or AVX-512"
)

channels_last = functools.partial(random_channels_last, dtype=torch.float32)


def reference_grads(grad, x, weight):
    """The weight's and bias's gradients from ATen's convolution backward in float64."""
    _, gw, gb = torch.ops.aten.convolution_backward(
        grad.double(), x.double(), weight.double(), [weight.shape[0]], [1, 1], [1, 1], [1, 1],
        False, [0, 0], 1, [False, True, True],
    )  # fmt: skip
    return gw, gb


def relative_max(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


# an RGB first layer; 64 outputs; 24 (a pair of vectors and a single one); one input
# channel; one pixel row; odd sizes; two rows of the kernel's 16-row chunks and a part
SHAPES = [(4, 3, 32, 32, 32), (2, 3, 9, 7, 64), (2, 4, 5, 6, 24), (3, 1, 1, 5, 8),
          (5, 2, 7, 3, 16), (2, 3, 17, 4, 8)]  # fmt: skip


@pytest.mark.parametrize(("n", "c_in", "h", "w", "c_out"), SHAPES)
def test_the_gradients_match_aten_in_float64(n, c_in, h, w, c_out):
    x = channels_last(n, c_in, h, w)
    grad = channels_last(n, c_out, h, w, seed=1)
    gw, gb = torch.ops.fastcifar.conv3x3_narrow_weight_grad(grad, x)
    want_w, want_b = reference_grads(grad, x, torch.zeros(c_out, c_in, 3, 3))
    assert gw.shape == (c_out, c_in, 3, 3) and gb.shape == (c_out,)
    assert gw.dtype == gb.dtype == torch.float32
    assert relative_max(gw, want_w) < 1e-5
    assert relative_max(gb, want_b) < 1e-5


def test_the_op_refuses_what_it_cannot_take():
    x = channels_last(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="multiples of 8"):
        torch.ops.fastcifar.conv3x3_narrow_weight_grad(channels_last(2, 12, 4, 4), x)
    with pytest.raises(RuntimeError, match="batch and size"):
        torch.ops.fastcifar.conv3x3_narrow_weight_grad(channels_last(2, 8, 4, 5), x)
    with pytest.raises(RuntimeError, match="float channels-last"):
        torch.ops.fastcifar.conv3x3_narrow_weight_grad(channels_last(2, 8, 4, 4), x.contiguous())


def test_opcheck():
    x, grad = channels_last(2, 3, 6, 5), channels_last(2, 16, 6, 5, seed=1)
    torch.library.opcheck(torch.ops.fastcifar.conv3x3_narrow_weight_grad.default, (grad, x))


@pytest.mark.parametrize("input_grad", [False, True])
def test_the_layer_trains_as_nn_conv2d(input_grad):
    """Output and every gradient against `nn.Conv2d`'s, the input's too where it needs one."""
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1))
    with torch.no_grad():
        model[0].weight.copy_(conv3x3_weights(32, 3)[0])
    swapped = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1))
    swapped.load_state_dict(model.state_dict())
    assert use_narrow_conv(swapped) == 1 and type(swapped[0]) is NarrowGradConv2d
    x = channels_last(4, 3, 10, 12)
    grad = channels_last(4, 32, 10, 12, seed=2)
    results = []
    for m in (model, swapped):
        inp = x.clone().requires_grad_(input_grad)
        out = m(inp)
        out.backward(grad)
        results.append((out.detach(), m[0].weight.grad, m[0].bias.grad, inp.grad))
    (want_y, want_w, want_b, want_x), (y, gw, gb, gx) = results
    torch.testing.assert_close(y, want_y)
    torch.testing.assert_close(gw, want_w, rtol=1e-4, atol=1e-4 * want_w.abs().max().item())
    torch.testing.assert_close(gb, want_b, rtol=1e-4, atol=1e-4 * want_b.abs().max().item())
    if input_grad:
        torch.testing.assert_close(gx, want_x)
    else:
        assert gx is None


def test_only_narrow_first_layers_are_taken():
    assert takes(nn.Conv2d(3, 32, 3, padding=1))
    assert not takes(nn.Conv2d(8, 32, 3, padding=1))  # Winograd's
    assert not takes(nn.Conv2d(3, 20, 3, padding=1))  # outputs not in multiples of 8
    assert not takes(nn.Conv2d(3, 32, 5, padding=2))
    model = create_model("conv4_relu_bn")
    assert use_narrow_conv(model) == 1 and type(model[0]) is NarrowGradConv2d


def test_other_batches_go_to_aten():
    """bf16 autocast, evaluation and NCHW batches: `nn.Conv2d`'s own forward."""
    conv = nn.Conv2d(3, 8, 3, padding=1)
    swapped = NarrowGradConv2d(3, 8, 3, padding=1)
    swapped.load_state_dict(conv.state_dict())
    x = channels_last(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(swapped(x), conv(x))
    torch.testing.assert_close(swapped(x.contiguous()), conv(x.contiguous()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert swapped(x).dtype == torch.bfloat16
