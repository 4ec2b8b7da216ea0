"""The master side: the MindSpore Lite-style API, batch-split master, worker pool (ModelParallelRunner), slicing, serving.

``import orchestrator as mslite`` gives a MindSpore Lite script what it uses
(Context, Model, ModelType, Tensor, DataType, Format) on ONNX Runtime, and
every error type of the project (each package owns its own; all are here).
"""

# The single-process API (package ranks) is part of ours: the names MindSpore Lite scripts use.
from ranks import (
    AscendDeviceInfo,
    CommError,
    Communicator,
    CommTimeoutError,
    ConfigError,
    ConfigTypeError,
    Context,
    CPUDeviceInfo,
    DataType,
    Format,
    GPUDeviceInfo,
    Identity,
    InputError,
    InputTypeError,
    Model,
    ModelError,
    ModelNotFoundError,
    ModelType,
    MpiCommunicator,
    OrchestratorError,
    ParallelConfig,
    PeerLostError,
    PortInUseError,
    ProviderError,
    RankConfig,
    RankDevice,
    RankTable,
    RankTableError,
    RemoteError,
    RemoteTraceback,
    ShardError,
    SingleCommunicator,
    StagedRunner,
    Tensor,
    TensorMeta,
    ZmqCommunicator,
    create_communicator,
    environment_variables,
    export_torchrun_env,
    free_base_port,
    generate_rank_table,
    load_config,
    rank_main,
    resolve_identity,
    resolve_shard_path,
)
from launchers import LaunchError, LaunchInterruptedError, LaunchTimeoutError, RankFailedError

from ._errors import PoolClosedError, PoolQueueFullError, WorkerError, WorkerLostError, WorkerTimeoutError
from ._generate import GenerateResult, generate, generate_on_rank
from ._model_parallel_runner import ModelParallelRunner
from ._parallel_predictor import ParallelPredictor
from ._samples import SAMPLE_MODELS, save_model, write_sample_model
from ._shard import ShardResult, shard_model
from ._shard_check import CheckResult, SimulatedRanks, check_shards
from ._sharded_model import ShardedModel, run_sharded
