"""The README's demo: build sample models, then run them every way this project offers.

Every step runs the real thing (ONNX Runtime sessions, real processes, real
mpirun and sockets) on models the demo writes itself, and checks its numbers
against one plain ONNX Runtime session on the whole model:

1. one process: Model.predict, MindSpore Lite's quick start;
2. an all-reduce across 2 ranks under mpirun and from a rank table;
3. tensor parallel: the sample MLP and transformer sliced into 2 shards, run
   under mpirun, from a rank table over ZeroMQ, and from Python in one call;
4. a batch split across 2 worker processes, the seeds' dual-core case;
5. many clients at once: 8 threads calling a ModelParallelRunner of 2 process workers.

    python examples/demo.py [--workdir DIR] [--quick]

The models, shards and rank tables go to --workdir, else to $ORCH_DEMO_DIR, else
to a temporary directory removed at the end.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orchestrator as mslite  # noqa: E402
from ranks._env import DEMO_DIR  # noqa: E402
from ranks._tensor_io import format_output  # noqa: E402


def reference(path: Path, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def single_process(workdir: Path) -> None:
    step("1. one process: Model.predict on the sample image classifier (MindSpore Lite's quick start)")
    path = mslite.write_sample_model("image", workdir / "image.onnx")
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    context = mslite.Context()
    context.cpu.thread_num = 2
    model = mslite.Model()
    model.build_from_file(path, mslite.ModelType.ONNX, context)
    inputs = model.get_inputs()
    inputs[0].set_data_from_numpy(x)
    t0 = time.perf_counter()
    outputs = model.predict(inputs)
    elapsed = time.perf_counter() - t0
    for output in outputs:
        print(format_output(output))
    diff = np.abs(outputs[0].get_data_to_numpy() - reference(path, {"x": x})[0]).max()
    print(f"max |ours - onnxruntime| = {diff:.2e}; predict took {elapsed * 1e3:.1f} ms")


def worker_pool(workdir: Path) -> bool:
    step("5. many clients at once: 8 threads call a ModelParallelRunner of 2 process workers (seed 000's runner)")
    import threading

    path = mslite.write_sample_model("mlp", workdir / "mlp.onnx", width=256, hidden=1024, layers=2)
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((1, 256), dtype=np.float32) for _ in range(32)]
    expected = reference(path, {"x": np.concatenate(xs)})[0]
    replies: list = [None] * len(xs)
    context = mslite.Context()
    context.cpu.thread_num = 1
    context.parallel.workers_num = 2
    with mslite.ModelParallelRunner() as runner:
        runner.build_from_file(path, context, worker_type="process", share_weights=True)

        def client(first: int) -> None:
            for k in range(first, len(xs), 8):
                replies[k] = runner.predict([xs[k]])[0].get_data_to_numpy()

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        elapsed = time.perf_counter() - t0
        print(f"workers: pids {runner.worker_pids}, one copy of the weights shared between them")
    diff = max(float(np.abs(r - e).max()) for r, e in zip(replies, expected)) if all(r is not None for r in replies) else float("inf")
    print(f"{len(xs)} requests from 8 threads in {elapsed * 1e3:.0f} ms; max |ours - onnxruntime| = {diff:.2e}")
    return diff < 1e-4


EXAMPLES = Path(__file__).resolve().parent
ROOT = EXAMPLES.parent


def run_example(title: str, command: list[str]) -> bool:
    """Run one example script as a user would; its output streams through."""
    step(title)
    print("$ " + " ".join(command), flush=True)
    result = subprocess.run([sys.executable if c == "python" else c for c in command], cwd=ROOT, timeout=600)
    if result.returncode != 0:
        print(f"FAILED: {' '.join(command)} exited with {result.returncode}", flush=True)
    return result.returncode == 0


def rank_table_and_ini(workdir: Path) -> list[str]:
    """A 2-device rank table on 127.0.0.1 and a config_file.ini naming it, with a free base port."""
    from ranks import free_base_port, generate_rank_table

    table = workdir / "rank_table_2p.json"
    generate_rank_table([("127.0.0.1", [0, 1])]).dump(table)
    ini = workdir / "config_file.ini"
    ini.write_text(f"[ascend_context]\nrank_table_file={table.name}\n[comm]\nbase_port={free_base_port(2)}\n")
    return [str(table), "--config_file", str(ini)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where to write models (default: $ORCH_DEMO_DIR, else a temporary directory)")
    parser.add_argument("--quick", action="store_true", help="only the one-process step")
    args = parser.parse_args()
    ok = True
    with tempfile.TemporaryDirectory(prefix="orch_demo_") as tmp:
        workdir = Path(args.workdir or DEMO_DIR.get() or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        single_process(workdir)
        if not args.quick:
            orchestrate = [sys.executable, "-m", "orchestrator._cli"]
            steps = [
                ("2a. all-reduce across 2 ranks under mpirun (mpi communicator)",
                 orchestrate + ["launch", "mpi", "-n", "2", "--", "python", "examples/allreduce.py"]),
                ("2b. all-reduce across 2 ranks from a rank table (zmq communicator)",
                 orchestrate + ["launch", "rank-table", *rank_table_and_ini(workdir), "--", "python", "examples/allreduce.py"]),
                ("3a. tensor parallel under mpirun: orchestrate launch mpi -n 2 -- python -m ranks --model_path=shards/...",
                 ["python", "examples/tp_mpirun.py", "--workdir", str(workdir / "tp_mpirun")]),
                ("3b. tensor parallel from a rank table: one command per rank with --device_id --rank_id --config_file",
                 ["python", "examples/tp_rank_table.py", "--workdir", str(workdir / "tp_rank_table")]),
                ("3c. tensor parallel from Python: run_sharded / ShardedModel",
                 ["python", "examples/tp_python.py", "--workdir", str(workdir / "tp_python")]),
                ("4. batch split over 2 worker processes: the seeds' dual-core case",
                 ["python", "examples/dual_core_split.py", "--workdir", str(workdir / "dual_core")]),
            ]
            for title, command in steps:
                ok &= run_example(title, command)
            ok &= worker_pool(workdir)
    print("\ndemo finished: " + ("every step matched the unsliced model" if ok else "SOME STEPS FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
