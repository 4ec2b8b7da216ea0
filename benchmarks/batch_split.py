"""The batch-split master (ParallelPredictor) against its ideal, the seeds' pickled pipes, and one process.

Three rows, measured side by side in one run:

- parallel efficiency: the sample MLP (width 1024, hidden 4096, 4 layers) at
  batch 64 over 2 workers x 1 thread, against the ideal: the slower of one
  1-thread worker's times on each half, each alone on the core that half
  runs on in the split (measured here, interleaved). Target >= 0.9. Also shown
  against a bare 1-thread run of each half in this process.
- transport: a 16 MB input and a 16 MB output through one worker of ours
  (shared memory) against the seeds' way (the same tensors pickled through
  ``multiprocessing.Pipe`` to a child running the same model). Target >= 5x.
- against one process with 2 threads on the whole batch: the ratio tells when
  splitting pays (no target).

    python benchmarks/batch_split.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._runner import Bench, interleaved, median  # noqa: E402
from orchestrator import Context, Model, ModelType, ParallelPredictor, save_model, write_sample_model  # noqa: E402

TRANSPORT_WIDTH = 1024
TRANSPORT_ROWS = 4096  # 4096 x 1024 float32 = 16 MB


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_transport_model(path: Path) -> Path:
    """y = x + 1 on float32 [rows, 1024]: one cheap pass over the bytes, as any real model makes."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])], "transport",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", TRANSPORT_WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", TRANSPORT_WIDTH])], [one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save_model(model, path)
    return path


def _pipe_child(conn, model_path: str) -> None:
    """The seeds' worker: receive a pickled array, run the model, send the pickled result back."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_path, sess_options=options, providers=["CPUExecutionProvider"])
    while True:
        x = conn.recv()
        if x is None:
            return
        conn.send(session.run(None, {"x": x})[0])


class PipeBaseline:
    def __init__(self, model_path: Path):
        mp = multiprocessing.get_context("spawn")
        self.conn, theirs = mp.Pipe()
        self.process = mp.Process(target=_pipe_child, args=(theirs, str(model_path)), daemon=True)
        self.process.start()
        theirs.close()

    def predict(self, x: np.ndarray) -> np.ndarray:
        self.conn.send(x)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)

    with tempfile.TemporaryDirectory(prefix="orch_bench_") as tmp:
        mlp = write_sample_model("mlp", Path(tmp) / "mlp.onnx")  # width 1024, hidden 4096, 4 layers
        bench = Bench("batch split: ParallelPredictor, 2 workers x 1 thread, MLP 1024/4096/4")

        one_thread, two_threads = Context(), Context()
        one_thread.cpu.thread_num = 1
        two_threads.cpu.thread_num = 2
        single = Model()
        single.build_from_file(mlp, ModelType.ONNX, one_thread)
        whole = Model()
        # No spinning: idle pool threads would otherwise burn the cores the next timed call needs.
        whole.build_from_file(mlp, ModelType.ONNX, two_threads, config_dict={"cpu_context": {"allow_spinning": "0"}})

        x = rng.standard_normal((args.batch, 1024), dtype=np.float32)
        with ParallelPredictor(mlp, device_ids=[0, 1], context=one_thread) as predictor:
            sizes = predictor.split_sizes(args.batch)
            halves = np.split(x, np.cumsum(sizes)[:-1])
            ours = predictor.predict([x])[0].get_data_to_numpy()
            np.testing.assert_allclose(ours, whole.predict([x])[0].get_data_to_numpy(), rtol=0, atol=1e-4)
            # The ideal: one worker alone on each half, on the very core that half runs on
            # in the split, so background load on a core weighs on both sides alike.
            alone = []
            for cores in predictor.cores:
                context = Context()
                context.cpu.thread_num = 1
                context.cpu.thread_affinity_core_list = cores
                alone.append(ParallelPredictor(mlp, device_ids=[0], context=context))
            try:
                fns = {"ours": lambda: predictor.predict([x])}
                for i, (half, worker) in enumerate(zip(halves, alone)):
                    fns[f"alone{i}"] = lambda half=half, worker=worker: worker.predict([half])
                    fns[f"inproc{i}"] = lambda half=half: single.predict([half])
                fns["whole"] = lambda: whole.predict([x])
                cpu_before = {pid: cpu_seconds(pid) for p in [predictor, *alone] for pid in p.pids}
                times = interleaved(fns, warmup=3, repeats=args.repeats)
                calls = 3 + args.repeats
                cpu = {pid: (cpu_seconds(pid) - start) / calls for pid, start in cpu_before.items()}
            finally:
                for worker in alone:
                    worker.close()
            ideal = max(median(times[f"alone{i}"]) for i in range(len(halves)))
            bench.add(f"batch {args.batch} split {sizes} vs ideal (slower half alone on its worker)",
                      median(times["ours"]), ideal, ratio="baseline/ours", target=(">=", 0.9),
                      note="ratio = parallel efficiency; ideal = max over halves of one 1-thread worker "
                           "pinned to that half's core running it alone")
            inproc = max(median(times[f"inproc{i}"]) for i in range(len(halves)))
            bench.add(f"batch {args.batch} split {sizes} vs slower half in this process, 1 thread",
                      median(times["ours"]), inproc, ratio="baseline/ours",
                      note="the same efficiency against a bare in-process run (no pinning, no transport)")
            bench.add(f"batch {args.batch} split {sizes}: worker CPU time per half, split vs alone",
                      max(cpu[pid] for pid in predictor.pids), max(cpu[w.pids[0]] for w in alone), ratio="baseline/ours",
                      note="CPU time, which other processes' load does not inflate: near 1 means the workers do not "
                           "slow each other, so a wall-clock efficiency below it is time the cores spent on other work")
            bench.add(f"batch {args.batch} split {sizes} vs one process, 2 threads, whole batch",
                      median(times["ours"]), median(times["whole"]), ratio="baseline/ours",
                      note="ratio > 1: splitting is faster than one process with 2 threads")

        path = write_transport_model(Path(tmp) / "transport.onnx")
        big = rng.standard_normal((TRANSPORT_ROWS, TRANSPORT_WIDTH), dtype=np.float32)
        baseline = PipeBaseline(path)
        try:
            with ParallelPredictor(path, device_ids=[0], context=one_thread) as predictor:
                np.testing.assert_array_equal(predictor.predict([big])[0].get_data_to_numpy(), baseline.predict(big))
                bench.compare(
                    f"transport: {big.nbytes >> 20} MB in + {big.nbytes >> 20} MB out, 1 worker",
                    ours=lambda: predictor.predict([big]), baseline=lambda: baseline.predict(big),
                    repeats=args.repeats, ratio="baseline/ours", target=(">=", 5.0),
                    note="baseline: the same arrays pickled through multiprocessing.Pipe (the seeds' way)",
                )
        finally:
            baseline.close()
        bench.report()
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())} "
          f"on {os.cpu_count()} cores: other work on the machine lowers the efficiency row first", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
