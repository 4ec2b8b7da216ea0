"""Every environment variable the project reads, in one place.

Our own variables carry the ``ORCH_`` prefix. The others are read because
launchers we interoperate with set them (mpirun, torchrun) and are listed here
so that a reader can see the whole surface at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str | None
    help: str

    def get(self) -> str | None:
        value = os.environ.get(self.name)
        return self.default if value in (None, "") else value

    def is_set(self) -> bool:
        return os.environ.get(self.name, "") != ""

    def get_float(self) -> float | None:
        value = self.get()
        if value is None:
            return None
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"environment variable {self.name}={value!r} is not a number") from None

    def get_int(self) -> int | None:
        value = self.get()
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"environment variable {self.name}={value!r} is not an integer") from None


_ALL: list[EnvVar] = []


def _var(name: str, default: str | None, help: str) -> EnvVar:
    var = EnvVar(name, default, help)
    _ALL.append(var)
    return var


# --- our own ---------------------------------------------------------------
TIMEOUT = _var("ORCH_TIMEOUT", "120", "seconds any blocking wait (collective, peer, worker reply) may take before it fails")
BASE_PORT = _var("ORCH_BASE_PORT", "29500", "first TCP port of the zmq communicator; rank r listens on base + r")
COMM_POOL_MB = _var(
    "ORCH_COMM_POOL_MB", "512",
    "megabytes of large collective results a communicator may keep for reuse once the caller dropped them (0: off)",
)
MPI_ARRIVAL_CHECK = _var(
    "ORCH_MPI_ARRIVAL_CHECK", "true",
    "mpi backend: check that every rank arrived at a collective before moving data (true: a catchable "
    "CommTimeoutError and mismatch detection; false: raw MPI speed, a timeout aborts the job)",
)
SHM_MODE = _var(
    "ORCH_SHM_MODE", "auto",
    "how shared-memory segments are made: memfd (peers open /proc/<owner pid>/fd/<fd>; nothing in /dev/shm, nothing "
    "can leak), named (/dev/shm/orch_*), or auto (memfd where peers can open it, else named)",
)
MERGED_DECODE_PREPACKING = _var(
    "ORCH_MERGED_DECODE_PREPACKING", "true",
    "a rank's shard of a merged decoder (an If on use_cache_branch): true keeps ONNX Runtime's weight prepacking in "
    "the with-past (decode) branch (decode steps as fast, memory as much as the with-past decoder's shard alone); "
    "false runs both branches on the one shared copy of the weights with prepacking off (least memory, slower "
    "steps at batch > 1)",
)
COMM_BACKEND = _var("ORCH_COMM_BACKEND", None, "force a communicator backend: mpi, zmq or single")
LOG_LEVEL = _var("ORCH_LOG_LEVEL", "WARNING", "logging level of the orchestrator's own loggers")
STOP_TIMEOUT = _var("ORCH_STOP_TIMEOUT", "10", "seconds a launcher waits after SIGTERM before it SIGKILLs the ranks it is stopping")
LOG_TAIL_LINES = _var("ORCH_LOG_TAIL_LINES", "20", "how many last lines of a failed rank's stderr a launcher's failure report quotes")
MPIRUN = _var("ORCH_MPIRUN", None, "the mpirun or mpiexec a launcher runs (default: next to the Python interpreter, then on PATH)")
DEMO_DIR = _var(
    "ORCH_DEMO_DIR", None,
    "where examples/demo.py writes its sample models, shards and rank tables (default: a temporary directory, "
    "removed at the end; --workdir wins)",
)
MINDIR_CACHE = _var(
    "ORCH_MINDIR_CACHE", os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "orchestrator", "mindir"),
    "where ONNX conversions of MINDIR files are cached when the MINDIR file's own folder cannot be written "
    "(otherwise: .orchestrator-cache/ beside the file)",
)
MINDIR_TIMEOUT = _var("ORCH_MINDIR_TIMEOUT", "600", "seconds one conversion of a MINDIR file by MindSpore may take before it is stopped")

# --- set by other launchers; read, never required ----------------------------
RANK_TABLE_FILE = _var(
    "RANK_TABLE_FILE", None,
    "HCCL's variable for the rank table (as Ascend users export it); create_communicator() reads it when given no "
    "table, and the rank-table launcher exports it to the ranks it starts",
)
RANK = _var("RANK", None, "torchrun-style global rank; exported to every rank we start")
WORLD_SIZE = _var("WORLD_SIZE", None, "torchrun-style world size; exported to every rank we start")
LOCAL_RANK = _var("LOCAL_RANK", None, "torchrun-style rank on this host; exported to every rank we start")
OMPI_COMM_WORLD_RANK = _var("OMPI_COMM_WORLD_RANK", None, "set by Open MPI's mpirun: tells a process it runs under MPI")
OMPI_COMM_WORLD_SIZE = _var("OMPI_COMM_WORLD_SIZE", None, "set by Open MPI's mpirun")
OMPI_COMM_WORLD_LOCAL_RANK = _var("OMPI_COMM_WORLD_LOCAL_RANK", None, "set by Open MPI's mpirun")
PMI_RANK = _var("PMI_RANK", None, "set by MPICH's mpiexec (hydra): tells a process it runs under MPI")
PMI_SIZE = _var("PMI_SIZE", None, "set by MPICH's mpiexec (hydra)")
MPI_LOCALRANKID = _var("MPI_LOCALRANKID", None, "set by MPICH's mpiexec (hydra): the rank on this host")
PRTE_TMPDIR_BASE = _var(
    "PRTE_MCA_prte_tmpdir_base", None,
    "Open MPI 5's session directory base; the mpirun launcher sets it to a per-launch directory of its own on a "
    "single host (a killed mpirun leaves $TMPDIR/ompi.PID, and a later mpirun given that pid cannot start); "
    "a value you export wins",
)
OMPI_BTL = _var(
    "OMPI_MCA_btl", None,
    "Open MPI's transports; the mpi communicator sets ^sm while an MPI singleton (no mpirun) initialises, whose "
    "shared-memory file nothing would remove; a value you export wins",
)
OMPI_BTL_SM_DIR = _var("OMPI_MCA_btl_sm_backing_directory", None, "Open MPI's shared-memory backing directory; set by the sharded model's mpi backend")
OMPI_OSC_SM_DIR = _var("OMPI_MCA_osc_sm_backing_directory", None, "Open MPI's one-sided shared-memory backing directory; set by the sharded model's mpi backend")
PMIX_RANK = _var("PMIX_RANK", None, "set by PMIx-based launchers (Open MPI 5's prterun, Slurm): the rank")
PMIX_NAMESPACE = _var(
    "PMIX_NAMESPACE", None,
    "set by PMIx-based launchers (Open MPI 5's prterun): the job; the mpi communicator finds the ranks of its own job "
    "by it when MPI_Init waits for a rank that never came",
)
PYTHONUNBUFFERED = _var("PYTHONUNBUFFERED", None, "set to 1 by the launchers for the ranks they start, so printed lines arrive at once")
PYTHONPATH = _var("PYTHONPATH", None, "read by the supervisor when it starts a module of a checkout that is not installed: the checkout goes first on the child's PYTHONPATH")
GRPC_ENABLE_FORK_SUPPORT = _var(
    "GRPC_ENABLE_FORK_SUPPORT", "false",
    "gRPC's fork handlers; the serving front sets false before gRPC starts (grpcio >= 1.81 with them on can crash a "
    "child the supervisor forks, before its exec: grpc/grpc#43055); a value you export wins",
)
PYTHONFAULTHANDLER = _var("PYTHONFAULTHANDLER", None, "set to 1 by the launchers for the ranks they start, so a segfault prints the Python stack")

# --- read by the shell entry points (launchers/run_ranks.sh, launchers/run_mpi.sh) only ---------
SH_PYTHON = _var("PYTHON", "python3", "run_ranks.sh / run_mpi.sh: the Python that reads the rank table and runs each rank's watcher")
SH_STOP_TIMEOUT = _var("STOP_TIMEOUT", None, "run_ranks.sh / run_mpi.sh: seconds between SIGTERM and SIGKILL when stopping ranks (default: ORCH_STOP_TIMEOUT)")
SH_SERVER_ID = _var("SERVER_ID", None, "run_ranks.sh: this host's server_id in the rank table when its names and addresses do not match")
SH_MPIRUN = _var("MPIRUN", None, "run_mpi.sh: the mpirun or mpiexec to run (default: next to $PYTHON, then on PATH)")
SH_HOSTS = _var("HOSTS", None, "run_mpi.sh: mpirun's -H host list")
SH_HOSTFILE = _var("HOSTFILE", None, "run_mpi.sh: mpirun's --hostfile")
SH_MPIRUN_ARGS = _var("MPIRUN_ARGS", None, "run_mpi.sh: more options for mpirun, split on spaces")


def all_variables() -> list[EnvVar]:
    """Every variable the project reads, in declaration order."""
    return list(_ALL)


def stop_timeout() -> float:
    """Seconds between SIGTERM and SIGKILL when a launcher stops its ranks, from ORCH_STOP_TIMEOUT."""
    value = STOP_TIMEOUT.get_float()
    if value is None or value < 0:
        raise ValueError(f"ORCH_STOP_TIMEOUT must be a number of seconds >= 0, got {STOP_TIMEOUT.get()!r}")
    return value


TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")


def parse_bool(value: str) -> bool | None:
    """true/1/yes -> True, false/0/no -> False (any case), anything else -> None."""
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    return None


def mpi_arrival_check() -> bool:
    """Whether the mpi backend runs its arrival check, from ORCH_MPI_ARRIVAL_CHECK (default true)."""
    return _flag(MPI_ARRIVAL_CHECK)


def merged_decode_prepacking() -> bool:
    """Whether a merged decoder's decode branch keeps prepacking, from ORCH_MERGED_DECODE_PREPACKING (default true)."""
    return _flag(MERGED_DECODE_PREPACKING)


