"""ReLU followed by training-mode BatchNorm as one layer on the CPU (fastcifar._C's relu_*
kernels, fastcifar.ops.relu_bn, fastcifar.models.relu_bn) against eager nn.ReLU and
nn.BatchNorm2d: outputs, every gradient and the running statistics, in float64 references."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcifar.models import create_model
from fastcifar.models.relu_bn import (
    ReluBatchNorm2d,
    ReluBatchNormMaxPool2d,
    relu_bn_available,
    use_relu_bn,
    use_relu_bn_pool,
)
from fastcifar.ops.relu_bn import kernels_take_bf16, relu_batch_norm, relu_bn_fits

from .tensors import random_channels_last

pytestmark = pytest.mark.skipif(
    not relu_bn_available(), reason="needs fastcifar._C and a CPU with AVX2 or AVX-512"
)
# the kernels take bf16 on AVX-512 only; on AVX2, fp32
bf16_kernels = pytest.mark.skipif(not kernels_take_bf16(), reason="bf16 kernels need AVX-512")

channels_last = functools.partial(random_channels_last, dtype=torch.float32)


def reference(x, weight, bias, grad, eps=1e-5, max_pool=False):
    """y (2 x 2 max-pooled with `max_pool`) and the gradients of x, weight and bias from
    eager ops in float64."""
    x64 = x.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    b64 = bias.double().requires_grad_()
    y = F.batch_norm(F.relu(x64), None, None, w64, b64, training=True, eps=eps)
    if max_pool:
        y = F.max_pool2d(y, 2)
    y.backward(grad.double())
    return y.detach(), x64.grad, w64.grad, b64.grad


def parameters(c, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)


def fused(x, weight, bias, grad):
    x = x.detach().requires_grad_()
    weight, bias = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    y = relu_batch_norm(x, weight, bias, None, None, 0.1, 1e-5)
    y.backward(grad)
    return y.detach(), x.grad, weight.grad, bias.grad


def relative_max(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


# cerberus's channel counts; one pixel row; sizes off the kernels' 256-pixel chunks
SHAPES = [(4, 64, 8, 8), (2, 16, 1, 3), (3, 128, 5, 7), (2, 256, 4, 4), (5, 32, 17, 13)]


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_eager_relu_and_batch_norm(shape):
    x = channels_last(*shape, shift=0.3)
    weight, bias = parameters(shape[1])
    grad = channels_last(*shape, seed=2)
    want = reference(x, weight, bias, grad)
    got = fused(x, weight, bias, grad)
    for name, g, w in zip(("y", "x grad", "weight grad", "bias grad"), got, want, strict=True):
        assert relative_max(g, w) < 1e-5, name
        assert g.dtype == torch.float32, name
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert got[1].is_contiguous(memory_format=torch.channels_last)


@bf16_kernels
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_bf16_is_within_its_rounding_of_the_float64_reference(shape):
    """Inputs in bf16, references from the same bf16 values in float64: each output is
    one bf16 rounding (2^-8 relative) from it; the per-channel sums stay in float64."""
    x = channels_last(*shape, dtype=torch.bfloat16, shift=0.3)
    weight, bias = parameters(shape[1])
    grad = channels_last(*shape, dtype=torch.bfloat16, seed=2)
    want = reference(x, weight, bias, grad)
    y, gx, gw, gb = fused(x, weight, bias, grad)
    assert y.dtype == gx.dtype == torch.bfloat16
    assert ((y.double() - want[0]).abs() <= want[0].abs() * 2**-8 + 1e-6).all()
    assert ((gx.double() - want[1]).abs() <= want[1].abs() * 2**-8 + 1e-6).all()
    assert relative_max(gw, want[2]) < 1e-5 and relative_max(gb, want[3]) < 1e-5


def test_the_input_gradient_is_zero_where_the_relu_cut():
    x = channels_last(2, 16, 3, 3)
    weight, bias = parameters(16)
    _, gx, _, _ = fused(x, weight, bias, channels_last(2, 16, 3, 3, seed=2))
    assert (gx[x <= 0] == 0).all() and (gx[x > 0] != 0).any()


def test_a_non_channels_last_gradient_is_taken():
    x = channels_last(2, 32, 4, 4)
    weight, bias = parameters(32)
    grad = channels_last(2, 32, 4, 4, seed=2).contiguous()  # NCHW
    got = fused(x, weight, bias, grad)
    want = reference(x, weight, bias, grad)
    assert relative_max(got[1], want[1]) < 1e-5


def pair(c, momentum=0.1):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(inplace=True),
                          nn.BatchNorm2d(c, momentum=momentum))  # fmt: skip
    with torch.no_grad():
        model[2].weight.uniform_(0.5, 1.5)
        model[2].bias.uniform_(-0.5, 0.5)
    return model.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_the_layer_trains_as_relu_then_batch_norm(momentum):
    """Two training steps and an evaluation: outputs, the conv's and the BatchNorm's
    gradients and the running statistics (momentum None: BatchNorm's cumulative average)."""
    eager = pair(32, momentum)
    swapped = copy.deepcopy(eager)
    assert use_relu_bn(swapped) == 1
    assert isinstance(swapped[1], nn.Identity) and isinstance(swapped[2], ReluBatchNorm2d)
    assert_trains_alike(eager, swapped, swapped[2], eager[2])


def assert_trains_alike(eager, swapped, layer, eager_layer):
    """Two training steps and an evaluation of 3-channel 10 x 10 batches: outputs, every
    parameter's gradient and `layer`'s running statistics as `eager_layer`'s."""
    for step in range(2):
        x = channels_last(8, 3, 10, 10, seed=10 + step)
        outs = []
        for model in (eager, swapped):
            model.zero_grad()
            y = model(x)
            y.pow(2).mean().backward()
            outs.append(y.detach())
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
        for a, b in zip(eager.parameters(), swapped.parameters(), strict=True):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(layer, name), getattr(eager_layer, name))
    eager.eval(), swapped.eval()
    x = channels_last(4, 3, 10, 10, seed=20)
    want = eager(x)
    got = swapped(x)  # with autograd: ATen's ReLU and BatchNorm
    assert got.requires_grad
    torch.testing.assert_close(got, want)
    for no_autograd in (torch.no_grad, torch.inference_mode):  # one pass of the kernels
        with no_autograd():
            torch.testing.assert_close(swapped(x), want, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_loads_either_way():
    eager = pair(16)
    swapped = copy.deepcopy(eager)
    use_relu_bn(swapped)
    assert eager.state_dict().keys() == swapped.state_dict().keys()
    eager.load_state_dict(swapped.state_dict())
    swapped.load_state_dict(eager.state_dict())


def test_batches_the_kernels_do_not_take_go_through_aten():
    layer = ReluBatchNorm2d(24)  # 24 channels: not a multiple of 16
    x = channels_last(2, 24, 4, 4)
    assert not relu_bn_fits(x) and not relu_bn_fits(x.contiguous())
    want = F.batch_norm(F.relu(x), None, None, layer.weight, layer.bias, training=True)
    torch.testing.assert_close(layer(x), want)


def test_cerberus_swaps_every_relu_batch_norm_pair_and_trains_the_same():
    """A whole CerberusNet step: in fp32 the same gradients (to the sums' order, amplified
    through twelve BatchNorms), in bf16 the same loss (bf16 moves eager's own gradients
    far from fp32's in this deep net, so they are compared in fp32)."""
    model = create_model("cerberus").to(memory_format=torch.channels_last)
    pairs = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    reference_model = copy.deepcopy(model)
    assert use_relu_bn(model) == pairs == 12
    x = channels_last(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    for amp in (False, True):
        losses = []
        for m in (reference_model, model):
            m.zero_grad()
            torch.manual_seed(3)  # the same dropout mask
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(m(x), y)
            loss.backward()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < (0.02 if amp else 1e-5) * abs(losses[0])
        if not amp:
            for a, b in zip(reference_model.parameters(), model.parameters(), strict=True):
                flat = a.grad.flatten().double(), b.grad.flatten().double()
                assert F.cosine_similarity(*flat, dim=0) > 0.99


@bf16_kernels
def test_cerberus_evaluates_in_bf16_as_eager_layers_do():
    """Evaluation without autograd through the one-pass kernels (the pools folded in),
    under bf16 autocast, against the eager model, after a few training steps have moved
    the running statistics."""
    model = create_model("cerberus").to(memory_format=torch.channels_last)
    for step in range(3):
        model(channels_last(16, 3, 32, 32, seed=step))  # training mode: statistics move
    reference_model = copy.deepcopy(model).eval()
    assert use_relu_bn(model) == 12 and use_relu_bn_pool(model) == 3
    model.eval()
    x = channels_last(8, 3, 32, 32, seed=9)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = reference_model(x).float(), model(x).float()
    assert relative_max(got, want.double()) < 0.03  # twelve layers of bf16 rounding


def test_compile_traces_the_layer_without_graph_breaks():
    model = pair(16)
    use_relu_bn(model)
    explanation = torch._dynamo.explain(model)(channels_last(2, 3, 6, 6))
    assert explanation.graph_break_count == 0
    model.eval()
    with torch.no_grad():  # the one-pass evaluation
        explanation = torch._dynamo.explain(model)(channels_last(2, 3, 6, 6))
    assert explanation.graph_break_count == 0


@pytest.mark.parametrize(("amx", "bf16", "capability", "native", "swapped"),
                         [(True, True, "AVX512", "auto", True), (False, True, "AVX512", "auto", True),
                          (True, True, "AVX512", "off", False), (False, False, "AVX512", "auto", False),
                          (False, False, "AVX2", "auto", True), (False, False, "AVX2", "off", False),
                          (False, False, "DEFAULT", "auto", False)])  # fmt: skip
def test_the_cpu_model_uses_it_where_measured_faster_and_native_is_not_off(
    amx, bf16, capability, native, swapped, monkeypatch
):
    """On CPUs with AMX or AVX512-BF16 (bf16 training) and on AVX2 ones (fp32) for the
    architectures measured faster there (conv5 among them); not on AVX-512 CPUs without
    bf16 (never measured) or CPUs without AVX2 (no kernels)."""
    from fastcifar.config import TrainConfig
    from fastcifar.train.build import build_model

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    cfg = TrainConfig(arch="conv5", channels_last=True, native=native)
    model = build_model(cfg, torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, ReluBatchNorm2d)]
    assert len(layers) == (5 if swapped else 0)
    pooling = [m for m in layers if isinstance(m, ReluBatchNormMaxPool2d)]
    assert len(pooling) == (3 if swapped else 0)  # the three followed by a max pool
