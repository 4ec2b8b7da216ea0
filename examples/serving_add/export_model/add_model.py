"""Build the add network (x + y on two 2x2 float32 tensors) as ONNX and copy it to ../add/1/tensor_add.onnx.

The seed exports a MindSpore network to MINDIR; here the same network is written
with onnx.helper (nothing downloaded), then run once to print x, y and x + y as
the seed does.
"""
import os
from shutil import copyfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper


def build_add_model():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 2])
    graph = helper.make_graph([helper.make_node("Add", ["x", "y"], ["z"])], "tensor_add", [x, y], [z])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def export_net():
    """Export add net of 2x2 + 2x2, and copy output model `tensor_add.onnx` to directory ../add/1"""
    x = np.ones([2, 2]).astype(np.float32)
    y = np.ones([2, 2]).astype(np.float32)
    model = build_add_model()
    onnx.save(model, "tensor_add.onnx")
    output = ort.InferenceSession("tensor_add.onnx", providers=["CPUExecutionProvider"]).run(None, {"x": x, "y": y})[0]
    dst_dir = '../add/1'
    try:
        os.mkdir(dst_dir)
    except OSError:
        pass

    dst_file = os.path.join(dst_dir, 'tensor_add.onnx')
    copyfile('tensor_add.onnx', dst_file)
    print("copy tensor_add.onnx to " + dst_dir + " success")

    print(x)
    print(y)
    print(output)


if __name__ == "__main__":
    export_net()
