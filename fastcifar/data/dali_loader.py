"""The DALI loader: the tensor loader's batches from an NVIDIA DALI pipeline.

An external source feeds uint8 images from the decoded cache (or, with `--dali-decode`,
the undecoded image files, which DALI decodes: on the GPU with CUDA) together with the
batch's random choices, drawn exactly as `TensorLoader` draws them (same sample order, crop
offsets, flips and cutout boxes for the same seed and epoch). The pipeline does the rest
in as few operators as it can: `slice` crops with zero padding, `erase` cuts out (only
when on), and `crop_mirror_normalize` flips, normalises and casts. On CUDA the images and
labels go to the GPU right after the source and batches arrive as CUDA tensors, prefetched,
bound to torch's current stream, with no host synchronisation; without CUDA the same
pipeline runs on the CPU (`device_id=None`). A pipeline run makes one batch, or with
`images_per_run` several at once, handed out as slices of its output, so that DALI's
cost a run on the host (`Run`, `ShareOutputs`, DLPack) is paid once for all of them.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from fastcifar.data.augment import MEAN, STD, draw
from fastcifar.data.loader import EpochBatches, epoch_seed
from fastcifar.errors import UserError

INSTALL_HINT = "DALI is not installed; pip install 'fastcifar[dali]'"


def import_dali():
    """The DALI modules, or a one-line UserError naming the install command."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return fn, pipeline_def, types


class _EpochPlan:
    """Sample order and augmentation draws of one epoch, as TensorLoader makes them."""

    def __init__(self, loader: DaliLoader, epoch: int):
        n, batch = len(loader.labels), loader.batch_size
        if loader.train:
            generator = torch.Generator().manual_seed(epoch_seed(loader.seed, epoch, 0))
            order = torch.randperm(n, generator=generator)
            aug = torch.Generator().manual_seed(epoch_seed(loader.seed, epoch, 1))
            self.batches = [order[b * batch : (b + 1) * batch] for b in range(len(loader))]
            self.draws = [draw(len(i), loader.pad, loader.cutout, loader.size, aug, loader.flip)
                          for i in self.batches]  # fmt: skip
        else:
            self.batches = [torch.arange(s, min(s + batch, n)) for s in range(0, n, batch)]
            self.draws = None


