"""Worker pool (ModelParallelRunner) against the naive server, and what its workers cost in memory.

Throughput and latency: CLIENTS threads each send batch-1 requests to the sample MLP (1024/4096/4,
134 MB of weights) as fast as their replies come back.
  ours:     a ModelParallelRunner of 2 workers x 1 thread
  baseline: one InferenceSession with 2 threads, called under a lock (the naive server)
Rounds of the two alternate, so a noisy neighbour hurts both alike; the medians over rounds are
compared. Target: throughput >= 1.3x. The same pool joining waiting requests into one run
(join_requests = clients: one read of the weights serves several requests), the same pool on shared
weights (prepacking off) and process workers are timed
against the same baseline, one worker on shared against private weights shows what sharing costs
a request, and two bare 1-thread sessions side by side against one bare 2-thread session show the
ceiling the machine sets for any pool of this shape.

Memory: the USS a pool of 4 workers adds over a pool of 1, with and without share_weights, in
units of the weight bytes (build, then every worker runs once). Target with sharing: the 3 extra
workers together add at most 0.10 x the weights. Process workers (worker_type="process") too: their
throughput against the naive server and the thread pool, and the USS of the 3 extra workers of 4,
beyond what 3 worker processes hold on a model without weights.

    python benchmarks/pool.py [--clients 8] [--requests 25] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._runner import Bench, format_seconds  # noqa: E402
from orchestrator import Context, ModelParallelRunner, write_sample_model  # noqa: E402
from orchestrator._samples import make_mlp_model, save_model  # noqa: E402


def load(call, inputs: list[np.ndarray], requests: int) -> tuple[float, list[float]]:
    """Every client sends ``requests`` requests back to back; (wall seconds, each request's latency)."""
    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(len(inputs) + 1)

    def client(x: np.ndarray) -> None:
        mine = []
        start.wait()
        for _ in range(requests):
            t0 = time.perf_counter()
            call(x)
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(x,)) for x in inputs]
    for thread in threads:
        thread.start()
    start.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - t0, latencies


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def runner_of(path: Path, workers: int, threads: int, share: bool, worker_type: str = "thread",
              join: int = 1) -> ModelParallelRunner:
    context = Context()
    context.cpu.thread_num = threads
    context.parallel.workers_num = workers
    runner = ModelParallelRunner()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 4 workers on fewer cores: measured on purpose
        runner.build_from_file(path, context, share_weights=share, worker_type=worker_type, join_requests=join)
    return runner


def _options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def uss() -> int:
    import ctypes
    import gc

    import psutil

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap is not memory this process holds
    return psutil.Process().memory_full_info().uss


def pool_uss(path: Path, workers: int, share: bool, x: np.ndarray) -> int:
    """USS a pool of ``workers`` adds once built and once every worker has run."""
    before = uss()
    runner = runner_of(path, workers, 1, share)
    for _ in range(3 * workers):
        runner.predict([x])
    grown = uss() - before
    runner.close()
    return grown


