"""MindSpore Lite's Python quick start, ported by changing one import.

Builds the sample image classifier (shaped like the seeds' MobileNetV2) and an
input.bin, then runs the seeds' script unchanged but for `import orchestrator
as mslite`.

    python examples/quick_start.py [--workdir DIR]
"""

import argparse
import atexit
import os
import sys
import shutil
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orchestrator as mslite  # was: import mindspore_lite as mslite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where to write model.onnx and input.bin (default: a temporary directory)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="orch_quick_start_"))
    if not args.workdir:
        atexit.register(shutil.rmtree, workdir, True)  # a directory we made goes when the example ends
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    mslite.write_sample_model("image", "model.onnx")
    np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32).tofile("input.bin")

    # --- the seeds' script, unchanged but for the import -------------------
    context = mslite.Context()
    context.target = ["cpu"]
    context.cpu.thread_num = 1
    context.cpu.thread_affinity_mode = 2
    model = mslite.Model()
    model.build_from_file("model.onnx", mslite.ModelType.ONNX, context)
    inputs = model.get_inputs()
    inputs[0].set_data_from_numpy(np.fromfile("input.bin", dtype=np.float32).reshape(1, 3, 224, 224))
    outputs = model.predict(inputs)
    for output in outputs:
        name = output.name.rstrip()
        data_size = output.data_size
        element_num = output.element_num
        print("tensor's name is:%s data size is:%s tensor elements num is:%s" % (name, data_size, element_num))
        data = output.get_data_to_numpy()
        data = data.flatten()
        print("output data is:", end=" ")
        for i in range(50):
            print(data[i], end=" ")
        print("")


if __name__ == "__main__":
    main()
