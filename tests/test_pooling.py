"""The native CPU max pooling (fastcifar._C's max_pool2x2) against F.max_pool2d."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcifar.config import TrainConfig
from fastcifar.models.pooling import (
    MaxPool2x2,
    is_plain_2x2,
    native_pooling_available,
    use_native_pooling,
)

from .tensors import random_channels_last as channels_last

pytestmark = pytest.mark.skipif(
    not native_pooling_available(), reason="needs fastcifar._C and a CPU with AVX-512"
)

# lenet's, conv3's (odd 13 x 13), a channel count past one 16-lane vector and not a
# multiple of it, and odd widths and heights of their own
SHAPES = [(3, 6, 28, 28), (2, 16, 10, 10), (2, 32, 13, 13), (2, 40, 7, 9), (1, 3, 2, 5)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("levels", [None, 3])
def test_values_and_gradients_equal_max_pool2d(shape, dtype, levels):
    """Bit for bit, ties included: each window's gradient goes where ATen sends it."""
    x = channels_last(*shape, dtype=dtype, levels=levels)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = MaxPool2x2()(ours), F.max_pool2d(theirs, 2)
    grad = channels_last(*want.shape, dtype=dtype, seed=1)
    got.backward(grad)
    want.backward(grad)
    assert torch.equal(got, want)
    assert torch.equal(ours.grad, theirs.grad)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert ours.grad.is_contiguous(memory_format=torch.channels_last)


def test_every_tie_pattern_of_a_window():
    """All 4^4 windows over four levels, one window per channel of one image."""
    values = torch.cartesian_prod(*[torch.arange(4.0)] * 4)  # (256, 4): a, b, c, d
    x = values.T.reshape(1, 2, 2, 256).permute(0, 3, 1, 2).bfloat16()
    x = x.contiguous(memory_format=torch.channels_last)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    MaxPool2x2()(ours).sum().backward()
    F.max_pool2d(theirs, 2).sum().backward()
    assert torch.equal(ours.grad, theirs.grad)


def test_nan_propagates():
    x = channels_last(1, 4, 4, 4)
    x[0, 1, 2, 3] = float("nan")
    out = MaxPool2x2()(x)
    assert out[0, 1, 1, 1].isnan() and not out.isnan().sum() > 1


def test_other_inputs_go_to_aten():
    """fp16 or NCHW memory: F.max_pool2d's result; a single row: ATen's own error."""
    pool = MaxPool2x2()
    for x in (
        torch.randn(2, 3, 6, 6).half().contiguous(memory_format=torch.channels_last),
        torch.randn(2, 3, 6, 6).bfloat16(),
    ):
        assert torch.equal(pool(x), F.max_pool2d(x, 2))
    one_row = torch.randn(2, 3, 1, 6).bfloat16().contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="Output size is too small"):
        pool(one_row)


def test_opcheck():
    x = channels_last(2, 6, 6, 5)
    torch.library.opcheck(torch.ops.fastcifar.max_pool2x2.default, (x,))


def test_traced_by_torch_compile():
    pool = torch.compile(MaxPool2x2(), backend="aot_eager", fullgraph=True)
    x = channels_last(2, 6, 8, 8)
    assert torch.equal(pool(x), F.max_pool2d(x, 2))


def test_only_plain_2x2_pools_are_replaced():
    model = nn.Sequential(
        nn.MaxPool2d(2), nn.Sequential(nn.MaxPool2d((2, 2), stride=2)), nn.MaxPool2d(3),
        nn.MaxPool2d(2, padding=1), nn.MaxPool2d(2, ceil_mode=True), nn.AvgPool2d(2),
    )  # fmt: skip
    assert [is_plain_2x2(m) for m in (model[0], model[1][0], model[2])] == [True, True, False]
    assert use_native_pooling(model) == 2
    assert isinstance(model[0], MaxPool2x2) and isinstance(model[1][0], MaxPool2x2)
    assert [type(m) for m in model[2:]] == [nn.MaxPool2d, nn.MaxPool2d, nn.MaxPool2d, nn.AvgPool2d]


@pytest.mark.parametrize(("native", "expected"), [("auto", MaxPool2x2), ("off", nn.MaxPool2d)])
def test_the_cpu_model_pools_natively_unless_native_is_off(native, expected):
    from fastcifar.train.build import build_model

    model = build_model(TrainConfig(arch="conv3", native=native), torch.device("cpu"))
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d | MaxPool2x2)]
    assert len(pools) == 3 and all(type(m) is expected for m in pools)


def test_a_training_step_is_unchanged():
    """lenet, bf16 autocast: the same loss and gradients with either pooling."""
    from fastcifar.models import create_model

    torch.manual_seed(0)
    plain = create_model("lenet").to(memory_format=torch.channels_last)
    native = create_model("lenet").to(memory_format=torch.channels_last)
    native.load_state_dict(plain.state_dict())
    assert use_native_pooling(native) == 2
    x = channels_last(16, 3, 32, 32, dtype=torch.float32)
    y = torch.randint(0, 10, (16,))
    for model in (plain, native):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F.cross_entropy(model(x), y).backward()
    for a, b in zip(plain.parameters(), native.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
