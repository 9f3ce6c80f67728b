"""The Triton-fused conv-BN-ReLU block against its eager reference (on the CPU through
the Triton interpreter): outputs, every gradient and the running statistics."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

from fastcifar.models.fused import FusedConvBNReLU  # noqa: E402
from fastcifar.ops.conv_bn_relu import reference_conv_bn_relu  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the TMA kernels need Hopper or later (or the interpreter)
needs_tma = pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_capability() < (9, 0),
    reason="TMA needs a Hopper GPU or later",
)
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (8e-2, 8e-2),
}


@pytest.fixture(autouse=True)
def _full_fp32():
    """fp32 comparisons in full fp32: no TF32 in cuDNN's reference or in the fused dots
    (which follow cuDNN's switch)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def units(c_in, c_out, order, seed=0):
    torch.manual_seed(seed)
    fused = FusedConvBNReLU(c_in, c_out, order).to(DEVICE)
    with torch.no_grad():
        fused.bn.weight.uniform_(0.5, 1.5)
        fused.bn.bias.uniform_(-0.5, 0.5)
    ref_conv, ref_bn = (
        torch.nn.Conv2d(c_in, c_out, 3, padding=1).to(DEVICE),
        torch.nn.BatchNorm2d(c_out).to(DEVICE),
    )
    ref_conv.load_state_dict(fused.conv.state_dict())
    ref_bn.load_state_dict(fused.bn.state_dict())
    return fused, ref_conv, ref_bn


# In reduced precision a ReLU mask flips wherever a value rounds across zero, moving a
# gradient element by a whole upstream gradient; seen here: bf16 relative errors of 0.3% to
# 4.4% for eager and fused alike, depending on which elements flip.
FLIP_TOLERANCE = {torch.float16: 0.015, torch.bfloat16: 0.06}


def run_reference(x, ref_conv, ref_bn, order, grad, dtype):
    """Output and gradients (input, weight, bias, gamma, beta) of the eager block."""
    conv, bn = copy.deepcopy(ref_conv), copy.deepcopy(ref_bn)
    x = x.to(dtype).clone().requires_grad_()
    out = reference_conv_bn_relu(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                                 bn.running_var, training=True, order=order)  # fmt: skip
    out.backward(grad.to(dtype))
    grads = [x.grad, conv.weight.grad, conv.bias.grad, bn.weight.grad, bn.bias.grad]
    return out, [g.float() for g in grads], bn


def relative_error(got, want):
    return ((got.float() - want).norm() / want.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("order", ["act_bn", "bn_act"])
@pytest.mark.parametrize(
    ("batch", "c_in", "c_out", "size"), [(2, 3, 16, 8), (1, 5, 7, 6), (3, 16, 33, 4)]
)
def test_training_forward_backward_and_running_stats(dtype, order, batch, c_in, c_out, size):
    fused, ref_conv, ref_bn = units(c_in, c_out, order)
    x = (
        torch.randn(batch, c_in, size, size, device=DEVICE)
        .to(dtype)
        .float()
        .to(memory_format=torch.channels_last)
    )
    grad = torch.randn(batch, c_out, size, size, device=DEVICE).to(
        memory_format=torch.channels_last
    )
    x_fused = x.to(dtype).clone().requires_grad_()
    out = fused(x_fused)
    out.backward(grad.to(dtype))
    got = [
        x_fused.grad,
        fused.conv.weight.grad,
        fused.conv.bias.grad,
        fused.bn.weight.grad,
        fused.bn.bias.grad,
    ]
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)

    # The eager block in the same dtype (reduced-precision conv, fp32 BatchNorm, as autocast
    # runs it) and in fp32, the ground truth.
    same, same_grads, same_bn = run_reference(x, ref_conv, ref_bn, order, grad, dtype)
    truth, truth_grads, _ = run_reference(x, ref_conv, ref_bn, order, grad, torch.float32)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), same.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(fused.bn.running_mean, same_bn.running_mean, atol=atol, rtol=rtol)
    torch.testing.assert_close(fused.bn.running_var, same_bn.running_var, atol=atol, rtol=rtol)
    assert fused.bn.num_batches_tracked.item() == 1
    for name, g, s, t in zip(
        ["input", "weight", "bias", "gamma", "beta"], got, same_grads, truth_grads, strict=True
    ):
        if dtype == torch.float32:
            torch.testing.assert_close(
                g, t, atol=1e-4 * (t.abs().max().item() + 1), rtol=1e-4, msg=name
            )
        else:  # as accurate as eager in the same dtype, or within the dtype's usual error
            bound = max(2 * relative_error(s, t), FLIP_TOLERANCE[dtype])
            assert relative_error(g, t) <= bound, (
                f"{name}: fused {relative_error(g, t):.2e}, eager {relative_error(s, t):.2e}"
            )


