"""3x3 convolutions whose weight and bias gradients come from the AMX kernel
(fastcifar._C's conv3x3_weight_grad, fastcifar.ops.amx_conv, fastcifar.models.amx_conv)
against eager convolutions: the kernel against float64 gradients of the same bf16
operands, the layer against nn.Conv2d under bf16 autocast, a whole CerberusNet step."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcifar.models import create_model
from fastcifar.models.amx_conv import AmxGradConv2d, amx_conv_available, use_amx_conv

from .tensors import random_channels_last as channels_last

pytestmark = pytest.mark.skipif(
    not amx_conv_available(), reason="needs fastcifar._C and a CPU with AMX-BF16"
)


def float64_grads(grad, x, c_out):
    """The weight and bias gradients of conv2d(x, w, b, padding=1) in float64."""
    w = torch.zeros(c_out, x.shape[1], 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(c_out, dtype=torch.float64, requires_grad=True)
    F.conv2d(x.double(), w, b, padding=1).backward(grad.double())
    return w.grad, b.grad


# cerberus's channel counts; sizes off the kernel's 256-pixel blocks; one row; one pixel
SHAPES = [(4, 64, 64, 8, 8), (3, 32, 96, 5, 7), (2, 128, 32, 16, 16), (2, 32, 32, 1, 9),
          (5, 32, 64, 1, 1), (1, 256, 256, 8, 8)]  # fmt: skip


@pytest.mark.parametrize(("n", "c_in", "c_out", "h", "w"), SHAPES)
def test_the_kernel_matches_float64_gradients(n, c_in, c_out, h, w):
    x = channels_last(n, c_in, h, w, seed=1)
    grad = channels_last(n, c_out, h, w, seed=2)
    weight, bias = torch.ops.fastcifar.conv3x3_weight_grad(grad, x)
    want_w, want_b = float64_grads(grad, x, c_out)
    assert weight.dtype == bias.dtype == torch.float32
    assert weight.shape == (c_out, c_in, 3, 3)
    assert weight.is_contiguous(memory_format=torch.channels_last)
    # fp32 sums of exact bf16 products: only the sums' rounding differs
    torch.testing.assert_close(weight.double(), want_w, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(bias.double(), want_b, rtol=1e-5, atol=1e-4)


@contextlib.contextmanager
def threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_threads_without_a_block_add_nothing():
    """One 256-pixel block for two threads: the idle thread's float tiles, never zeroed,
    hold whatever the heap left there (here NaN, freed just before) and must not count."""
    x = channels_last(1, 32, 4, 4, seed=1)
    grad = channels_last(1, 32, 4, 4, seed=2)
    want_w, want_b = float64_grads(grad, x, 32)
    with threads(2):
        for _ in range(3):
            junk = torch.full((2 * 9 * 32 * 32,), float("nan"))  # the tiles' size, freed
            del junk
            weight, bias = torch.ops.fastcifar.conv3x3_weight_grad(grad, x)
            torch.testing.assert_close(weight.double(), want_w, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(bias.double(), want_b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: (channels_last(2, 16, 4, 4), channels_last(2, 32, 4, 4)), "multiples of 32"),
        (lambda: (channels_last(2, 32, 4, 4).contiguous(), channels_last(2, 32, 4, 4)),
         "channels-last bf16"),
        (lambda: (channels_last(2, 32, 4, 4, dtype=torch.float32), channels_last(2, 32, 4, 4)),
         "channels-last bf16"),
        (lambda: (channels_last(2, 32, 4, 4), channels_last(2, 32, 4, 5)), "must match"),
    ],
)  # fmt: skip
def test_the_kernel_refuses_what_it_does_not_compute(make, message):
    grad, x = make()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastcifar.conv3x3_weight_grad(grad, x)


def conv_pair(c_in=32, c_out=64, seed=0):
    torch.manual_seed(seed)
    eager = nn.Conv2d(c_in, c_out, 3, padding=1).to(memory_format=torch.channels_last)
    swapped = copy.deepcopy(eager)
    assert use_amx_conv(swapped) == 0  # a bare convolution is no container's child
    swapped = nn.Sequential(swapped)
    assert use_amx_conv(swapped) == 1 and type(swapped[0]) is AmxGradConv2d
    return eager, swapped[0]


def test_the_layer_trains_as_nn_conv2d_under_bf16_autocast():
    """The same output and input gradient (both oneDNN's, from the same bf16 operands),
    and weight and bias gradients closer to float64's than autocast's bf16 ones."""
    eager, layer = conv_pair()
    x = channels_last(4, 32, 12, 12, dtype=torch.float32, seed=3)
    grad = channels_last(4, 64, 12, 12, seed=4)
    results = []
    for conv in (eager, layer):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(xi)
        y.backward(grad)
        results.append((y.detach(), xi.grad, conv.weight.grad, conv.bias.grad))
    (y0, gx0, gw0, gb0), (y1, gx1, gw1, gb1) = results
    assert y1.dtype == torch.bfloat16
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(gx1, gx0)
    want_w, want_b = float64_grads(grad, x.to(torch.bfloat16), 64)
    for got, autocast, want in ((gw1, gw0, want_w), (gb1, gb0, want_b)):
        assert got.dtype == torch.float32
        assert (got.double() - want).abs().max() <= (autocast.double() - want).abs().max()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_evaluation_fp32_and_frozen_weights_go_through_aten(monkeypatch):
    eager, layer = conv_pair()

    def refuse(*args):
        raise AssertionError("the AMX kernel ran")

    monkeypatch.setattr(torch.ops.fastcifar, "conv3x3_weight_grad", refuse)
    x = channels_last(2, 32, 6, 6, dtype=torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(layer(x), eager(x))
    layer(x).sum().backward()  # fp32 without autocast
    torch.testing.assert_close(
        layer.weight.grad, torch.autograd.grad(eager(x).sum(), eager.weight)[0]
    )


def test_a_checkpoint_loads_either_way():
    eager, layer = conv_pair()
    assert eager.state_dict().keys() == layer.state_dict().keys()
    layer.load_state_dict(eager.state_dict())
    eager.load_state_dict(layer.state_dict())


def cerberus_bf16_steps(*models):
    """Each model's loss and flattened float64 parameter gradients after one bf16
    CerberusNet step on the same batch and dropout mask."""
    x = channels_last(8, 3, 32, 32, dtype=torch.float32)
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(0))
    losses, grads = [], []
    for m in models:
        torch.manual_seed(3)  # the same dropout mask
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(m(x), y)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.flatten().double() for p in m.parameters()])
    return losses, grads


def test_cerberus_swaps_its_convolutions_and_trains_the_same():
    """A whole bf16 CerberusNet step: eleven of its twelve convolutions (the first has 3
    input channels), the same loss, and each parameter's gradient along eager's."""
    model = create_model("cerberus").to(memory_format=torch.channels_last)
    reference_model = copy.deepcopy(model)
    assert use_amx_conv(model) == 11
    losses, grads = cerberus_bf16_steps(reference_model, model)
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    for a, b in zip(*grads, strict=True):
        assert F.cosine_similarity(a, b, dim=0) > 0.99


def test_compile_traces_the_layer_without_graph_breaks():
    _, layer = conv_pair()
    x = channels_last(2, 32, 6, 6)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0


@pytest.mark.parametrize(("usable", "native", "swapped"),
                         [(True, "auto", True), (True, "off", False), (False, "auto", False)])  # fmt: skip
def test_the_cpu_model_uses_it_where_amx_tiles_are_and_native_is_not_off(usable, native, swapped,
                                                                         monkeypatch):  # fmt: skip
    from fastcifar.config import TrainConfig
    from fastcifar.train import build

    monkeypatch.setattr(build, "amx_conv_available", lambda: usable)
    cfg = TrainConfig(arch="conv5", channels_last=True, native=native)
    model = build.build_model(cfg, torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, AmxGradConv2d)]
    assert len(layers) == (4 if swapped else 0)
