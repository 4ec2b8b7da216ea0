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
from ._errors import (ConfigError, ConfigTypeError, InputError, InputTypeError, ModelError, ModelNotFoundError,
                      OrchestratorError, ort_message)
from ._log import get_logger
from ._session import execution_providers, session_options
from ._shared_weights import release_freed_heap, share_weights
from ._tensor import DataType, Tensor, TensorMeta, check_shape_argument, data_type_from_ort, fit_shape, output_tensors

log = get_logger("model")

COLLECTIVE_OPS = ("AllReduce", "AllGather")
MODEL_INFO_KEYS = ("user_info", "input_shape", "dynamic_dims", "current_pid", "shareable_weight_mem_handle")


class ModelType(enum.Enum):
    """MindSpore Lite's model types, with its values; ONNX has the value of MindSpore's C++ ``kONNX``."""

    MINDIR = 0
    ONNX = 3
    MINDIR_LITE = 4


DEC_MAX_PARALLEL = 64  # MindSpore Lite's upper bound for dec_num_parallel


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
    """The ONNX graph of ``path``, or of its ONNX conversion when it is a MINDIR file (``ranks._mindir``).

    Ported MindSpore Lite scripts pass ModelType.MINDIR with an ONNX file: accepted. The file's
    content decides, not ``model_type``: the rank program and the workers pass ModelType.ONNX.
    """
    from ._mindir import converted_model_file

    path = converted_model_file(path)  # made once and cached beside the MINDIR file; workers find it there
    if model_type not in (ModelType.MINDIR, ModelType.MINDIR_LITE):
        return load_onnx_header(path)
    try:
        return load_onnx_header(path)
    except ModelNotFoundError:
        raise
    except ModelError:
        if path.is_file() and path.stat().st_size == 0:
            raise ModelError(f"model file {path} is empty; expected a MINDIR file written by MindSpore "
                             f"(mindspore.export(..., file_format='MINDIR')) or an ONNX model") from None
        raise ModelError(
            f"model file {path} is neither an ONNX model nor a MINDIR file written by MindSpore (mindspore.export(..., "
            f"file_format='MINDIR')); {model_type.name} files of MindSpore Lite's converter (.ms) cannot be run by this "
            f"runtime: export the network to ONNX or MINDIR with MindSpore (mindspore.export(net, x, file_format='ONNX')) "
            f"and load that file"
        ) from None


