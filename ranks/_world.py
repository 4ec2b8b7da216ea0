"""Who this process is (rank, size, device) and which communicator it gets.

``resolve_identity`` reads, in order: explicit values; MPI when started by
mpirun/mpiexec (their environment says so, then mpi4py's COMM_WORLD);
torchrun-style ``RANK/WORLD_SIZE/LOCAL_RANK``; else a world of one.

``create_communicator`` picks the backend: an explicit one (argument, then
``ORCH_COMM_BACKEND``), else ``mpi`` when started by mpirun, else ``zmq``
when a rank table is given, else ``single``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import _env
from ._comm_base import Communicator
from ._errors import ConfigError
from ._log import get_logger

log = get_logger("comm")

BACKENDS = ("mpi", "zmq", "single")


@dataclass(frozen=True)
class Identity:
    """This process's place in the job; ``source`` says where it was read from."""

    rank: int
    size: int
    local_rank: int
    device_id: int | None
    source: str  # "explicit", "mpi", "torchrun" or "single"


def launched_by_mpi() -> bool:
    """True when mpirun (Open MPI) or mpiexec (MPICH hydra, Intel MPI) started this process."""
    return _env.OMPI_COMM_WORLD_SIZE.is_set() or _env.PMI_SIZE.is_set() or _env.PMI_RANK.is_set()


def _int_var(var) -> int | None:
    try:
        return var.get_int()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def resolve_identity(
    rank_id: int | None = None, world_size: int | None = None, device_id: int | None = None, *, rank_table=None
) -> Identity:
    """This process's rank, world size, local rank and device id.

    ``device_id`` defaults to the rank's device in ``rank_table`` (a
    ``RankTable`` or a path) when one is given, else to the local rank (one
    device per rank on a host), as the seeds' shell samples number them.
    With an explicit ``rank_id`` the world size comes from ``world_size``,
    the launcher or the rank table. Raises ``ConfigError`` for a rank outside
    ``0..world_size-1`` or unreadable launcher variables.
    """
    table = None
    if rank_table is not None:
        from ._rank_table import RankTable

        table = rank_table if isinstance(rank_table, RankTable) else RankTable.load(rank_table)
        if world_size is None and rank_id is not None:
            world_size = table.world_size
    if rank_id is not None:
        if world_size is None:
            # A rank without a size: take the size from the launcher if there is one.
            if launched_by_mpi():
                world_size = _mpi_identity().size
            elif _env.WORLD_SIZE.is_set():
                world_size = _int_var(_env.WORLD_SIZE)
        identity = Identity(
            rank=int(rank_id),
            size=int(world_size) if world_size is not None else int(rank_id) + 1,
            local_rank=int(device_id) if device_id is not None else _local_rank_from_env(default=int(rank_id)),
            device_id=None,
            source="explicit",
        )
    elif launched_by_mpi():
        identity = _mpi_identity()
        if world_size is not None and world_size != identity.size:
            raise ConfigError(f"world size {world_size} was given, but mpirun started {identity.size} processes")
    elif _env.RANK.is_set():
        rank = _int_var(_env.RANK)
        size = _int_var(_env.WORLD_SIZE) if _env.WORLD_SIZE.is_set() else world_size
        if size is None:
            raise ConfigError("RANK is set but WORLD_SIZE is not; set both (torchrun sets both)")
        local = _int_var(_env.LOCAL_RANK) if _env.LOCAL_RANK.is_set() else rank
        identity = Identity(rank, size, local, None, "torchrun")
    else:
        identity = Identity(0, 1 if world_size is None else int(world_size), 0, None, "single")
    if identity.size < 1 or not 0 <= identity.rank < identity.size:
        raise ConfigError(f"rank {identity.rank} is outside 0..{identity.size - 1} (world size {identity.size})")
    if table is not None and identity.source == "explicit" and identity.rank < table.world_size:
        mine = table.device(identity.rank)
        local = [d.rank_id for d in table.devices_on_server(mine.server_id)].index(identity.rank)
        identity = Identity(identity.rank, identity.size, local, None, identity.source)
        if device_id is None:
            device_id = mine.device_id
        elif int(device_id) != mine.device_id:
            # A device the table gives another rank (or none) would make two ranks claim one device, or a
            # rank that its peers look for elsewhere and wait out their timeout for.
            raise ConfigError(f"device id {device_id} was given for rank {identity.rank}, but rank table "
                              f"{table.source} gives rank {identity.rank} device {mine.device_id} on server "
                              f"{mine.server_id}; pass --device_id {mine.device_id} (or leave it out)")
    return Identity(
        identity.rank,
        identity.size,
        identity.local_rank,
        int(device_id) if device_id is not None else identity.local_rank,
        identity.source,
    )


