"""The communicator contract: MPI's verbs on numpy arrays.

Every backend (``single``, ``mpi``, ``zmq``) implements this class. All
blocking verbs are bounded by ``self.timeout`` seconds and raise
``CommTimeoutError`` naming the operation, this rank and the peer that did
not answer; a peer that exits mid-operation raises ``PeerLostError``.
"""

from __future__ import annotations

import abc
import traceback

import numpy as np

REDUCE_OPS = ("sum", "max", "min", "prod")

SUPPORTED_DTYPES = tuple(
    np.dtype(t) for t in (np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.bool_)
)


class Communicator(abc.ABC):
    """A group of ``size`` ranks; this process is ``rank``."""

    backend: str = ""
    # True when abort() ends this process (MPI_Abort) instead of returning.
    abort_ends_process: bool = False

    def __init__(self, rank: int, size: int, timeout: float):
        self.rank = rank
        self.size = size
        self.timeout = timeout

    # -- collectives ---------------------------------------------------------
    @abc.abstractmethod
    def allreduce(self, array: np.ndarray, op: str = "sum", *, out: np.ndarray | None = None) -> np.ndarray:
        """Element-wise reduction of ``array`` over all ranks; every rank gets the result.

        ``out``: a writable C-contiguous array of ``array``'s dtype and shape
        (it may be ``array`` itself) that receives the result and is returned,
        like MPI's receive buffer: no fresh allocation per call. A wrong dtype
        raises TypeError, a wrong shape ValueError, before any data moves.
        """

    @abc.abstractmethod
    def allgather(self, array: np.ndarray, axis: int = 0, *, out: np.ndarray | None = None) -> np.ndarray:
        """Concatenation of every rank's ``array`` along ``axis``, in rank order.

        ``out``: a writable C-contiguous array of the result's dtype and shape
        that receives it and is returned (TypeError/ValueError when it does
        not fit; when only its length along ``axis`` is wrong the rank still
        takes part, so its peers do not stall, and raises afterwards).
        """

    @abc.abstractmethod
    def broadcast(self, array: np.ndarray | None, root: int = 0) -> np.ndarray:
        """``root``'s array on every rank (others may pass None)."""

    @abc.abstractmethod
    def barrier(self) -> None:
        """Return once every rank has entered the barrier."""

    # -- point to point ------------------------------------------------------
    @abc.abstractmethod
    def send(self, array: np.ndarray, dest: int, tag: int = 0) -> None:
        """Send ``array`` to rank ``dest``."""

    @abc.abstractmethod
    def recv(self, source: int, tag: int = 0) -> np.ndarray:
        """Receive the array rank ``source`` sent with ``tag``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release sockets and memory; calling it twice is harmless."""

    def abort(self, reason: str) -> None:
        """End this rank's part in the group at once, so its peers fail now instead of at their timeout.

        The default closes the communicator (backends whose peers notice a close);
        the mpi backend aborts the whole MPI job, as MPI_Abort does.
        """
        self.close()

    # MPI spelling, so users of mpi4py find the verb they know.
    def bcast(self, array: np.ndarray | None, root: int = 0) -> np.ndarray:
        return self.broadcast(array, root)

    def __enter__(self) -> "Communicator":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and issubclass(exc_type, Exception) and self.size > 1:
            # The peers may be waiting in a collective for this rank. A plain close would
            # leave them to their timeout (and MPI's exit hook skips closed communicators).
            if self.abort_ends_process:
                traceback.print_exception(exc_type, exc, tb)  # the abort below leaves no other chance
            self.abort(
                f"rank {self.rank} of {self.size}: {exc_type.__name__} inside the communicator's with-block; "
                f"{'aborting the MPI job' if self.abort_ends_process else 'leaving the group'} so the other ranks do not wait"
            )
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} backend={self.backend} rank={self.rank} size={self.size}>"
