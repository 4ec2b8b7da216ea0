"""The README's demo: build sample models, then run them the ways this project offers.

Every step runs the real thing (ONNX Runtime sessions, real processes) on
models the demo writes itself, and checks its numbers against one plain
ONNX Runtime session on the whole model.

    python examples/demo.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orchestrator as mslite  # noqa: E402
from ranks._rank_program import format_output  # noqa: E402


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where to write models (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="orch_demo_") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        single_process(workdir)
    print("\ndemo finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