def _weights_folded_at_build(proto: onnx.ModelProto) -> set[str]:
    """Initializers that feed a node computing from constants alone (ONNX Runtime folds those at build)."""
    constants = {init.name for init in proto.graph.initializer} | {""}
    constants |= {out for node in proto.graph.node if node.op_type == "Constant" for out in node.output}
    return {
        name for node in proto.graph.node
        if node.op_type != "Constant" and set(node.input) <= constants
        for name in node.input if name
    }


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
        self._folded_weights: set[str] = set()
        self._resized_shapes: dict[str, list[int]] | None = None  # set when resize() rewrote the graph's inputs
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
        dec_key: bytes | None = None,
        dec_mode: str = "AES-GCM",
        dec_num_parallel: int = 0,
        *,
        communicator=None,
    ) -> None:
        """Load and compile ``model_path``.

        Args:
            model_path: an ONNX file (weights inline or as external data beside it), or a MINDIR
                file written by MindSpore: converted to ONNX through MindSpore once (the
                ``mindspore`` extra) and cached beside it (see ``ranks._mindir``).
            model_type: ``ModelType.ONNX`` or ``ModelType.MINDIR``; the file's content decides.
            context: devices and threads; ``Context()`` (CPU) when omitted.
            config_path: a ``config_file.ini`` (see ``ranks._config_file``).
            config_dict: ``{section: {key: value}}`` overriding the file; also the flat
                weight-sharing keys ``{"pids": "pid1, pid2"}`` (publish this model's
                weights to those processes) and ``{"shared_mem_handle": handle}``
                (run on weights another process published; see ``ranks._shared_weights``).
            dec_key, dec_mode, dec_num_parallel: MindSpore Lite's decryption arguments; they are
                type-checked, and a ``dec_key`` is refused (ONNX models are not encrypted).
            communicator: for a tensor-parallel shard, the communicator to its peers
                (default: chosen from the launch environment and the config).

        Raises:
            ModelNotFoundError, ModelError, ConfigError, ProviderError (all RuntimeError);
            ConfigTypeError (a TypeError) for an argument of the wrong type.
        """
        if not isinstance(model_type, ModelType):
            raise ConfigTypeError(f"model_type must be a ModelType (e.g. ModelType.ONNX), got {model_type!r}")
        _check_decryption(dec_key, dec_mode, dec_num_parallel)
        if context is not None and not isinstance(context, Context):
            raise ConfigTypeError(f"context must be a Context, got {type(context).__name__}")
        self._resized_shapes = None
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
        from ._mindir import converted_model_file

        path = converted_model_file(path)  # a MINDIR file: the session runs its cached ONNX conversion
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
        self._folded_weights = _weights_folded_at_build(proto)
        previous, self._shared_weights = self._shared_weights, None
        if previous is not None:
            previous.close()  # a rebuild stops publishing the old weights
        # None unless the config asks to publish the weights or attach to published ones
        self._shared_weights = share_weights(proto, path, context, config, sharded=is_sharded(proto))
        if self._shared_weights is not None:
            self._weight_overrides = dict(self._shared_weights.ort_values)
        is_sharded_model = is_sharded(proto)
        if is_sharded_model:
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
        log.info("built %s (%s; inputs %s)", path, "shard of rank %d of %d" % (identity.rank, identity.size)
                 if is_sharded_model else "whole model", self.get_model_info("input_shape"))

    def _new_session(self):
        options = session_options(self._context, self._config)
        for name, value in self._weight_overrides.items():
            options.add_initializer(name, value)
        providers = execution_providers(self._context, self._config)
        model = str(self._path)
        if self._resized_shapes is not None:
            model = self._resized_graph(self._resized_shapes)
            # Built from bytes, ONNX Runtime finds external weights only when told where the file was.
            folder = str(self._path.absolute().parent)
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        try:
            if self._shared_weights is not None:
                return self._shared_weights.new_session(model, options, providers)
            return ort.InferenceSession(model, sess_options=options, providers=providers,
                                        disabled_optimizers=self._optimizers_to_skip())
        except Exception as exc:
            raise ModelError(f"ONNX Runtime could not build {self._path}: {ort_message(exc)}") from None

    def _optimizers_to_skip(self) -> list[str]:
        """Optimizers that would bake the model file's weight values in, ignoring updated ones.

        ONNX Runtime's graph optimizers read initializers from the graph, not from
        ``add_initializer``: a folded ``Transpose(W)`` or a fused Conv+BN would keep
        the old values after update_weights.
        """
        if not self._weight_overrides:
            return []
        from ._shared_weights import WEIGHT_REWRITING_OPTIMIZERS

        folded = bool(self._folded_weights & set(self._weight_overrides))
        return list(WEIGHT_REWRITING_OPTIMIZERS) + (["ConstantFolding"] if folded else [])

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

        def make_session(model, weights=None):
            # Several stage sessions share the cores; spinning pool threads would fight over them.
            options = session_options(context, config, allow_spinning=False)
            disabled = weights.apply(options) if weights is not None else []  # a merged decoder's shared weights
            return ort.InferenceSession(model, sess_options=options, providers=execution_providers(context, config),
                                        disabled_optimizers=disabled)

        try:
            return StagedRunner(self._path, communicator, make_session=make_session)
        except OrchestratorError:
            raise
        except Exception as exc:
            raise ModelError(f"could not build shard {self._path}: {ort_message(exc)}") from exc

    def _require_built(self) -> None:
        if self._session is None:
            raise ModelError("the model is not built: call build_from_file() first")

    # -- introspection -------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [name for name, _, _ in self._model_inputs]

    def get_inputs(self) -> list[Tensor]:
        """New input tensors (name, dtype, current shape, format) on every call: fill them with
        set_data_from_numpy() and pass them to predict(). Each caller gets its own, so threads do not
        overwrite each other's data."""
        self._require_built()
        return [Tensor(shape=t.shape, dtype=t.dtype, name=t.name, format=t.format) for t in self._inputs]

    def get_outputs(self) -> list[TensorMeta]:
        """The model's outputs as TensorMeta (name, dtype, shape with -1 for dimensions known only after predict)."""
        self._require_built()
        return [TensorMeta(t.name, t.dtype, t.shape, t.format) for t in self._outputs]

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
        """Give the inputs new shapes; later get_inputs() show them and predict() takes only them.

        A shape that only fills the graph's free (-1) dimensions changes nothing else. A shape
        that changes a fixed dimension rebuilds the session from the graph with its input shapes
        rewritten, then runs it once on zeros, so a graph that cannot take the shape (an
        operator whose weights fix it, a Reshape to constants) fails here and not in predict.
        On failure the model keeps its previous shapes and session. Resizing to the current
        shapes does nothing.

        Args:
            inputs: the model's input Tensors (e.g. from get_inputs()), matched by name.
            dims: one new shape (list of int) per tensor in ``inputs``.

        Raises:
            InputTypeError: ``inputs``/``dims`` are not lists of Tensors/lists of int.
            InputError: len(inputs) != len(dims), unknown inputs, non-positive dimensions,
                another rank, or a shape the graph cannot take.
            ModelError: a tensor-parallel shard asked for new fixed dimensions.
        """
        self._require_built()
        if not isinstance(inputs, list):
            raise InputTypeError(f"resize: inputs must be a list of Tensors, got {type(inputs).__name__}")
        if not isinstance(dims, list):
            raise InputTypeError(f"resize: dims must be a list of shapes (lists of int), got {type(dims).__name__}")
        for index, tensor in enumerate(inputs):
            if not isinstance(tensor, Tensor):
                raise InputTypeError(f"resize: inputs must be Tensors, got {type(tensor).__name__} at index {index}")
        shapes = [check_shape_argument(f"resize: dims[{index}]", shape) for index, shape in enumerate(dims)]
        if len(inputs) != len(dims):
            raise InputError(f"resize: got {len(inputs)} inputs and {len(dims)} shapes; give one shape per input")
        names = [tensor.name or (self.input_names[i] if i < len(self.input_names) else "") for i, tensor in enumerate(inputs)]
        for name in names:
            self._model_shape(name)  # an unknown name is an InputError that lists the inputs
        if len(set(names)) != len(names):
            raise InputError(f"resize: inputs {names} name an input twice")
        with self._lock:
            current = {t.name: t.shape for t in self._inputs}
            wanted = dict(current)
            for name, shape in zip(names, shapes):
                graph_shape = self._model_shape(name)
                if graph_shape and len(shape) != len(graph_shape):
                    now = f", now {current[name]}" if current.get(name) not in (None, graph_shape) else ""
                    raise InputError(f"resize: input {name!r}: shape {shape} has {len(shape)} dimensions, "
                                     f"the model's has {len(graph_shape)} ({_spell_shape(graph_shape)}{now})")
                if any(d <= 0 for d in shape):
                    raise InputError(f"resize: input {name!r}: every dimension must be positive, got {shape}")
                wanted[name] = shape
            if wanted != current:
                self._apply_shapes(wanted, current)
        for tensor, shape in zip(inputs, shapes):
            tensor.shape = shape

    def _apply_shapes(self, wanted: dict[str, list[int]], current: dict[str, list[int]]) -> None:
        """Make ``wanted`` the model's input shapes, rebuilding the session when the graph must change (lock held)."""
        fits_graph = all(_fits(self._model_shape(name), shape) for name, shape in wanted.items())
        resized = None if fits_graph else wanted
        if resized is not None and getattr(self._session, "is_staged", False):
            raise ModelError(
                f"resize: {self._path.name} is a tensor-parallel shard, whose graph cannot be rebuilt with other fixed "
                f"dimensions here ({_spell_changes(wanted, current)}); only free dimensions can be set. "
                f"Shard a model exported with the shape you need."
            )
        if resized is not None or self._resized_shapes is not None:
            previous = self._resized_shapes
            self._resized_shapes = resized
            try:
                session = self._new_session()
                if resized is not None:
                    _trial_run(session, {t.name: (t.dtype, wanted[t.name]) for t in self._inputs})
            except Exception as exc:
                self._resized_shapes = previous
                text = ort_message(exc).removeprefix(f"ONNX Runtime could not build {self._path}: ")
                raise InputError(
                    f"resize: the graph of {self._path.name} cannot take {_spell_changes(wanted, current)}: {text}. "
                    f"The model keeps its previous shapes."
                ) from None
            self._session = session
            self._outputs = [
                Tensor(shape=[d if isinstance(d, int) else -1 for d in arg.shape], dtype=data_type_from_ort(arg.type), name=arg.name)
                for arg in session.get_outputs()
            ]
        self._inputs = [Tensor(shape=wanted[t.name], dtype=t.dtype, name=t.name, format=t.format) for t in self._inputs]

    def _resized_graph(self, shapes: dict[str, list[int]]) -> bytes:
        """The model file's graph with the inputs' dimensions set to ``shapes``, serialized (weights stay external)."""
        proto = load_onnx_header(self._path)
        for value in proto.graph.input:
            if value.name in shapes:
                dims = value.type.tensor_type.shape.dim
                del dims[:]
                for size in shapes[value.name]:
                    dims.add().dim_value = size
        # Shapes recorded for the old input shapes would contradict the new ones: ONNX Runtime infers them again.
        del proto.graph.value_info[:]
        for value in proto.graph.output:
            for dim in value.type.tensor_type.shape.dim:
                dim.Clear()
        return proto.SerializeToString()

    def predict(self, inputs, outputs: list[Tensor] | None = None, *, run_options: ort.RunOptions | None = None) -> list[Tensor]:
        """Run the model.

        Args:
            inputs: a list of Tensors or numpy arrays in the model's input order,
                or a dict {input name: array or Tensor}.
            outputs: optional Tensors to fill in place (MindSpore Lite style).
            run_options: ONNX Runtime's run options (another thread may set their
                ``terminate`` to stop the run: a worker pool's timeout does).

        Returns:
            One Tensor per model output, in order.

        Raises:
            InputError: wrong count, name, dtype or shape, or an empty batch.
            ModelError: ONNX Runtime failed while running.
        """
        self._require_built()
        if outputs is not None and (not isinstance(outputs, list) or not all(isinstance(t, Tensor) for t in outputs)):
            raise InputTypeError(f"predict: outputs must be a list of Tensors, got {outputs!r}")
        feeds = self._feeds(inputs)
        try:
            results = self._session.run(None, feeds, run_options) if run_options is not None else self._session.run(None, feeds)
        except OrchestratorError:
            raise
        except Exception as exc:
            if getattr(self._session, "is_staged", False):
                raise
            raise ModelError(f"running {self._path.name} failed: {ort_message(exc)}") from None
        return output_tensors([meta.name for meta in self._outputs], results, outputs)

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
                array = np.asarray(array, order="C")
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
                raise ModelError(f"running {self._path.name} into the given buffers failed: {ort_message(exc)}") from None
        finally:
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()

    def _model_shape(self, name: str) -> list[int]:
        for input_name, _, shape in self._model_inputs:
            if input_name == name:
                return shape
        raise InputError(f"the model has no input named {name!r}; its inputs are {self.input_names}")

    def _feeds(self, inputs) -> dict[str, np.ndarray]:
        # The current shapes (after resize() or the config's input_shape), not only the graph's.
        return validate_feeds(inputs, [(t.name, t.dtype, t.shape) for t in self._inputs])

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
            unnamed = sum(1 for t in flat if isinstance(t, Tensor) and not t.name)
            if unnamed and variable is not None and len(flat) != len(variable):
                # Matched by position: fewer tensors than names would change the first weights listed, which may
                # not be the ones meant. Named tensors may update any subset.
                raise InputError(
                    f"update_weights: got {len(flat)} tensors ({unnamed} unnamed), but variable_weights_file names "
                    f"{len(variable)} weights {variable}: unnamed tensors are matched to those names in order, so give "
                    f"one per name, or name each tensor (Tensor.name = ...) to update only some"
                )
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
            overrides[name] = ort.OrtValue.ortvalue_from_numpy(np.asarray(array, order="C"))
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

    def __str__(self) -> str:
        return f"model_path: {self._path if self._path is not None else ''}."

    def __repr__(self) -> str:
        return f"<Model {self._path} inputs={self.input_names if self._session else '?'}>"


