"""Cross-process weight sharing: memory each process adds, and what running on shared weights costs per predict.

Memory: one publisher and two attachers share the weights of the seed's UNet
(the sample, widened to tens of MB); a fourth process loads the same model
without sharing. Each process first builds and runs a tiny model (so ONNX
Runtime's code and pools are paged in), then we read its USS, build the big
model, predict once, and read its USS again: the difference is what that
process adds. Target: an attacher adds at most 0.25 x the weight bytes.

Latency: in this process, a Model on the shared weights against a plain one,
same threads, interleaved; and a plain session with only prepacking off, to
show how much of the difference prepacking is.

    python benchmarks/shared_weights.py [--model unet|mlp] [--threads 2] [--repeats 20]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import multiprocessing
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._runner import Bench  # noqa: E402
from orchestrator import Context, Model, ModelType, write_sample_model  # noqa: E402

MODELS = {  # name: (sample options for the big model, for the warm-up model)
    "unet": ({"bottleneck": 32768, "time_hidden": 4096}, {"channels": 8, "bottleneck": 64, "time_hidden": 32}),
    "mlp": ({"width": 1024, "hidden": 4096, "layers": 2}, {"width": 64, "hidden": 128, "layers": 1}),
}
TIMEOUT = 300.0


def feeds_for(model: Model, rng) -> list[np.ndarray]:
    return [
        rng.standard_normal([max(d, 1) for d in t.shape]).astype(t.dtype.to_numpy()) if t.dtype.to_numpy().kind == "f"
        else rng.integers(0, 1000, [max(d, 1) for d in t.shape]).astype(t.dtype.to_numpy())
        for t in model.get_inputs()
    ]


def uss() -> int:
    import psutil

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap is not memory this process holds
    return psutil.Process().memory_full_info().uss


def _process(conn, threads: int) -> None:
    """One measured process: warm up, then build (plain, publishing or attached) and predict once; report USS."""
    context = Context()
    context.cpu.thread_num = threads
    model, base = None, 0
    while True:
        op, args = conn.recv()
        try:
            if op == "exit":
                return
            if op == "pid":
                conn.send(Model().get_model_info("current_pid"))
            elif op == "warm_up":
                small = Model()
                small.build_from_file(args[0], ModelType.ONNX, context)
                small.predict(feeds_for(small, np.random.default_rng(0)))
                small.close()
                del small
                base = uss()
                conn.send(base)
            elif op == "build":
                model = Model()
                model.build_from_file(args[0], ModelType.ONNX, context, config_dict=args[1])
                handle = model.get_model_info("shareable_weight_mem_handle") if args[1] and "pids" in args[1] else None
                conn.send((handle, uss() - base))
            elif op == "predict_and_measure":
                model.predict(feeds_for(model, np.random.default_rng(1)))
                conn.send(uss() - base)
        except Exception as exc:
            conn.send(exc)


class Process:
    def __init__(self, name: str, threads: int):
        ctx = multiprocessing.get_context("spawn")
        self.name = name
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_process, args=(child, threads), name=name, daemon=True)
        self.process.start()
        child.close()
        self.pid = int(self.ask("pid"))

    def ask(self, op: str, *args):
        self.conn.send((op, args))
        if not self.conn.poll(TIMEOUT):
            raise TimeoutError(f"{self.name} (pid {self.process.pid}) did not answer {op!r} within {TIMEOUT:.0f} s")
        reply = self.conn.recv()
        if isinstance(reply, Exception):
            raise RuntimeError(f"{self.name}: {op} failed") from reply
        return reply

    def stop(self) -> None:
        if self.process.is_alive():
            self.conn.send(("exit", ()))
            self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="unet")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    big_options, small_options = MODELS[args.model]

    with tempfile.TemporaryDirectory(prefix="orch_bench_") as tmp:
        path = write_sample_model(args.model, Path(tmp) / f"{args.model}.onnx", **big_options)
        small = write_sample_model(args.model, Path(tmp) / f"{args.model}_small.onnx", **small_options)
        weight_bytes = sum(onnx.numpy_helper.to_array(i).nbytes for i in onnx.load(str(path)).graph.initializer)

        # -- memory, one process per role ------------------------------------------------
        roles = {name: Process(name, args.threads) for name in ("publisher", "attacher 1", "attacher 2", "no sharing")}
        try:
            for process in roles.values():
                process.ask("warm_up", str(small))
            attachers = [roles["attacher 1"], roles["attacher 2"]]
            pids = ", ".join(str(pid) for pid in [p.pid for p in attachers] + [os.getpid()])  # this process: the latency rows
            handle, built = roles["publisher"].ask("build", str(path), {"pids": pids})
            after_build = {"publisher": built}
            for process in attachers:
                after_build[process.name] = process.ask("build", str(path), {"shared_mem_handle": handle})[1]
            after_build["no sharing"] = roles["no sharing"].ask("build", str(path), None)[1]
            after_predict = {name: process.ask("predict_and_measure") for name, process in roles.items()}

            # -- latency, in this process: shared weights (attached) against a plain model ----
            context = Context()
            context.cpu.thread_num = args.threads
            shared, plain = Model(), Model()
            shared.build_from_file(path, ModelType.ONNX, context, config_dict={"shared_mem_handle": handle})
            plain.build_from_file(path, ModelType.ONNX, context)
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            options.log_severity_level = 3
            options.add_session_config_entry("session.disable_prepacking", "1")
            no_prepack = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            inputs = feeds_for(plain, np.random.default_rng(2))
            by_name = dict(zip(plain.input_names, inputs))
            a, b = shared.predict(inputs)[0].get_data_to_numpy(), plain.predict(inputs)[0].get_data_to_numpy()
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)

            bench = Bench(f"predict on shared weights vs a plain Model, {args.model}, {args.threads} thread(s)")
            bench.compare("shared weights", ours=lambda: shared.predict(inputs), baseline=lambda: plain.predict(inputs),
                          repeats=args.repeats)
            bench.compare("prepacking off only", ours=lambda: no_prepack.run(None, by_name),
                          baseline=lambda: plain.predict(inputs), repeats=args.repeats)
            shared.close()
            plain.close()
        finally:
            for process in roles.values():
                process.stop()

    print(f"== memory each process adds (USS minus USS before building), {args.model}, {args.threads} thread(s) ==")
    print(f"weights: {mib(weight_bytes)} ({weight_bytes} bytes), held once in shared memory")
    print(f"  {'process':<11} {'after build':>22} {'after 1st predict':>22}  (activations come with the 1st predict)")
    for name in after_build:
        cells = [f"{mib(v[name])} ({v[name] / weight_bytes:.2f} x w)" for v in (after_build, after_predict)]
        print(f"  {name:<11} {cells[0]:>22} {cells[1]:>22}")
    print("  (the publisher's 'after build' holds the shared copy: a page mapped by one process alone is in its USS)")
    attached = [after_build["attacher 1"], after_build["attacher 2"]]
    print(f"attacher / no-sharing process after build: {np.mean(attached) / after_build['no sharing']:.3f}; "
          f"after 1st predict: {np.mean([after_predict['attacher 1'], after_predict['attacher 2']]) / after_predict['no sharing']:.3f}")
    saved = after_predict["no sharing"] - np.mean([after_predict["attacher 1"], after_predict["attacher 2"]])
    print(f"target: an attacher adds <= 0.25 x weights ({mib(0.25 * weight_bytes)}) after build: "
          f"{'met' if max(attached) <= 0.25 * weight_bytes else 'MISSED'}; "
          f"each attacher saves {mib(saved)} ({saved / weight_bytes:.2f} x weights) against no sharing")
    three_plain = 3 * after_predict["no sharing"]
    three_shared = weight_bytes + sum(after_predict[n] for n in ("publisher", "attacher 1", "attacher 2"))
    print(f"three processes after a predict each: {mib(three_plain)} without sharing, {mib(three_shared)} with "
          f"(the one shared copy, in no process's USS, plus what each adds)")
    bench.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