def _local_rank_from_env(default: int) -> int:
    for var in (_env.OMPI_COMM_WORLD_LOCAL_RANK, _env.LOCAL_RANK):
        if var.is_set():
            return _int_var(var)
    return default


def _mpi_identity() -> Identity:
    if _env.OMPI_COMM_WORLD_RANK.is_set() and _env.OMPI_COMM_WORLD_SIZE.is_set():
        # Open MPI says it all in the environment; no need to initialise MPI yet.
        rank = _int_var(_env.OMPI_COMM_WORLD_RANK)
        size = _int_var(_env.OMPI_COMM_WORLD_SIZE)
        local = _int_var(_env.OMPI_COMM_WORLD_LOCAL_RANK) if _env.OMPI_COMM_WORLD_LOCAL_RANK.is_set() else rank
        return Identity(rank, size, local, None, "mpi")
    if _env.PMI_RANK.is_set() and _env.PMI_SIZE.is_set() and _env.MPI_LOCALRANKID.is_set():
        # MPICH's hydra says it all too. (The fallback below splits COMM_WORLD, a collective: a
        # process that asks alone, say to print context.gpu.rank_id on rank 0, would wait for the others.)
        rank, size, local = (_int_var(v) for v in (_env.PMI_RANK, _env.PMI_SIZE, _env.MPI_LOCALRANKID))
        return Identity(rank, size, local, None, "mpi")
    from ._comm_mpi import _mpi

    MPI = _mpi()  # initialised within ORCH_TIMEOUT, or CommTimeoutError naming the ranks that never came
    world = MPI.COMM_WORLD
    local = world.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return Identity(world.Get_rank(), world.Get_size(), local.Get_rank(), None, "mpi")
    finally:
        local.Free()


def export_torchrun_env(identity: Identity) -> None:
    """Set ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` for libraries that read them."""
    os.environ[_env.RANK.name] = str(identity.rank)
    os.environ[_env.WORLD_SIZE.name] = str(identity.size)
    os.environ[_env.LOCAL_RANK.name] = str(identity.local_rank)


def choose_backend(backend: str | None = None, rank_table=None) -> str:
    """The backend ``create_communicator`` would use for these arguments."""
    chosen = backend or _env.COMM_BACKEND.get()
    if chosen:
        chosen = chosen.strip().lower()
        if chosen not in BACKENDS:
            source = "backend" if backend else _env.COMM_BACKEND.name
            raise ConfigError(f"{source}={chosen!r} is not a communicator backend; use one of {', '.join(BACKENDS)}")
        return chosen
    if launched_by_mpi():
        return "mpi"
    if rank_table is not None:
        return "zmq"
    return "single"


def _refuse_a_silent_world_of_one(rank: int | None, size: int | None) -> None:
    """A process told it is one of several ranks must not quietly run alone."""
    if size is not None and size > 1:
        raise ConfigError(f"size {size} was asked for, but nothing says where the peers are: start the ranks with mpirun, "
                          f"or give a rank table (rank_table=, config_file= with [ascend_context] rank_table_file, or RANK_TABLE_FILE)")
    if _env.WORLD_SIZE.is_set() and _int_var(_env.WORLD_SIZE) > 1:
        rank_text = f"RANK={_env.RANK.get()} and " if _env.RANK.is_set() else ""
        raise ConfigError(
            f"{rank_text}WORLD_SIZE={_env.WORLD_SIZE.get()} say this process is one of several ranks, but nothing says where "
            f"its peers are: give a rank table (rank_table=, config_file= with [ascend_context] rank_table_file, or "
            f"RANK_TABLE_FILE), start the ranks with mpirun, or pass backend='single' to run alone"
        )