def validate_feeds(inputs, expected: list[tuple[str, DataType, list[int]]]) -> dict[str, np.ndarray]:
    """Check inputs against (name, dtype, shape) specs; {name: array} in input order.

    An input whose shape is fully known takes an array with the right element count, reshaped
    (as ``Tensor.set_data_from_numpy`` does); one with free dimensions an array of its rank
    whose fixed dimensions match. InputTypeError for values of the wrong type, InputError
    for anything that does not fit (naming the array and the input).
    """
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
        raise InputTypeError(f"predict: inputs must be a list of Tensors or numpy arrays, or a dict by name; got {type(inputs).__name__}")

    feeds = {}
    for (name, dtype, model_shape), (_, value) in zip(expected, items):
        if isinstance(value, Tensor):
            array = value.get_data_to_numpy()
        elif isinstance(value, np.ndarray):
            array = value
        else:
            raise InputTypeError(f"predict: input {name!r} must be a Tensor or numpy array, got {type(value).__name__}")
        want = dtype.to_numpy() if dtype is not DataType.UNKNOWN else array.dtype
        if array.dtype != want:
            raise InputError(f"predict: input {name!r} has dtype {array.dtype}, the model expects {want}")
        array = fit_shape(f"input {name!r}", model_shape, array)
        if array.size == 0:
            raise InputError(f"predict: input {name!r} is empty (shape {list(array.shape)}); every dimension must be at least 1")
        feeds[name] = array
    return feeds