@pytest.mark.parametrize(
    ("batch", "c_in", "c_out", "size"), [(2, 3, 16, 8), (1, 20, 7, 5), (2, 64, 64, 4)]
)
def test_the_flat_reduction_convolves_as_the_nested_one(monkeypatch, batch, c_in, c_out, size):
    """FASTCIFAR_CONV_LOOP=flat: one loop over 9 x C_in, whose steps span two taps where
    C_in is no multiple of the step (20 channels, steps of 16 in the interpreter)."""
    from fastcifar.ops import conv_bn_relu

    torch.manual_seed(0)
    x = torch.randn(batch, size, size, c_in, device=DEVICE)
    weight = torch.randn(c_out, c_in, 3, 3, device=DEVICE)
    bias = torch.randn(c_out, device=DEVICE)
    want = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=1)
    w9 = conv_bn_relu.to_w9(weight, torch.float32)
    got = {}
    for loop in ("nested", "flat"):
        monkeypatch.setattr(conv_bn_relu, "CONV_LOOP", loop)
        y, total, _ = conv_bn_relu.conv3x3(x, w9, bias, stats=True)
        got[loop] = y.permute(0, 3, 1, 2)
        torch.testing.assert_close(total, want.sum((0, 2, 3)).double(), atol=1e-2, rtol=1e-4)
    for loop, y in got.items():
        torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4, msg=loop)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_with_the_flat_reduction(monkeypatch, dtype):
    """The whole block, forward and backward (whose input gradient runs the same kernel)."""
    from fastcifar.ops import conv_bn_relu

    monkeypatch.setattr(conv_bn_relu, "CONV_LOOP", "flat")
    test_training_forward_backward_and_running_stats(dtype, "act_bn", 3, 16, 33, 4)


