"""A background thread that prepares the next batches while the current step trains.

torch releases the GIL inside its tensor operators, so on the CPU the augmentation of
batch k+1 can overlap the training step of batch k. `--prefetch on` turns it on; `auto`
leaves it off, since on the 2-core CPU machine the tensor loader's cost is already below
the noise of a lenet step and the thread competes with the step's own threads
(benchmarks/test_loader_share.py). On CUDA the loaders only enqueue kernels.
"""

from __future__ import annotations

import queue
import threading

_DONE = object()


class Prefetched:
    """`loader` with up to `depth` batches made ahead by a thread; same loader interface."""

    def __init__(self, loader, depth: int = 2):
        self.loader = loader
        self.depth = depth

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def num_samples(self) -> int:
        return self.loader.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self):
        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                for batch in self.loader:
                    if not put(batch):
                        return
                put(_DONE)
            except BaseException as exc:  # handed to the consumer, raised there
                put(exc)

        worker = threading.Thread(target=produce, name="fastcifar-prefetch", daemon=True)
        worker.start()
        try:
            while (item := ready.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # also when the consumer stops early
            stop.set()
            worker.join()
