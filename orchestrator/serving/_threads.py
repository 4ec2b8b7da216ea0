"""A thread pool that keeps working while the interpreter shuts down.

MindSpore Serving's scripts end right after starting their servers, and the
process serves on from the keeper thread (``_process``). By then the
interpreter is shutting down, and ``concurrent.futures.ThreadPoolExecutor``
refuses new work ("cannot schedule new futures after interpreter shutdown").
This pool does not: its threads are daemons, started as needed up to
``max_workers``, and it stops only on ``shutdown``.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading


class ServingExecutor(concurrent.futures.Executor):
    def __init__(self, max_workers: int, name: str):
        self._max = max_workers
        self._name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn, /, *args, **kwargs):
        future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name}: the pool is shut down")
            self._jobs.put((future, fn, args, kwargs))
            if self._idle == 0 and len(self._threads) < self._max:
                thread = threading.Thread(target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
            else:
                self._idle -= 1 if self._idle else 0
        return future

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn, args, kwargs = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                    future.set_exception(exc)
            del job, future, fn, args, kwargs
            with self._lock:
                self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            threads = list(self._threads)
        if cancel_futures:
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job[0].cancel()
        for _ in threads:
            self._jobs.put(None)
        if wait:
            for thread in threads:
                thread.join(10.0)
