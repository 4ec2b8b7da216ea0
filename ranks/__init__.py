"""The inside of one process: Context, Model and Tensor on ONNX Runtime, communicators, rank tables."""

from ._comm_base import Communicator
from ._comm_mpi import MpiCommunicator
from ._comm_single import SingleCommunicator
from ._comm_zmq import ZmqCommunicator
from ._config_file import RankConfig, load_config
from ._context import AscendDeviceInfo, Context, CPUDeviceInfo, GPUDeviceInfo, ParallelConfig
from ._env import all_variables as environment_variables
from ._errors import (
    CommError,
    CommTimeoutError,
    ConfigError,
    ConfigTypeError,
    InputError,
    InputTypeError,
    ModelError,
    ModelNotFoundError,
    OrchestratorError,
    PeerLostError,
    PortInUseError,
    ProviderError,
    RankTableError,
    ShardError,
)
from ._model import Model, ModelType
from ._ports import free_base_port
from ._rank_program import main as rank_main
from ._rank_table import RankDevice, RankTable, generate_rank_table
from ._remote_errors import RemoteError, RemoteTraceback
from ._shard_files import resolve_shard_path
from ._staged_runner import StagedRunner
from ._tensor import DataType, Format, Tensor, TensorMeta
from ._world import Identity, create_communicator, export_torchrun_env, resolve_identity
