"""Sample models, written by code, deterministically from a seed (nothing is downloaded).

They are built the way exporters write real models (MatMul + Add for linear
layers, Reshape/Transpose for attention heads) because the slicing tool and
the benchmarks treat them as stand-ins for real models.

================  =====================================  =========================
name              inputs                                 outputs
================  =====================================  =========================
add               x, y: float32 [2, 2]                   z = x + y
mlp               x: float32 [batch, width]              y: float32 [batch, width]
transformer       x: float32 [batch, seq, d_model]       y: float32 [batch, seq, d_model]
image             x: float32 [batch, 3, 224, 224] NCHW   probs: float32 [batch, 1000]
unet              sample: float32 [1, 8, 168, 128],      noise: float32 [1, 8, 168, 128]
                  timestep: int32 [1]
================  =====================================  =========================
"""

from __future__ import annotations

import math
import os
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
_FLOAT = TensorProto.FLOAT


class _WeightCount:
    """A dry run of a factory: the bytes of its random weights, for a progress bar's total."""

    def __init__(self):
        self.nbytes = 0


# What the builders of the current write_sample_model report to: None, a
# _WeightCount (the dry run: no data made) or a progress bar (bytes made).
_REPORT: ContextVar = ContextVar("sample_progress", default=None)


class _GraphBuilder:
    """Collects nodes and initializers with unique, readable names."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.report = _REPORT.get()

    def weight(self, name: str, shape: tuple[int, ...], fan_in: int) -> str:
        if isinstance(self.report, _WeightCount):
            self.report.nbytes += 4 * math.prod(shape)
            return name
        data = self.rng.standard_normal(shape, dtype=np.float32) / np.float32(math.sqrt(fan_in))
        self.initializers.append(numpy_helper.from_array(data.astype(np.float32), name))
        if self.report is not None:
            self.report.update(data.nbytes)
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=f"{output}_{op}", **attrs))
        return output

    def linear(self, prefix: str, x: str, fan_in: int, fan_out: int) -> str:
        """MatMul + Add of a bias, as PyTorch's exporter writes nn.Linear."""
        w = self.weight(f"{prefix}.weight", (fan_in, fan_out), fan_in)
        b = self.const(f"{prefix}.bias", (self.rng.standard_normal(fan_out) * 0.02).astype(np.float32))
        mm = self.node("MatMul", [x, w], f"{prefix}.matmul")
        return self.node("Add", [mm, b], f"{prefix}.out")

    def layer_norm(self, prefix: str, x: str, width: int) -> str:
        scale = self.const(f"{prefix}.scale", np.ones(width, np.float32))
        bias = self.const(f"{prefix}.bias", np.zeros(width, np.float32))
        return self.node("LayerNormalization", [x, scale, bias], f"{prefix}.out", axis=-1, epsilon=1e-5)

    def gelu(self, prefix: str, x: str) -> str:
        """GELU spelled with Erf, as exporters write it for opsets before 20."""
        inv_sqrt2 = self.const(f"{prefix}.inv_sqrt2", np.array(1 / math.sqrt(2), np.float32))
        one = self.const(f"{prefix}.one", np.array(1.0, np.float32))
        half = self.const(f"{prefix}.half", np.array(0.5, np.float32))
        scaled = self.node("Mul", [x, inv_sqrt2], f"{prefix}.scaled")
        erf = self.node("Erf", [scaled], f"{prefix}.erf")
        shifted = self.node("Add", [erf, one], f"{prefix}.shifted")
        halved = self.node("Mul", [x, half], f"{prefix}.halved")
        return self.node("Mul", [halved, shifted], f"{prefix}.out")

    def model(self, name, inputs, outputs, doc: str) -> onnx.ModelProto | None:
        if isinstance(self.report, _WeightCount):
            return None
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="orchestrator.samples",
            doc_string=doc,
        )
        model.ir_version = 8  # readable by every onnxruntime we support
        onnx.checker.check_model(model)
        return model


def make_add_model() -> onnx.ModelProto:
    """The seeds' serving example: z = x + y on two float32 [2, 2] tensors."""
    b = _GraphBuilder(0)
    b.node("Add", ["x", "y"], "z")
    return b.model(
        "add",
        [helper.make_tensor_value_info(n, _FLOAT, [2, 2]) for n in ("x", "y")],
        [helper.make_tensor_value_info("z", _FLOAT, [2, 2])],
        "2x2 tensor add",
    )


