"""The seeds' dual-core case: a batch of 2 images split over 2 workers, the halves joined into one result.

The seeds' Ascend sample starts one child process per core of a dual-core
card, pipes each child half the batch and collects the halves by hand.
Here ParallelPredictor does it: one spawned worker per device id (on the CPU,
each pinned to its own core), the halves travel through shared memory, and
the joined output is checked against one process running the whole batch.

    python examples/dual_core_split.py [--workdir DIR] [--target cpu|ascend|gpu]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator import Context, Model, ModelType, ParallelPredictor, write_sample_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where to write model.onnx (default: a temporary directory)")
    parser.add_argument("--target", default="cpu", choices=("cpu", "gpu", "ascend"))
    parser.add_argument("--size", type=int, default=224, help="image side (default 224, as MobileNetV2)")
    parser.add_argument("--classes", type=int, default=1000)
    args = parser.parse_args()
    if args.workdir:
        return run(args, Path(args.workdir))
    with tempfile.TemporaryDirectory(prefix="orch_dual_core_") as workdir:  # removed afterwards, whatever happens
        return run(args, Path(workdir))


def run(args, workdir: Path) -> int:
    model_path = write_sample_model("image", workdir / "model.onnx", size=args.size, classes=args.classes)

    batch = np.random.default_rng(0).random((2, 3, args.size, args.size), dtype=np.float32)  # NCHW, 2 images

    context = Context()
    context.target = [args.target]
    context.cpu.thread_num = 1
    started = time.perf_counter()
    with ParallelPredictor(model_path, device_ids=[0, 1], context=context) as predictor:
        print(f"built on 2 workers (pids {predictor.pids}, cores {predictor.cores}) "
              f"in {time.perf_counter() - started:.2f} s")
        print(f"a batch of 2 splits as {predictor.split_sizes(2)}")
        probs = predictor.predict({"x": batch})[0].get_data_to_numpy()

    one = Model()
    one.build_from_file(model_path, ModelType.ONNX, context)
    expected = one.predict([batch])[0].get_data_to_numpy()
    one.close()

    for i, row in enumerate(probs):
        print(f"image {i}: top-1 class {int(row.argmax())} (p={row.max():.4f})")
    difference = float(np.abs(probs - expected).max())
    if probs.shape != expected.shape or difference > 1e-5:
        print(f"MISMATCH: joined {probs.shape} vs one process {expected.shape}, max difference {difference:g}")
        return 1
    print(f"joined outputs equal one process: shape {list(probs.shape)}, max difference {difference:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