def extra_worker_uss(path: Path, share: bool, x: np.ndarray) -> int:
    """USS of workers 1-3 of a pool of 4 process workers together, once each has run: the memory they hold
    alone (pages they map with worker 0, as shared weights, are not in it)."""
    import psutil

    runner = runner_of(path, 4, 1, share, worker_type="process")
    for _ in range(12):
        runner.predict([x])
    total = sum(psutil.Process(pid).memory_full_info().uss for pid in runner.worker_pids[1:])
    runner.close()
    return total


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="requests per client per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="orch_bench_") as tmp:
        path = write_sample_model("mlp", Path(tmp) / "mlp.onnx")  # width 1024, hidden 4096, 4 layers
        weight_bytes = sum(onnx.numpy_helper.to_array(i).nbytes for i in onnx.load(str(path)).graph.initializer)
        rng = np.random.default_rng(0)
        inputs = [rng.standard_normal((1, 1024), dtype=np.float32) for _ in range(args.clients)]

        # -- memory first, before the throughput runs leave their arenas behind ------------------
        pool_uss(path, 1, False, inputs[0])  # ONNX Runtime's one-time allocations land here, unmeasured
        memory = {share: (pool_uss(path, 1, share, inputs[0]), pool_uss(path, 4, share, inputs[0])) for share in (True, False)}
        process_memory = {share: extra_worker_uss(path, share, inputs[0]) for share in (True, False)}
        # What a worker process holds whatever its model: its interpreter and ONNX Runtime (a model of 32 KiB).
        tiny = Path(tmp) / "tiny.onnx"
        save_model(make_mlp_model(width=1024, hidden=8, layers=1), tiny)
        process_floor = extra_worker_uss(tiny, False, inputs[0])

        # -- throughput and latency ----------------------------------------------------------
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        lock = threading.Lock()

        def naive(x):
            with lock:
                return session.run(None, {"x": x})

        # The naive server again with its idle pool threads not spinning, so the pool's edge is not only that.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        quiet_session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def naive_quiet(x):
            with lock:
                return quiet_session.run(None, {"x": x})

        pool = runner_of(path, 2, 1, False)
        shared = runner_of(path, 2, 1, True)
        processes = runner_of(path, 2, 1, False, worker_type="process")
        joining = runner_of(path, 2, 1, False, join=args.clients)
        expected = naive(inputs[0])[0]
        for runner in (pool, shared, processes, joining):
            np.testing.assert_allclose(runner.predict([inputs[0]])[0].get_data_to_numpy(), expected, rtol=1e-4, atol=1e-4)

        paths = {"pool": lambda x: pool.predict([x]), "pool, shared weights": lambda x: shared.predict([x]),
                 "process pool": lambda x: processes.predict([x]), "pool, joining requests": lambda x: joining.predict([x]),
                 "naive": naive, "naive, no spinning": naive_quiet}
        walls: dict[str, list[float]] = {name: [] for name in paths}
        latencies: dict[str, list[float]] = {name: [] for name in paths}
        for name, call in paths.items():
            load(call, inputs, 2)  # warm-up
        for _ in range(args.rounds):
            for name, call in paths.items():
                wall, lat = load(call, inputs, args.requests)
                walls[name].append(wall)
                latencies[name].extend(lat)

        # The ceiling, without clients or a queue: two bare 1-thread sessions side by side against one bare
        # 2-thread session (spinning off in both), 20 requests each way. Where the model is bound by memory
        # bandwidth, as this MLP is on a small VM, two workers cannot beat one session of two threads.
        bare = [ort.InferenceSession(str(path), _options(1), providers=["CPUExecutionProvider"]) for _ in range(2)]
        bare_two = ort.InferenceSession(str(path), _options(2), providers=["CPUExecutionProvider"])
        feeds = {"x": inputs[0]}

        def side_by_side():
            threads = [threading.Thread(target=lambda s=s: [s.run(None, feeds) for _ in range(10)]) for s in bare]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        ceiling = Bench("").compare("ceiling", ours=side_by_side, baseline=lambda: [bare_two.run(None, feeds) for _ in range(20)],
                                    repeats=15)

        # One client, one worker: what running on shared weights (prepacking off) costs a request.
        one_private, one_shared = runner_of(path, 1, 1, False), runner_of(path, 1, 1, True)
        bench_one = Bench("")
        cost = bench_one.compare("shared", ours=lambda: one_shared.predict([inputs[0]]),
                                 baseline=lambda: one_private.predict([inputs[0]]), repeats=60)
        for runner in (pool, shared, processes, joining, one_private, one_shared):
            runner.close()

    requests = args.clients * args.requests
    per_request = {name: statistics.median(w) / requests for name, w in walls.items()}
    bench = Bench(f"worker pool: {args.clients} client threads, batch 1, MLP 1024/4096/4 "
                  f"(pool 2 workers x 1 thread; naive: one session, 2 threads, under a lock)")
    bench.add("throughput (time per request), pool vs naive", per_request["pool"], per_request["naive"],
              ratio="baseline/ours", target=(">=", 1.3))
    bench.add("throughput, pool vs naive without spinning", per_request["pool"], per_request["naive, no spinning"],
              ratio="baseline/ours")
    bench.add("throughput, pool on shared weights vs naive", per_request["pool, shared weights"], per_request["naive"],
              ratio="baseline/ours")
    bench.add("throughput, pool joining waiting requests (join_requests) vs naive", per_request["pool, joining requests"],
              per_request["naive"], ratio="baseline/ours", target=(">=", 1.3))
    bench.add("throughput, process workers vs naive", per_request["process pool"], per_request["naive"],
              ratio="baseline/ours")
    bench.add("throughput, process workers vs thread workers", per_request["process pool"], per_request["pool"],
              ratio="baseline/ours")
    for q in (50, 99):
        bench.add(f"p{q} latency, pool vs naive", percentile(latencies["pool"], q), percentile(latencies["naive"], q))
    for q in (50, 99):
        bench.add(f"p{q} latency, pool on shared weights vs naive", percentile(latencies["pool, shared weights"], q),
                  percentile(latencies["naive"], q))
    for q in (50, 99):
        bench.add(f"p{q} latency, pool joining requests vs naive", percentile(latencies["pool, joining requests"], q),
                  percentile(latencies["naive"], q))
    bench.add("one worker, 1 client: shared vs private weights", cost.ours, cost.baseline)
    bench.add("ceiling: 2 bare 1-thread sessions side by side vs 1 bare 2-thread session (per request)",
              ceiling.ours / 20, ceiling.baseline / 20, ratio="baseline/ours")
    bench.report()
    for name in paths:
        print(f"  {name:<20} {requests / statistics.median(walls[name]):7.1f} requests/s  "
              f"p50 {format_seconds(percentile(latencies[name], 50))}  p99 {format_seconds(percentile(latencies[name], 99))}")

    print(f"== memory: USS of a pool of 4 workers over a pool of 1 (weights {mib(weight_bytes)}) ==")
    for share in (True, False):
        one, four = memory[share]
        extra = four - one
        line = (f"  share_weights={str(share):<5}  1 worker {mib(one)}, 4 workers {mib(four)}: the 3 extra add "
                f"{mib(extra)} = {extra / weight_bytes:.3f} x weights")
        if share:
            line += f"  (target <= 0.10: {'met' if extra <= 0.10 * weight_bytes else 'MISSED'})"
        print(line)
    print(f"== memory: USS of workers 1-3 of 4 process workers (what they hold alone); on a model without "
          f"weights they hold {mib(process_floor)} (3 interpreters with ONNX Runtime) ==")
    for share in (True, False):
        extra = process_memory[share]
        line = (f"  share_weights={str(share):<5}  workers 1-3 hold {mib(extra)}, {mib(extra - process_floor)} beyond "
                f"the processes' own = {(extra - process_floor) / weight_bytes:.3f} x weights")
        if share:
            line += f"  (target <= 0.10: {'met' if extra - process_floor <= 0.10 * weight_bytes else 'MISSED'})"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
