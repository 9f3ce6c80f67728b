"""The ReLU-BatchNorm layer with a 2x2 max pool folded in (fastcifar._C's
relu_affine_max_pool kernels, fastcifar.models.relu_bn.ReluBatchNormMaxPool2d): the
kernels against the unfused affine kernels followed by ATen's max pool, bit for bit, and
the layer against eager ReLU, BatchNorm and max pooling in float64."""

import copy

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
from fastcifar.ops.relu_bn import kernels_take_bf16, relu_batch_norm

from .test_relu_bn import (
    assert_trains_alike,
    channels_last,
    parameters,
    reference,
    relative_max,
)

pytestmark = pytest.mark.skipif(
    not relu_bn_available(), reason="needs fastcifar._C and a CPU with AVX2 or AVX-512"
)

ops = torch.ops.fastcifar
# the kernels take bf16 on AVX-512 only; on AVX2, fp32
DTYPES = [torch.bfloat16, torch.float32] if kernels_take_bf16() else [torch.float32]

# even sizes, odd ones (the last row and column outside every window), 2 x 2
SHAPES = [(4, 64, 8, 8), (3, 16, 7, 9), (2, 128, 2, 2), (2, 32, 5, 4)]


def with_ties(shape, dtype, seed=0):
    """Values drawn from few levels, half of them negative, so windows hold equal values
    before the ReLU and zeros after it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 4, shape, generator=g).float() / 4
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


def max_pool_with_positions(y):
    """ATen's 2x2 max pool of `y` and each window's winner as 0 to 3 (row-major in the
    window), channels-last uint8."""
    pooled, indices = F.max_pool2d(y, 2, return_indices=True)
    width = y.shape[3]
    where = 2 * (indices // width % 2) + indices % width % 2
    return pooled, where.to(torch.uint8).contiguous(memory_format=torch.channels_last)


def unpool(grad, where, height, width):
    """Each window's gradient at its winner, zero elsewhere (and outside the windows of an
    odd height or width)."""
    n, c, oh, ow = grad.shape
    full = torch.zeros(n, c, height, width, dtype=grad.dtype)
    for p in range(4):
        full[:, :, p // 2 : 2 * oh : 2, p % 2 : 2 * ow : 2] = torch.where(where == p, grad, 0)
    return full.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ties", [False, True])
def test_the_forward_kernel_is_relu_affine_then_max_pool(shape, dtype, ties):
    """Values, winners and each winner's relu(x) exactly as the two kernels it replaces
    (a negative scale included, so some windows' winners are their smallest inputs)."""
    x = with_ties(shape, dtype) if ties else channels_last(*shape, dtype=dtype, shift=0.2)
    scale, shift = parameters(shape[1])
    scale[::3] *= -1
    y, winner_relu, where = ops.relu_affine_max_pool(x, scale, shift)
    want_y, want_where = max_pool_with_positions(ops.relu_affine(x, scale, shift))
    assert torch.equal(y, want_y) and torch.equal(where, want_where)
    assert y.is_contiguous(memory_format=torch.channels_last)
    n, c, h, w = shape
    windows = x.relu()[:, :, : h // 2 * 2, : w // 2 * 2].unflatten(2, (h // 2, 2))
    windows = windows.unflatten(4, (w // 2, 2)).permute(0, 1, 2, 4, 3, 5).flatten(4)
    winners = windows.gather(4, where.long().unsqueeze(4)).squeeze(4)
    assert torch.equal(winner_relu, winners)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_the_backward_kernel_is_max_pool_backward_then_relu_affine_backward(shape, dtype):
    x = with_ties(shape, dtype, seed=1)
    scale, shift = parameters(shape[1])
    _, _, where = ops.relu_affine_max_pool(x, scale, -shift)
    grad = channels_last(*where.shape, dtype=dtype, seed=2)
    grad_scale, x_scale = parameters(shape[1], seed=3)
    offset = torch.randn(shape[1])
    got = ops.relu_affine_max_pool_backward(grad, where, x, grad_scale, x_scale, offset)
    full = unpool(grad, where, *shape[2:])
    want = ops.relu_affine_backward(full, x, grad_scale, x_scale, offset)
    assert torch.equal(got, want)
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_the_kernels_refuse_what_they_cannot_take():
    x = channels_last(2, 16, 1, 4)
    with pytest.raises(RuntimeError, match="2 x 2 pixels"):
        ops.relu_affine_max_pool(x, torch.ones(16), torch.zeros(16))
    x = channels_last(2, 16, 4, 4)
    where = torch.zeros(2, 16, 2, 2, dtype=torch.uint8).contiguous(
        memory_format=torch.channels_last
    )
    grad = channels_last(2, 16, 3, 3)
    with pytest.raises(RuntimeError, match="pooled shape"):
        ops.relu_affine_max_pool_backward(grad, where, x, *[torch.ones(16)] * 3)


@pytest.mark.skipif(kernels_take_bf16(), reason="a CPU whose kernels take fp32 only (AVX2)")
def test_bf16_goes_through_aten_where_the_kernels_take_fp32_only():
    """On AVX2 the kernels refuse bf16 with a reason, and the layer (training and
    evaluation) sends bf16 batches through ATen's ReLU, BatchNorm and max pool."""
    x = channels_last(2, 16, 4, 4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="AVX-512"):
        ops.relu_affine_max_pool(x, torch.ones(16), torch.zeros(16))
    layer = ReluBatchNormMaxPool2d(16).to(torch.bfloat16)
    want = F.max_pool2d(F.batch_norm(F.relu(x), None, None, layer.weight, layer.bias, True), 2)
    torch.testing.assert_close(layer(x), want)
    layer.eval()
    with torch.no_grad():
        want = F.max_pool2d(F.batch_norm(F.relu(x), layer.running_mean, layer.running_var,
                                         layer.weight, layer.bias, False), 2)  # fmt: skip
        torch.testing.assert_close(layer(x), want)


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_eager_relu_batch_norm_and_max_pool(shape):
    """Continuous inputs (no ties, so the eager pool picks the same winners)."""
    x = channels_last(*shape, shift=0.3)
    weight, bias = parameters(shape[1])
    weight[::4] *= -1
    grad = channels_last(shape[0], shape[1], shape[2] // 2, shape[3] // 2, seed=2)
    want = reference(x, weight, bias, grad, max_pool=True)
    x = x.detach().requires_grad_()
    weight, bias = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    y = relu_batch_norm(x, weight, bias, None, None, 0.1, 1e-5, max_pool=True)
    y.backward(grad)
    got = y.detach(), x.grad, weight.grad, bias.grad
    for name, g, w in zip(("y", "x grad", "weight grad", "bias grad"), got, want, strict=True):
        assert relative_max(g, w) < 1e-5, name


def block(c):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(c),
                          nn.MaxPool2d(2), nn.Flatten(), nn.LazyLinear(4))  # fmt: skip
    model(torch.randn(1, 3, 10, 10))
    with torch.no_grad():
        model[2].weight.uniform_(-1.5, 1.5)  # some negative: winners are the smallest
        model[2].bias.uniform_(-0.5, 0.5)
    return model.to(memory_format=torch.channels_last)


def test_the_layer_trains_as_relu_batch_norm_then_max_pool():
    """Two training steps and an evaluation against eager modules: outputs, every
    gradient and the running statistics; the checkpoint's keys unchanged."""
    eager = block(32)
    swapped = copy.deepcopy(eager)
    assert use_relu_bn(swapped) == 1 and use_relu_bn_pool(swapped) == 1
    assert isinstance(swapped[2], ReluBatchNormMaxPool2d) and isinstance(swapped[3], nn.Identity)
    assert eager.state_dict().keys() == swapped.state_dict().keys()
    assert_trains_alike(eager, swapped, swapped[2], eager[2])


def test_batches_the_kernels_do_not_take_are_pooled_after_aten():
    layer = ReluBatchNormMaxPool2d(24)  # 24 channels: not a multiple of 16
    x = channels_last(2, 24, 4, 4)
    want = F.max_pool2d(F.batch_norm(F.relu(x), None, None, layer.weight, layer.bias, True), 2)
    torch.testing.assert_close(layer(x), want)


def test_only_pools_right_after_the_layer_fold():
    model = nn.Sequential(ReluBatchNorm2d(16), nn.MaxPool2d(2), nn.Conv2d(16, 16, 1),
                          ReluBatchNorm2d(16), nn.MaxPool2d(3), nn.BatchNorm2d(16),
                          nn.MaxPool2d(2))  # fmt: skip
    assert use_relu_bn_pool(model) == 1
    assert type(model[0]) is ReluBatchNormMaxPool2d and type(model[3]) is ReluBatchNorm2d


def test_cerberus_folds_its_three_pools_and_trains_the_same():
    """fp32 gradients of a whole step against the unfused layers, to the sums' order
    amplified through twelve BatchNorms."""
    model = create_model("cerberus").to(memory_format=torch.channels_last)
    use_relu_bn(model)
    reference_model = copy.deepcopy(model)
    assert use_relu_bn_pool(model) == 3
    x = channels_last(4, 3, 32, 32)
    y = torch.randint(0, 10, (4,))
    grads = []
    for m in (reference_model, model):
        torch.manual_seed(3)  # the same dropout mask
        F.cross_entropy(m(x), y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert relative_max(grads[1], grads[0].double()) < 1e-4


def test_compile_traces_the_folded_layer_without_graph_breaks():
    model = block(16)
    use_relu_bn(model)
    use_relu_bn_pool(model)
    explanation = torch._dynamo.explain(model)(channels_last(2, 3, 10, 10))
    assert explanation.graph_break_count == 0
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = channels_last(2, 3, 10, 10)
    grads = []
    for run in (model, compiled):
        model.zero_grad()
        run(x).pow(2).sum().backward()
        grads.append(model[0].weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])
