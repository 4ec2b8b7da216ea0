"""Model inputs from files, or ones; model outputs in the seeds' printed format.

What the per-rank program (``python -m ranks``), ``orchestrate predict`` and the
demo share: reading ``.npz``/``.npy``/``.bin`` input files for a model's inputs,
ones for inputs without a file, and the two lines MindSpore Lite's samples print
per output tensor.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ._command_line import read_numpy_file, write_failed
from ._errors import InputError
from ._model import Model
from ._tensor import Tensor

PRINT_VALUES = 50


def read_input_files(files: list[str], tensors: list[Tensor]) -> dict[str, np.ndarray]:
    """Arrays by input name from ``.npz`` (by name), ``.npy`` (the next input) or raw ``.bin`` (the first input)."""
    names = [t.name for t in tensors]
    arrays: dict[str, np.ndarray] = {}
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise InputError(f"input file {path} does not exist")
        if path.suffix == ".npz":
            for key, value in read_numpy_file(path).items():
                if key not in names:
                    raise InputError(f"input file {path} holds {key!r}, which is not an input of the model; inputs are {names}")
                arrays[key] = value
        elif path.suffix == ".npy":
            free = [n for n in names if n not in arrays]
            if not free:
                raise InputError(f"input file {path}: every input already has data")
            arrays[free[0]] = read_numpy_file(path)
        else:
            first = tensors[0]
            raw = np.fromfile(path, dtype=first.dtype.to_numpy())
            try:
                arrays[first.name] = raw.reshape([d if d > 0 else -1 for d in first.shape])
            except ValueError:
                raise InputError(f"input file {path} holds {raw.size} {first.dtype.to_numpy()} values, which do not fit input {first.name!r} of shape {first.shape}") from None
    return arrays


def ones_for(tensor: Tensor, first_dim: int | None = None) -> np.ndarray:
    """Ones shaped like ``tensor``, free dimensions set to 1 (the first to ``first_dim`` when given)."""
    shape = [d if d > 0 else 1 for d in tensor.shape]
    if first_dim is not None and shape:
        shape[0] = first_dim
    return np.ones(shape, dtype=tensor.dtype.to_numpy())


def load_inputs(files: list[str], model: Model) -> list[np.ndarray]:
    """Arrays for the model's inputs, from files or ones (dynamic dimensions set to 1)."""
    tensors = model.get_inputs()
    arrays = read_input_files(files, tensors)
    return [arrays[t.name] if t.name in arrays else ones_for(t) for t in tensors]


def format_output(tensor: Tensor, count: int = PRINT_VALUES) -> str:
    """The seeds' two lines for one output tensor."""
    data = tensor.get_data_to_numpy().reshape(-1)[:count]
    values = " ".join(str(v) for v in data)
    return (
        f"tensor's name is:{tensor.name} data size is:{tensor.data_size} tensor elements num is:{tensor.element_num}\n"
        f"output data is: {values}"
    )


def emit_outputs(outputs: list[Tensor], output_file: Path | None, *, quiet: bool = False) -> None:
    """Print each output in the seeds' format (unless ``quiet``) and save them by name to ``output_file``."""
    if not quiet:
        for tensor in outputs:
            # One write per output: ranks sharing a terminal (PYTHONUNBUFFERED=1 makes print() write
            # the text and its newline apart) would otherwise interleave their lines.
            sys.stdout.write(format_output(tensor) + "\n")
            sys.stdout.flush()
    if output_file is not None:
        try:
            np.savez(output_file, **{t.name: t.get_data_to_numpy() for t in outputs})
        except OSError as exc:
            raise write_failed(output_file, "--output", exc) from None
