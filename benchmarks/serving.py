"""Serving over gRPC: request batching against none, and what the gRPC path costs a request.

Closed-loop load: CLIENTS concurrent gRPC clients (one channel each) send batch-1 requests to the
sample MLP (1024/4096/4) on a lightweight server (a child process: the worker pool, 2 workers x 1
thread), each sending its next request when its reply is back.
  ours:     the servable with request batching (max_batch 32, batch_delay_ms 2)
  baseline: the same servable without (max_batch 1): each request its own model run
Both servers run at once, rounds alternate between them, and the medians over rounds are compared.
Target: throughput >= 2x. p50/p99 latency of both.

The gRPC path: one client, one request at a time, through the server without batching, against
calling a worker pool of the same shape in this process (``ModelParallelRunner.predict``), on the
2x2 add: the model costs next to nothing, so the difference is what the client, gRPC, the server and
its method pipeline add to a request (on the MLP, the model's run-to-run noise is larger than that).

    python benchmarks/serving.py [--clients 32] [--requests 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._runner import Bench, format_seconds  # noqa: E402
from launchers import ProcessSpec, RankOutput, Supervisor, python_module  # noqa: E402
from orchestrator import Context, ModelParallelRunner, write_sample_model  # noqa: E402
from orchestrator.serving.client import Client  # noqa: E402

CONFIG = textwrap.dedent("""
    from orchestrator.serving import register

    register.declare_servable(servable_file="mlp.onnx", model_format="ONNX", with_batch_dim=True)

    @register.register_method(output_names=["y"])
    def predict(x):
        return register.call_servable(x)
""")

ADD_CONFIG = textwrap.dedent("""
    from orchestrator.serving import register

    register.declare_servable(servable_file="add.onnx", model_format="ONNX", with_batch_dim=False)

    @register.register_method(output_names=["z"])
    def add(x, y):
        return register.call_servable(x, y)
""")

SERVER = textwrap.dedent("""
    import sys
    from orchestrator.serving import master, worker

    directory, port, max_batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    worker.start_servable_in_master(directory, "mlp", workers_num=2, thread_num=1, max_batch=max_batch, batch_delay_ms=2)
    worker.start_servable_in_master(directory, "add", workers_num=2, thread_num=1)
    master.start_grpc_server("127.0.0.1", port)
