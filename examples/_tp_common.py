"""What the three tensor-parallel examples share: build the sample models, slice them, compare outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator import shard_model, write_sample_model  # noqa: E402

TOLERANCE = 1e-4
# name -> (model options, input shape)
MODELS = {
    "mlp": ({"width": 1024, "hidden": 4096, "layers": 4}, (4, 1024)),
    "transformer": ({"d_model": 256, "heads": 8, "layers": 2, "ffn": 1024}, (2, 16, 256)),
}


def prepare(workdir: Path, name: str, tp: int = 2):
    """Write DIR/NAME.onnx, its shards in DIR/shards_NAME/ and an input DIR/NAME_x.npy; return the paths."""
    options, shape = MODELS[name]
    source = write_sample_model(name, workdir / f"{name}.onnx", **options)
    shards = shard_model(source, tp, workdir / f"shards_{name}", progress=False)
    print(shards.summary())
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.save(workdir / f"{name}_x.npy", x)
    return source, shards.model_path, workdir / f"{name}_x.npy"


def whole_model_output(source: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def report(name: str, got: np.ndarray, expected: np.ndarray, how: str) -> bool:
    diff = float(np.max(np.abs(got - expected)))
    ok = got.shape == expected.shape and diff <= TOLERANCE
    print(f"{name}: {how}: output shape {list(got.shape)}, max abs difference to the unsliced model {diff:.3g} "
          f"({'ok' if ok else 'MISMATCH'}, tolerance {TOLERANCE:g})", flush=True)
    return ok