@needs_tma
@pytest.mark.parametrize(
    ("batch", "c_in", "c_out", "size"),
    [(2, 32, 16, 8), (3, 64, 64, 4), (1, 32, 8, 16), (1, 32, 16, 32)],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_tma_convolution_convolves_as_the_eager_one(monkeypatch, dtype, batch, c_in, c_out,
                                                        size):  # fmt: skip
    """FASTCIFAR_CONV_LOOP=tma: a tap's tile is one TMA box of whole image rows (part of an
    image at 8x8, 16x16 and 32x32, four images a box at 4x4, the last box partly past the
    batch), the padding ring TMA's zero fill. Against eager fp32 on the same rounded inputs."""
    from fastcifar.ops import conv_bn_relu

    monkeypatch.setattr(conv_bn_relu, "CONV_LOOP", "tma")
    torch.manual_seed(0)
    x = torch.randn(batch, size, size, c_in, device=DEVICE).to(dtype)
    weight = torch.randn(c_out, c_in, 3, 3, device=DEVICE).to(dtype)
    bias = torch.randn(c_out, device=DEVICE).to(dtype)
    w9 = conv_bn_relu.to_w9(weight, dtype)
    assert conv_bn_relu.tma_fits(x, w9)
    want = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2).float(), weight.float(), bias.float(),
                                      padding=1)  # fmt: skip
    y, total, squares = conv_bn_relu.conv3x3(x, w9, bias, stats=True)
    torch.testing.assert_close(y.permute(0, 3, 1, 2).float(), want, atol=0.1, rtol=1e-2)
    stored = y.double().reshape(-1, c_out)  # the sums are of the values as stored
    torch.testing.assert_close(total, stored.sum(0), atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(squares, (stored * stored).sum(0), atol=1e-3, rtol=1e-5)


def test_the_tma_convolution_leaves_what_it_cannot_take_to_the_other(monkeypatch):
    """CerberusNet's first layer (3 channels: rows of 6 bytes), fp32 values, and images
    whose sizes are not powers of two take the pointer kernel's flat loop, with the same
    results."""
    from fastcifar.ops import conv_bn_relu

    cases = [(torch.float16, 3, 8), (torch.float32, 32, 8), (torch.float16, 32, 6)]
    for dtype, c_in, size in cases:
        x = torch.randn(2, size, size, c_in, device=DEVICE).to(dtype)
        w9 = conv_bn_relu.to_w9(torch.randn(16, c_in, 3, 3, device=DEVICE), dtype)
        assert not conv_bn_relu.tma_fits(x, w9)
        got = {}
        for loop in ("flat", "tma"):
            monkeypatch.setattr(conv_bn_relu, "CONV_LOOP", loop)
            got[loop] = conv_bn_relu.conv3x3(x, w9, None)[0]
        assert torch.equal(got["flat"], got["tma"])


@needs_tma
@pytest.mark.parametrize("order", ["act_bn", "bn_act"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_training_with_tma_loads(monkeypatch, dtype, order):
    """The whole block, forward and backward, whose input gradient runs the TMA kernel too."""
    from fastcifar.ops import conv_bn_relu

    monkeypatch.setattr(conv_bn_relu, "CONV_LOOP", "tma")
    test_training_forward_backward_and_running_stats(dtype, order, 2, 32, 32, 8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU times the kernels themselves")
def test_the_flat_loop_compiles_to_one_pipelined_loop():
    """Compiled for sm_90 without a GPU (benchmarks/conv_kernel_ir.py): the nested
    reduction drains its copy pipeline once per tap, nine times; the flat and TMA ones once, and a
    step of it issues about as many instructions as a step of the nested one (its tap is a
    scalar, not one per column). The weight gradient finds its pixels' rows and columns
    without dividing: 757 instructions a step when it divided by the image size."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "conv_kernel_ir.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, not interpret

    def report(*args: str) -> dict[str, int]:
        out = subprocess.run([sys.executable, str(script), *args], env=env, check=True,
                             capture_output=True, text=True, timeout=300).stdout  # fmt: skip
        return {line[:32].strip(): int(line[32:]) for line in out.splitlines()}

    nested, flat = report("--loop", "nested"), report("--loop", "flat")
    tma = report("--loop", "tma")
    weight_grad = report("--kernel", "weight-grad")  # a long loop over pixels already
    drains, step = "drains (waits for every copy)", "instructions a loop step"
    assert (nested["loops"], nested[drains]) == (9, 9)
    for kernel in (flat, weight_grad):
        assert (kernel["loops"], kernel[drains]) == (1, 1)
        assert kernel["async copies"] > 0 and kernel["wgmma instructions"] > 0
    assert nested[step] > 0 and flat[step] <= 1.15 * nested[step], (flat[step], nested[step])
    assert 0 < weight_grad[step] <= 400, weight_grad[step]
    # TMA feeds both operands to the tensor cores from shared memory: its 4-D box is
    # reshaped there, not loaded into registers and reshaped every step
    assert (tma["loops"], tma["async copies"], tma["reshapes in registers"]) == (1, 0, 0)
    assert tma["TMA copies"] > 0 and tma["wgmma instructions"] > 0
    assert 0 < tma[step] <= 1.15 * nested[step], (tma[step], nested[step])
    # the weight gradient's TMA loop leaves out its pointers' row and column arithmetic
    tma_grad = report("--kernel", "weight-grad", "--loop", "tma")
    assert (tma_grad["loops"], tma_grad["async copies"], tma_grad["reshapes in registers"]) == (
        1,
        0,
        0,
    )
    assert tma_grad["TMA copies"] > 0 and tma_grad["wgmma instructions"] > 0
    assert 0 < tma_grad[step] <= 0.5 * weight_grad[step], (tma_grad[step], weight_grad[step])


@pytest.mark.parametrize("order", ["act_bn", "bn_act"])
def test_float64_gradcheck(order):
    """Every input's gradient against finite differences, with fp64 kernels throughout."""
    torch.manual_seed(0)
    f64 = dict(device=DEVICE, dtype=torch.float64)
    x = torch.randn(2, 2, 3, 3, **f64).to(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(3, 2, 3, 3, **f64).requires_grad_()
    bias, beta = (torch.randn(3, **f64).requires_grad_() for _ in range(2))
    gamma = (torch.rand(3, **f64) + 0.5).requires_grad_()

    def block(*inputs):
        return torch.ops.fastcifar.conv_bn_relu_train(*inputs, 1e-5, order)[0]

    assert torch.autograd.gradcheck(block, (x, weight, bias, gamma, beta))


@pytest.mark.parametrize("splits", [1, 3])
def test_weight_gradient_split_over_pixels(splits):
    from fastcifar.ops.conv_bn_relu import conv3x3_weight_grad

    torch.manual_seed(0)
    x = torch.randn(3, 5, 6, 6, device=DEVICE, dtype=torch.float64).float()
    weight = torch.randn(7, 5, 3, 3, device=DEVICE, requires_grad=True)
    dy = torch.randn(3, 7, 6, 6, device=DEVICE)
    torch.nn.functional.conv2d(x, weight, padding=1).backward(dy)
    nhwc = lambda t: t.permute(0, 2, 3, 1).contiguous()  # noqa: E731
    dw9 = conv3x3_weight_grad(nhwc(x), nhwc(dy), splits=splits)
    got = dw9.reshape(3, 3, 5, 7).permute(3, 2, 0, 1)
    torch.testing.assert_close(got, weight.grad, atol=1e-4, rtol=1e-4)


@needs_tma
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize(("batch", "c_in", "c_out", "size"), [(2, 32, 16, 8), (3, 16, 24, 4)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_tma_weight_gradient_sums_as_the_eager_one(monkeypatch, dtype, batch, c_in, c_out,
                                                       size, splits):  # fmt: skip
    """FASTCIFAR_CONV_LOOP=tma: the weight gradient's input tiles are TMA boxes at the
    tap's offset (four images a box at 4x4, 16 channels in a box of 32), split over
    pixels or not. Against eager fp32 on the same rounded inputs."""
    from fastcifar.ops import conv_bn_relu

    monkeypatch.setattr(conv_bn_relu, "CONV_LOOP", "tma")
    torch.manual_seed(0)
    x = torch.randn(batch, c_in, size, size, device=DEVICE).to(dtype)
    dy = torch.randn(batch, c_out, size, size, device=DEVICE).to(dtype)
    weight = torch.zeros(c_out, c_in, 3, 3, device=DEVICE, requires_grad=True)
    torch.nn.functional.conv2d(x.float(), weight, padding=1).backward(dy.float())
    nhwc = lambda t: t.permute(0, 2, 3, 1).contiguous()  # noqa: E731
    assert conv_bn_relu.tma_weight_grad_fits(nhwc(x), nhwc(dy))
    dw9 = conv_bn_relu.conv3x3_weight_grad(nhwc(x), nhwc(dy), splits=splits)
    got = dw9.reshape(3, 3, c_in, c_out).permute(3, 2, 0, 1)
    torch.testing.assert_close(got, weight.grad, atol=1e-3, rtol=1e-3)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps) of the GPU's TMA tiles, and a layer (batch, C_in,
# C_out, size) whose box takes each shape: four 8x8 images, rows of 16x16 and 32x32
TMA_GPU_TILES = [((256, 64, 64, 8), (3, 64, 64, 8)), ((128, 128, 64, 4), (1, 64, 128, 16)),
                 ((256, 128, 64, 8), (1, 64, 128, 16)), ((128, 64, 32, 4), (1, 32, 64, 32)),
                 ((256, 64, 32, 8), (1, 32, 64, 32)), ((128, 256, 64, 8), (2, 64, 256, 8))]  # fmt: skip


@needs_tma
@pytest.mark.parametrize(("tile", "layer"), TMA_GPU_TILES)
def test_the_tma_convolution_at_the_gpus_tiles(tile, layer):
    """The TMA kernel launched directly with a tile the GPU's autotuner may pick (the
    interpreter's own are smaller), its boxes as the pre-hook sets them."""
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    from fastcifar.ops import conv_bn_relu as ops
    from fastcifar.ops import fused_kernels as kernels

    (bm, bn, bk, warps), (n, c_in, c_out, size) = tile, layer
    torch.manual_seed(0)
    x = torch.randn(n, size, size, c_in, device=DEVICE).half()
    weight = torch.randn(c_out, c_in, 3, 3, device=DEVICE).half()
    w9 = ops.to_w9(weight, torch.float16)
    y = torch.empty(n, size, size, c_out, device=DEVICE, dtype=torch.float16)
    sums = torch.zeros(2, c_out, device=DEVICE, dtype=torch.float64)
    x_desc = TensorDescriptor.from_tensor(x, [*kernels.image_box(bm, size, size), bk])
    w_desc = TensorDescriptor.from_tensor(w9.reshape(-1, c_out), [bk, bn])
    grid = (triton.cdiv(n * size * size, bm), triton.cdiv(c_out, bn))
    kernels.conv3x3_tma_kernel.fn[grid](
        x_desc, w_desc, sums[0], y, sums[0], sums[0], sums[0], sums[1], n, size, size, c_in, c_out,
        RELU_FIRST=False, AFFINE=False, RELU_LAST=False, STATS=True, HAS_BIAS=False, UPCAST=False,
        PRECISION="ieee", ACC=tl.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
    )  # fmt: skip
    want = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2).float(), weight.float(), padding=1)
    torch.testing.assert_close(y.permute(0, 3, 1, 2).float(), want, atol=0.05, rtol=1e-2)
    torch.testing.assert_close(sums[0], y.double().reshape(-1, c_out).sum(0), atol=1e-3, rtol=1e-5)


@needs_tma
@pytest.mark.parametrize(
    ("tile", "layer", "per_split"),
    [((128, 64, 64, 4), (2, 64, 64, 8), 128), ((64, 128, 128, 8), (1, 128, 128, 16), 128),
     ((128, 128, 128, 8), (4, 128, 64, 8), 256), ((128, 32, 64, 4), (1, 64, 64, 32), 512)],
)  # fmt: skip
def test_the_tma_weight_gradient_at_the_gpus_tiles(tile, layer, per_split):
    """The TMA weight gradient launched directly with tiles of the GPU's list, split over
    pixels."""
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    from fastcifar.ops import fused_kernels as kernels

    (bp, bci, bco, warps), (n, c_in, c_out, size) = tile, layer
    torch.manual_seed(0)
    x = torch.randn(n, size, size, c_in, device=DEVICE).half()
    dy = torch.randn(n, size, size, c_out, device=DEVICE).half()
    dw = torch.zeros(9, c_in, c_out, device=DEVICE)
    x_desc = TensorDescriptor.from_tensor(x, [*kernels.image_box(bp, size, size), bci])
    dy_desc = TensorDescriptor.from_tensor(dy.reshape(-1, c_out), [bp, bco])
    pixels = n * size * size
    grid = (triton.cdiv(c_in, bci), triton.cdiv(c_out, bco), 9 * triton.cdiv(pixels, per_split))
    kernels.conv3x3_wgrad_tma_kernel.fn[grid](
        x_desc, dy_desc, dw, n, size, size, c_in, c_out, per_split, UPCAST=False, PRECISION="ieee",
        ACC=tl.float32, BLOCK_P=bp, BLOCK_CI=bci, BLOCK_CO=bco, num_warps=warps,
    )  # fmt: skip
    weight = torch.zeros(c_out, c_in, 3, 3, device=DEVICE, requires_grad=True)
    torch.nn.functional.conv2d(x.permute(0, 3, 1, 2).float(), weight, padding=1).backward(
        dy.permute(0, 3, 1, 2).float()
    )
    got = dw.reshape(3, 3, c_in, c_out).permute(3, 2, 0, 1)
    torch.testing.assert_close(got, weight.grad, atol=1e-3, rtol=1e-4)


def test_tile_candidates_fit_the_layer(monkeypatch):
    """A GPU times every tile no wider than the layer needs (all of them unless
    FASTCIFAR_AUTOTUNE=0, then the first); the interpreter runs the widest that fits."""
    from fastcifar.ops import fused_kernels as kernels

    shapes = [(64, 64, 32, 4), (128, 128, 32, 8), (64, 128, 64, 4)]
    configs = kernels.tile_configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"), shapes, hook=None)

    def tiles(c_in, c_out):
        kept = kernels.prune_tiles(configs, {"c_in": c_in, "c_out": c_out})
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in kept]

    monkeypatch.setattr(kernels, "INTERPRET", False)
    monkeypatch.setattr(kernels, "AUTOTUNE", True)  # whatever FASTCIFAR_AUTOTUNE says
    assert tiles(128, 128) == [(64, 64, 32), (128, 128, 32), (64, 128, 64)]
    assert tiles(32, 64) == [(64, 64, 32)]  # 128 output channels and 64 input are too wide
    assert tiles(5, 7) == [(64, 64, 32)]  # none fits: the first
    monkeypatch.setattr(kernels, "AUTOTUNE", False)
    assert tiles(128, 128) == [(64, 64, 32)]
    monkeypatch.setattr(kernels, "INTERPRET", True)
    assert tiles(128, 128) == [(64, 128, 64)]


def test_atomic_sums_start_from_zero_whatever_the_buffer_held(monkeypatch):
    """The two GEMM kernels add into their outputs atomically (BatchNorm sums, split weight
    gradient); each launch zeroes them first, so buffers full of garbage give exact sums."""
    from fastcifar.ops.conv_bn_relu import conv3x3, conv3x3_weight_grad

    torch.manual_seed(0)
    x = torch.randn(2, 6, 6, 5, device=DEVICE)
    w9 = torch.randn(9, 5, 7, device=DEVICE)
    dy = torch.randn(2, 6, 6, 7, device=DEVICE)
    empty = torch.empty
    with monkeypatch.context() as m:
        m.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(7))
        y, total, squares = conv3x3(x, w9, None, stats=True)
        dw9 = conv3x3_weight_grad(x, dy, splits=2)
    flat = y.double().reshape(-1, 7)
    torch.testing.assert_close(total, flat.sum(0), atol=1e-4, rtol=1e-5)  # fp32 tile sums
    torch.testing.assert_close(squares, (flat * flat).sum(0), atol=1e-4, rtol=1e-5)
    weight = w9.reshape(3, 3, 5, 7).permute(3, 2, 0, 1).requires_grad_()
    nchw = lambda t: t.permute(0, 3, 1, 2)  # noqa: E731
    torch.nn.functional.conv2d(nchw(x), weight, padding=1).backward(nchw(dy))
    torch.testing.assert_close(dw9.reshape(3, 3, 5, 7).permute(3, 2, 0, 1), weight.grad,
                               atol=1e-4, rtol=1e-4)  # fmt: skip


@pytest.mark.parametrize("order", ["act_bn", "bn_act"])
def test_eval_mode_folds_batchnorm(order):
    fused, ref_conv, ref_bn = units(8, 16, order, seed=1)
    with torch.no_grad():
        fused.bn.running_mean.uniform_(-0.2, 0.2)
        fused.bn.running_var.uniform_(0.5, 2.0)
    ref_bn.load_state_dict(fused.bn.state_dict())
    fused.eval()
    x = torch.randn(2, 8, 6, 6, device=DEVICE).to(memory_format=torch.channels_last)
    want = reference_conv_bn_relu(x, ref_conv.weight, ref_conv.bias, ref_bn.weight, ref_bn.bias,
                                  ref_bn.running_mean, ref_bn.running_var, training=False, order=order)  # fmt: skip
    torch.testing.assert_close(fused(x), want, atol=1e-4, rtol=1e-4)


def test_opcheck():
    fused, _, _ = units(3, 16, "act_bn")
    x = torch.randn(2, 3, 4, 4, device=DEVICE).to(memory_format=torch.channels_last)
    args = (x, fused.conv.weight, fused.conv.bias, fused.bn.weight, fused.bn.bias, 1e-5, "act_bn")
    torch.library.opcheck(torch.ops.fastcifar.conv_bn_relu_train.default, args,
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip
    with torch.no_grad():
        out, v, mean, var = torch.ops.fastcifar.conv_bn_relu_train(*args)
    dout = torch.randn_like(out)
    for input_grad in (True, False):  # False: the first unit, whose input needs no gradient
        torch.library.opcheck(torch.ops.fastcifar.conv_bn_relu_backward.default,
                              (dout, x, *args[1:2], v, mean, var, *args[3:], input_grad),
                              test_utils=("test_schema", "test_faketensor"))  # fmt: skip


def test_compiles_without_graph_breaks():
    torch.manual_seed(0)
    model = torch.nn.Sequential(FusedConvBNReLU(3, 16), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                                torch.nn.Linear(16 * 2 * 2, 10)).to(DEVICE)  # fmt: skip
    x = torch.randn(2, 3, 4, 4, device=DEVICE).to(memory_format=torch.channels_last)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for a, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)


def test_cerberus_training_step_with_and_without_fusion():
    from fastcifar.models import create_model

    torch.manual_seed(0)
    eager = create_model("cerberus").to(DEVICE)
    fused = create_model("cerberus", fused=True).to(DEVICE)
    convs = [m for m in eager.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in eager.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    units_ = [m for m in fused.modules() if isinstance(m, FusedConvBNReLU)]
    for unit, conv, bn in zip(units_, convs, bns, strict=True):
        unit.conv.load_state_dict(conv.state_dict())
        unit.bn.load_state_dict(bn.state_dict())
    heads = [m for m in eager.modules() if isinstance(m, torch.nn.Linear)]
    for a, b in zip(
        [m for m in fused.modules() if isinstance(m, torch.nn.Linear)], heads, strict=True
    ):
        a.load_state_dict(b.state_dict())
    assert sum(p.numel() for p in fused.parameters()) == 3_223_882
    eager.eval(), fused.eval()  # dropout off; BN in training mode below
    for model in (eager, fused):
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, FusedConvBNReLU)):
                m.train()
    x = torch.randn(1, 3, 32, 32, device=DEVICE).to(memory_format=torch.channels_last)
    y = torch.tensor([7], device=DEVICE)
    losses = []
    for model in (eager, fused):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-4, rtol=1e-4)
    pairs = zip(fused.parameters(), eager.parameters(), strict=True)
    for i, (a, b) in enumerate(pairs):
        error = relative_error(a.grad, b.grad)
        assert error < 1e-2, f"parameter {i}: relative error {error:.2e}"


def test_the_flop_counter_counts_fused_units_as_the_eager_convolutions():
    """On meta tensors (the ops' fake implementations: nothing runs), forward and backward in
    training, and the forward in eval mode."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastcifar.models import create_model

    counted = {}
    for fused in (False, True):
        with torch.device("meta"):
            model = create_model("cerberus", fused=fused)
            x = torch.empty(2, 3, 32, 32).to(memory_format=torch.channels_last)
        with FlopCounterMode(display=False) as training:
            model(x).sum().backward()
        with torch.no_grad(), FlopCounterMode(display=False) as evaluation:
            model.eval()(x)
        counted[fused] = training.get_total_flops(), evaluation.get_total_flops()
    assert counted[True] == counted[False]
    assert counted[False][1] == 2 * 2 * 379_782_400  # two images, the paper's mult-adds
