"""The native fused augmentation op (fastcifar._C) against the per-image reference."""

import pytest
import torch

from fastcifar.data.augment import MEAN, STD, draw, reference_augment
from fastcifar.data.loader import TensorLoader
from fastcifar.ops import native

available, why = native.load()
pytestmark = pytest.mark.skipif(not available, reason=why)

TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def sample(batch: int, cutout: int, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8, generator=g)
    index = torch.randperm(40, generator=g)[:batch]
    d = draw(batch, 4, cutout, 32, g)
    move = lambda t: t.to(device) if t is not None else None  # noqa: E731
    return (
        images.to(device),
        index.to(device),
        type(d)(*(move(t) for t in (d.dy, d.dx, d.flip, d.cut_y, d.cut_x))),
    )


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("cutout", [0, 8])
@pytest.mark.parametrize("batch", [1, 7, 33])
def test_matches_reference(batch, cutout, dtype):
    images, index, d = sample(batch, cutout)
    got = native.augment_batch(images, index, d, pad=4, cutout=cutout, dtype=dtype)
    want = reference_augment(images, index, d, pad=4, cutout=cutout)
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("cutout", [0, 6])
def test_opcheck(cutout):
    images, index, d = sample(5, cutout)
    args = (images, index, d.dy, d.dx, d.flip, d.cut_y if cutout else None, d.cut_x if cutout else None,
            4, cutout, list(MEAN), list(STD), torch.bfloat16)  # fmt: skip
    torch.library.opcheck(torch.ops.fastcifar.augment_batch.default, args)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: {**a, "images": a["images"].float()}, "images must be uint8"),
        (lambda a: {**a, "images": a["images"][..., :2].contiguous()}, r"must be \(N, H, W, 3\)"),
        (lambda a: {**a, "index": a["index"] + 100}, "out of range"),
        (lambda a: {**a, "dy": a["dy"] + 9}, "crop offsets must be in 0..8"),
        (lambda a: {**a, "index": a["index"].int()}, "must be int64"),
        (lambda a: {**a, "cutout": 4}, "cutout > 0 needs cut_y and cut_x"),
        (lambda a: {**a, "dtype": torch.int32}, "dtype must be"),
    ],
)
def test_bad_inputs_are_rejected(change, message):
    images, index, d = sample(4, 0)
    args = dict(images=images, index=index, dy=d.dy, dx=d.dx, flip=d.flip, cut_y=None, cut_x=None,
                pad=4, cutout=0, mean=list(MEAN), std=list(STD), dtype=torch.float32)  # fmt: skip
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastcifar.augment_batch(**change(args))


def test_traced_by_torch_compile():
    images, index, d = sample(6, 8)

    def batch(images, index, dy, dx, flip, cy, cx):
        out = torch.ops.fastcifar.augment_batch(images, index, dy, dx, flip, cy, cx, 4, 8, list(MEAN),
                                                list(STD), torch.float32)  # fmt: skip
        return out * 2

    compiled = torch.compile(batch, backend="aot_eager", fullgraph=True)
    args = (images, index, d.dy, d.dx, d.flip, d.cut_y, d.cut_x)
    torch.testing.assert_close(compiled(*args), batch(*args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensor_loader_native_path_equals_the_gather_path(dtype):
    images = torch.randint(0, 256, (70, 32, 32, 3), dtype=torch.uint8)
    labels = torch.arange(70)
    for train in (True, False):
        a = TensorLoader(
            images, labels, 16, train=train, seed=2, cutout=8, dtype=dtype, native=True
        )
        b = TensorLoader(
            images, labels, 16, train=train, seed=2, cutout=8, dtype=dtype, native=False
        )
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(ya, yb)
            torch.testing.assert_close(
                xa.float(), xb.float(), atol=TOLERANCES[dtype], rtol=TOLERANCES[dtype]
            )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_cuda_matches_reference(dtype):
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fastcifar::augment_batch", "CUDA"):
        pytest.skip("fastcifar._C was built without its CUDA kernels")
    images, index, d = sample(33, 8, device="cuda")
    got = native.augment_batch(images, index, d, pad=4, cutout=8, dtype=dtype)
    assert got.is_cuda
    want = reference_augment(images.cpu(), index.cpu(), type(d)(*(t.cpu() for t in (d.dy, d.dx, d.flip, d.cut_y, d.cut_x))),
                             pad=4, cutout=8)  # fmt: skip
    torch.testing.assert_close(
        got.float().cpu(), want, atol=TOLERANCES[dtype], rtol=TOLERANCES[dtype]
    )
