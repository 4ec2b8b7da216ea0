"""Serving: request batching against none on every front, KServe HTTP against gRPC, and what the gRPC path costs.

Closed-loop load: CLIENTS concurrent clients (one connection each) send batch-1 requests to the
sample MLP (1024/4096/4) on a lightweight server (a child process: the worker pool, 2 workers x 1
thread), each sending its next request when its reply is back. Three fronts, stock clients:
  ms-grpc:      MindSpore Serving's MSService.Predict (our Client, part 1)
  kserve-grpc:  KServe v2 gRPC, tritonclient.grpc (raw_input_contents)
  kserve-http:  KServe v2 HTTP, tritonclient.http with its defaults (binary tensor data both ways)
and two servers that run at once:
  batching:     the servable with request batching (max_batch 32, batch_delay_ms 2)
  no batching:  the same servable without (max_batch 1): each request its own model run
Rounds go over every (front, server) pair in turn, and the medians over rounds are compared.
Targets: batching >= 2x the throughput of none on every front; KServe HTTP (binary) within 1.5x of
KServe gRPC per request (time per request under the same load, with batching and without, and one
client's request at a time on the 2x2 add).

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

    directory, port, http_port, max_batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    worker.start_servable_in_master(directory, "mlp", workers_num=2, thread_num=1, max_batch=max_batch, batch_delay_ms=2)
    worker.start_servable_in_master(directory, "add", workers_num=2, thread_num=1)
    master.start_grpc_server("127.0.0.1", port)
    master.start_http_server("127.0.0.1", http_port)
""")
FRONTS = ("ms-grpc", "kserve-grpc", "kserve-http")


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


def request_fn(front: str, ports: dict, x: np.ndarray):
    """A function sending one batch-1 request of row ``x`` on its own client; returns the output (None: failed)."""
    if front == "ms-grpc":
        client = Client("127.0.0.1", ports["grpc"], "mlp", "predict", timeout=60)

        def one():
            reply = client.infer({"x": x})
            return reply[0]["y"] if isinstance(reply, list) else None
        return one, client.close
    if front == "kserve-grpc":
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(f"127.0.0.1:{ports['grpc']}")
        tensor = grpcclient.InferInput("x", [1, x.size], "FP32")
        tensor.set_data_from_numpy(x[None])
        return (lambda: client.infer("mlp", [tensor], client_timeout=60).as_numpy("y")[0]), client.close
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{ports['http']}", network_timeout=60)
    tensor = httpclient.InferInput("x", [1, x.size], "FP32")
    tensor.set_data_from_numpy(x[None])  # binary, tritonclient's default; the reply binary too (its default)
    return (lambda: client.infer("mlp", [tensor]).as_numpy("y")[0]), client.close


