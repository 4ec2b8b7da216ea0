"""Checks every verb and dtype of a communicator against numpy; run by every rank.

Used by the multi-process tests: ``python tests/comm_check.py mpi [mpi-arrival|fast]``
under mpirun (``fast``: the mpi backend without arrival check, which needs
equal shapes in allgather), or ``python tests/comm_check.py zmq RANK SIZE TABLE BASE_PORT`` per
rank. Prints ``CHECKED rank R of N: K cases`` and exits 0, or raises.
"""

from __future__ import annotations

import sys

import numpy as np

DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.bool_]
SHAPES = [(), (0,), (7,), (3, 4), (2, 3, 5), (2, 0, 3)]
OPS = ["sum", "max", "min", "prod"]


def data(rank: int, shape, dtype, salt: int = 0) -> np.ndarray:
    rng = np.random.default_rng(1000 * rank + salt)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    # Small integers: sums and products stay exact in every dtype (int8 may wrap, as numpy does).
    return rng.integers(-3, 4, size=shape).astype(dtype)


def expected_reduce(op, arrays):
    out = arrays[0].copy()
    for a in arrays[1:]:
        if out.dtype == np.bool_:
            out = (out | a) if op in ("sum", "max") else (out & a)
        elif op == "sum":
            out = out + a
        elif op == "prod":
            out = out * a
        elif op == "max":
            out = np.maximum(out, a)
        else:
            out = np.minimum(out, a)
    return out


def same(got, want, what):
    assert isinstance(got, np.ndarray), f"{what}: got {type(got).__name__}, not an ndarray"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.array_equal(got, want), f"{what}: values differ\n got {got!r}\nwant {want!r}"


def expect_error(kind, text, fn, what):
    try:
        fn()
    except kind as exc:
        assert text in str(exc), f"{what}: {exc}"
        return
    raise AssertionError(f"{what}: no {kind.__name__} raised")


def check_out(comm) -> int:
    """``out=`` on allreduce and allgather: written in place, returned, and its errors."""
    r, n = comm.rank, comm.size
    cases = 0
    for dtype in DTYPES:
        for shape in ((), (7,), (3, 4)):
            mine = data(r, shape, dtype, salt=21)
            everyone = [data(k, shape, dtype, salt=21) for k in range(n)]
            out = np.full(shape, 1, dtype)
            got = comm.allreduce(mine, op="max", out=out)
            assert got is out, f"allreduce out= {np.dtype(dtype)} {shape}: the result is not out"
            same(out, expected_reduce("max", everyone), f"allreduce out= {np.dtype(dtype)} {shape}")
            inplace = np.array(mine, copy=True)  # data() may give a numpy scalar for shape ()
            assert comm.allreduce(inplace, out=inplace) is inplace
            same(inplace, expected_reduce("sum", everyone), f"allreduce in place {np.dtype(dtype)} {shape}")
            ndim = max(len(shape), 1)
            for axis in range(-ndim, ndim):
                want = np.concatenate([e.reshape(1) if e.ndim == 0 else e for e in everyone], axis=axis)
                out = np.zeros(want.shape, dtype)
                assert comm.allgather(mine, axis=axis, out=out) is out
                same(out, want, f"allgather out= axis {axis} {np.dtype(dtype)} {shape}")
            cases += 3
    x = data(r, (3, 4), np.float32, salt=22)
    expect_error(TypeError, "allreduce on rank %d: out= has dtype float64, the result has dtype float32" % r,
                 lambda: comm.allreduce(x, out=np.empty((3, 4), np.float64)), "allreduce out= dtype")
    expect_error(ValueError, "allreduce on rank %d: out= has shape (4, 3), the result has shape (3, 4)" % r,
                 lambda: comm.allreduce(x, out=np.empty((4, 3), np.float32)), "allreduce out= shape")
    expect_error(ValueError, "out= must be C-contiguous and writable",
                 lambda: comm.allreduce(x, out=np.empty((3, 8), np.float32)[:, ::2]), "allreduce out= strided")
    expect_error(TypeError, "out= must be a numpy array", lambda: comm.allreduce(x, out=[0] * 12), "allreduce out= list")
    expect_error(TypeError, "allgather on rank %d: out= has dtype int32" % r,
                 lambda: comm.allgather(x, out=np.empty((3 * n, 4), np.int32)), "allgather out= dtype")
    expect_error(ValueError, f"allgather on rank {r}: out= has shape (3, {4 * n + 1}), the result has shape (3, {4 * n})",
                 lambda: comm.allgather(x, axis=1, out=np.empty((3, 4 * n + 1), np.float32)), "allgather out= length")
    # After the errors the ranks are still in step.
    same(comm.allreduce(x), expected_reduce("sum", [data(k, (3, 4), np.float32, salt=22) for k in range(n)]), "after errors")
    return cases + 7


