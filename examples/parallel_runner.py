"""MindSpore Lite's concurrent-inference quick start (ModelParallelRunner), ported by changing one import.

Five client threads send two requests each to a runner of three workers; each prints its time, the
output's name, size and element count and the first values, then the total time. The preparation
below writes what the seed downloads: ./model/mobilenetv2.onnx (the sample image classifier, batch 1,
NHWC [1, 224, 224, 3], as MindSpore Lite's converted MobileNetV2 takes) and ./model/input.bin.
After it comes the seed's script as it is, but for the lines marked "# changed:".

    python examples/parallel_runner.py [--workdir DIR]
"""

import argparse
import atexit
import os
import sys
import shutil
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# --- preparation (not in the seed): the model and input the seed downloads, in DIR/model/ ----------------
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--workdir", help="where to write model/mobilenetv2.onnx and model/input.bin (default: a temporary directory)")
args = parser.parse_args()
workdir = Path(args.workdir or tempfile.mkdtemp(prefix="orch_parallel_runner_"))
if not args.workdir:
    atexit.register(shutil.rmtree, workdir, True)  # a directory we made goes when the example ends
(workdir / "model").mkdir(parents=True, exist_ok=True)
os.chdir(workdir)
import numpy  # noqa: E402
import orchestrator  # noqa: E402

if not Path("model/mobilenetv2.onnx").exists():
    orchestrator.write_sample_model("image", "model/mobilenetv2.onnx", batch=1, layout="NHWC")
    numpy.random.default_rng(0).random((1, 224, 224, 3), dtype=numpy.float32).tofile("model/input.bin")

# --- the seed's script (quick_start_parallel_python.py), unchanged but for the lines marked "# changed:" --
import time  # noqa: E402
from threading import Thread  # noqa: E402
import numpy as np  # noqa: E402
import orchestrator as mslite  # changed: was `import mindspore_lite as mslite`  # noqa: E402

# the number of threads of one worker.
# WORKERS_NUM * THREAD_NUM should not exceed the number of cores of the machine.
THREAD_NUM = 1

# In parallel inference, the number of workers in one `ModelParallelRunner` in server.
# If you prepare to compare the time difference between parallel inference and serial inference,
# you can set WORKERS_NUM = 1 as serial inference.
WORKERS_NUM = 3

# Simulate 5 clients, and each client sends 2 inference tasks to the server at the same time.
PARALLEL_NUM = 5
TASK_NUM = 2

# Init RunnerConfig and context, and add CPU device info
context = mslite.Context()
context.target = ["cpu"]
context.cpu.thread_num = THREAD_NUM
context.cpu.inter_op_parallel_num = THREAD_NUM
context.parallel.workers_num = WORKERS_NUM

# Build ModelParallelRunner from file
model_parallel_runner = mslite.ModelParallelRunner()
model_parallel_runner.build_from_file(model_path="./model/mobilenetv2.onnx", context=context)  # changed: was "./model/mobilenetv2.mindir"

def parallel_runner_predict(parallel_runner, parallel_id):
    """
    One Runner with 3 workers, set model input, execute inference and get output.

    Args:
        parallel_runner (mindspore_lite.ModelParallelRunner): Actuator Supporting Parallel inference.
        parallel_id (int): Simulate which client's task to process
    """

    task_index = 0
    while True:
        if task_index == TASK_NUM:
            break
        task_index += 1
        # Set model input
        inputs = parallel_runner.get_inputs()
        in_data = np.fromfile("./model/input.bin", dtype=np.float32)
        inputs[0].set_data_from_numpy(in_data)
        once_start_time = time.time()
        # Execute inference
        outputs = parallel_runner.predict(inputs)
        once_end_time = time.time()
        print("parallel id: ", parallel_id, " | task index: ", task_index, " | run once time: ",
              once_end_time - once_start_time, " s")
        # Get output
        for output in outputs:
            tensor_name = output.name.rstrip()
            data_size = output.data_size
            element_num = output.element_num
            print("tensor name is:%s tensor size is:%s tensor elements num is:%s" % (tensor_name,
                                                                                     data_size,
                                                                                     element_num))
            data = output.get_data_to_numpy()
            data = data.flatten()
            print("output data is:", end=" ")
            for j in range(5):
                print(data[j], end=" ")
            print("")


# The server creates 5 threads to store the inference tasks of 5 clients.
threads = []
total_start_time = time.time()
for i in range(PARALLEL_NUM):
    threads.append(Thread(target=parallel_runner_predict, args=(model_parallel_runner, i,)))

# Start threads to perform parallel inference.
for th in threads:
    th.start()
for th in threads:
    th.join()
total_end_time = time.time()
print("total run time: ", total_end_time - total_start_time, " s")
