"""Small networks built with mindspore.nn and exported by MindSpore itself: ``python tests/mindir_nets.py DIR``.

Run as a child process (the tests never import MindSpore themselves). Writes into DIR:

- ``classifier.mindir`` (x: 1x3x32x32 -> 1000 softmax probabilities; Conv, ReLU, MaxPool, Dense) and
  ``classifier_v2.mindir`` (same network, other weights), with ``classifier.npz`` / ``classifier_v2.npz``:
  inputs ``x1`` (batch 1), ``x5`` (batch 5) and MindSpore's outputs ``y1``, ``y5`` of the network itself;
  ``classifier_dyn.mindir``: the first exported with its batch free (``Tensor(shape=[None, 3, 32, 32])``);
- ``mlp.mindir`` (x: 1x64 -> Dense 256, ReLU, Dense 64) and ``mlp.npz`` (``x4``, ``y4``);
- ``mlp_tp0.mindir``, ``mlp_tp1.mindir``: the MLP sliced by hand over 2 ranks (rank r holds columns r of
  the first layer and rows r of the second, then AllReduce), ``mlp_tp.npz`` (``x``: 2x64, ``y``: the whole MLP,
  ``y_ones``: the whole MLP on ones);
- ``tensor_add.mindir`` (x1, x2: 2x2 float32 -> x1 + x2);
- ``erfinv.mindir`` (an operator MindSpore cannot export to ONNX) and ``encrypted.mindir`` (AES-GCM).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ENC_KEY = b"0123456789abcdef"


def main(folder: Path) -> None:
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn, ops

    # Graph mode, as a GraphCell runs: MindSpore 2.10's eager kernels fail under NumPy 2 ("compiled using NumPy 1.x").
    ms.set_context(mode=ms.GRAPH_MODE)

    class Classifier(nn.Cell):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, pad_mode="same", has_bias=True)
            self.relu = nn.ReLU()
            self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
            self.flatten = nn.Flatten()
            self.fc = nn.Dense(8 * 16 * 16, 1000)
            self.softmax = nn.Softmax()

        def construct(self, x):
            return self.softmax(self.fc(self.flatten(self.pool(self.relu(self.conv(x))))))

    class Mlp(nn.Cell):
        def __init__(self, w1, b1, w2, b2):
            super().__init__()
            self.w1, self.b1 = Parameter(Tensor(w1), name="w1"), Parameter(Tensor(b1), name="b1")
            self.w2, self.b2 = Parameter(Tensor(w2), name="w2"), Parameter(Tensor(b2), name="b2")
            self.matmul, self.relu = ops.MatMul(), ops.ReLU()

        def construct(self, x):
            return self.matmul(self.relu(self.matmul(x, self.w1) + self.b1), self.w2) + self.b2

    class MlpRank(Mlp):
        """One rank's piece: a column slice of layer 1, a row slice of layer 2, the partial sums all-reduced."""

        def __init__(self, *weights):
            super().__init__(*weights)
            self.allreduce = ops.AllReduce()

        def construct(self, x):
            return self.allreduce(self.matmul(self.relu(self.matmul(x, self.w1) + self.b1), self.w2)) + self.b2

    class Add(nn.Cell):
        def construct(self, x1, x2):
            return x1 + x2

    class Odd(nn.Cell):
        def __init__(self):
            super().__init__()
            self.erfinv = ops.Erfinv()

        def construct(self, x):
            return self.erfinv(x) * 2

    rng = np.random.default_rng(0)
    for name, seed in (("classifier", 1), ("classifier_v2", 2)):
        ms.set_seed(seed)
        net = Classifier()
        net.set_train(False)
        x1 = rng.random((1, 3, 32, 32), dtype=np.float32)
        x5 = rng.random((5, 3, 32, 32), dtype=np.float32)
        ms.export(net, Tensor(x1), file_name=str(folder / name), file_format="MINDIR")
        if name == "classifier":  # the same network with its batch declared free
            ms.export(net, Tensor(shape=[None, 3, 32, 32], dtype=ms.float32), file_name=str(folder / "classifier_dyn"),
                      file_format="MINDIR")
        np.savez(folder / f"{name}.npz", x1=x1, y1=net(Tensor(x1)).asnumpy(), x5=x5, y5=net(Tensor(x5)).asnumpy())

    w1 = (rng.standard_normal((64, 256)) * 0.1).astype(np.float32)
    b1 = (rng.standard_normal(256) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((256, 64)) * 0.1).astype(np.float32)
    b2 = (rng.standard_normal(64) * 0.1).astype(np.float32)
    mlp = Mlp(w1, b1, w2, b2)
    x4 = rng.standard_normal((4, 64)).astype(np.float32)
    ms.export(mlp, Tensor(x4[:1]), file_name=str(folder / "mlp"), file_format="MINDIR")
    np.savez(folder / "mlp.npz", x4=x4, y4=mlp(Tensor(x4)).asnumpy())
    for rank in range(2):
        cols = slice(128 * rank, 128 * (rank + 1))
        piece = MlpRank(w1[:, cols].copy(), b1[cols].copy(), w2[cols, :].copy(), b2)
        ms.export(piece, Tensor(x4[:2]), file_name=str(folder / f"mlp_tp{rank}"), file_format="MINDIR")
    ones = np.ones((2, 64), np.float32)  # what seed 003's main.py feeds
    np.savez(folder / "mlp_tp.npz", x=x4[:2], y=mlp(Tensor(x4[:2])).asnumpy(), y_ones=mlp(Tensor(ones)).asnumpy())

    two = Tensor(np.ones((2, 2), np.float32))
    ms.export(Add(), two, two, file_name=str(folder / "tensor_add"), file_format="MINDIR")
    ms.export(Odd(), Tensor(np.full((2, 5), 0.5, np.float32)), file_name=str(folder / "erfinv"), file_format="MINDIR")
    ms.export(mlp, Tensor(x4[:1]), file_name=str(folder / "encrypted"), file_format="MINDIR",
              enc_key=ENC_KEY, enc_mode="AES-GCM")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