def _check_decryption(dec_key, dec_mode, dec_num_parallel) -> None:
    """MindSpore Lite's decryption arguments: checked as it checks them; a key is refused."""
    if dec_key is not None and not isinstance(dec_key, bytes):
        raise ConfigTypeError(f"dec_key must be bytes, got {type(dec_key).__name__}")
    if not isinstance(dec_mode, str):
        raise ConfigTypeError(f"dec_mode must be a str, got {type(dec_mode).__name__}")
    if not dec_mode:
        raise ConfigError('dec_mode must not be empty (MindSpore Lite uses "AES-GCM" or "AES-CBC")')
    if isinstance(dec_num_parallel, bool) or not isinstance(dec_num_parallel, int):
        raise ConfigTypeError(f"dec_num_parallel must be an int, got {type(dec_num_parallel).__name__}")
    if not 0 <= dec_num_parallel <= DEC_MAX_PARALLEL:
        raise ConfigError(f"dec_num_parallel must be in 0..{DEC_MAX_PARALLEL}, got {dec_num_parallel}")
    if dec_key is not None:
        raise ModelError(
            f"encrypted models are not supported by this runtime (dec_key was given, dec_mode {dec_mode}): ONNX models "
            f"are not encrypted. Decrypt the model first and build it without dec_key."
        )


def _fits(graph_shape: list[int], shape: list[int]) -> bool:
    """True when ``shape`` only fills the free dimensions of ``graph_shape``."""
    if not graph_shape:
        return True
    return len(graph_shape) == len(shape) and all(g < 0 or g == d for g, d in zip(graph_shape, shape))


def _spell_shape(shape: list[int]) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in shape) + "]"


def _spell_changes(wanted: dict[str, list[int]], current: dict[str, list[int]]) -> str:
    changed = [name for name in wanted if wanted[name] != current.get(name)] or list(wanted)
    return ", ".join(f"input {name!r} of shape {wanted[name]} (was {current.get(name)})" for name in changed)


def _trial_run(session, specs: dict[str, tuple[DataType, list[int]]]) -> None:
    """Run ``session`` once on zeros of the given shapes (skipped for string inputs, which have no zeros)."""
    if any(dtype in (DataType.STRING, DataType.UNKNOWN, DataType.INVALID) for dtype, _ in specs.values()):
        return
    session.run(None, {name: np.zeros(shape, dtype.to_numpy()) for name, (dtype, shape) in specs.items()})
