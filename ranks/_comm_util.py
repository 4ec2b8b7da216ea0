"""Checks and numpy helpers shared by the communicator backends."""

from __future__ import annotations

import sys

import numpy as np

from ._comm_base import REDUCE_OPS, SUPPORTED_DTYPES
from ._errors import CommError

# Every dtype a verb accepts, by a stable small code (the wire headers carry the
# code). The first seven are the contract's; the rest move and reduce the same way.
DTYPES: tuple[np.dtype, ...] = SUPPORTED_DTYPES + tuple(
    np.dtype(t) for t in (np.uint8, np.int16, np.uint16, np.uint32, np.uint64)
)
DTYPE_CODE = {dt: i for i, dt in enumerate(DTYPES)}
CHAR_CODE = {dt.char: i for i, dt in enumerate(DTYPES)}  # dtype.char lookups are cheaper than dtype hashing

OP_CODE = {name: i for i, name in enumerate(REDUCE_OPS)}

# Elementwise numpy reduction per op; on bool arrays these are logical or / and.
_BOOL_UFUNC = {"sum": np.logical_or, "max": np.logical_or, "min": np.logical_and, "prod": np.logical_and}
_UFUNC = {"sum": np.add, "max": np.maximum, "min": np.minimum, "prod": np.multiply}


_FOREIGN = ">" if np.little_endian else "<"


def as_array(array, verb: str, rank: int) -> np.ndarray:
    """``array`` as a C-contiguous, native-byte-order numpy array of a supported dtype."""
    arr = np.asarray(array)
    dtype = arr.dtype
    if dtype.char not in CHAR_CODE or dtype.byteorder == _FOREIGN:
        what = f"{verb} on rank {rank}"
        native = arr.dtype.newbyteorder("=") if arr.dtype.byteorder not in ("=", "|") else arr.dtype
        if native in DTYPE_CODE:
            arr = arr.astype(native)
        else:
            names = ", ".join(str(d) for d in DTYPES)
            raise TypeError(f"{what}: dtype {arr.dtype} is not supported; use one of {names}")
    if not arr.flags.c_contiguous:
        arr = np.asarray(arr, order="C")
    return arr


def check_out(out, shape: tuple[int, ...], dtype: np.dtype, verb: str, rank: int) -> None:
    """``out=`` of a verb: a writable, C-contiguous ndarray of exactly ``dtype`` and ``shape``."""
    if type(out) is np.ndarray and out.dtype == dtype and out.shape == shape and out.flags.c_contiguous and out.flags.writeable:
        return
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{verb} on rank {rank}: out= must be a numpy array of dtype {dtype} and shape {shape}, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"{verb} on rank {rank}: out= has dtype {out.dtype}, the result has dtype {dtype}")
    if out.shape != shape:
        raise ValueError(f"{verb} on rank {rank}: out= has shape {out.shape}, the result has shape {shape}")
    raise ValueError(f"{verb} on rank {rank}: out= must be C-contiguous and writable (a receive buffer MPI writes into)")


def gathered_shape(shape: tuple[int, ...], axis: int, size: int) -> tuple[int, ...]:
    """Shape of an allgather of ``size`` equal ``shape`` pieces along ``axis`` (0-d counts as (1,))."""
    if not shape:
        return (size,)
    return shape[:axis] + (shape[axis] * size,) + shape[axis + 1 :]


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
    out = np.empty_like(arrays[0])  # an explicit output keeps 0-d results arrays, not scalars
    ufunc(arrays[0], arrays[1], out=out)
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


class ResultPool:
    """Reuses the memory of large results once the caller has dropped every array that views it.

    A fresh multi-megabyte ``np.empty`` costs a page fault per 4 KB page on
    first touch (about 20 ms for 16 MB here), more than the collective itself.
    The pool keeps a few such buffers; a buffer is handed out again only when
    nothing but the pool refers to it (every array made from it, and every
    view of those, keeps a reference), so a result the caller still holds is
    never overwritten. Sized by ``ORCH_COMM_POOL_MB``.
    """

    MIN_BYTES = 1 << 20
    MAX_BUFFERS = 4

    def __init__(self, max_bytes: int | None = None):
        if max_bytes is None:
            from ._env import COMM_POOL_MB

            max_bytes = int((COMM_POOL_MB.get_float() or 0) * (1 << 20))
        self.max_bytes = max_bytes
        self._buffers: list[np.ndarray] = []

    def empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        if nbytes < self.MIN_BYTES or nbytes > self.max_bytes:
            return np.empty(shape, dtype)
        buffers = self._buffers
        for buf in buffers:
            # 3 references: the list, the loop variable, getrefcount's argument.
            if buf.nbytes == nbytes and sys.getrefcount(buf) == 3:
                return buf.view(dtype).reshape(shape)
        self._make_room(nbytes)
        buf = np.empty(nbytes, np.uint8)
        if len(buffers) < self.MAX_BUFFERS and self._held() + nbytes <= self.max_bytes:
            buffers.append(buf)
        return buf.view(dtype).reshape(shape)

    def _held(self) -> int:
        return sum(b.nbytes for b in self._buffers)

    def _make_room(self, nbytes: int) -> None:
        buffers = self._buffers
        i = 0
        while i < len(buffers) and (len(buffers) >= self.MAX_BUFFERS or self._held() + nbytes > self.max_bytes):
            if sys.getrefcount(buffers[i]) == 2:  # the list and the argument: free
                del buffers[i]
            else:
                i += 1

    def clear(self) -> None:
        self._buffers.clear()