def _flag(variable) -> bool:
    value = variable.get()
    flag = parse_bool(value)
    if flag is None:
        raise ValueError(f"{variable.name} must be one of true/false/1/0/yes/no, got {value!r}")
    return flag


# The longest timeout taken (about 116 days): past it, deadlines overflow time_t and threading's waits.
MAX_TIMEOUT_SECONDS = 1e7


def default_timeout() -> float:
    """The timeout in seconds for any blocking wait, from ORCH_TIMEOUT."""
    value = TIMEOUT.get_float()
    if value is None or not 0 < value <= MAX_TIMEOUT_SECONDS:  # NaN and inf fail too
        raise ValueError(f"ORCH_TIMEOUT must be a positive number of seconds, at most {MAX_TIMEOUT_SECONDS:g}, "
                         f"got {TIMEOUT.get()!r}")
    return value


def check_timeout(value, what: str) -> float:
    """``value`` as seconds, or ConfigTypeError / ConfigError naming ``what`` ("predict: timeout"): a number
    > 0, finite and at most MAX_TIMEOUT_SECONDS."""
    from ._errors import ConfigError, ConfigTypeError

    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise ConfigTypeError(f"{what} must be a number of seconds > 0, got {value!r}")
    if not 0 < float(value) <= MAX_TIMEOUT_SECONDS:  # NaN and inf fail too
        raise ConfigError(f"{what} must be a number of seconds > 0, at most {MAX_TIMEOUT_SECONDS:g}, got {value!r}")
    return float(value)