""")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, x: np.ndarray, timeout: float = 120.0) -> None:
    client = Client("127.0.0.1", port, "mlp", "predict", timeout=10)
    deadline = time.monotonic() + timeout
    while not isinstance(client.infer({"x": x}), list):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server on port {port} did not serve within {timeout} s")
        time.sleep(0.2)
    client.close()


def load(clients: list[Client], rows: list[np.ndarray], requests: int) -> tuple[float, list[float], int]:
    """Every client sends ``requests`` requests back to back: (wall seconds, latencies, failed replies)."""
    latencies: list[float] = []
    failed = [0]
    lock = threading.Lock()
    start = threading.Barrier(len(clients) + 1)

    def run(client: Client, x: np.ndarray) -> None:
        mine, bad = [], 0
        start.wait()
        for _ in range(requests):
            t0 = time.perf_counter()
            reply = client.infer({"x": x})
            mine.append(time.perf_counter() - t0)
            bad += not isinstance(reply, list)
        with lock:
            latencies.extend(mine)
            failed[0] += bad

    threads = [threading.Thread(target=run, args=(c, x)) for c, x in zip(clients, rows)]
    for thread in threads:
        thread.start()
    start.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - t0, latencies, failed[0]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=10, help="requests per client per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="orch_bench_serving_") as tmp:
        root = Path(tmp) / "servables"
        (root / "mlp" / "1").mkdir(parents=True)
        (root / "mlp" / "servable_config.py").write_text(CONFIG)
        write_sample_model("mlp", root / "mlp" / "1" / "mlp.onnx")
        (root / "add" / "1").mkdir(parents=True)
        (root / "add" / "servable_config.py").write_text(ADD_CONFIG)
        add_path = write_sample_model("add", root / "add" / "1" / "add.onnx")
        script = Path(tmp) / "server.py"
        script.write_text(SERVER)
        ports = {"batching": free_port(), "no batching": free_port()}
        specs = []
        for i, (name, port) in enumerate(ports.items()):
            _, env = python_module("orchestrator")
            specs.append(ProcessSpec(i, [sys.executable, str(script), str(root), str(port), "32" if i == 0 else "1"],
                                     env=env, label=f"server, {name}"))
        servers = Supervisor(specs, output=RankOutput(Path(tmp) / "logs", console=False))
        servers.start()
        try:
            rng = np.random.default_rng(0)
            rows = [rng.standard_normal(1024, dtype=np.float32) for _ in range(args.clients)]
            for port in ports.values():
                wait_ready(port, rows[0])
            clients = {name: [Client("127.0.0.1", port, "mlp", "predict", timeout=60) for _ in rows]
                       for name, port in ports.items()}
            # The same answer both ways (batching joins rows and splits them back).
            one = {name: c[0].infer({"x": rows[0]})[0]["y"] for name, c in clients.items()}
            np.testing.assert_allclose(one["batching"], one["no batching"], rtol=1e-4, atol=1e-4)

            walls = {name: [] for name in clients}
            latencies = {name: [] for name in clients}
            failures = 0
            for name in clients:
                load(clients[name], rows, 2)  # warm-up
            for _ in range(args.rounds):
                for name in clients:
                    wall, lat, failed = load(clients[name], rows, args.requests)
                    walls[name].append(wall)
                    latencies[name].extend(lat)
                    failures += failed

            # The gRPC path against the pool in process, one request at a time, on the 2x2 add (where the
            # model costs next to nothing: on the MLP the run-to-run noise of the model is larger than the path).
            context = Context()
            context.cpu.thread_num = 1
            context.parallel.workers_num = 2
            add_runner = ModelParallelRunner()
            add_runner.build_from_file(str(add_path), context)
            add_client = Client("127.0.0.1", ports["no batching"], "add", "add", timeout=60)
            a = np.ones((2, 2), np.float32)
            add_cost = Bench("").compare("grpc path, add", ours=lambda: add_client.infer({"x": a, "y": a}),
                                         baseline=lambda: add_runner.predict([a, a]), repeats=200, warmup=10)
            add_runner.close()
            add_client.close()
            for group in clients.values():
                for client in group:
                    client.close()
        finally:
            servers.stop()

    requests = args.clients * args.requests
    per_request = {name: statistics.median(w) / requests for name, w in walls.items()}
    bench = Bench(f"serving over gRPC: {args.clients} concurrent clients, batch-1 requests, MLP 1024/4096/4 "
                  f"(pool 2 workers x 1 thread; batching: max_batch 32, delay 2 ms)")
    bench.add("throughput (time per request), batching vs none", per_request["batching"], per_request["no batching"],
              ratio="baseline/ours", target=(">=", 2.0))
    for q in (50, 99):
        bench.add(f"p{q} latency, batching vs none", percentile(latencies["batching"], q),
                  percentile(latencies["no batching"], q))
    bench.add("one client, 2x2 add: a request over gRPC vs the pool in process", add_cost.ours, add_cost.baseline,
              note=f"the gRPC path (client, gRPC, server, method pipeline) adds "
                   f"{format_seconds(add_cost.ours - add_cost.baseline)} per request")
    bench.report()
    for name in walls:
        print(f"  {name:<12} {requests / statistics.median(walls[name]):8.1f} requests/s  "
              f"p50 {format_seconds(percentile(latencies[name], 50))}  p99 {format_seconds(percentile(latencies[name], 99))}")
    if failures:
        print(f"  {failures} requests failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
