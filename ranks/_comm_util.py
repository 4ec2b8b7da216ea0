"""Checks and numpy helpers shared by the communicator backends."""

from __future__ import annotations

import numpy as np

from ._comm_base import REDUCE_OPS, SUPPORTED_DTYPES
from ._errors import CommError

# Every dtype a verb accepts, by a stable small code (the wire headers carry the
# code). The first seven are the contract's; the rest move and reduce the same way.
DTYPES: tuple[np.dtype, ...] = SUPPORTED_DTYPES + tuple(
    np.dtype(t) for t in (np.uint8, np.int16, np.uint16, np.uint32, np.uint64)
)
DTYPE_CODE = {dt: i for i, dt in enumerate(DTYPES)}

OP_CODE = {name: i for i, name in enumerate(REDUCE_OPS)}

# Elementwise numpy reduction per op; on bool arrays these are logical or / and.
_BOOL_UFUNC = {"sum": np.logical_or, "max": np.logical_or, "min": np.logical_and, "prod": np.logical_and}
_UFUNC = {"sum": np.add, "max": np.maximum, "min": np.minimum, "prod": np.multiply}


def as_array(array, what: str) -> np.ndarray:
    """``array`` as a C-contiguous, native-byte-order numpy array of a supported dtype."""
    arr = np.asarray(array)
    if arr.dtype not in DTYPE_CODE:
        native = arr.dtype.newbyteorder("=") if arr.dtype.byteorder not in ("=", "|") else arr.dtype
        if native in DTYPE_CODE:
            arr = arr.astype(native)
        else:
            names = ", ".join(str(d) for d in DTYPES)
            raise TypeError(f"{what}: dtype {arr.dtype} is not supported; use one of {names}")
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    return arr


def check_op(op: str) -> None:
    if op not in REDUCE_OPS:
        raise ValueError(f"allreduce op must be one of {REDUCE_OPS}, got {op!r}")


def check_rank(value, size: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < size:
        raise ValueError(f"{what} must be a rank in 0..{size - 1}, got {value!r}")
    return int(value)


def check_tag(tag) -> int:
    if isinstance(tag, bool) or not isinstance(tag, (int, np.integer)) or not 0 <= tag < 2**30:
        raise ValueError(f"tag must be an integer in 0..2**30-1, got {tag!r}")
    return int(tag)


def gather_axis(shape: tuple[int, ...], axis) -> int:
    """The normalised concatenation axis; a 0-d array gathers as if it had shape (1,)."""
    ndim = max(len(shape), 1)
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
        raise ValueError(f"allgather axis {axis!r} is out of range for an array of {len(shape)} dimensions")
    return int(axis) % ndim


def reduce_into(op: str, out: np.ndarray, other: np.ndarray) -> None:
    """``out = out (op) other`` elementwise, in place."""
    table = _BOOL_UFUNC if out.dtype == np.bool_ else _UFUNC
    table[op](out, other, out=out)


def reduce_arrays(op: str, arrays: list[np.ndarray]) -> np.ndarray:
    """Reduce ``arrays`` in list order (rank order), so every rank gets bitwise the same result."""
    table = _BOOL_UFUNC if arrays[0].dtype == np.bool_ else _UFUNC
    ufunc = table[op]
    if len(arrays) == 1:
        return np.array(arrays[0], copy=True)
    out = ufunc(arrays[0], arrays[1])
    for a in arrays[2:]:
        ufunc(out, a, out=out)
    return out


def concat_gathered(pieces: list[np.ndarray], axis: int) -> np.ndarray:
    """Concatenate per-rank pieces along ``axis`` (0-d pieces count as shape (1,))."""
    pieces = [p.reshape(1) if p.ndim == 0 else p for p in pieces]
    first = pieces[0]
    for rank, p in enumerate(pieces):
        if p.ndim != first.ndim or p.shape[:axis] + p.shape[axis + 1 :] != first.shape[:axis] + first.shape[axis + 1 :]:
            raise CommError(
                f"allgather along axis {axis}: rank {rank} sent shape {p.shape} but rank 0 sent {first.shape}; "
                f"shapes may differ only along axis {axis}"
            )
        if p.dtype != first.dtype:
            raise CommError(f"allgather: rank {rank} sent dtype {p.dtype} but rank 0 sent {first.dtype}")
    return np.concatenate(pieces, axis=axis)
