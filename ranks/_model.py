"""Model: build an ONNX file into an ONNX Runtime session and run it, MindSpore Lite style."""

from __future__ import annotations

import enum
import os
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ._config_file import RankConfig, load_config
from ._context import Context
from ._errors import ConfigError, InputError, ModelError, ModelNotFoundError, OrchestratorError
from ._session import execution_providers, session_options
from ._shared_weights import release_freed_heap, share_weights
from ._tensor import DataType, Tensor, check_shape, data_type_from_ort

COLLECTIVE_OPS = ("AllReduce", "AllGather")
MODEL_INFO_KEYS = ("user_info", "input_shape", "dynamic_dims", "current_pid", "shareable_weight_mem_handle")


class ModelType(enum.Enum):
    MINDIR = 0
    MINDIR_LITE = 4
    ONNX = 100


def load_onnx_header(path: Path) -> onnx.ModelProto:
    """Parse the ONNX file's graph (without external weights), with errors that name the file."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ModelNotFoundError(f"model file {path} does not exist") from None
    if size == 0:
        raise ModelError(f"model file {path} is empty; expected an ONNX model (.onnx)")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning-ish errors, ValueError
        raise ModelError(
            f"model file {path} ({size} bytes) is not a readable ONNX model: the file is corrupt, truncated "
            f"or of another format ({type(exc).__name__}: {exc})"
        ) from None
    if not proto.graph.node and not proto.graph.output:
        raise ModelError(f"model file {path} ({size} bytes) parsed as ONNX but holds no graph: it is not an ONNX model or is truncated")
    return proto


def _load_model_file(path: Path, model_type: "ModelType") -> onnx.ModelProto:
    """The ONNX graph of ``path``. Ported MindSpore Lite scripts pass ModelType.MINDIR with an ONNX file: accepted."""
    if model_type not in (ModelType.MINDIR, ModelType.MINDIR_LITE):
        return load_onnx_header(path)
    try:
        return load_onnx_header(path)
    except ModelNotFoundError:
        raise
    except ModelError:
        raise ModelError(
            f"model file {path} is not an ONNX model, and {model_type.name} files (MindSpore's own format) cannot be run "
            f"by this runtime: export the network to ONNX (mindspore.export(net, x, file_format='ONNX')) and load that file"
        ) from None


def _identity(context: Context, config: RankConfig):
    """Whose shard this process loads: a rank set on the context or in the config, else the launcher's.

    ``context.ascend.rank_id`` (when the script set it) and ``[ascend_context] rank_id`` must
    agree; under mpirun they must also agree with MPI's rank. With a rank given this way the
    world size comes from the rank table, as HCCL reads it.
    """
    from ._world import launched_by_mpi, resolve_identity

    named = []
    if "rank_id" in vars(context.ascend):  # set by the script, not the default
        named.append(("context.ascend.rank_id", context.ascend.rank_id))
    if config.rank_id is not None:
        named.append((f"{config.source} [ascend_context] rank_id", config.rank_id))
    if len({rank for _, rank in named}) > 1:
        raise ConfigError("the rank is given twice with different values: " + ", ".join(f"{w}={r}" for w, r in named))
    if not named:
        return resolve_identity()
    where, rank = named[0]
    if launched_by_mpi():
        launcher = resolve_identity()
        if launcher.rank != rank:
            raise ConfigError(f"{where}={rank}, but mpirun started this process as rank {launcher.rank} of {launcher.size}")
        return launcher
    return resolve_identity(rank, rank_table=config.rank_table_file)


def is_sharded(proto: onnx.ModelProto) -> bool:
    """True when the graph holds com.microsoft collective nodes (a tensor-parallel shard)."""
    return any(node.domain == "com.microsoft" and node.op_type in COLLECTIVE_OPS for node in proto.graph.node)


class Model:
    """One model on one device. ``build_from_file`` once, ``predict`` many times (from any thread)."""

    def __init__(self):
        self._session = None
        self._path: Path | None = None
        self._context: Context | None = None
        self._config: RankConfig | None = None
        self._inputs: list[Tensor] = []
        self._model_inputs: list[tuple[str, DataType, list[int]]] = []
        self._outputs: list[Tensor] = []
        self._initializers: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self._weight_overrides: dict[str, ort.OrtValue] = {}
        self._shared_weights = None  # ranks._shared_weights.SharedWeights when publishing or attached
        self._metadata: dict[str, str] = {}
        self._communicator = None
        self._lock = threading.Lock()

    # -- building ------------------------------------------------------------
    def build_from_file(
        self,
        model_path: str | os.PathLike,
        model_type: ModelType = ModelType.ONNX,
        context: Context | None = None,
        config_path: str = "",
        config_dict: dict | None = None,
        *,
        communicator=None,
    ) -> None:
        """Load and compile ``model_path``.

        Args:
            model_path: an ONNX file (weights inline or as external data beside it).
            model_type: ``ModelType.ONNX``; MindIR files are refused with a clear message.
            context: devices and threads; ``Context()`` (CPU) when omitted.
            config_path: a ``config_file.ini`` (see ``ranks._config_file``).
            config_dict: ``{section: {key: value}}`` overriding the file; also the flat
                weight-sharing keys ``{"pids": "pid1, pid2"}`` (publish this model's
                weights to those processes) and ``{"shared_mem_handle": handle}``
                (run on weights another process published; see ``ranks._shared_weights``).
            communicator: for a tensor-parallel shard, the communicator to its peers
                (default: chosen from the launch environment and the config).

        Raises:
            ModelNotFoundError, ModelError, ConfigError, ProviderError.
        """
        if not isinstance(model_type, ModelType):
            raise ConfigError(f"model_type must be a ModelType (e.g. ModelType.ONNX), got {model_type!r}")
        if context is not None and not isinstance(context, Context):
            raise ConfigError(f"context must be a Context, got {type(context).__name__}")
        self._session = None  # a failed rebuild must not leave the old session answering
        context = context or Context()
        config = load_config(config_path, config_dict)
        identity = _identity(context, config)
        path = Path(model_path)
        if not path.exists():
            # shards/m.onnx names the model; each rank loads its own shards/m{rank}.onnx
            from ._shard_files import resolve_shard_path

            path = resolve_shard_path(path, identity.rank, identity.size if identity.source != "single" else None)
        if path.is_dir():
            raise ModelError(f"model path {path} is a directory; expected an ONNX file")
        proto = _load_model_file(path, model_type)

        self._path, self._context, self._config = path, context, config
        self._initializers = {
            init.name: (tuple(init.dims), onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
            for init in proto.graph.initializer
        }
        self._metadata = {prop.key: prop.value for prop in proto.metadata_props}
        unknown = [n for n in (config.variable_weights or []) if n not in self._initializers]
        if unknown:
            raise ConfigError(
                f"{config.source}: variable weights {unknown} are not weights of {path}"
                + (f"; its weights include {sorted(self._initializers)[:8]}" if self._initializers else "")
            )
        self._weight_overrides = {}
        previous, self._shared_weights = self._shared_weights, None
        if previous is not None:
            previous.close()  # a rebuild stops publishing the old weights
        # None unless the config asks to publish the weights or attach to published ones
        self._shared_weights = share_weights(proto, path, context, config, sharded=is_sharded(proto))
        if self._shared_weights is not None:
            self._weight_overrides = dict(self._shared_weights.ort_values)
        if is_sharded(proto):
            self._session = self._build_sharded(proto, communicator, identity)
        else:
            self._session = self._new_session()
        self._model_inputs = [
            (arg.name, data_type_from_ort(arg.type), [d if isinstance(d, int) else -1 for d in arg.shape])
            for arg in self._session.get_inputs()
        ]
        for name, shape in config.input_shapes.items():
            if name not in self.input_names:
                raise ConfigError(f"{config.source}: input_shape names {name!r}, but the model's inputs are {self.input_names}")
        self._inputs = [
            Tensor(shape=config.input_shapes.get(name, shape), dtype=dtype, name=name)
            for name, dtype, shape in self._model_inputs
        ]
        self._outputs = [
            Tensor(shape=[d if isinstance(d, int) else -1 for d in arg.shape], dtype=data_type_from_ort(arg.type), name=arg.name)
            for arg in self._session.get_outputs()
        ]
        del proto
        if self._shared_weights is not None:
            release_freed_heap()  # the parsed file's weights, now stood in for by the shared ones

    def _new_session(self):
        options = session_options(self._context, self._config)
        for name, value in self._weight_overrides.items():
            options.add_initializer(name, value)
        providers = execution_providers(self._context, self._config)
        try:
            if self._shared_weights is not None:
                return self._shared_weights.new_session(str(self._path), options, providers)
            return ort.InferenceSession(str(self._path), sess_options=options, providers=providers)
        except Exception as exc:
            raise ModelError(f"ONNX Runtime could not build {self._path}: {_ort_message(exc)}") from None

    def _build_sharded(self, proto, communicator, identity):
        from ._staged_runner import StagedRunner
        from ._world import create_communicator

        if communicator is None:
            comm = self._config.comm
            if identity.source == "explicit" and self._config.rank_table_file is None and comm.backend != "mpi":
                raise ConfigError(
                    f"{self._path} is rank {identity.rank}'s shard of a tensor-parallel model, but nothing says where "
                    f"its peers are: set [ascend_context] rank_table_file in the config file, or start the ranks "
                    f"with mpirun"
                )
            communicator = create_communicator(
                backend=comm.backend, rank_table=self._config.rank_table_file,
                rank=identity.rank if identity.source in ("explicit", "torchrun") else None,
                base_port=comm.base_port, timeout=comm.timeout, mpi_arrival_check=comm.mpi_arrival_check,
            )
        self._communicator = communicator
        context, config = self._context, self._config

        def make_session(model):
            # Several stage sessions share the cores; spinning pool threads would fight over them.
            options = session_options(context, config, allow_spinning=False)
            return ort.InferenceSession(model, sess_options=options, providers=execution_providers(context, config))

        try:
            return StagedRunner(self._path, communicator, make_session=make_session)
        except OrchestratorError:
            raise
        except Exception as exc:
            raise ModelError(f"could not build shard {self._path}: {_ort_message(exc)}") from exc

    def _require_built(self) -> None:
        if self._session is None:
            raise ModelError("the model is not built: call build_from_file() first")

    # -- introspection -------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [name for name, _, _ in self._model_inputs]

    def get_inputs(self) -> list[Tensor]:
        """The model's input tensors: fill them with set_data_from_numpy() and pass them to predict()."""
        self._require_built()
        return self._inputs

    def get_outputs(self) -> list[Tensor]:
        """The model's outputs (name, dtype, shape with -1 for dimensions known only after predict)."""
        self._require_built()
        return self._outputs

    def get_model_info(self, key: str) -> str:
        """``user_info`` (the model's metadata), ``input_shape`` ("x:1,3,224,224;..."), ``dynamic_dims``,
        ``current_pid`` (this process's id, also before building) or ``shareable_weight_mem_handle``
        (the handle other processes attach with, once built with ``config_dict={"pids": ...}``)."""
        if key == "current_pid":
            return str(os.getpid())
        self._require_built()
        if key == "shareable_weight_mem_handle":
            if self._shared_weights is None:
                raise ModelError(
                    "get_model_info('shareable_weight_mem_handle'): this model does not share its weights; build it with "
                    "config_dict={'pids': 'pid1, pid2'} (the processes that may attach) first"
                )
            return str(self._shared_weights.handle)
        if key == "user_info":
            return ";".join(f"{k}:{v}" for k, v in sorted(self._metadata.items()))
        if key == "input_shape":
            return ";".join(f"{t.name}:{','.join(map(str, t.shape))}" for t in self._inputs)
        if key == "dynamic_dims":
            return ";".join(
                f"{name}:{','.join(str(i) for i, d in enumerate(shape) if d < 0)}"
                for name, _, shape in self._model_inputs if any(d < 0 for d in shape)
            )
        raise ConfigError(f"get_model_info: unknown key {key!r}; valid keys are {list(MODEL_INFO_KEYS)}")

    # -- running -------------------------------------------------------------
    def resize(self, inputs: list[Tensor], dims: list[list[int]]) -> None:
        """Set new shapes for the inputs' free (dynamic) dimensions."""
        self._require_built()
        if len(inputs) != len(self._inputs) or len(dims) != len(inputs):
            raise InputError(f"resize: got {len(inputs)} inputs and {len(dims)} shapes, the model has {len(self._inputs)} inputs")
        for tensor, new_shape in zip(inputs, dims):
            model_shape = self._model_shape(tensor.name)
            new_shape = [int(d) for d in new_shape]
            check_shape(tensor.name, model_shape, new_shape)
            if any(d <= 0 for d in new_shape):
                raise InputError(f"resize: input {tensor.name!r}: every dimension must be positive, got {new_shape}")
        for tensor, new_shape in zip(inputs, dims):
            tensor.shape = new_shape
            for own in self._inputs:
                if own.name == tensor.name and own is not tensor:
                    own.shape = new_shape

    def predict(self, inputs, outputs: list[Tensor] | None = None) -> list[Tensor]:
        """Run the model.

        Args:
            inputs: a list of Tensors or numpy arrays in the model's input order,
                or a dict {input name: array or Tensor}.
            outputs: optional Tensors to fill in place (MindSpore Lite style).

        Returns:
            One Tensor per model output, in order.

        Raises:
            InputError: wrong count, name, dtype or shape, or an empty batch.
            ModelError: ONNX Runtime failed while running.
        """
        self._require_built()
        feeds = self._feeds(inputs)
        try:
            results = self._session.run(None, feeds)
        except OrchestratorError:
            raise
        except Exception as exc:
            if getattr(self._session, "is_staged", False):
                raise
            raise ModelError(f"running {self._path.name} failed: {_ort_message(exc)}") from None
        if outputs is not None:
            if len(outputs) != len(results):
                raise InputError(f"predict: got {len(outputs)} output tensors, the model has {len(results)} outputs")
            for tensor, array in zip(outputs, results):
                tensor._dtype = DataType.from_numpy(array.dtype)
                tensor._shape = list(array.shape)
                tensor._data = array
            return outputs
        return [Tensor(array, name=meta.name) for meta, array in zip(self._outputs, results)]

    def predict_into(self, inputs, outputs: dict[str, np.ndarray], run_options: ort.RunOptions | None = None) -> None:
        """Run the model with every output written straight into the caller's array (no copy).

        Args:
            inputs: as for ``predict``.
            outputs: {output name: C-contiguous array} of exactly the dtype and
                shape the model computes for these inputs (e.g. views of shared memory).

        Raises:
            InputError: bad inputs, or ``outputs`` that do not name every output.
            ModelError: the model computed other shapes than ``outputs`` hold, or this
                model cannot write into caller buffers (a tensor-parallel shard).
        """
        self._require_built()
        if getattr(self._session, "is_staged", False):
            raise ModelError("predict_into is not available on a tensor-parallel shard; use predict()")
        feeds = self._feeds(inputs)
        names = [t.name for t in self._outputs]
        if sorted(outputs) != sorted(names):
            raise InputError(f"predict_into: outputs must name every model output {names}, got {sorted(outputs)}")
        binding = self._session.io_binding()
        try:
            for name, array in feeds.items():
                array = np.ascontiguousarray(array)
                feeds[name] = array  # keep it alive until the run is over
                binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
            for name in names:
                array = outputs[name]
                if not array.flags.c_contiguous or not array.flags.writeable:
                    raise InputError(f"predict_into: the buffer for output {name!r} must be C-contiguous and writeable")
                binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
            try:
                self._session.run_with_iobinding(binding, run_options)
            except Exception as exc:
                raise ModelError(f"running {self._path.name} into the given buffers failed: {_ort_message(exc)}") from None
        finally:
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()

    def _model_shape(self, name: str) -> list[int]:
        for input_name, _, shape in self._model_inputs:
            if input_name == name:
                return shape
        raise InputError(f"the model has no input named {name!r}; its inputs are {self.input_names}")

    def _feeds(self, inputs) -> dict[str, np.ndarray]:
        return validate_feeds(inputs, self._model_inputs)

    def update_weights(self, weights) -> None:
        """Replace named initializers (weights) and rebuild the session in memory.

        ``weights`` is MindSpore Lite's ``list[list[Tensor]]``, a list of named
        Tensors, or a dict {initializer name: numpy array}. Names, dtypes and
        shapes must match the model's; nothing changes unless all of them do.
        """
        self._require_built()
        if getattr(self._session, "is_staged", False):
            raise ModelError("update_weights is not available on a tensor-parallel shard; re-shard the updated model")
        named: list[tuple[str, np.ndarray]] = []
        variable = self._config.variable_weights
        if isinstance(weights, dict):
            named = [(k, np.asarray(v)) for k, v in weights.items()]
        else:
            flat = []
            for item in weights:
                flat.extend(item if isinstance(item, (list, tuple)) else [item])
            for index, tensor in enumerate(flat):
                if not isinstance(tensor, Tensor):
                    raise InputError(f"update_weights: expected Tensors, got {type(tensor).__name__} at position {index}")
                name = tensor.name
                if not name:
                    # MindSpore Lite matches unnamed tensors to variable_weights_file's names, in order.
                    if variable is None:
                        raise InputError(
                            f"update_weights: the tensor at position {index} has no name; name it (Tensor.name = ...) or "
                            f"list the weights that may change in [ascend_context] variable_weights_file"
                        )
                    if index >= len(variable):
                        raise InputError(
                            f"update_weights: got {len(flat)} tensors, but variable_weights_file names only "
                            f"{len(variable)} weights: {variable}"
                        )
                    name = variable[index]
                named.append((name, tensor.get_data_to_numpy()))
        if not named:
            raise InputError("update_weights: no weights given")
        if variable is not None:
            outside = [name for name, _ in named if name not in variable]
            if outside:
                raise InputError(
                    f"update_weights: {outside} not among the weights variable_weights_file lets change: {variable}"
                )
        overrides = dict(self._weight_overrides)
        for name, array in named:
            if name not in self._initializers:
                close = [n for n in self._initializers if name.split(".")[-1] in n][:5]
                raise InputError(f"update_weights: the model has no weight named {name!r}" + (f"; similar: {close}" if close else ""))
            shape, dtype = self._initializers[name]
            if tuple(array.shape) != shape or array.dtype != dtype:
                raise InputError(
                    f"update_weights: weight {name!r} is {array.dtype}{list(array.shape)}, the model's is {np.dtype(dtype)}{list(shape)}"
                )
            overrides[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
        with self._lock:
            previous = self._weight_overrides
            self._weight_overrides = overrides
            try:
                self._session = self._new_session()
            except Exception:
                self._weight_overrides = previous
                raise

    def close(self) -> None:
        """Release the session (and the communicator of a shard, and this process's hold on shared weights)."""
        self._session = None
        if self._shared_weights is not None:
            self._shared_weights.close()
            self._shared_weights = None
            self._weight_overrides = {}
        if self._communicator is not None:
            self._communicator.close()
            self._communicator = None

    def __repr__(self) -> str:
        return f"<Model {self._path} inputs={self.input_names if self._session else '?'}>"


def validate_feeds(inputs, expected: list[tuple[str, DataType, list[int]]]) -> dict[str, np.ndarray]:
    """Check inputs against (name, dtype, shape) specs; {name: array} in input order, or InputError."""
    input_names = [name for name, _, _ in expected]
    if isinstance(inputs, (Tensor, np.ndarray)):
        inputs = [inputs]
    if isinstance(inputs, dict):
        unknown = [k for k in inputs if k not in input_names]
        if unknown:
            raise InputError(f"predict: unknown input name(s) {unknown}; the model's inputs are {input_names}")
        missing = [n for n in input_names if n not in inputs]
        if missing:
            raise InputError(f"predict: missing input(s) {missing}; the model's inputs are {input_names}")
        items = [(name, inputs[name]) for name in input_names]
    elif isinstance(inputs, (list, tuple)):
        if len(inputs) != len(expected):
            raise InputError(
                f"predict: got {len(inputs)} inputs, the model has {len(expected)}: {input_names}"
            )
        items = []
        for (name, _, _), value in zip(expected, inputs):
            if isinstance(value, Tensor) and value.name and value.name != name:
                raise InputError(f"predict: tensor {value.name!r} was given where input {name!r} belongs (inputs are {input_names})")
            items.append((name, value))
    else:
        raise InputError(f"predict: inputs must be a list of Tensors or numpy arrays, or a dict by name; got {type(inputs).__name__}")

    feeds = {}
    for (name, dtype, model_shape), (_, value) in zip(expected, items):
        if isinstance(value, Tensor):
            array = value.get_data_to_numpy()
        elif isinstance(value, np.ndarray):
            array = value
        else:
            raise InputError(f"predict: input {name!r} must be a Tensor or numpy array, got {type(value).__name__}")
        want = dtype.to_numpy() if dtype is not DataType.UNKNOWN else array.dtype
        if array.dtype != want:
            raise InputError(f"predict: input {name!r} has dtype {array.dtype}, the model expects {want}")
        check_shape(name, model_shape, array.shape)
        if array.size == 0:
            raise InputError(f"predict: input {name!r} is empty (shape {list(array.shape)}); every dimension must be at least 1")
        feeds[name] = array
    return feeds


def _ort_message(exc: Exception) -> str:
    text = str(exc).strip()
    # ORT prefixes messages with "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : ..."; keep the human part.
    if text.startswith("[ONNXRuntimeError]"):
        text = text.split(" : ", 3)[-1]
    return text
