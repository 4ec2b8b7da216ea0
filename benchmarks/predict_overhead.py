"""Model.predict against a bare onnxruntime.InferenceSession.run on the sample MLP, same threads.

Target: our overhead ratio at most 1.05 at batch 1.

    python benchmarks/predict_overhead.py [--threads 1] [--repeats 200]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._runner import Bench  # noqa: E402
from orchestrator import Context, Model, ModelType, write_sample_model  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="orch_bench_") as tmp:
        path = write_sample_model("mlp", Path(tmp) / "mlp.onnx")  # width 1024, hidden 4096, 4 layers
        context = Context()
        context.cpu.thread_num = args.threads
        model = Model()
        model.build_from_file(path, ModelType.ONNX, context)

        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])

        bench = Bench(f"Model.predict vs InferenceSession.run, MLP 1024/4096/4, {args.threads} thread(s)")
        rng = np.random.default_rng(0)
        for batch, repeats in ((1, args.repeats), (64, max(10, args.repeats // 10))):
            x = rng.standard_normal((batch, 1024), dtype=np.float32)
            inputs = model.get_inputs()
            inputs[0].shape = [batch, 1024]
            inputs[0].set_data_from_numpy(x)
            ours = model.predict(inputs)[0].get_data_to_numpy()
            theirs = session.run(None, {"x": x})[0]
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
            bench.compare(
                f"batch {batch}",
                ours=lambda: model.predict(inputs),
                baseline=lambda: session.run(None, {"x": x}),
                repeats=repeats,
                target=("<=", 1.05) if batch == 1 else None,
            )
        bench.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
