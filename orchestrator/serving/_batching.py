"""Request batching for ``with_batch_dim=True`` servables: join instances that arrive close together.

Each ``submit`` brings one instance (one row per input) and waits. A runner
thread takes the oldest waiting instance, then gathers more that have the same
row shapes and dtypes, until ``max_batch`` or until ``delay`` seconds passed
since it took the first; it runs them as one batch and hands each instance
exactly its own rows back (MindSpore Serving pads a batch to the model's fixed
size with copies of the first instance; we join what arrived and split exactly).

There are as many runners as the model can run batches at once (the pool's
workers), and one of them gathers at a time (``_gathering``): a batch is
gathered while others run, and two runners never split the instances of one
moment between them. An instance whose deadline
passes while it waits fails alone; an error of a batch fails its instances.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable, Sequence

import numpy as np

from ._errors import ServingError, ServingTimeoutError


class _Item:
    __slots__ = ("arrays", "deadline", "done", "result", "error", "signature")

    def __init__(self, arrays: Sequence[np.ndarray], deadline: float):
        self.arrays = arrays
        self.deadline = deadline
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None
        self.signature = tuple((a.shape, a.dtype.str) for a in arrays)


class Batcher:
    """Joins instances into batches for ``run_batch(list of stacked arrays) -> list of output arrays``.

    ``shared``: input indexes without a batch dimension (taken from the first instance of a batch).
    """

    def __init__(self, run_batch: Callable[[list[np.ndarray], float], list[np.ndarray]], *, max_batch: int,
                 delay: float, runners: int, label: str, shared: Sequence[int] = ()):
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.delay = delay
        self.label = label
        self._shared = set(shared)
        self._waiting: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition()
        self._gathering = threading.Lock()
        self._closed = False
        self.batches_run = 0
        self.instances_run = 0
        self._threads = [threading.Thread(target=self._loop, name=f"{label} batcher {i}", daemon=True)
                         for i in range(max(1, runners))]
        for thread in self._threads:
            thread.start()

    def submit(self, arrays: Sequence[np.ndarray], deadline: float) -> list[np.ndarray]:
        """This instance's outputs (its rows of the batch's outputs); raises the batch's error or a timeout."""
        item = _Item(arrays, deadline)
        with self._cond:
            if self._closed:
                raise ServingError(f"{self.label} is stopping; request refused")
            self._waiting.append(item)
            self._cond.notify()
        if not item.done.wait(max(0.0, deadline - time.monotonic())):
            with self._cond:
                try:
                    self._waiting.remove(item)
                    queued = True
                except ValueError:
                    queued = False
            if not item.done.is_set():
                where = "waiting to be batched" if queued else "running in a batch"
                raise ServingTimeoutError(f"{self.label}: the request's timeout passed while it was {where}")
        if item.error is not None:
            raise item.error
        return item.result

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            left = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for item in left:
            item.error = ServingError(f"{self.label} stopped before the request ran")
            item.done.set()
        for thread in self._threads:
            thread.join(timeout)

    def _gather(self) -> list[_Item] | None:
        with self._cond:
            while not self._waiting:
                if self._closed:
                    return None
                self._cond.wait(0.5)
            first = self._waiting.popleft()
            batch = [first]
            until = time.monotonic() + self.delay
            while len(batch) < self.max_batch:
                for item in list(self._waiting):
                    if item.signature == first.signature:
                        self._waiting.remove(item)
                        batch.append(item)
                        if len(batch) == self.max_batch:
                            break
                remaining = until - time.monotonic()
                if len(batch) == self.max_batch or remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            return batch

    def _loop(self) -> None:
        while True:
            with self._gathering:
                batch = self._gather()
            if batch is None:
                return
            now = time.monotonic()
            live = []
            for item in batch:
                if item.deadline <= now:
                    item.error = ServingTimeoutError(f"{self.label}: the request's timeout passed while it waited to be batched")
                    item.done.set()
                else:
                    live.append(item)
            if live:
                self._run(live)

    def _run(self, batch: list[_Item]) -> None:
        try:
            inputs = [batch[0].arrays[i][None] if i in self._shared else
                      np.stack([item.arrays[i] for item in batch]) for i in range(len(batch[0].arrays))]
            inputs = [a[0] if i in self._shared else a for i, a in enumerate(inputs)]
            outputs = self._run_batch(inputs, max(item.deadline for item in batch))
            for output in outputs:
                if output.ndim == 0 or output.shape[0] != len(batch):
                    raise ServingError(f"{self.label}: a batch of {len(batch)} gave an output of shape "
                                       f"{list(output.shape)}: dimension 0 is not the batch (declare "
                                       f"with_batch_dim=False for this model)")
            for row, item in enumerate(batch):
                item.result = [output[row] for output in outputs]
        except BaseException as exc:  # every instance of the batch hears why it failed
            for item in batch:
                item.error = exc
        finally:
            self.batches_run += 1
            self.instances_run += len(batch)
            for item in batch:
                item.done.set()