def make_mlp_model(width: int = 1024, hidden: int = 4096, layers: int = 4, seed: int = 0) -> onnx.ModelProto:
    """A residual stack of feed-forward blocks: x = x + W2(relu(W1 x + b1)) + b2, with dynamic batch."""
    _check_positive(width=width, hidden=hidden, layers=layers)
    b = _GraphBuilder(seed)
    x = "x"
    for i in range(layers):
        up = b.linear(f"layers.{i}.fc1", x, width, hidden)
        act = b.node("Relu", [up], f"layers.{i}.act")
        down = b.linear(f"layers.{i}.fc2", act, hidden, width)
        x = b.node("Add", [x, down], f"layers.{i}.residual" if i < layers - 1 else "y")
    return b.model(
        "mlp",
        [helper.make_tensor_value_info("x", _FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", _FLOAT, ["batch", width])],
        f"residual MLP width={width} hidden={hidden} layers={layers} seed={seed}",
    )


def make_transformer_model(
    d_model: int = 256, heads: int = 8, layers: int = 2, ffn: int = 1024, seed: int = 0
) -> onnx.ModelProto:
    """A pre-norm decoder stack: causal multi-head self-attention and a GELU MLP, dynamic batch and sequence."""
    _check_positive(d_model=d_model, heads=heads, layers=layers, ffn=ffn)
    if d_model % heads:
        raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
    head_dim = d_model // heads
    b = _GraphBuilder(seed)
    split_heads = b.const("shape.split_heads", np.array([0, 0, heads, head_dim], np.int64))
    merge_heads = b.const("shape.merge_heads", np.array([0, 0, d_model], np.int64))
    scale = b.const("attn.scale", np.array(1 / math.sqrt(head_dim), np.float32))
    neg_inf = helper.make_tensor("mask.fill", _FLOAT, [1], [-1e9])
    x = "x"
    for i in range(layers):
        p = f"layers.{i}"
        h = b.layer_norm(f"{p}.ln1", x, d_model)
        q = b.linear(f"{p}.attn.q_proj", h, d_model, d_model)
        k = b.linear(f"{p}.attn.k_proj", h, d_model, d_model)
        v = b.linear(f"{p}.attn.v_proj", h, d_model, d_model)
        q = b.node("Reshape", [q, split_heads], f"{p}.attn.q_heads")
        k = b.node("Reshape", [k, split_heads], f"{p}.attn.k_heads")
        v = b.node("Reshape", [v, split_heads], f"{p}.attn.v_heads")
        q = b.node("Transpose", [q], f"{p}.attn.q_t", perm=[0, 2, 1, 3])
        k = b.node("Transpose", [k], f"{p}.attn.k_t", perm=[0, 2, 3, 1])
        v = b.node("Transpose", [v], f"{p}.attn.v_t", perm=[0, 2, 1, 3])
        scores = b.node("MatMul", [q, k], f"{p}.attn.scores")
        scores = b.node("Mul", [scores, scale], f"{p}.attn.scaled")
        # Causal mask: -1e9 above the diagonal, built from the dynamic [seq, seq] tail of the scores' shape.
        seq_seq = b.node("Shape", [scores], f"{p}.attn.seq_seq", start=2)
        filled = b.node("ConstantOfShape", [seq_seq], f"{p}.attn.mask_full", value=neg_inf)
        mask = b.node("Trilu", [filled], f"{p}.attn.mask", upper=1)
        # Trilu with upper=1 keeps the diagonal too; shift it one above the diagonal.
        b.nodes[-1].input.append(b.const(f"{p}.attn.mask_k", np.array(1, np.int64)))
        scores = b.node("Add", [scores, mask], f"{p}.attn.masked")
        probs = b.node("Softmax", [scores], f"{p}.attn.probs", axis=-1)
        ctx = b.node("MatMul", [probs, v], f"{p}.attn.context")
        ctx = b.node("Transpose", [ctx], f"{p}.attn.context_t", perm=[0, 2, 1, 3])
        ctx = b.node("Reshape", [ctx, merge_heads], f"{p}.attn.merged")
        attn = b.linear(f"{p}.attn.o_proj", ctx, d_model, d_model)
        x = b.node("Add", [x, attn], f"{p}.attn.residual")
        h = b.layer_norm(f"{p}.ln2", x, d_model)
        up = b.linear(f"{p}.mlp.fc1", h, d_model, ffn)
        act = b.gelu(f"{p}.mlp.gelu", up)
        down = b.linear(f"{p}.mlp.fc2", act, ffn, d_model)
        x = b.node("Add", [x, down], f"{p}.mlp.residual")
    b.layer_norm("final_ln", x, d_model)
    b.nodes[-1].output[0] = "y"
    return b.model(
        "transformer",
        [helper.make_tensor_value_info("x", _FLOAT, ["batch", "seq", d_model])],
        [helper.make_tensor_value_info("y", _FLOAT, ["batch", "seq", d_model])],
        f"decoder transformer d_model={d_model} heads={heads} layers={layers} ffn={ffn} seed={seed}",
    )


def make_image_model(
    classes: int = 1000, size: int = 224, seed: int = 0, batch: int | None = None, layout: str = "NCHW"
) -> onnx.ModelProto:
    """A small classifier shaped like the seeds' MobileNetV2 example: [batch,3,224,224] -> softmax [batch,1000].

    ``batch`` fixes the batch dimension (MindSpore Lite's converted models have batch 1: the seeds
    fill them from a flat ``input.bin``); ``layout="NHWC"`` takes [batch,224,224,3] as seed 000's model does.
    """
    _check_positive(classes=classes, size=size, **({"batch": batch} if batch is not None else {}))
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    b = _GraphBuilder(seed)
    x = "x"
    if layout == "NHWC":
        x = b.node("Transpose", [x], "to_nchw", perm=[0, 3, 1, 2])
    channels = 3
    for i, out_channels in enumerate((16, 32, 64)):
        w = b.weight(f"features.{i}.conv.weight", (out_channels, channels, 3, 3), channels * 9)
        bias = b.const(f"features.{i}.conv.bias", np.zeros(out_channels, np.float32))
        x = b.node("Conv", [x, w, bias], f"features.{i}.conv", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
        x = b.node("Relu", [x], f"features.{i}.relu")
        channels = out_channels
    x = b.node("GlobalAveragePool", [x], "pool")
    x = b.node("Flatten", [x], "flatten", axis=1)
    w = b.weight("classifier.weight", (classes, channels), channels)
    bias = b.const("classifier.bias", np.zeros(classes, np.float32))
    x = b.node("Gemm", [x, w, bias], "logits", transB=1)
    b.node("Softmax", [x], "probs", axis=-1)
    first = "batch" if batch is None else batch
    shape = [first, 3, size, size] if layout == "NCHW" else [first, size, size, 3]
    return b.model(
        "image",
        [helper.make_tensor_value_info("x", _FLOAT, shape)],
        [helper.make_tensor_value_info("probs", _FLOAT, [first, classes])],
        f"image classifier classes={classes} size={size} layout={layout} batch={first} seed={seed}",
    )


def make_unet_model(
    channels: int = 32, bottleneck: int = 2048, time_hidden: int = 512, seed: int = 0
) -> onnx.ModelProto:
    """A small diffusion UNet with the seeds' weight-sharing inputs: a latent [1, 8, 168, 128] and an int32 timestep [1].

    The timestep is cast to float, embedded sinusoidally, passed through an MLP
    (``time_hidden`` wide) and added to the first feature map; three stride-2
    convolutions go down to 1/8 resolution, a token-wise MLP (``bottleneck``
    wide) mixes channels there, and nearest-neighbour upsampling with skip
    connections comes back up. Most weights sit in the two MLPs, whose cost
    grows with their width far less than the convolutions' would, so a wide
    ``bottleneck``/``time_hidden`` gives tens of MB of weights at a modest
    compute cost.
    """
    _check_positive(channels=channels, bottleneck=bottleneck, time_hidden=time_hidden)
    height, width, latent = 168, 128, 8
    b = _GraphBuilder(seed)

    def conv(prefix: str, x: str, c_in: int, c_out: int, stride: int = 1) -> str:
        w = b.weight(f"{prefix}.weight", (c_out, c_in, 3, 3), c_in * 9)
        bias = b.const(f"{prefix}.bias", (b.rng.standard_normal(c_out) * 0.02).astype(np.float32))
        return b.node("Conv", [x, w, bias], f"{prefix}.out", kernel_shape=[3, 3], strides=[stride, stride], pads=[1, 1, 1, 1])

    def silu(prefix: str, x: str) -> str:
        return b.node("Mul", [x, b.node("Sigmoid", [x], f"{prefix}.sigmoid")], f"{prefix}.out")

    # Timestep embedding: [sin(t * f), cos(t * f)] over geometric frequencies, then an MLP to `channels`.
    time_dim = 2 * max(8, channels // 2)
    half = time_dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half, dtype=np.float64) / half).astype(np.float32)
    t = b.node("Cast", ["timestep"], "time.float", to=_FLOAT)
    t = b.node("Unsqueeze", [t, b.const("time.axis", np.array([1], np.int64))], "time.column")
    args = b.node("Mul", [t, b.const("time.freqs", freqs.reshape(1, half))], "time.args")
    emb = b.node("Concat", [b.node("Sin", [args], "time.sin"), b.node("Cos", [args], "time.cos")], "time.sinusoid", axis=1)
    emb = silu("time.act", b.linear("time.fc1", emb, time_dim, time_hidden))
    emb = b.linear("time.fc2", emb, time_hidden, channels)
    emb = b.node("Reshape", [emb, b.const("time.map_shape", np.array([1, channels, 1, 1], np.int64))], "time.embedding")

    h0 = b.node("Add", [conv("conv_in", "sample", latent, channels), emb], "conv_in.timed")
    h0 = silu("conv_in.act", h0)
    h1 = silu("down.0.act", conv("down.0", h0, channels, 2 * channels, stride=2))          # 1/2
    h2 = silu("down.1.act", conv("down.1", h1, 2 * channels, 4 * channels, stride=2))      # 1/4
    h3 = silu("down.2.act", conv("down.2", h2, 4 * channels, 4 * channels, stride=2))      # 1/8

    # Bottleneck: every position is a token; a residual MLP mixes its channels.
    mid = 4 * channels
    tokens = b.node("Reshape", [h3, b.const("mid.flat_shape", np.array([1, mid, -1], np.int64))], "mid.flat")
    tokens = b.node("Transpose", [tokens], "mid.tokens", perm=[0, 2, 1])
    up = silu("mid.act", b.linear("mid.fc1", tokens, mid, bottleneck))
    tokens = b.node("Add", [tokens, b.linear("mid.fc2", up, bottleneck, mid)], "mid.residual")
    tokens = b.node("Transpose", [tokens], "mid.channels", perm=[0, 2, 1])
    h = b.node("Reshape", [tokens, b.const("mid.map_shape", np.array([1, mid, height // 8, width // 8], np.int64))], "mid.out")

    scales = b.const("up.scales", np.array([1, 1, 2, 2], np.float32))
    for i, (skip, c_in, c_out) in enumerate(((h2, mid, 4 * channels), (h1, 4 * channels, 2 * channels), (h0, 2 * channels, channels))):
        h = b.node("Resize", [h, "", scales], f"up.{i}.resize", mode="nearest")
        h = b.node("Add", [conv(f"up.{i}", h, c_in, c_out), skip], f"up.{i}.skip")
        h = silu(f"up.{i}.act", h)
    out = conv("conv_out", h, channels, latent)
    b.nodes[-1].output[0] = "noise"
    del out
    return b.model(
        "unet",
        [
            helper.make_tensor_value_info("sample", _FLOAT, [1, latent, height, width]),
            helper.make_tensor_value_info("timestep", TensorProto.INT32, [1]),
        ],
        [helper.make_tensor_value_info("noise", _FLOAT, [1, latent, height, width])],
        f"diffusion unet channels={channels} bottleneck={bottleneck} time_hidden={time_hidden} seed={seed}",
    )


SAMPLE_MODELS = {
    "add": make_add_model,
    "mlp": make_mlp_model,
    "transformer": make_transformer_model,
    "image": make_image_model,
    "unet": make_unet_model,
}


def write_sample_model(name: str, path: str | os.PathLike, *, external_data: bool = False,
                       progress: bool | None = None, **options) -> Path:
    """Build sample model ``name`` (see SAMPLE_MODELS) and write it to ``path``.

    With ``external_data=True`` the weights go to ``<file>.data`` beside the
    model, as exporters do for large models. ``progress``: a bar on stderr
    (weight bytes made, then written); None shows it only when stderr is a
    terminal. Returns the path written.
    """
    from ._progress import progress_bar

    try:
        factory = SAMPLE_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown sample model {name!r}; choose one of {sorted(SAMPLE_MODELS)}") from None
    count = _WeightCount()
    token = _REPORT.set(count)
    try:
        factory(**options)  # shapes only: the bar's total
    finally:
        _REPORT.reset(token)
    path = Path(path)
    with progress_bar(2 * count.nbytes, f"sample {name}", unit="B", enabled=progress,
                      unit_scale=True, unit_divisor=1024) as bar:
        token = _REPORT.set(bar)
        try:
            model = factory(**options)
        finally:
            _REPORT.reset(token)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model(model, path, external_data=external_data)
        bar.update(count.nbytes)
    return path


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool = False) -> None:
    """Write ``model``, optionally with its weights in one ``<file>.data`` beside it."""
    path = Path(path)
    if external_data:
        data_file = path.with_name(path.name + ".data")
        if data_file.exists():
            data_file.unlink()  # onnx appends to an existing data file
        onnx.save_model(
            model, path, save_as_external_data=True, all_tensors_to_one_file=True,
            location=data_file.name, size_threshold=1024,
        )
    else:
        onnx.save_model(model, path)


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