def load(front: str, ports: dict, rows: list[np.ndarray], requests: int) -> tuple[float, list[float], int]:
    """Every client sends ``requests`` requests back to back: (wall seconds, latencies, failed replies).

    Each thread makes its own client before the clock starts (tritonclient.http's gevent
    connection belongs to the thread that made it).
    """
    latencies: list[float] = []
    failed = [0]
    lock = threading.Lock()
    start = threading.Barrier(len(rows) + 1)

    def run(x: np.ndarray) -> None:
        mine, bad = [], 0
        try:
            one, close = request_fn(front, ports, x)
        except BaseException:
            start.abort()
            raise
        start.wait()
        for _ in range(requests):
            t0 = time.perf_counter()
            try:
                reply = one()
            except Exception:  # noqa: BLE001 - a failed request is counted, the load goes on
                reply = None
            mine.append(time.perf_counter() - t0)
            bad += reply is None
        close()
        with lock:
            latencies.extend(mine)
            failed[0] += bad

    threads = [threading.Thread(target=run, args=(x,)) for x in rows]
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
        ports = {"batching": {"grpc": free_port(), "http": free_port()},
                 "no batching": {"grpc": free_port(), "http": free_port()}}
        specs = []
        for i, (name, port) in enumerate(ports.items()):
            _, env = python_module("orchestrator")
            specs.append(ProcessSpec(i, [sys.executable, str(script), str(root), str(port["grpc"]), str(port["http"]),
                                         "32" if i == 0 else "1"], env=env, label=f"server, {name}"))
        servers = Supervisor(specs, output=RankOutput(Path(tmp) / "logs", console=False))
        servers.start()
        try:
            rng = np.random.default_rng(0)
            rows = [rng.standard_normal(1024, dtype=np.float32) for _ in range(args.clients)]
            for port in ports.values():
                wait_ready(port["grpc"], rows[0])
            # The same answer on every front and server (batching joins rows and splits them back).
            answers = {(front, name): request_fn(front, port, rows[0])[0]() for front in FRONTS
                       for name, port in ports.items()}
            for key, answer in answers.items():
                np.testing.assert_allclose(answer, answers[("ms-grpc", "no batching")], rtol=1e-4, atol=1e-4,
                                           err_msg=str(key))

            cases = [(front, name) for front in FRONTS for name in ports]
            walls = {case: [] for case in cases}
            latencies = {case: [] for case in cases}
            failures = 0
            for front, name in cases:
                load(front, ports[name], rows, 2)  # warm-up
            for _ in range(args.rounds):
                for front, name in cases:
                    wall, lat, failed = load(front, ports[name], rows, args.requests)
                    walls[(front, name)].append(wall)
                    latencies[(front, name)].extend(lat)
                    failures += failed

            # The gRPC path against the pool in process, one request at a time, on the 2x2 add (where the
            # model costs next to nothing: on the MLP the run-to-run noise of the model is larger than the path).
            context = Context()
            context.cpu.thread_num = 1
            context.parallel.workers_num = 2
            add_runner = ModelParallelRunner()
            add_runner.build_from_file(str(add_path), context)
            add_client = Client("127.0.0.1", ports["no batching"]["grpc"], "add", "add", timeout=60)
            a = np.ones((2, 2), np.float32)
            add_cost = Bench("").compare("grpc path, add", ours=lambda: add_client.infer({"x": a, "y": a}),
                                         baseline=lambda: add_runner.predict([a, a]), repeats=200, warmup=10)
            # One client, one request at a time on the 2x2 add: KServe HTTP (binary) against KServe gRPC.
            import tritonclient.grpc as grpcclient
            import tritonclient.http as httpclient

            kgrpc = grpcclient.InferenceServerClient(f"127.0.0.1:{ports['no batching']['grpc']}")
            khttp = httpclient.InferenceServerClient(f"127.0.0.1:{ports['no batching']['http']}", network_timeout=60)
            g_in, h_in = [grpcclient.InferInput(n, [2, 2], "FP32") for n in "xy"], [httpclient.InferInput(n, [2, 2], "FP32")
                                                                                    for n in "xy"]
            for tensor in g_in + h_in:
                tensor.set_data_from_numpy(a)
            one_client = Bench("").compare("kserve http vs grpc, add", ours=lambda: khttp.infer("add", h_in),
                                           baseline=lambda: kgrpc.infer("add", g_in), repeats=200, warmup=10)
            kgrpc.close()
            khttp.close()
            add_runner.close()
            add_client.close()
        finally:
            servers.stop()

    requests = args.clients * args.requests
    per_request = {case: statistics.median(w) / requests for case, w in walls.items()}
    bench = Bench(f"serving: {args.clients} concurrent clients, batch-1 requests, MLP 1024/4096/4 "
                  f"(pool 2 workers x 1 thread; batching: max_batch 32, delay 2 ms)")
    for front in FRONTS:
        bench.add(f"{front}: time per request, batching vs none", per_request[(front, "batching")],
                  per_request[(front, "no batching")], ratio="baseline/ours", target=(">=", 2.0))
    for name in ports:
        bench.add(f"{name}: time per request, kserve-http (binary) vs kserve-grpc", per_request[("kserve-http", name)],
                  per_request[("kserve-grpc", name)], target=("<=", 1.5))
    for name in ports:
        bench.add(f"{name}: time per request, kserve-grpc vs ms-grpc", per_request[("kserve-grpc", name)],
                  per_request[("ms-grpc", name)])
    bench.add("one client, 2x2 add: kserve-http (binary) vs kserve-grpc", one_client.ours, one_client.baseline,
              target=("<=", 1.5))
    bench.add("one client, 2x2 add: a request over gRPC vs the pool in process", add_cost.ours, add_cost.baseline,
              note=f"the gRPC path (client, gRPC, server, method pipeline) adds "
                   f"{format_seconds(add_cost.ours - add_cost.baseline)} per request")
    bench.report()
    for case in cases:
        label = f"{case[0]}, {case[1]}"
        print(f"  {label:<26} {requests / statistics.median(walls[case]):8.1f} requests/s  "
              f"p50 {format_seconds(percentile(latencies[case], 50))}  p99 {format_seconds(percentile(latencies[case], 99))}")
    if failures:
        print(f"  {failures} requests failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
