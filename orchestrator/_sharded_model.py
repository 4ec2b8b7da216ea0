"""A sharded model from Python: start the ranks, send inputs, get the whole model's outputs back.

    with ShardedModel("shards/model.onnx", backend="mpi") as model:
        outputs = model.predict({"x": x})        # {"y": array}, as the unsliced model gives

    run_sharded("shards/model.onnx", {"x": x})   # the same, in one call

Ranks are started with ``mpirun -n N`` (backend ``mpi``) or as N local
processes with a generated rank table (backend ``zmq``). Each builds its
shard (``ranks.StagedRunner``); requests and replies travel over ZeroMQ on a
Unix socket (``_sharded_protocol``). A rank that fails turns into the rank's
own exception in the caller (type kept, remote traceback as ``__cause__``),
a rank that dies or stalls into a ``WorkerError`` within the timeout; then
every rank process is stopped (TERM, a deadline, KILL).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import zmq

from ranks._env import default_timeout
from ranks._model import load_onnx_header, validate_feeds
from ranks._ports import free_base_port
from ranks._shard_files import resolve_shard_path
from ranks._tensor import DataType
from ranks._errors import ConfigError, ModelNotFoundError

from ._errors import WorkerError
from ranks._remote_errors import unpack_exception
from ranks._shard_manifest import manifest_path_for, read_manifest

from . import _sharded_protocol as proto

BACKENDS = ("mpi", "zmq")
_STOP_GRACE = 5.0


class ShardedModel:
    """Tensor-parallel shards run by ``tp`` rank processes, used like one model.

    ``model_path``: ``DIR/MODEL.onnx`` whose shards ``DIR/MODEL{r}.onnx`` and manifest exist
    (or the shard directory when it holds one manifest). ``tp``: defaults to the manifest's
    world size; another value is an error. ``threads``: intra-op threads per rank.
    """

    def __init__(self, model_path: str | os.PathLike, *, tp: int | None = None, backend: str = "mpi",
                 threads: int = 1, timeout: float | None = None, startup_timeout: float | None = None):
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.model_path = _model_path(Path(model_path))
        manifest = read_manifest(manifest_path_for(self.model_path))
        size = manifest["world_size"]
        if tp is not None and tp != size:
            raise ConfigError(f"tp={tp}, but the shards of {self.model_path} were made for {size} ranks")
        self.tp = size
        # The inputs every rank expects, so bad ones fail here with an InputError and the ranks stay up.
        self._input_specs = _input_specs(resolve_shard_path(self.model_path, 0, size))
        self.backend = backend
        self.timeout = default_timeout() if timeout is None else timeout
        self._closed = False
        self._lock = threading.Lock()
        self._next_id = 0
        self.last_rank_seconds: float | None = None
        self._procs: list[subprocess.Popen] = []
        self._logs: list = []
        self._tmp = tempfile.TemporaryDirectory(prefix="orch_sharded_")
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # A Unix socket in our own temporary directory: every rank runs on this host, and it moves a
        # batch-64 tensor faster than TCP on 127.0.0.1; it goes away with the directory.
        address = f"ipc://{self._tmp.name}/master.sock"
        self._sock.bind(address)
        self._peers: dict[int, bytes] = {}
        try:
            self._start(address, threads)
            self._wait_ready(startup_timeout or max(self.timeout, 60.0))
        except BaseException:
            self.close()
            raise

    # -- starting ------------------------------------------------------------
    def _start(self, address: str, threads: int) -> None:
        worker = [sys.executable, "-m", "orchestrator._sharded_worker", "--model", str(self.model_path),
                  "--master", address, "--backend", self.backend, "--threads", str(threads),
                  "--master_pid", str(os.getpid()), "--timeout", str(self.timeout)]
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        if self.backend == "mpi":
            from launchers import MpiLaunchConfig, build_mpirun_command, find_mpirun, mpi_flavor

            # Each rank runs under the launchers' wrapper: lines prefixed with the rank, an exit record
            # per rank, and the rank's process group stopped when mpirun tears the job down.
            mpirun = find_mpirun()
            config = MpiLaunchConfig(nprocs=self.tp, program=worker, console=False)
            self._spawn(build_mpirun_command(config, mpirun, mpi_flavor(mpirun)), env, "mpirun")
        else:
            from ranks._rank_table import generate_rank_table

            table = Path(self._tmp.name) / "rank_table.json"
            generate_rank_table([("127.0.0.1", list(range(self.tp)))]).dump(table)
            base_port = free_base_port(self.tp)
            for rank in range(self.tp):
                self._spawn(worker + ["--rank", str(rank), "--size", str(self.tp), "--rank_table", str(table),
                                      "--base_port", str(base_port)], env, f"rank{rank}")

    def _spawn(self, cmd: list[str], env: dict, name: str) -> None:
        log = open(Path(self._tmp.name) / f"{name}.log", "w+b")
        self._logs.append(log)
        self._procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True))

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self._peers) < self.tp:
            kind, header, _, extra, identity = self._receive(deadline, "starting the ranks")
            if kind == proto.READY:
                self._peers[header["rank"]] = identity
                self.inputs, self.outputs = header["inputs"], header["outputs"]
            elif kind == proto.ERROR:
                raise self._remote_error(header, extra)

    # -- running -------------------------------------------------------------
    def predict(self, inputs) -> dict[str, np.ndarray]:
        """Run the sharded model on ``inputs`` ({name: array} or a list in input order); {output name: array}."""
        with self._lock:  # one request in flight: the ranks answer in order, over one socket
            return self._predict(inputs)

    def _predict(self, inputs) -> dict[str, np.ndarray]:
        if self._closed:
            raise WorkerError("predict on a closed ShardedModel")
        return self._request(validate_feeds(inputs, self._input_specs))

    def _request(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Send checked inputs to every rank and wait for rank 0's outputs (the lock is held)."""
        request = self._next_id
        self._next_id += 1
        frames = proto.encode(proto.PREDICT, {"id": request}, inputs)
        for rank in range(self.tp):
            self._sock.send_multipart([self._peers[rank]] + frames)
        deadline = time.monotonic() + self.timeout
        pending = set(range(self.tp))
        result = None
        self.last_rank_seconds = None  # slowest rank's time inside run(), without the transfers
        try:
            while pending:
                kind, header, arrays, extra, _ = self._receive(deadline, f"predict request {request}")
                if kind == proto.ERROR:
                    raise self._remote_error(header, extra)
                if kind == proto.REPLY and header.get("id") == request:
                    pending.discard(header["rank"])
                    self.last_rank_seconds = max(self.last_rank_seconds or 0.0, header.get("seconds", 0.0))
                    if header["rank"] == 0:
                        result = {k: np.array(v) for k, v in arrays.items()}
        except BaseException:
            self.close()  # a failed or stalled rank leaves its peers inside a collective: the job is over
            raise
        return result

    __call__ = predict

    def _receive(self, deadline: float, doing: str):
        while True:
            for proc, log in zip(self._procs, self._logs):
                code = proc.poll()
                if code is not None and (code != 0 or not self._closed):
                    if self._sock.poll(50):  # its last word (an ERROR) may still be on the way
                        break
                    raise self._death_error(doing, proc, code, log)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerError(f"{doing}: no answer from the {self.tp} ranks of {self.model_path} "
                                  f"within {self.timeout:.0f} s\n" + "\n".join(_tail(log) for log in self._logs))
            if self._sock.poll(int(min(remaining, 0.2) * 1000)):
                frames = self._sock.recv_multipart()
                kind, header, arrays, extra = proto.decode(frames[1:])
                return kind, header, arrays, extra, frames[0]

    def _death_error(self, doing: str, proc: subprocess.Popen, code: int, log) -> WorkerError:
        """The first failed rank, as the launchers report it (from the wrappers' exit records) when known."""
        from launchers._failures import RankExit, failure_error
        from launchers._rank_wrapper import parse_record

        text = _tail(log, limit=1 << 20)
        records = [parse_record(line) for line in text.splitlines()]
        exits = [RankExit.from_dict(r) for r in records if r and r.get("event") == "exit"]
        report = failure_error(exits, self.tp)
        name = "mpirun" if self.backend == "mpi" else f"rank {self._procs.index(proc)}"
        detail = str(report) if report is not None else _tail(log, 4000)
        error = WorkerError(f"{doing}: {name} (pid {proc.pid}) exited with {_describe_exit(code)}\n{detail}")
        error.__cause__ = report
        return error

    def _remote_error(self, header: dict, extra: list[bytes]) -> BaseException:
        packed = dict(header["error"])
        packed["pickled"] = extra[0] if extra else b""
        return unpack_exception(packed)

    # -- stopping ------------------------------------------------------------
    def close(self) -> None:
        """Stop every rank (EXIT, then TERM and KILL after a deadline); calling it twice is harmless."""
        if self._closed:
            return
        self._closed = True
        for identity in self._peers.values():
            try:
                self._sock.send_multipart([identity] + proto.encode(proto.EXIT, {}), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        deadline = time.monotonic() + _STOP_GRACE
        for proc in self._procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE
        for proc in self._procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        for log in self._logs:
            log.close()
        self._sock.close()
        self._ctx.term()
        self._tmp.cleanup()

    def __enter__(self) -> "ShardedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def run_sharded(model_path: str | os.PathLike, inputs, *, backend: str = "mpi", tp: int | None = None,
                threads: int = 1, timeout: float | None = None) -> dict[str, np.ndarray]:
    """Start the ranks of a sharded model, run ``inputs`` once, stop the ranks; {output name: array}."""
    with ShardedModel(model_path, backend=backend, tp=tp, threads=threads, timeout=timeout) as model:
        return model.predict(inputs)


def _model_path(path: Path) -> Path:
    if path.is_dir():
        manifests = sorted(path.glob("*.manifest.json"))
        if len(manifests) != 1:
            raise ModelNotFoundError(f"{path} holds {len(manifests)} shard manifests; name the model, e.g. {path}/MODEL.onnx")
        return path / manifests[0].name.replace(".manifest.json", ".onnx")
    return path


def _input_specs(shard_path: Path) -> list[tuple[str, DataType, list[int]]]:
    """(name, dtype, shape with -1 for free dimensions) of a shard's graph inputs."""
    graph = load_onnx_header(shard_path).graph
    weights = {t.name for t in graph.initializer}
    specs = []
    for value in graph.input:
        if value.name in weights:
            continue
        tensor = value.type.tensor_type
        dtype = DataType.from_numpy(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor.shape.dim]
        specs.append((value.name, dtype, shape))
    return specs


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _tail(log, limit: int = 4000) -> str:
    try:
        log.flush()
        log.seek(0, os.SEEK_END)
        size = log.tell()
        log.seek(max(0, size - limit))
        return log.read().decode(errors="replace")
    except (OSError, ValueError):
        return ""
