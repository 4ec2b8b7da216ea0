# Seed 001 (MindSpore Lite, "动态权重更新"): dynamic weight update, the seed's code blocks in order.
# Lines marked "# changed:" differ from the seed; the one marked "# added:" stands for a step the seed
# describes in words only ("构建新权重tensor": convert a third-party SaveTensor into an array).
import numpy as np
import orchestrator as mslite  # changed: was `import mindspore_lite as mslite`

# init context, and set target is gpu.
context = mslite.Context()
context.target = ["cpu"]  # changed: was ["ascend"] (no Ascend card here)
context.gpu.device_id = 0

# build model from file
MODEL_PATH = "./SD1.5/unet.onnx"  # changed: was "./SD1.5/unet.mindir"
model = mslite.Model()
model.build_from_file(MODEL_PATH, mslite.ModelType.MINDIR, context,  "config.ini")

data = np.load("new_weight.npy")  # added: the seed's "build the new weight tensor" step
new_weight = mslite.Tensor(data)
new_weights = [new_weight]
model.update_weights([new_weights])
