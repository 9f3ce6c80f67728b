"""The DALI loader on the CPU (device_id=None): against the per-image reference, against
the tensor loader, epoch coverage, statistics of the applied augmentation, and the error
when DALI is missing."""

import sys

import numpy as np
import pytest
import torch

from fastcifar.data.augment import reference_augment
from fastcifar.data.loader import TensorLoader
from fastcifar.errors import UserError

pytest.importorskip("nvidia.dali")
pytestmark = pytest.mark.filterwarnings("ignore::Warning:nvidia.dali")

from fastcifar.data.dali_loader import DaliLoader  # noqa: E402

# Batches a pipeline run makes: the default's one (None), three (the epoch's last run
# short), or more than an epoch holds
BATCHES_PER_RUN = pytest.mark.parametrize("batches_per_run", [None, 3, 100])


def per_run(batches_per_run: int | None, batch_size: int) -> dict:
    return {} if batches_per_run is None else {"images_per_run": batches_per_run * batch_size}


def coded_images(n: int) -> np.ndarray:
    """Channel 0: the image index; channel 1: 8 x row; channel 2: 8 x col + 1."""
    i = np.broadcast_to((np.arange(n) % 251)[:, None, None], (n, 32, 32))
    r = np.broadcast_to((np.arange(32) * 8)[None, :, None], (n, 32, 32))
    c = np.broadcast_to((np.arange(32) * 8 + 1)[None, None, :], (n, 32, 32))
    return np.stack([i, r, c], -1).astype(np.uint8)


@BATCHES_PER_RUN
@pytest.mark.parametrize("cutout", [0, 8])
def test_matches_reference_for_the_same_draws(cutout, batches_per_run):
    images = np.random.default_rng(0).integers(0, 256, (70, 32, 32, 3), dtype=np.uint8)
    loader = DaliLoader(images, np.arange(70), 16, train=True, seed=5, cutout=cutout,
                        **per_run(batches_per_run, 16))  # fmt: skip
    loader.set_epoch(2)
    plan = loader._plan(2)
    batches = list(loader)
    assert len(batches) == len(plan.batches) == 4
    for b, (x, y) in enumerate(batches):
        want = reference_augment(
            torch.from_numpy(images), plan.batches[b], plan.draws[b], pad=4, cutout=cutout
        )
        torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(y, plan.batches[b])
        assert x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equal_to_tensor_loader_on_the_same_seed(dtype):
    images = np.random.default_rng(1).integers(0, 256, (90, 32, 32, 3), dtype=np.uint8)
    dali = DaliLoader(images, np.arange(90), 32, train=True, seed=9, cutout=6, dtype=dtype)
    tensor = TensorLoader(
        torch.from_numpy(images), torch.arange(90), 32, train=True, seed=9, cutout=6, dtype=dtype
    )
    for epoch in (1, 2):
        dali.set_epoch(epoch)
        tensor.set_epoch(epoch)
        for (a, ya), (b, yb) in zip(dali, tensor, strict=True):
            assert torch.equal(ya, yb) and a.dtype == b.dtype == dtype
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                       atol=1e-2 if dtype == torch.bfloat16 else 1e-5)  # fmt: skip


@BATCHES_PER_RUN
def test_every_image_once_per_epoch_with_its_label(batches_per_run):
    n = 101
    loader = DaliLoader(coded_images(n), np.arange(n), 10, train=True, seed=0, drop_last=False,
                        **per_run(batches_per_run, 10))  # fmt: skip
    seen = []
    for x, y in loader:
        # undo the normalisation of channel 0 at the centre pixel: the image's own index
        from fastcifar.data.augment import MEAN, STD

        index = (x[:, 0, 16, 16] * STD[0] * 255 + MEAN[0] * 255).round().long()
        assert torch.equal(index, y % 251)
        seen += y.tolist()
    assert sorted(seen) == list(range(n))
    assert len(loader) == 11 and loader.num_samples == n


def test_applied_offsets_uniform_and_flips_half():
    from fastcifar.data.augment import MEAN, STD

    n = 2000
    loader = DaliLoader(coded_images(n), np.arange(n), 250, train=True, seed=4)

    def pixel(x, ch, r, c):  # undo the normalisation
        return (x[:, ch, r, c] * STD[ch] * 255 + MEAN[ch] * 255).round()

    rows, flips = [], []
    for x, _ in loader:
        rows.append(pixel(x, 1, 16, 16) / 8 - 16 + 4)  # crop offset dy in 0..8
        flips.append(pixel(x, 2, 16, 17) < pixel(x, 2, 16, 15))
    dy = torch.cat(rows).long()
    counts = torch.bincount(dy, minlength=9)
    assert len(counts) == 9 and counts.min() > 0.7 * n / 9
    assert abs(torch.cat(flips).float().mean().item() - 0.5) < 0.05