class DaliLoader(EpochBatches):
    """Same interface as TensorLoader: iterate (images, labels), `len`, `set_epoch`,
    `num_samples`. Images come out NCHW with channels-last memory in `dtype`."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        pad: int = 4,
        flip: bool = True,
        cutout: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        drop_last: bool | None = None,
        threads: int = 2,
        size: int = 32,
        images_per_run: int | None = None,
    ):
        """`images`: uint8 (N, H, W, 3) on the host (numpy or a CPU tensor), or a list of N
        image files' bytes (1-D uint8 arrays) that the pipeline decodes to `size` x `size` RGB.
        Each pipeline run makes `images_per_run // batch_size` batches (one at least; one
        when None: on the CPU, larger runs measured slower, benchmarks/NOTES.md)."""
        self.fn, self.pipeline_def, self.types = import_dali()
        self.encoded = isinstance(images, list | tuple)
        if self.encoded:
            if not all(isinstance(f, np.ndarray) and f.dtype == np.uint8 and f.ndim == 1
                       for f in images):  # fmt: skip
                raise ValueError("encoded images must be 1-D uint8 arrays of file bytes")
            self.images, self.size = list(images), size
        else:
            images = np.asarray(images)  # a CPU tensor's memory, as numpy
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError("images must be uint8 (N, H, W, 3)")
            self.images, self.size = np.ascontiguousarray(images), images.shape[1]
        self.labels = np.asarray(labels, np.int64)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.pad, self.flip, self.cutout = (pad, flip, cutout) if train else (0, False, 0)
        self.dtype, self.device = dtype, torch.device(device)
        self.drop_last = train if drop_last is None else drop_last
        self.threads = threads
        self.run_batches = max(1, (images_per_run or batch_size) // batch_size)
        self.epoch = 0
        self._plans: dict[int, _EpochPlan] = {}
        self._first_epoch: int | None = None  # the epoch the built pipeline's epoch 0 is
        self._pipe = None
        self._next_epoch: int | None = None  # the epoch the pipeline gives next, if whole

    def _plan(self, epoch: int) -> _EpochPlan:
        if epoch not in self._plans:
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = _EpochPlan(self, epoch)
        return self._plans[epoch]

    def _source(self, info):
        """One run's batches for DALI, as one: a pure function of (epoch, run), because
        DALI prefetches ahead, across the epoch boundary too. Each output is one dense
        array (a single copy into DALI, and to the GPU) except the encoded files, which
        differ in length."""
        epoch = self._first_epoch + info.epoch_idx
        plan = self._plan(epoch)
        first = info.iteration * self.run_batches
        if first >= len(plan.batches):
            raise StopIteration
        batches = range(first, min(first + self.run_batches, len(plan.batches)))
        index = torch.cat([plan.batches[b] for b in batches]).numpy()
        images = [self.images[i] for i in index] if self.encoded else self.images[index]
        labels = self.labels[index]
        if plan.draws is None:
            return images, labels, np.zeros(len(index), np.int32)
        choices = zip(*(self._choices(plan.draws[b]) for b in batches), strict=True)
        return images, labels, *(np.concatenate(c) for c in choices)

    def _choices(self, d) -> list[np.ndarray]:
        """One batch's random choices as the pipeline takes them: flips, then crop offsets
        relative to the unpadded image (when padding), then cutout boxes (when cutting out)."""
        flips = d.flip.numpy().astype(np.int32)
        choices = [flips]
        if self.pad:
            choices.append(np.stack([d.dy.numpy(), d.dx.numpy()], 1).astype(np.int32) - self.pad)
        if self.cutout:
            choices += self._erase_boxes(d, flips)
        return choices

    def _erase_boxes(self, d, flips: np.ndarray):
        """Cutout boxes, clipped to the image, in pre-mirror coordinates (erase runs
        before crop_mirror_normalize flips)."""
        c = self.cutout
        lo_y = d.cut_y.numpy() - c // 2
        lo_x = d.cut_x.numpy() - c // 2
        lo_x = np.where(flips == 1, self.size - (lo_x + c), lo_x)
        y0, x0 = np.clip(lo_y, 0, self.size), np.clip(lo_x, 0, self.size)
        y1, x1 = np.clip(lo_y + c, 0, self.size), np.clip(lo_x + c, 0, self.size)
        anchors = np.stack([y0, x0], 1).astype(np.float32)
        shapes = np.stack([y1 - y0, x1 - x0], 1).astype(np.float32)
        return anchors, shapes

    def _build(self, first_epoch: int):
        fn, types = self.fn, self.types
        on_gpu = self.device.type == "cuda"
        fp16 = self.dtype == torch.float16

        @self.pipeline_def(
            batch_size=self.run_batches * self.batch_size, num_threads=self.threads,
            prefetch_queue_depth=2,
            device_id=(self.device.index or 0) if on_gpu else None,
        )  # fmt: skip
        def pipeline():
            # only the outputs the pipeline uses: crop offsets when padding, boxes when
            # cutting out (an unused output costs a copy and draws a DALI warning)
            dtypes = [types.UINT8, types.INT64, types.INT32]  # images, labels, flips
            if self.pad:
                dtypes.append(types.INT32)  # crop offsets
            if self.cutout:
                dtypes += [types.FLOAT, types.FLOAT]  # cutout anchors and shapes
            images, labels, flips, *rest = fn.external_source(
                source=self._source, num_outputs=len(dtypes), batch=True, batch_info=True,
                layout=[None if self.encoded else "HWC"] + [None] * (len(dtypes) - 1),
                dtype=dtypes,
            )  # fmt: skip
            start = rest.pop(0) if self.pad else None
            if self.encoded:  # "mixed": decoded on the GPU, delivered there
                images = fn.decoders.image(images, device="mixed" if on_gpu else "cpu",
                                           output_type=types.RGB)  # fmt: skip
            elif on_gpu:
                images = images.gpu()
            if on_gpu:  # labels too: a pageable host-to-GPU copy per batch would wait
                labels = labels.gpu()  # for the queued training step (a stream sync)
            if self.pad:
                size = types.Constant(np.array([self.size, self.size], np.int32))
                images = fn.slice(images, start, size, axes=[0, 1], out_of_bounds_policy="pad",
                                  fill_values=0)  # fmt: skip
            if self.cutout:
                images = fn.erase(images, anchor=rest[0], shape=rest[1], axes=[0, 1], fill_value=0)
            images = fn.crop_mirror_normalize(
                images, mirror=flips, mean=[m * 255 for m in MEAN], std=[s * 255 for s in STD],
                dtype=types.FLOAT16 if fp16 else types.FLOAT, output_layout="HWC",
            )  # fmt: skip
            return images, labels

        self._first_epoch = first_epoch
        self._pipe = pipeline()
        self._pipe.build()
        self._pipe.schedule_run()  # fills the prefetch queue
        self._next_epoch = first_epoch

    def __iter__(self):
        # an evaluation loader's passes are all alike: its pipeline serves every one
        jumped = self.train and self.epoch != self._next_epoch
        if self._pipe is None or self._next_epoch is None or jumped:
            # first use, an epoch left unfinished, or a jump (resume): start there
            self._build(self.epoch)
        self._next_epoch = None  # until this epoch's last batch is out
        pipe, on_gpu = self._pipe, self.device.type == "cuda"
        # outputs bound to torch's stream, which waits for them on the GPU; by default
        # DALI hands them over only once made, a host wait for the GPU every batch
        stream = torch.cuda.current_stream(self.device) if on_gpu else None
        while True:
            try:
                images, labels = pipe.share_outputs(stream)
            except StopIteration:  # the epoch's batches are all out: start the next
                pipe.reset()
                pipe.schedule_run()
                self._next_epoch = self.epoch + 1
                return
            with torch.cuda.device(self.device) if on_gpu else nullcontext():
                images, labels = (torch.from_dlpack(t.as_tensor()) for t in (images, labels))
            # the tensors keep their memory; the freed slot lets DALI make the next run
            pipe.release_outputs()
            pipe.schedule_run()
            # both come out on the loader's device; only the dtype may change (bf16). The
            # run's batches are whole but for an epoch's last, which ends the last run.
            images = images.to(self.dtype).permute(0, 3, 1, 2)
            yield from zip(images.split(self.batch_size), labels.view(-1).split(self.batch_size),
                           strict=True)  # fmt: skip
