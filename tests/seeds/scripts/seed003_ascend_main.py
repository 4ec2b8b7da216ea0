# Seed 003 (MindSpore Lite, "Performing Cloud-side Distributed Inference Using Python Interface"),
# the Ascend flavour of main.py (run.sh: one command per rank with --device_id --rank_id --config_file).
# The seed shows main.py in fragments; the argument parsing (marked "# from run.sh:") follows the
# flags its run.sh passes. Lines marked "# changed:" differ from the seed.
import argparse

import numpy as np
import orchestrator as mslite  # changed: was `import mindspore_lite as mslite`

parser = argparse.ArgumentParser()  # from run.sh:
parser.add_argument("--model_path", type=str)  # from run.sh:
parser.add_argument("--device_id", type=int)  # from run.sh:
parser.add_argument("--rank_id", type=int)  # from run.sh:
parser.add_argument("--config_file", type=str)  # from run.sh:
args = parser.parse_args()  # from run.sh:
model_path = args.model_path  # from run.sh:

# init context
context = mslite.Context()

# set Ascend target and distributed info
context.target = ["cpu"]  # changed: was ["Ascend"] (no Ascend card here)
context.ascend.device_id = args.device_id
context.ascend.rank_id = args.rank_id
context.ascend.provider = "ge"

# create Model and build Model
model = mslite.Model()
model.build_from_file(model_path, mslite.ModelType.MINDIR, context, args.config_file)

# set model input as ones
inputs = model.get_inputs()
for input_i in inputs:
    input_i.set_data_from_numpy(np.ones(input_i.shape, dtype=np.float32))

# execute inference
outputs = model.predict(inputs)

# get output and print
for output in outputs:
    name = output.name.rstrip()
    data_size = output.data_size
    element_num = output.element_num
    print("tensor's name is:%s data size is:%s tensor elements num is:%s" %
          (name, data_size, element_num))
    data = output.get_data_to_numpy()
    data = data.flatten()
    print("output data is:", end=" ")
    for i in range(10):
        print(data[i], end=" ")
    print("")