@BATCHES_PER_RUN
def test_resume_jumps_to_the_same_epoch(batches_per_run):
    images = np.random.default_rng(2).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    straight = DaliLoader(images, np.arange(64), 16, train=True, seed=1,
                          **per_run(batches_per_run, 16))  # fmt: skip
    batches = {}
    for epoch in (1, 2, 3):
        straight.set_epoch(epoch)
        batches[epoch] = [x.clone() for x, _ in straight]
    fresh = DaliLoader(images, np.arange(64), 16, train=True, seed=1,
                       **per_run(batches_per_run, 16))  # fmt: skip
    fresh.set_epoch(3)
    for a, (b, _) in zip(batches[3], fresh, strict=True):
        torch.testing.assert_close(a, b)


@BATCHES_PER_RUN
def test_an_unfinished_epoch_leaves_nothing_for_the_next(batches_per_run):
    """A consumer that stops early (a benchmark's few steps, here within a run's
    batches) and moves to the next epoch gets that epoch's batches, not the rest of the
    one it left."""
    images = np.random.default_rng(3).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    whole = DaliLoader(images, np.arange(64), 16, train=True, seed=1)
    whole.set_epoch(2)
    expected = [y.clone() for _, y in whole]
    loader = DaliLoader(images, np.arange(64), 16, train=True, seed=1,
                        **per_run(batches_per_run, 16))  # fmt: skip
    loader.set_epoch(1)
    next(iter(loader))
    loader.set_epoch(2)
    got = [y for _, y in loader]
    assert len(got) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize("batches_per_run", [None, 2, 100])
def test_eval_loader_keeps_order_and_last_partial_batch(batches_per_run):
    images = coded_images(45)
    loader = DaliLoader(images, np.arange(45), 20, train=False, **per_run(batches_per_run, 20))
    xs, ys = zip(*loader, strict=True)
    assert [len(y) for y in ys] == [20, 20, 5]
    assert torch.equal(torch.cat(ys), torch.arange(45))
    from fastcifar.data.augment import prepare_images, to_nchw

    torch.testing.assert_close(
        torch.cat(xs), to_nchw(prepare_images(torch.from_numpy(images), 0, torch.float32))
    )


def test_an_evaluation_loader_builds_its_pipeline_once(monkeypatch):
    """Evaluation passes, never given an epoch, reuse the pipeline instead of building
    one each pass, and give the same batches each time."""
    images = coded_images(45)
    loader = DaliLoader(images, np.arange(45), 20, train=False)
    builds = []
    real_build = loader._build
    monkeypatch.setattr(loader, "_build", lambda epoch: builds.append(epoch) or real_build(epoch))
    passes = [[(x.clone(), y.clone()) for x, y in loader] for _ in range(3)]
    assert len(builds) == 1
    for other in passes[1:]:
        assert all(torch.equal(a, c) and torch.equal(b, d)
                   for (a, b), (c, d) in zip(passes[0], other, strict=True))  # fmt: skip


def test_missing_dali_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(UserError, match=r"pip install 'fastcifar\[dali\]'"):
        DaliLoader(coded_images(4), np.arange(4), 2, train=True)


@pytest.mark.parametrize("images_per_run", [0, 100])
def test_training_with_the_dali_loader(tmp_path, images_per_run):
    from fastcifar.config import TrainConfig
    from fastcifar.display import TrainingDisplay
    from fastcifar.train.engine import fit

    from .conftest import make_arrays, write_batches_dir

    data = str(write_batches_dir(tmp_path / "d", make_arrays(n_train=200, n_test=50)))
    # on the CPU, where both runs are bitwise deterministic (the GPU pipeline has its own test)
    common = dict(arch="lenet", data=data, epochs=1, batch_size=50, val=50, amp="none",
                  track=False, device="cpu")  # fmt: skip
    a = fit(
        TrainConfig(**common, out=str(tmp_path / "a"), loader="dali",
                    dali_images_per_run=images_per_run),
        TrainingDisplay(quiet=True),
    )  # fmt: skip
    b = fit(
        TrainConfig(**common, out=str(tmp_path / "b"), loader="tensor"), TrainingDisplay(quiet=True)
    )
    assert a["best"] == b["best"]  # same batches, same model, same result on the CPU


@pytest.mark.gpu
@pytest.mark.parametrize("batches_per_run", [None, 3])
@pytest.mark.parametrize(("device", "dtype"), [("cuda", torch.float32), ("cuda:0", torch.bfloat16)])
def test_gpu_pipeline_gives_the_tensor_loader_batches_as_cuda_tensors(
    device, dtype, batches_per_run
):
    images = np.random.default_rng(3).integers(0, 256, (70, 32, 32, 3), dtype=np.uint8)
    args = dict(train=True, seed=2, cutout=6, dtype=dtype)
    dali = DaliLoader(images, np.arange(70), 16, device=device, **args,
                      **per_run(batches_per_run, 16))  # fmt: skip
    tensor = TensorLoader(torch.from_numpy(images), torch.arange(70), 16, **args)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for (a, ya), (b, yb) in zip(dali, tensor, strict=True):
        assert a.is_cuda and ya.is_cuda and a.dtype == dtype
        assert a.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(ya.cpu(), yb)
        torch.testing.assert_close(a.float().cpu(), b.float(), rtol=tol, atol=tol)


