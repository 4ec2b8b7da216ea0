"""A caller of ShardedModel, ParallelPredictor or ModelParallelRunner for the fault matrix (tests/test_fault_matrix.py).

    python fault_caller.py sharded SHARDS/MODEL.onnx --commands FIFO --backend mpi|zmq --timeout S
    python fault_caller.py parallel MODEL.onnx --commands FIFO --timeout S [--build-timeout S]
    python fault_caller.py pool MODEL.onnx --commands FIFO --timeout S   (2 process workers; ORCH_TIMEOUT bounds the build)

Builds the model (ranks or workers), runs one request and prints, one line each, flushed:

    PIDS [pid of rank/worker 0, pid of rank/worker 1]
    READY

Then it takes commands from the named pipe FIFO, one per line (not from stdin: mpirun, which
ShardedModel starts with this process's stdin, reads it too and forwards it to rank 0):

    predict   run one request; prints ``OK <unix time>`` or
              ``ERROR <unix time> <exception type>`` + the message, one ``| line`` each, + ``END``;
              after an error it tries once more and prints ``AFTER OK`` or ``AFTER <type>: <first line>``
    close     close() and print ``CLOSED <seconds it took>``, then exit 0

An error while building prints ``ERROR ...`` as above (``BUILD`` instead of ``PREDICT`` in front) and exits 3.
Signals are not handled: SIGTERM, SIGINT and SIGKILL do to this process what they do to a user's script
(SIGUSR1 prints every thread's stack, for a test that finds it still running).
"""

import argparse
import faulthandler
import json
import os
import select
import signal
import sys
import time

import numpy as np


def report(prefix: str, exc: BaseException) -> None:
    lines = str(exc).splitlines() or [""]
    out = [f"{prefix} {time.time():.6f} {type(exc).__name__}"] + [f"| {line}" for line in lines] + ["END"]
    print("\n".join(out), flush=True)


def commands(path: str):
    """The lines written to the named pipe ``path``, until its writer closes it.

    Read with a short timeout rather than one blocking read: a Python signal handler (Python's own
    for SIGINT, ranks._shared_memory's for SIGTERM while it owns a named segment) runs only when the
    main thread runs Python, and the kernel may hand the signal to another thread (one of ONNX
    Runtime's or the BLAS library's), which does not interrupt the main thread's read. A user's
    script that computes is back in Python at once; a test caller must be too.
    """
    fd = os.open(path, os.O_RDONLY)
    pending = b""
    try:
        while True:
            if not select.select([fd], [], [], 0.1)[0]:
                continue
            data = os.read(fd, 4096)
            if not data:
                return
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                yield line.decode().strip()
    finally:
        os.close(fd)


def main() -> int:
    # SIGUSR1 prints every thread's stack: the matrix asks for it when this process does not end
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("sharded", "parallel", "pool"))
    parser.add_argument("model")
    parser.add_argument("--commands", required=True)
    parser.add_argument("--backend", default="mpi")
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--build-timeout", type=float)
    args = parser.parse_args()

    x = np.ones((4, 64), np.float32)
    try:
        if args.what == "sharded":
            from orchestrator import ShardedModel

            model = ShardedModel(args.model, backend=args.backend, timeout=args.timeout,
                                 startup_timeout=args.build_timeout)

            def predict():
                return model.predict({"x": x})

            pids = [pid for _, pid in sorted(model.pids.items())]  # as each rank reported its own pid
        elif args.what == "pool":
            import threading

            from orchestrator import Context, ModelParallelRunner

            context = Context()
            context.cpu.thread_num = 1
            context.parallel.workers_num = 2
            model = ModelParallelRunner()
            model.build_from_file(args.model, context, worker_type="process", timeout=args.timeout)

            def predict():
                # Two requests at once, one per worker, until worker 1 (the victim) has run one: a free worker
                # takes the next request, so worker 0 may serve both of a pair before worker 1 wakes up.
                armed = os.path.join(os.environ.get("FAULT_MATRIX_DIR", ""), f"fault.{pids[1]}")
                for _ in range(100):
                    errors = []

                    def one():
                        try:
                            model.predict({"x": x})
                        except Exception as exc:  # noqa: BLE001
                            errors.append(exc)

                    threads = [threading.Thread(target=one) for _ in range(2)]
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()
                    if errors:
                        raise errors[0]
                    if not os.path.exists(armed):
                        return

            pids = model.worker_pids
        else:
            from orchestrator import Context, ParallelPredictor

            context = Context()
            context.cpu.thread_num = 1
            model = ParallelPredictor(args.model, device_ids=[0, 1], context=context,
                                      timeout=args.build_timeout or args.timeout)

            def predict():
                return model.predict({"x": x}, timeout=args.timeout)

            pids = model.pids
        predict()
    except Exception as exc:  # noqa: BLE001 - the matrix reads what the caller would see
        report("BUILD", exc)
        return 3
    print("PIDS " + json.dumps(pids), flush=True)
    print("READY", flush=True)
    for command in commands(args.commands):
        if command == "predict":
            try:
                predict()
                print(f"OK {time.time():.6f}", flush=True)
            except Exception as exc:  # noqa: BLE001
                report("ERROR", exc)
                try:
                    predict()
                    print("AFTER OK", flush=True)
                except Exception as again:  # noqa: BLE001
                    print(f"AFTER {type(again).__name__}: {(str(again).splitlines() or [''])[0]}", flush=True)
        elif command == "close":
            started = time.monotonic()
            model.close()
            print(f"CLOSED {time.monotonic() - started:.3f}", flush=True)
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
