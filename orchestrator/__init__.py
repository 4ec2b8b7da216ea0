"""The master side: the MindSpore Lite-style API, batch-split master, worker pool, slicing, serving.

``import orchestrator as mslite`` gives a MindSpore Lite script what it uses
(Context, Model, ModelType, Tensor, DataType, Format) on ONNX Runtime.
"""

from ranks import *  # noqa: F401,F403  the single-process API is part of ours

from ._parallel_predictor import ParallelPredictor
from ._samples import SAMPLE_MODELS, save_model, write_sample_model
from ._shard import ShardResult, shard_model
from ._shard_check import CheckResult, SimulatedRanks, check_shards
from ._sharded_model import ShardedModel, run_sharded