@pytest.mark.gpu
def test_gpu_batches_arrive_without_a_host_sync():
    """A synchronising copy per batch (labels from pageable host memory, say) would make
    the host wait for the queued training step every iteration."""
    images = np.random.default_rng(4).integers(0, 256, (70, 32, 32, 3), dtype=np.uint8)
    dali = DaliLoader(images, np.arange(70), 16, train=True, cutout=6, device="cuda",
                      dtype=torch.bfloat16)  # fmt: skip
    batches = iter(dali)
    next(batches)  # builds the pipeline
    torch.cuda.set_sync_debug_mode("error")
    try:
        rest = [y for _, y in batches]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(rest) == len(dali) - 1 and all(y.is_cuda for y in rest)


@pytest.mark.gpu
def test_gpu_batches_come_on_the_consumers_stream(monkeypatch):
    """DALI's outputs are bound to the stream the training step runs on, whichever that
    is, and read there give the tensor loader's batches. DALI's default instead hands
    them over only once the GPU has made them: a host wait every batch that
    `set_sync_debug_mode` cannot see, as torch does not make it."""
    from nvidia.dali.pipeline import Pipeline

    streams = []
    real_share = Pipeline.share_outputs

    def share_outputs(self, cuda_stream=None):
        streams.append(cuda_stream)
        return real_share(self, cuda_stream)

    monkeypatch.setattr(Pipeline, "share_outputs", share_outputs)
    images = np.random.default_rng(5).integers(0, 256, (70, 32, 32, 3), dtype=np.uint8)
    args = dict(train=True, seed=3, cutout=6, dtype=torch.float32)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        dali = DaliLoader(images, np.arange(70), 16, device="cuda", **args)
        got = [(x.float() * 1, y * 1) for x, y in dali]  # computed on the side stream
    side.synchronize()
    assert len(streams) == len(dali) + 1  # the last call finds the epoch's end
    assert all(s == side for s in streams)
    tensor = TensorLoader(torch.from_numpy(images), torch.arange(70), 16, **args)
    for (a, ya), (b, yb) in zip(got, tensor, strict=True):
        assert torch.equal(ya.cpu(), yb)
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)


def png_files(images: np.ndarray) -> list[np.ndarray]:
    import io

    from PIL import Image

    files = []
    for image in images:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        files.append(np.frombuffer(buf.getvalue(), np.uint8))
    return files


@pytest.mark.parametrize(("train", "cutout"), [(True, 0), (True, 8), (False, 0)])
def test_decoding_files_gives_the_decoded_cache_batches(train, cutout):
    images = np.random.default_rng(1).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    args = dict(train=train, seed=4, cutout=cutout)
    decoded = DaliLoader(images, np.arange(40), 16, **args)
    encoded = DaliLoader(png_files(images), np.arange(40), 16, **args)
    for (xa, ya), (xb, yb) in zip(decoded, encoded, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_training_with_dali_decoding_matches_the_cache(tmp_path, png_zip, monkeypatch):
    from fastcifar.config import TrainConfig
    from fastcifar.display import TrainingDisplay
    from fastcifar.train.engine import fit

    cache = tmp_path / "cache"
    monkeypatch.setenv("FASTCIFAR_CACHE", str(cache))
    common = dict(arch="lenet", data=str(png_zip), epochs=1, batch_size=20, val=20, amp="none",
                  track=False, loader="dali")  # fmt: skip
    decoding = TrainConfig(**common, out=str(tmp_path / "b"), dali_decode=True)
    b = fit(decoding, TrainingDisplay(quiet=True))
    assert not cache.exists() or not any(cache.iterdir())  # DALI decoded: no PIL pass, no cache
    a = fit(TrainConfig(**common, out=str(tmp_path / "a")), TrainingDisplay(quiet=True))
    assert any(cache.iterdir())
    assert a["best"] == b["best"]


def test_dali_decoding_needs_image_files(tmp_path, batches_dir):
    from fastcifar.data.dataset import prepare_encoded

    with pytest.raises(UserError, match="needs an image-folder directory or .zip"):
        prepare_encoded(str(batches_dir), val=0, split_seed=0, subset=None)
    from fastcifar.config import TrainConfig

    with pytest.raises(UserError, match="--dali-decode needs --loader dali"):
        TrainConfig(dali_decode=True)