def create_communicator(
    backend: str | None = None,
    *,
    rank: int | None = None,
    size: int | None = None,
    rank_table=None,
    base_port: int | None = None,
    timeout: float | None = None,
    shared_memory: bool | None = None,
    mpi_arrival_check: bool | None = None,
    config_file: str | os.PathLike | None = None,
) -> Communicator:
    """A communicator for this process.

    ``config_file``: a config_file.ini whose ``[comm] backend/timeout/base_port``
    and ``[ascend_context] rank_table_file`` fill in the arguments not given.
    ``rank_table`` is a ``RankTable`` or the path of one (needed by ``zmq``);
    ``rank``/``size`` default to ``resolve_identity()``; ``base_port``
    defaults to ``ORCH_BASE_PORT`` (29500); ``timeout`` to ``ORCH_TIMEOUT``
    (120 s). ``shared_memory`` (zmq only) forces the same-host fast path on
    or off; by default it is used when every rank is on one server.
    ``mpi_arrival_check`` (mpi only): False is the fast mode (no arrival
    check; a timeout aborts the job instead of raising), None reads
    ``[comm] mpi_arrival_check`` then ``ORCH_MPI_ARRIVAL_CHECK`` (default true).
    """
    from ._env import default_timeout

    if config_file:
        from ._config_file import load_config

        config = load_config(config_file)
        backend = backend or config.comm.backend
        timeout = timeout if timeout is not None else config.comm.timeout
        base_port = base_port if base_port is not None else config.comm.base_port
        rank_table = rank_table if rank_table is not None else config.rank_table_file
        if mpi_arrival_check is None:
            mpi_arrival_check = config.comm.mpi_arrival_check
    timeout = default_timeout() if timeout is None else float(timeout)
    if timeout <= 0:
        raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if rank_table is None and _env.RANK_TABLE_FILE.get():
        rank_table = _env.RANK_TABLE_FILE.get()
    chosen = choose_backend(backend, rank_table)
    if chosen == "single" and backend is None and not _env.COMM_BACKEND.get():
        _refuse_a_silent_world_of_one(rank, size)
    if chosen == "single":
        from ._comm_single import SingleCommunicator

        if size not in (None, 1):
            raise ConfigError(f"the single backend is a world of one, but size={size} was asked for")
        return SingleCommunicator(timeout=timeout)
    if chosen == "mpi":
        from ._comm_mpi import MpiCommunicator

        comm = MpiCommunicator(timeout=timeout, arrival_check=mpi_arrival_check)
        if size is not None and size != comm.size:
            raise ConfigError(f"size {size} was asked for, but MPI's COMM_WORLD has {comm.size} ranks")
        if rank is not None and rank != comm.rank:
            raise ConfigError(f"rank {rank} was asked for, but this process is rank {comm.rank} of MPI's COMM_WORLD")
        log.info("joined rank %d of %d over mpi", comm.rank, comm.size)
        return comm
    from ._comm_zmq import ZmqCommunicator
    from ._rank_table import RankTable

    if rank_table is None:
        raise ConfigError("the zmq backend needs a rank table (config_file [ascend_context] rank_table_file=, or rank_table=)")
    table = rank_table if isinstance(rank_table, RankTable) else RankTable.load(rank_table)
    if rank is None and (launched_by_mpi() or _env.RANK.is_set()):
        rank = resolve_identity().rank
    if rank is None:
        raise ConfigError("the zmq backend needs this process's rank (--rank_id, RANK, or rank=)")
    if size is not None and size != table.world_size:
        raise ConfigError(f"size {size} was asked for, but rank table {table.source} lists {table.world_size} ranks")
    if base_port is None:
        base_port = _env.BASE_PORT.get_int()
    comm = ZmqCommunicator(rank, table, base_port=base_port, timeout=timeout, shared_memory=shared_memory)
    log.info("joined rank %d of %d over zmq (rank table %s, base port %d)", comm.rank, comm.size, table.source, base_port)
    return comm
