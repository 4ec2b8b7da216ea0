"""Cross-process weight sharing (MindSpore Lite's "shareable weights"), on the CPU.

One process, the *publisher*, builds a model with a whitelist of process ids
(``config_dict={"pids": "pid1, pid2"}`` or ``[ascend_context]
shareable_weight_pid_list``). It writes the model's weights (its numeric
initializers) once into an anonymous, sealed memory file and runs on them
itself. ``get_model_info("shareable_weight_mem_handle")`` gives the *handle*;
a whitelisted process that builds the same model file with
``config_dict={"shared_mem_handle": handle}`` (or ``[ascend_context]
shareable_weight_mem_handle``), an *attacher*, maps the same pages read-only
and ONNX Runtime runs on them in place (``SessionOptions.add_initializer``),
so N processes hold one copy of the weights instead of N.

Mechanism: ``memfd_create`` (see ``_shared_memory.create_sealed``). The file has no
name in /dev/shm or anywhere else, so nothing can be left behind and nothing
needs unlinking; it is sealed (no write, grow or shrink) before the handle
exists, so no process can change weights under another's feet. The handle
is ``publisher_pid << 32 | fd`` (an integer that fits a signed int64, as the
seeds store it in ``Value(ctypes.c_int64)``); an attacher opens
``/proc/<pid>/fd/<fd>``, which works while the publisher keeps that fd open,
i.e. until it closes its model or exits. We chose this over a named
``/dev/shm`` segment because the kernel ties the memory's life to its users:

===================================  ========================================
event                                effect
===================================  ========================================
publisher builds                     memfd written, sealed, mapped; handle valid
attacher builds                      opens /proc/<pid>/fd/<fd>, maps, closes its fd
publisher closes model or exits      fd gone: new attaches fail ("stale");
                                     attachers already mapped keep running
last mapping goes (close or death)   the kernel frees the memory
===================================  ========================================

Who may attach: the publisher's own process and the pids in its whitelist.
The whitelist is checked by this module on attach; the kernel's own rule for
``/proc/<pid>/fd`` (same user, or root) is the hard boundary beneath it.

Layout of the memory file (little-endian; every tensor 64-byte aligned, the
first one page-aligned):

=============  =====  =========================================================
offset         bytes  field
=============  =====  =========================================================
0              8      magic ``b"ORCHWGT\\0"``
8              4      layout version (1)
12             4      publisher pid
16             8      data offset (first tensor; multiple of 4096)
24             8      total size in bytes
32             8      length of the JSON table of contents that follows
40             24     reserved, zero
64             n      JSON: {"pids": [...], "model": path, "tensors": [{"name",
                      "onnx_type", "dtype", "shape", "offset", "nbytes",
                      "sample"}, ...]} ("offset" counts from the data offset;
                      "sample": a digest of three 256-byte windows of the
                      tensor, to tell another checkpoint apart)
data offset    ...    tensor bytes, row-major, at data offset + "offset"
=============  =====  =========================================================

ONNX Runtime settings of a session on shared weights, and why: prepacking is
off (``session.disable_prepacking``: MLAS packs MatMul weights into private
copies); optimizers that rewrite weights into new private tensors are off
(``NchwcTransformer`` reorders Conv weights at ORT_ENABLE_ALL; ``ConvBNFusion``,
``ConvAddFusion``, ``ConvMulFusion`` fold into Conv weights), and
``ConstantFolding`` is off when the graph computes something from a weight
alone (a Transpose or Cast of a weight would be folded into a private copy,
and folded from the attacher's own file, not from the shared pages).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import struct
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

from . import _shared_memory
from ._errors import ConfigError, ModelError

MAGIC = b"ORCHWGT\0"
VERSION = 1
ALIGN = 64
PAGE = 4096
_PREFIX = struct.Struct("<8sIIQQQ24x")  # magic, version, publisher pid, data offset, total size, JSON length
MEMFD_NAME = "orch_weights"

PID_LIST_KEY = "shareable_weight_pid_list"
HANDLE_KEY = "shareable_weight_mem_handle"

WEIGHT_REWRITING_OPTIMIZERS = ("NchwcTransformer", "ConvBNFusion", "ConvAddFusion", "ConvMulFusion")
_SHAREABLE_TYPES = {
    TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BOOL,
    TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
    TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64,
}
_FOLDABLE_WEIGHT_BYTES = 4096  # folding a smaller constant costs no memory worth keeping ConstantFolding off for


@dataclass(frozen=True)
class TensorEntry:
    name: str
    onnx_type: int
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    sample: str = ""

    def signature(self) -> tuple:
        return (self.onnx_type, self.shape)


# -- config ------------------------------------------------------------------
def parse_pid_list(text: str, where: str) -> list[int]:
    """``"123, 456"`` (also ``"[123, 456]"``) -> [123, 456]."""
    parts = [p.strip() for p in str(text).strip().strip("[]()").split(",")]
    parts = [p for p in parts if p]
    if not parts:
        raise ConfigError(f"{where} is empty: list the pids (from Model().get_model_info('current_pid')) that may attach")
    pids = []
    for part in parts:
        try:
            pid = int(part)
        except ValueError:
            pid = -1
        if pid < 0:
            raise ConfigError(f"{where}: {part!r} is not a process id; expected 'pid1, pid2, ...', got {text!r}")
        pids.append(pid)
    return pids


def parse_handle(text, where: str) -> int:
    try:
        handle = int(str(text).strip())
    except ValueError:
        raise ConfigError(
            f"{where} must be the integer that get_model_info('shareable_weight_mem_handle') returned, got {text!r}"
        ) from None
    if handle <= 0:
        raise ConfigError(f"{where} must be a positive integer handle, got {text!r}")
    return handle


def make_handle(pid: int, fd: int) -> int:
    return pid << 32 | fd


def split_handle(handle: int) -> tuple[int, int]:
    return handle >> 32, handle & 0xFFFFFFFF


def _pid_max() -> int:
    try:
        with open("/proc/sys/kernel/pid_max") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return 1 << 22


# -- entry point -----------------------------------------------------------
def share_weights(proto: onnx.ModelProto, path: Path, context, config, *, sharded: bool = False) -> "SharedWeights | None":
    """Publish or attach the weights of ``proto`` (read from ``path``) as ``config`` asks; None when it asks neither.

    Raises:
        ConfigError: malformed pid list or handle, both given, or a non-CPU target.
        ModelError: ``sharded`` (a tensor-parallel shard: not shared).
        ModelError: a handle that is malformed, stale or not ours, a process not
            in the publisher's whitelist, or a model file other than the publisher's.
    """
    section = config.sections.get("ascend_context", {})
    pid_list, handle = section.get(PID_LIST_KEY), section.get(HANDLE_KEY)
    if pid_list is None and handle is None:
        return None
    where = f"{config.source}: [ascend_context]"
    if pid_list is not None and handle is not None:
        raise ConfigError(
            f"{where} sets both {PID_LIST_KEY} ('pids') and {HANDLE_KEY} ('shared_mem_handle'): a model either publishes "
            f"its weights (the pid list) or attaches to another process's (the handle), not both"
        )
    if sharded:
        raise ModelError(f"{path} is a tensor-parallel shard; weight sharing across processes is for whole models")
    if list(context.target) != ["cpu"]:
        raise ConfigError(
            f"weight sharing runs on the CPU here (shared host memory); context.target is {list(context.target)}, "
            f"set it to ['cpu']"
        )
    if pid_list is not None:
        return SharedWeights.publish(proto, path, parse_pid_list(pid_list, f"{where} {PID_LIST_KEY} ('pids')"))
    return SharedWeights.attach(proto, path, parse_handle(handle, f"{where} {HANDLE_KEY} ('shared_mem_handle')"))


class SharedWeights:
    """One process's view of published weights: the read-only mapping, numpy views and OrtValues over it.

    The mapping stays alive while this object does; every session built on it
    holds a reference (``new_session``), so closing a model while another
    thread still runs it cannot unmap memory under ONNX Runtime.
    """

    def __init__(self, handle: int, mapping, data_offset: int, entries: list[TensorEntry], pids: list[int],
                 publisher_pid: int, model: str, disabled_optimizers: list[str], owned_fd: int | None = None):
        self.handle = handle
        self.pids = pids
        self.publisher_pid = publisher_pid
        self.model = model
        self.entries = entries
        self.disabled_optimizers = disabled_optimizers
        self._mapping = mapping
        self.arrays = {
            e.name: np.frombuffer(mapping, dtype=e.dtype, count=int(np.prod(e.shape, dtype=np.int64)),
                                  offset=data_offset + e.offset).reshape(e.shape)
            for e in entries
        }
        self.ort_values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in self.arrays.items()}
        # The publisher's fd is what makes the handle valid; close it once, on close() or when this object goes.
        self._close_fd = weakref.finalize(self, os.close, owned_fd) if owned_fd is not None else None

    @property
    def is_publisher(self) -> bool:
        return self._close_fd is not None

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    # -- publisher ---------------------------------------------------------
    @classmethod
    def publish(cls, proto: onnx.ModelProto, path: Path, pids: list[int]) -> "SharedWeights":
        inits = [init for init in proto.graph.initializer if _shareable(init)]
        entries, offset = [], 0
        for init in inits:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
            nbytes = int(np.prod(init.dims, dtype=np.int64)) * dtype.itemsize
            entries.append(TensorEntry(init.name, init.data_type, dtype.str, tuple(int(d) for d in init.dims), offset, nbytes, "0" * 16))
            offset = _align(offset + nbytes, ALIGN)
        me = os.getpid()
        toc = _toc_json(pids, str(path.resolve()), entries)  # placeholder samples: the same length as the real ones
        data_offset = _align(_PREFIX.size + len(toc), PAGE)
        total = data_offset + offset
        base_dir = str(path.resolve().parent)

        def fill(fd: int) -> None:
            for i, init in enumerate(inits):
                array = np.asarray(numpy_helper.to_array(init, base_dir), order="C")
                entry = entries[i]
                entries[i] = TensorEntry(entry.name, entry.onnx_type, entry.dtype, entry.shape, entry.offset, entry.nbytes, _sample(array))
                _shared_memory.write_all(fd, array, data_offset + entry.offset)
                del array
            body = _toc_json(pids, str(path.resolve()), entries)
            _shared_memory.write_all(fd, _PREFIX.pack(MAGIC, VERSION, me, data_offset, total, len(body)) + body, 0)

        try:
            fd = _shared_memory.create_sealed(f"{MEMFD_NAME}_{me}", total, fill)
        except OSError as exc:
            raise ModelError(f"could not publish the weights of {path} ({_mb(total)}) in shared memory: {exc}") from None
        try:
            mapping = _shared_memory.map_readonly(fd)
        except OSError as exc:
            os.close(fd)
            raise ModelError(f"could not map the shared weights of {path}: {exc}") from None
        return cls(make_handle(me, fd), mapping, data_offset, entries, pids, me, str(path.resolve()),
                   _disabled_optimizers(proto, entries), owned_fd=fd)

    # -- attacher ----------------------------------------------------------
    @classmethod
    def attach(cls, proto: onnx.ModelProto, path: Path, handle: int) -> "SharedWeights":
        pid, fd = split_handle(handle)
        what = f"shared weights handle {handle} (process {pid}, fd {fd})"
        never = "or it is not a number that get_model_info('shareable_weight_mem_handle') returned"
        if not 0 < pid <= _pid_max() or fd >= 1 << 31:
            raise ModelError(
                f"shared weights handle {handle} is not a handle: it would name process {pid}, fd {fd}, and no process "
                f"can have those; pass the number get_model_info('shareable_weight_mem_handle') returned in the publisher"
            )
        try:
            own_fd = _shared_memory.open_peer_fd(pid, fd)
        except ProcessLookupError:
            raise ModelError(f"{what} is stale: no process {pid} is running; the publisher has exited, {never}") from None
        except FileNotFoundError:
            raise ModelError(
                f"{what} is stale: process {pid} is running but holds no fd {fd}; the publisher closed its model "
                f"(Model.close) or was rebuilt, {never}"
            ) from None
        except PermissionError:
            raise ModelError(f"{what}: the kernel refuses to open process {pid}'s fd (it runs as another user)") from None
        try:
            target = _readlink(_shared_memory.peer_fd_path(pid, fd))
            if not target.startswith(f"/memfd:{MEMFD_NAME}"):
                raise ModelError(
                    f"{what} is stale: process {pid} is running, but its fd {fd} is no longer published weights (it is "
                    f"now {target!r}, reused after the publisher closed its model (Model.close) or was rebuilt), {never}"
                )
            if not _shared_memory.is_sealed(own_fd):
                raise ModelError(f"{what} names memory that is not sealed, so not (yet) published weights")
            mapping = _shared_memory.map_readonly(own_fd)
        finally:
            os.close(own_fd)
        publisher, pids, model, data_offset, entries = _read_header(mapping, what)
        me = os.getpid()
        if me != publisher and me not in pids:
            raise ModelError(
                f"process {me} may not attach to {what}: the publisher allows only processes {pids} (its 'pids' / "
                f"{PID_LIST_KEY}); pass this process's Model().get_model_info('current_pid') to the publisher before it builds"
            )
        _check_same_model(proto, path, entries, model, publisher)
        return cls(handle, mapping, data_offset, entries, pids, publisher, model, _disabled_optimizers(proto, entries))

    # -- use -----------------------------------------------------------------
    def new_session(self, model, options: ort.SessionOptions, providers) -> ort.InferenceSession:
        """A session on these weights for ``model`` (a path or the model's bytes); ``options`` must
        already carry ``ort_values`` (add_initializer)."""
        options.add_session_config_entry("session.disable_prepacking", "1")
        session = ort.InferenceSession(model, sess_options=options, providers=providers,
                                       disabled_optimizers=self.disabled_optimizers)
        session._orch_shared_weights = self  # the mapping lives as long as any session on it
        release_freed_heap()
        return session

    def close(self) -> None:
        """Stop publishing (new attaches fail); the memory goes with the last mapping, in any process."""
        if self._close_fd is not None:
            self._close_fd()

    def __repr__(self) -> str:
        role = "publisher" if self.is_publisher else f"attached to {self.publisher_pid}"
        return f"<SharedWeights handle={self.handle} {role} tensors={len(self.entries)} {_mb(self.nbytes)} pids={self.pids}>"


# -- helpers ---------------------------------------------------------------
def _shareable(init: TensorProto) -> bool:
    return init.data_type in _SHAREABLE_TYPES and all(d > 0 for d in init.dims)


def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def _sample(array: np.ndarray) -> str:
    """A digest of the tensor's size and three 256-byte windows: cheap, and enough to tell another checkpoint apart."""
    data = memoryview(array).cast("B")
    n = len(data)
    digest = hashlib.blake2b(str(n).encode(), digest_size=8)
    for start in (0, max(0, n // 2 - 128), max(0, n - 256)):
        digest.update(data[start:start + 256])
    return digest.hexdigest()


def _toc_json(pids: list[int], model: str, entries: list[TensorEntry]) -> bytes:
    tensors = [
        {"name": e.name, "onnx_type": e.onnx_type, "dtype": e.dtype, "shape": list(e.shape),
         "offset": e.offset, "nbytes": e.nbytes, "sample": e.sample}
        for e in entries
    ]
    return json.dumps({"pids": pids, "model": model, "tensors": tensors}, separators=(",", ":")).encode()


def _read_header(mapping, what: str) -> tuple[int, list[int], str, int, list[TensorEntry]]:
    if len(mapping) < _PREFIX.size:
        raise ModelError(f"{what} names {len(mapping)} bytes of memory, too few for the shared-weights header")
    magic, version, publisher, data_offset, total, length = _PREFIX.unpack_from(mapping, 0)
    if magic != MAGIC:
        raise ModelError(f"{what} names memory that does not start with the shared-weights header ({magic!r})")
    if version != VERSION:
        raise ModelError(f"{what} has layout version {version}; this orchestrator reads version {VERSION} (upgrade both sides alike)")
    if total != len(mapping) or _PREFIX.size + length > data_offset:
        raise ModelError(f"{what}: the header says {total} bytes, the memory holds {len(mapping)}: it is damaged")
    try:
        toc = json.loads(bytes(mapping[_PREFIX.size:_PREFIX.size + length]))
        entries = [TensorEntry(t["name"], t["onnx_type"], t["dtype"], tuple(t["shape"]), t["offset"], t["nbytes"], t["sample"])
                   for t in toc["tensors"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{what}: unreadable table of contents ({exc})") from None
    if any(e.offset % ALIGN or e.offset < 0 or data_offset + e.offset + e.nbytes > total for e in entries):
        raise ModelError(f"{what}: a tensor lies outside the memory or off alignment: it is damaged")
    return publisher, list(toc["pids"]), toc["model"], data_offset, entries


def _check_same_model(proto: onnx.ModelProto, path: Path, entries: list[TensorEntry], model: str, publisher: int) -> None:
    """The attacher's file must have the publisher's weights: names, types and shapes, and the same sampled bytes."""
    ours = {init.name: init for init in proto.graph.initializer if _shareable(init)}
    theirs = {e.name: e for e in entries}
    problems = []
    missing = [n for n in theirs if n not in ours]
    extra = [n for n in ours if n not in theirs]
    if missing:
        problems.append(f"weights {missing[:3]}{' ...' if len(missing) > 3 else ''} are in the publisher's model but not in this one")
    if extra:
        problems.append(f"weights {extra[:3]}{' ...' if len(extra) > 3 else ''} are in this model but not in the publisher's")
    for name in (n for n in theirs if n in ours):
        init, entry = ours[name], theirs[name]
        if (init.data_type, tuple(init.dims)) != entry.signature():
            problems.append(
                f"weight {name!r} is {_type_name(init.data_type)}{list(init.dims)} here, "
                f"{_type_name(entry.onnx_type)}{list(entry.shape)} in the publisher's"
            )
        if len(problems) >= 4:
            break
    if not problems:
        base_dir = str(path.resolve().parent)
        for name, entry in theirs.items():
            if _sample(np.asarray(numpy_helper.to_array(ours[name], base_dir), order="C")) != entry.sample:
                problems.append(f"weight {name!r} has the same type and shape but other values (another checkpoint?)")
                break
    if problems:
        raise ModelError(
            f"model {path} is not the model whose weights process {publisher} shares ({model}): " + "; ".join(problems)
            + ". Attach with the same model file the publisher built."
        )


def _type_name(onnx_type: int) -> str:
    try:
        return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx_type)))
    except (KeyError, TypeError, ValueError):
        return f"onnx type {onnx_type}"


def _disabled_optimizers(proto: onnx.ModelProto, entries: list[TensorEntry]) -> list[str]:
    """The optimizers that would copy shared weights into private tensors for this graph (see the module docstring)."""
    return disabled_optimizers(proto, {e.name for e in entries if e.nbytes >= _FOLDABLE_WEIGHT_BYTES})


def disabled_optimizers(proto: onnx.ModelProto, weights: set[str]) -> list[str]:
    """The optimizers to turn off in a session of ``proto`` that runs on shared ``weights`` (names of large
    initializers): those that rewrite weights, and ConstantFolding when a node computes from such a weight alone."""
    constants = {init.name for init in proto.graph.initializer} | {""}
    constants |= {out for node in proto.graph.node if node.op_type == "Constant" for out in node.output}
    folds_weight = any(
        node.op_type != "Constant" and set(node.input) <= constants and weights & set(node.input)
        for node in proto.graph.node
    )
    return list(WEIGHT_REWRITING_OPTIMIZERS) + (["ConstantFolding"] if folds_weight else [])


class SharedInitializers:
    """Initializers of one model, read once, as OrtValues that several sessions of this process run on.

    Used by the thread pool (every worker's session on one copy) and by a rank's merged decoder (the
    stage sessions of both branches on one copy). ``names`` limits it to those initializers.
    """

    def __init__(self, proto: onnx.ModelProto, base_dir: str, names: set[str] | None = None):
        self.arrays: dict[str, np.ndarray] = {}
        for init in proto.graph.initializer:
            if _shareable(init) and (names is None or init.name in names):
                self.arrays[init.name] = np.asarray(numpy_helper.to_array(init, base_dir), order="C")
        # ortvalue_from_numpy wraps the array's memory (no copy) and keeps the array alive.
        self.ort_values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in self.arrays.items()}
        self.large = {name for name, array in self.arrays.items() if array.nbytes >= _FOLDABLE_WEIGHT_BYTES}
        self.disabled_optimizers = disabled_optimizers(proto, self.large)

    @property
    def nbytes(self) -> int:
        """Bytes held (an array under two names counts once)."""
        return sum(array.nbytes for array in {id(a): a for a in self.arrays.values()}.values())

    def add(self, name: str, array: np.ndarray) -> None:
        """One more initializer (an array already held under another name is not copied)."""
        self.arrays[name] = array
        self.ort_values[name] = ort.OrtValue.ortvalue_from_numpy(array)
        if array.nbytes >= _FOLDABLE_WEIGHT_BYTES:
            self.large.add(name)

    def drop(self, name: str) -> None:
        for held in (self.arrays, self.ort_values):
            held.pop(name, None)
        self.large.discard(name)

    def apply(self, options: ort.SessionOptions, names=None, *, prepacking: bool = False) -> None:
        """Hand these initializers (or those of ``names``) to a session's options, prepacking off (see the module
        docstring); the session then needs ``disabled_optimizers`` (or ``disabled_optimizers(its model, ...)``).
        ``prepacking=True`` leaves it on: the session then packs its MatMul weights into a private copy."""
        for name in self.ort_values if names is None else names:
            options.add_initializer(name, self.ort_values[name])
        if not prepacking:
            options.add_session_config_entry("session.disable_prepacking", "1")


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError as exc:
        return f"<unreadable: {exc.strerror}>"


def release_freed_heap() -> None:
    """Give the heap that model loading freed back to the kernel (glibc keeps it otherwise).

    Building a session parses the whole model file, weights included, and frees
    that copy once the shared weights stand in for it; without a trim the freed
    pages would stay resident and count against the memory sharing saves.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