def check(comm, uneven: bool = True) -> int:
    r, n = comm.rank, comm.size
    cases = check_out(comm)
    for dtype in DTYPES:
        for shape in SHAPES:
            mine = data(r, shape, dtype)
            everyone = [data(k, shape, dtype) for k in range(n)]
            for op in OPS:
                same(comm.allreduce(mine, op=op), expected_reduce(op, everyone), f"allreduce {op} {np.dtype(dtype)} {shape}")
                cases += 1
            ndim = max(len(shape), 1)
            for axis in range(-ndim, ndim):
                want = np.concatenate([e.reshape(1) if e.ndim == 0 else e for e in everyone], axis=axis)
                same(comm.allgather(mine, axis=axis), want, f"allgather axis {axis} {np.dtype(dtype)} {shape}")
                cases += 1
            for root in range(n):
                got = comm.broadcast(mine if r == root else None, root=root)
                same(got, everyone[root], f"broadcast root {root} {np.dtype(dtype)} {shape}")
                cases += 1
    # Shapes that differ along the gather axis.
    for axis in (0, 1, -1) if uneven else ():
        pieces = []
        for k in range(n):
            shape = [2, 3, 4]
            shape[axis] = k + 1
            pieces.append(data(k, tuple(shape), np.float32, salt=7))
        same(comm.allgather(pieces[r], axis=axis), np.concatenate(pieces, axis=axis), f"uneven allgather axis {axis}")
        cases += 1
    # Non-contiguous input.
    big = data(r, (6, 8), np.float64, salt=3)
    same(
        comm.allreduce(big[:, ::2]),
        expected_reduce("sum", [data(k, (6, 8), np.float64, salt=3)[:, ::2] for k in range(n)]),
        "allreduce of a strided view",
    )
    # Large enough to take every backend's chunked paths (3 MB + change).
    large = [data(k, (777_777,), np.float32, salt=5) for k in range(n)]
    kept = comm.allreduce(large[r])
    doubled = comm.allreduce(large[r] * 2)  # must not reuse the memory of ``kept``, which is still held
    same(kept, expected_reduce("sum", large), "large allreduce")
    same(doubled, expected_reduce("sum", large) * 2, "second large allreduce")
    del kept, doubled
    for _ in range(3):  # results dropped at once: the pool hands the same memory out again
        same(comm.allreduce(large[r]), expected_reduce("sum", large), "large allreduce again")
    same(comm.allgather(large[r]), np.concatenate(large), "large allgather")
    same(comm.broadcast(large[r] if r == n - 1 else None, root=n - 1), large[n - 1], "large broadcast")
    cases += 4
    comm.barrier()
    # Point to point: a ring in both directions, two tags, every dtype.
    right, left = (r + 1) % n, (r - 1) % n
    for dtype in DTYPES:
        for shape in ((), (0,), (3, 5)):
            comm.send(data(r, shape, dtype, salt=11), right, tag=1)
            comm.send(data(r, shape, dtype, salt=12), left, tag=2)
            same(comm.recv(left, tag=1), data(left, shape, dtype, salt=11), f"recv tag 1 {np.dtype(dtype)} {shape}")
            same(comm.recv(right, tag=2), data(right, shape, dtype, salt=12), f"recv tag 2 {np.dtype(dtype)} {shape}")
            cases += 2
    comm.send(large[r], right, tag=3)
    same(comm.recv(left, tag=3), large[left], "large send/recv")
    comm.barrier()
    return cases


def main(argv: list[str]) -> int:
    import faulthandler

    # Should this ever hang, say where, and exit (the tests must leave nothing running).
    faulthandler.dump_traceback_later(100, exit=True)
    backend = argv[0]
    if backend == "mpi":
        from ranks import MpiCommunicator

        mode = argv[1] if len(argv) > 1 else ""
        comm = MpiCommunicator(timeout=60, shared_memory=False if mode == "mpi-arrival" else None,
                               arrival_check=mode != "fast")
        uneven = comm.arrival_check
    else:
        from ranks import RankTable, ZmqCommunicator

        rank, size, table, port = int(argv[1]), int(argv[2]), argv[3], int(argv[4])
        shm = {"shm": True, "tcp": False}.get(argv[5] if len(argv) > 5 else "auto")
        comm = ZmqCommunicator(rank, RankTable.load(table), base_port=port, timeout=60, shared_memory=shm)
        assert comm.size == size
        uneven = True
    with comm:
        cases = check(comm, uneven)
        print(f"CHECKED rank {comm.rank} of {comm.size}: {cases} cases, backend {comm.backend}"
              + (f", path {comm.path}" if hasattr(comm, "path") else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
