"""Checks every verb and dtype of a communicator against numpy; run by every rank.

Used by the multi-process tests: ``python tests/comm_check.py mpi`` under
mpirun, or ``python tests/comm_check.py zmq RANK SIZE TABLE BASE_PORT`` per
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


def check(comm) -> int:
    r, n = comm.rank, comm.size
    cases = 0
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
    for axis in (0, 1, -1):
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
    same(comm.allreduce(large[r]), expected_reduce("sum", large), "large allreduce")
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
    backend = argv[0]
    if backend == "mpi":
        from ranks import MpiCommunicator

        comm = MpiCommunicator(timeout=60)
    else:
        from ranks import RankTable, ZmqCommunicator

        rank, size, table, port = int(argv[1]), int(argv[2]), argv[3], int(argv[4])
        shm = argv[5] != "tcp" if len(argv) > 5 else True
        comm = ZmqCommunicator(rank, RankTable.load(table), base_port=port, timeout=60, shared_memory=shm)
        assert comm.size == size
    with comm:
        cases = check(comm)
        print(f"CHECKED rank {comm.rank} of {comm.size}: {cases} cases, backend {comm.backend}"
              + (f", path {comm.path}" if hasattr(comm, "path") else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
