"""A sharded model from Python: start the ranks, send inputs, get the whole model's outputs back.

    with ShardedModel("shards/model.onnx", backend="mpi") as model:
        outputs = model.predict({"x": x})        # {"y": array}, as the unsliced model gives

    run_sharded("shards/model.onnx", {"x": x})   # the same, in one call

    with ShardedModel("shards/decoder.onnx") as model:   # a decoder sharded with its key/value cache
        result = model.generate([[15, 7, 300], [5, 6]], 32)   # result.tokens: the new ids per prompt

The ranks are the supervisor's children (``launchers``): ``mpirun -n N`` under
``MpiLauncher`` (backend ``mpi``), or N local processes with a generated rank
table under ``Supervisor`` (backend ``zmq``). Each runs ``_sharded_worker``;
messages are the one protocol's (``_protocol``, stream framing) over one Unix
socket per rank in the model's temporary directory (``_rank_links``).

Handshake and order (reordering any step would deadlock or misreport):

1. the master listens on its socket before it starts any rank;
2. each rank builds its communicator and its shard, passes a barrier with
   every other rank, then sends BUILD_FINISH (pid, host, inputs, outputs);
3. no PREDICT before BUILD_FINISH from EVERY rank: a rank's ERROR, its death
   or the startup timeout end the constructor. (zmq: a rank whose port was
   taken after the master probed it reports ``PortInUseError``; the master
   stops every rank and starts them again on other ports, ``PORT_ATTEMPTS`` times);
4. one request at a time (a lock): PREDICT to every rank; rank 0 answers REPLY
   with the outputs (for ``generate`` every rank replies; for a plain predict
   the others send nothing, a message and a wake-up of the master less), any
   rank ERROR when it fails, and STARTED before it when the
   request runs longer than a short while (a stalled request's ranks have said
   whether they took it). ``generate`` is one such request (PREDICT with a
   ``generate`` field): the prompt goes out once, the ranks run the whole
   loop (``_generate``), rank 0's REPLY carries the new ids;
5. close: EXIT to every rank, up to ``EXIT_GRACE`` seconds for them to leave
   (not waiting for a suspended rank, which cannot read it), then the
   supervisor's stop: TERM + CONT, one deadline, KILL.

Failures. A rank that raises re-raises its own exception type in the caller
(its traceback as ``__cause__``). A rank that dies gives a ``WorkerError``
with the launchers' first-failure report (rank, host, pid, signal or exit
code, last lines). A rank that only lost its peer (``PeerLostError``) or
timed out waiting for it is a victim: the peer is named instead (its own
exception, its death, or its silence), whichever message came first. A
request that stalls gives a ``WorkerTimeoutError`` naming the ranks that
did not answer (pid, host, whether they took the request, whether their
process is stopped). After any of these the job is over: every rank
process is stopped.

Nothing is left behind: ``close()`` (also ``with``, garbage collection and
interpreter exit) stops every process and removes the temporary directory.
If the caller dies without it (SIGKILL, an unhandled SIGTERM), the ranks die
with it (parent-death signal) and the supervisor's watchdog sweeps their
process groups and removes the directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import onnx
import psutil

from launchers import MpiLaunchConfig, MpiLauncher, ProcessSpec, RankOutput, Supervisor, python_module
from ranks._env import check_timeout, default_timeout
from ranks._errors import (CommError, CommTimeoutError, ConfigError, ModelNotFoundError, PeerLostError,
                           PortInUseError)
from ranks._model import load_onnx_header, validate_feeds
from ranks._ports import free_base_port
from ranks._rank_table import generate_rank_table
from ranks._shard_files import resolve_shard_path
from ranks._shard_manifest import manifest_path_for, read_manifest
from ranks import _shared_memory
from ranks._tensor import DataType

from . import _protocol as proto
from ._errors import WorkerError, WorkerTimeoutError
from ._decoder_tables import DecoderTables
from ._rank_links import MasterLinks

BACKENDS = ("mpi", "zmq")
WORKER_MODULE = "orchestrator._sharded_worker"
EXIT_GRACE = 2.0  # close(): seconds the ranks get to leave after EXIT before the supervisor stops them
PORT_ATTEMPTS = 3  # zmq: how often the ranks are started again when a port was taken under them
FAILURE_GRACE = 1.0  # after a rank reports a lost or silent peer: how long to wait for that peer's own failure
DEAD_PEER_GRACE = 2.0  # ... and how long when that peer's process is seen gone (its report is on the way)
_LAST_WORD_MS = 250  # after a death: how long its last message (an ERROR) may take to arrive
# A rank that took a request says so (STARTED) within about 0.3 s (_sharded_worker.STARTED_AFTER and its
# helper's cadence): one that has not after this long never took it.
SILENT_AFTER = 1.0


class _Job:
    """What ``close()``, errors and the exit hook stop: the ranks (a Supervisor or an MpiLauncher), the links, the directory."""

    def __init__(self, tmp: str):
        self.tmp = tmp
        self.launcher: Supervisor | MpiLauncher | None = None
        # A Unix socket in our own temporary directory: every rank runs on this host, and it goes away with
        # the directory.
        self.links = MasterLinks(os.path.join(tmp, "master.sock"))
        self.scratch: str | None = None  # mpi: Open MPI's files
        self.lock = threading.Lock()
        self.down = False

    def stop_ranks(self, graceful: bool) -> None:
        launcher = self.launcher
        try:
            if launcher is None:
                return
            if graceful and self.links.peers:
                self.links.tell_everyone(proto.encode(proto.EXIT))
                launcher.join(EXIT_GRACE, skip_suspended=True)
            launcher.stop()
        finally:
            self.links.forget_peers()

    def shutdown(self, graceful: bool = True) -> None:
        with self.lock:
            if self.down:
                return
            self.down = True
        try:
            self.stop_ranks(graceful)
        finally:
            self.links.close()
            if self.scratch is not None and os.path.dirname(self.scratch) == _shared_memory.SHM_DIR:
                _shared_memory.remove_directory(self.scratch)  # made by the home: it forgets it too
            for path in (self.tmp, self.scratch):
                if path is not None:
                    shutil.rmtree(path, ignore_errors=True)


class ShardedModel:
    """Tensor-parallel shards run by ``tp`` rank processes, used like one model.

    ``model_path``: ``DIR/MODEL.onnx`` whose shards ``DIR/MODEL{r}.onnx`` and manifest exist
    (or the shard directory when it holds one manifest). ``tp``: defaults to the manifest's
    world size; another value is an error. ``backend``: ``mpi`` or ``zmq``. ``threads``:
    intra-op threads per rank. ``timeout``: seconds a request may take (and the ranks'
    collectives); default ORCH_TIMEOUT. ``startup_timeout``: seconds the ranks may take to
    build their shards (default: the timeout, at least 60). ``prefill``: the shards of a separate prefill
    graph (no past inputs; the decoder's ``generate`` runs it for the prompt), made for the same ranks.
    """

    def __init__(self, model_path: str | os.PathLike, *, tp: int | None = None, backend: str = "mpi",
                 threads: int = 1, timeout: float | None = None, startup_timeout: float | None = None,
                 prefill: str | os.PathLike | None = None):
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if timeout is not None:
            timeout = check_timeout(timeout, "ShardedModel: timeout")  # before any rank starts
        if startup_timeout is not None:
            startup_timeout = check_timeout(startup_timeout, "ShardedModel: startup_timeout")
        self.model_path = _model_path(Path(model_path))
        manifest = read_manifest(manifest_path_for(self.model_path))
        size = manifest["world_size"]
        if tp is not None and tp != size:
            raise ConfigError(f"tp={tp}, but the shards of {self.model_path} were made for {size} ranks")
        self.tp = size
        self.prefill_path = None
        if prefill is not None:
            self.prefill_path = _model_path(Path(prefill))
            other = read_manifest(manifest_path_for(self.prefill_path))["world_size"]
            if other != size:
                raise ConfigError(f"the prefill shards {self.prefill_path} were made for {other} ranks, "
                                  f"the decoder's {self.model_path} for {size}")
        # The inputs every rank expects, so bad ones fail here with an InputError and the ranks stay up.
        # (predict takes a decoder's cache whole, as the source model does: each rank slices its heads)
        self._cache = [c for c in manifest.get("cache", []) if c["axis"] is not None]
        self._cache_pairs = {c["past"]: c["present"] for c in manifest.get("cache", [])} or None  # as the ranks pair
        self._decoder_checked = False  # generate: whether shard 0's graph was found to be a decoder with its cache
        # A token embedding split by vocabulary gives zeros for an id no rank owns, where the whole model's
        # Gather fails: ids are checked against its rows here.
        self._tables = DecoderTables(
            vocabulary=next((w["shape"][0] for w in manifest.get("weights", []) if w["split"] == "vocabulary"), None),
            positions=manifest.get("positions"))
        self._input_specs = _input_specs(resolve_shard_path(self.model_path, 0, size), self._cache)
        self._accepted: tuple | None = None  # (name, dtype, shape) of the inputs last checked and taken as they were
        self.backend = backend
        self.timeout = default_timeout() if timeout is None else timeout
        self._closed: str | None = None
        self._lock = threading.Lock()
        self._next_id = 1
        self._ranks: dict[int, dict] = {}  # each rank's BUILD_FINISH header: pid, host, ...
        self.last_rank_seconds: float | None = None
        self.last_reply: dict | None = None  # rank 0's last REPLY header
        self.last_replies: dict[int, dict] = {}  # every rank's last REPLY header
        tmp = tempfile.mkdtemp(prefix="orch_sharded_")
        try:
            self._job = _Job(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._finalizer = weakref.finalize(self, self._job.shutdown, True)  # garbage collection, interpreter exit
        try:
            self._start(threads, startup_timeout or max(self.timeout, 60.0))
        except BaseException:
            self._closed = "it failed to start"
            self._job.shutdown(graceful=False)
            raise

    # -- starting ------------------------------------------------------------
    def _start(self, threads: int, startup_timeout: float) -> None:
        argv, env = python_module(WORKER_MODULE, "--model", str(self.model_path), "--master", self._job.links.path,
                                  "--backend", self.backend, "--threads", str(threads),
                                  "--master_pid", str(os.getpid()), "--timeout", str(self.timeout),
                                  *(["--prefill", str(self.prefill_path)] if self.prefill_path else []))
        deadline = time.monotonic() + startup_timeout
        if self.backend == "mpi":
            # Each rank runs under the launchers' wrapper: lines prefixed with the rank, an exit record
            # per rank (the reports are built from them), its process group stopped with the job.
            config = MpiLaunchConfig(nprocs=self.tp, program=argv, console=False)
            # Open MPI's own files (session directory, shared-memory backing files) in a directory of
            # ours on /dev/shm, which goes with the job however it ends.
            scratch = (_shared_memory.make_directory("sharded") if _shared_memory.named_usable()
                       else tempfile.mkdtemp(prefix="ompi_", dir=self._job.tmp))
            self._job.scratch = scratch
            self._job.launcher = MpiLauncher(config, env=env, cleanup_paths=[self._job.tmp, scratch], scratch_dir=scratch)
            self._job.launcher.start()
            self._wait_built(deadline)
            return
        table = Path(self._job.tmp) / "rank_table.json"
        generate_rank_table([("127.0.0.1", list(range(self.tp)))]).dump(table)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            # The ports are probed free, then the ranks bind them: another process may take one in
            # between. The rank that cannot bind says so (PortInUseError); then every rank starts again.
            base_port = free_base_port(self.tp)
            specs = [ProcessSpec(rank, argv + ["--rank", str(rank), "--size", str(self.tp), "--rank_table", str(table),
                                               "--base_port", str(base_port)], env=env)
                     for rank in range(self.tp)]
            self._job.launcher = Supervisor(specs, output=RankOutput(console=False, tail_lines=20), world_size=self.tp,
                                            cleanup_paths=[self._job.tmp])
            self._job.launcher.start()
            try:
                self._wait_built(deadline)
                return
            except PortInUseError as exc:
                taken = exc
                self._job.stop_ranks(graceful=False)
                self._ranks.clear()
        raise CommError(
            f"starting the zmq ranks of {self.model_path}: {PORT_ATTEMPTS} times, another process took a port "
            f"between the master's probe and the rank's bind (last: {taken}); try again, or run fewer jobs that "
            f"open ports at once"
        ) from taken

    def _wait_built(self, deadline: float) -> None:
        exchange = _Exchange("starting the ranks", set(range(self.tp)), None)
        while exchange.pending:
            msg, channel = self._receive(deadline, exchange)
            if msg.kind == proto.ERROR:
                raise self._error_from(msg, exchange)
            if msg.kind != proto.BUILD_FINISH:
                raise WorkerError(f"starting the ranks: a rank sent {msg.kind}; expected BUILD_FINISH or ERROR")
            rank = msg["rank"]
            self._job.links.peers[rank] = channel
            self._ranks[rank] = msg.header
            self.inputs, self.outputs = msg["inputs"], msg["outputs"]
            exchange.pending.discard(rank)

    # -- running -------------------------------------------------------------
    def predict(self, inputs) -> dict[str, np.ndarray]:
        """Run the sharded model on ``inputs`` ({name: array} or a list in input order); {output name: array}."""
        with self._lock:  # one request in flight: the ranks answer in order, over one socket
            return self._predict(inputs)

    def _predict(self, inputs) -> dict[str, np.ndarray]:
        if self._closed:
            raise WorkerError(f"predict on a closed ShardedModel ({self._closed}); create a new ShardedModel")
        feeds = self._as_last_time(inputs)
        if feeds is None:
            feeds = validate_feeds(inputs, self._input_specs)
            if isinstance(inputs, dict) and all(feeds[name] is inputs[name] for name in feeds):
                self._accepted = tuple((name, a.dtype, a.shape) for name, a in feeds.items())
        return self._request(feeds)

    def _as_last_time(self, inputs) -> dict[str, np.ndarray] | None:
        """``inputs`` as they are when they are arrays of the dtypes and shapes ``validate_feeds`` took as they
        were last time (a decoding loop's calls), else None: a batch-1 call's master is mostly Python."""
        accepted = self._accepted
        if type(inputs) is not dict or accepted is None or len(inputs) != len(accepted):
            return None
        feeds = {}
        for name, dtype, shape in accepted:
            array = inputs.get(name)
            if type(array) is not np.ndarray or array.dtype != dtype or array.shape != shape:
                return None
            feeds[name] = array
        return feeds

    def generate(self, input_ids, max_new_tokens: int, *, attention_mask=None, stop_token: int | None = None,
                 temperature: float = 0.0, seed: int | None = None, return_logits: bool = False):
        """Generate up to ``max_new_tokens`` per prompt with a decoder sharded with its key/value cache.

        ``input_ids``: one prompt, a list of prompts of any lengths, or a 2-D array with -1 as padding
        (or an ``attention_mask``). The prompt goes to the ranks once; each rank runs prefill and the decode
        steps itself, keeps its own heads' cache, and the ranks pick each token from their pieces of the
        vocabulary with one small collective (``_generate``). Greedy unless ``temperature`` > 0 (sampling,
        reproducible with ``seed``); ``stop_token`` ends a prompt. Returns a ``GenerateResult`` (per prompt
        the new ids; the logits [new tokens, vocab] when ``return_logits``).
        """
        from ._generate import GenerateResult, check_options, check_prompts, decoder_io_of_file, prepare_prompts

        if not self._decoder_checked:
            # Here, not on the ranks: a rank's error would close this ShardedModel for a mere mistake of the call.
            decoder_io_of_file(resolve_shard_path(self.model_path, 0, self.tp), pairs=self._cache_pairs)
            self._decoder_checked = True
        ids, mask = prepare_prompts(input_ids, attention_mask)
        check_options(max_new_tokens, temperature, seed, stop_token, self._tables, str(self.model_path))
        check_prompts(ids, mask, max_new_tokens, self._tables, str(self.model_path))
        if temperature and seed is None:
            seed = int.from_bytes(os.urandom(4), "little")  # one seed for every rank: they sample alike
        options = {"max_new_tokens": int(max_new_tokens), "stop_token": None if stop_token is None else int(stop_token),
                   "temperature": float(temperature), "seed": None if seed is None else int(seed),
                   "return_logits": bool(return_logits)}
        started = time.perf_counter()
        with self._lock:
            if self._closed:
                raise WorkerError(f"generate on a closed ShardedModel ({self._closed}); create a new ShardedModel")
            arrays = self._request({"input_ids": ids, "attention_mask": mask}, generate=options)
        header = self.last_reply or {}
        replies = list(self.last_replies.values())
        lengths = arrays["lengths"]
        # The slowest rank's time in the model (the others wait for it at the collectives), and the pick of
        # the rank that reached its collective last (the others' include waiting for it).
        result = GenerateResult(tokens=[arrays["tokens"][r, :lengths[r]] for r in range(len(lengths))],
                                steps=int(header.get("steps", 0)), seconds=time.perf_counter() - started,
                                model_seconds=max(float(h.get("model_seconds", 0.0)) for h in replies),
                                pick_seconds=min(float(h.get("pick_seconds", 0.0)) for h in replies))
        result.timings["rank_seconds"] = self.last_rank_seconds
        result.timings["per_rank"] = {rank: {k: h.get(k) for k in ("model_seconds", "pick_seconds", "seconds")}
                                      for rank, h in sorted(self.last_replies.items())}
        if return_logits:
            result.logits = [arrays["logits"][r, :lengths[r]] for r in range(len(lengths))]
        return result

    def _request(self, inputs: dict[str, np.ndarray], **fields) -> dict[str, np.ndarray]:
        """Send checked inputs to every rank and wait for rank 0's outputs (the lock is held)."""
        request = self._next_id
        self._next_id += 1
        exchange = _Exchange(f"{'generate' if 'generate' in fields else 'predict'} request {request}",
                             set(range(self.tp)), set())
        packed = proto.pack_stream(proto.encode(proto.PREDICT, request, arrays=inputs, **fields))
        deadline = time.monotonic() + self.timeout
        result = None
        # the ranks' time inside run(), without the transfers: the slowest rank's for generate, rank 0's for
        # predict (it ends in a collective with the others, so it includes waiting for the slowest)
        self.last_rank_seconds = None
        self.last_replies = {}
        try:
            for rank in range(self.tp):
                try:
                    self._job.links.send(rank, packed, deadline)  # False for a rank gone: _receive names it
                except TimeoutError:
                    raise self._stall(exchange, [rank]) from None  # it took no bytes for the whole timeout
            # A plain predict ends with rank 0's REPLY: the other ranks send none (they met rank 0 in its
            # last collective; one that fails after it says so with an ERROR, which the next request reads).
            # Every rank stays pending, so a stall still names the ranks that never took the request.
            everyone = "generate" in fields
            while exchange.pending if everyone else 0 in exchange.pending:
                msg, _ = self._receive(deadline, exchange)
                if msg.kind == proto.ERROR:
                    raise self._error_from(msg, exchange)
                if msg.id != request:
                    continue
                if msg.kind == proto.STARTED:
                    exchange.started.add(msg["rank"])
                elif msg.kind == proto.REPLY:
                    exchange.pending.discard(msg["rank"])
                    self.last_rank_seconds = max(self.last_rank_seconds or 0.0, msg.get("seconds", 0.0))
                    self.last_replies[msg["rank"]] = msg.header
                    if msg["rank"] == 0:
                        result = {k: np.array(v) for k, v in msg.arrays().items()}
                        self.last_reply = msg.header
                else:
                    raise WorkerError(f"{exchange.doing}: {self._where(msg.get('rank'))} sent {msg.kind}; "
                                      f"expected STARTED, REPLY or ERROR")
        except BaseException as exc:
            # A failed or stalled rank leaves its peers inside a collective: the job is over.
            self._closed = f"{exchange.doing} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            self._job.shutdown(graceful=False)
            raise
        return result

    __call__ = predict

    def _receive(self, deadline: float, exchange: "_Exchange"):
        """The next message and its sender's identity; a dead rank or the deadline raise (naming the root cause)."""
        links, launcher = self._job.links, self._job.launcher
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._stall(exchange, self._silent(exchange, at_deadline=True))
            try:
                got = links.receive(min(remaining, 0.1), deadline)
            except TimeoutError:  # a message began and stopped half-way: its sender is stopped
                raise self._stall(exchange, self._silent(exchange, at_deadline=True)) from None
            if got is not None:
                return got
            # An idle moment (or a rank closed its end): note who is stopped now (by the time a peer gives
            # up on it, the launcher may already be tearing it down), and whether a rank has died.
            exchange.suspended.update(set(launcher.suspended()) & exchange.pending)
            error = launcher.failure(every_exit_fails=True)
            if error is not None:
                last = time.monotonic() + _LAST_WORD_MS / 1000  # its last word (an ERROR) may still be on the way
                while (now := time.monotonic()) < last:
                    got = links.receive(last - now, last + 1.0)
                    if got is not None:
                        return got
                raise self._root_cause(exchange, _death(exchange.doing, error), error)

    def _error_from(self, msg: proto.Message, exchange: "_Exchange") -> BaseException:
        """The exception for a rank's ERROR: its own, unless it only reports another rank's failure or silence.

        A lost or silent peer (``PeerLostError``, ``CommTimeoutError``) makes the sender a victim; the root
        cause is that peer: its own ERROR if it sends one (its exception), its death (the launchers' report),
        or its silence. A peer whose process is seen gone died first, whatever arrived first: its report
        is waited for a little longer (``DEAD_PEER_GRACE``), and if it does not come the peer is named anyway.
        """
        exc = proto.unpack_error(msg)
        if not isinstance(exc, (CommTimeoutError, PeerLostError)):
            return exc
        victims = {msg.get("rank")}
        exchange.pending.discard(msg.get("rank"))
        exchange.gave_up[msg.get("rank")] = exc
        started = time.monotonic()
        while True:
            got = self._job.links.receive(0.05, time.monotonic() + 1.0)
            if got is not None:
                other, _ = got
                if other.kind == proto.ERROR:
                    own = proto.unpack_error(other)
                    if not isinstance(own, (CommTimeoutError, PeerLostError)):
                        return own  # the failed rank's own exception, just behind its peer's word
                    victims.add(other.get("rank"))
                    exchange.pending.discard(other.get("rank"))
                    exchange.gave_up[other.get("rank")] = own
                elif other.kind == proto.STARTED and exchange.started is not None:
                    exchange.started.add(other.get("rank"))
            error = self._job.launcher.failure(every_exit_fails=True)
            failures = getattr(error, "failures", None)
            # (the ranks that sent the ERROR exit after it: their own exits are not the root cause)
            if error is not None and (failures is None or any(e.rank not in victims for e in failures)):
                return self._root_cause(exchange, _death(exchange.doing, error, exc), error)
            others = exchange.pending - victims
            if others and others <= set(self._job.launcher.suspended()):
                exchange.suspended.update(others)
                break  # the peers they wait for are stopped: they cannot fail on their own, they are the silent ones
            waited = time.monotonic() - started
            if waited >= FAILURE_GRACE:
                gone = [r for r in self._gone() if r not in victims]
                if not gone:
                    break
                if waited >= DEAD_PEER_GRACE:
                    names = ", ".join(self._where(r) for r in gone)
                    death = WorkerError(f"{exchange.doing}: {names} ended while its peers waited for it (its process "
                                        f"is gone; how it ended was not reported within {waited:.1f} s)")
                    death.__cause__ = exc
                    return death
        silent = self._silent(exchange)
        if silent:
            stall = self._stall(exchange, silent)
            stall.__cause__ = exc
            return stall
        return exc

    def _gone(self) -> list[int]:
        """Ranks whose process has ended (it may not be recorded by the launcher yet)."""
        gone = []
        for rank, pid in self._rank_pids().items():
            try:
                if psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                    gone.append(rank)
            except psutil.NoSuchProcess:
                gone.append(rank)
            except psutil.Error:
                pass
        return sorted(gone)

    def _rank_pids(self) -> dict[int, int]:
        """Rank -> pid of its program: from its BUILD_FINISH, else from the launcher."""
        launcher = self._job.launcher
        pids = launcher.rank_pids() if isinstance(launcher, MpiLauncher) else dict(launcher.pids)
        pids.update({rank: info["pid"] for rank, info in self._ranks.items()})
        return pids

    def _silent(self, exchange: "_Exchange", dead=(), at_deadline: bool = False) -> list[int]:
        """Ranks that never said they took the request although they had the time to (not dead ones)."""
        if exchange.started is None:
            return sorted(exchange.pending) if at_deadline else []
        if not at_deadline and time.monotonic() - exchange.since < SILENT_AFTER:
            return []
        return sorted(exchange.pending - exchange.started - set(dead))

    def _root_cause(self, exchange: "_Exchange", death: WorkerError, report) -> BaseException:
        """A rank that died during a request may have died of waiting for one that never took it."""
        failed = {e.rank: e for e in getattr(report, "failures", [])}
        silent = self._silent(exchange, dead=failed)
        if not silent:
            return death
        stall = self._stall(exchange, silent, failed)
        stall.__cause__ = death
        return stall

    def _stall(self, exchange: "_Exchange", silent: list[int], failed: dict | None = None) -> WorkerTimeoutError:
        """Name the ranks that did not answer: those that never took the request first (pid, host, stopped or
        not), then those that took it and wait, or failed waiting (``failed``: rank -> RankExit), or gave up
        waiting with an ERROR of their own."""
        failed = failed or {}
        suspended = exchange.suspended | set(self._job.launcher.suspended())
        busy = sorted((exchange.pending & exchange.started) - set(silent)) if exchange.started is not None else []
        what = "did not answer" if exchange.started is not None else "did not report BUILD_FINISH"
        parts = []
        for rank in silent:
            note = ["it never reported taking the request"] if exchange.started is not None else []
            if rank in suspended:
                note.append("its process is stopped (SIGSTOP or Ctrl-Z)")
            parts.append(f"{self._where(rank)} {what} within {self.timeout:g} s" + (f": {', and '.join(note)}" if note else ""))
        text = "; ".join(parts)
        gave_up = [r for r in busy if r in failed]
        waiting = [r for r in busy if r not in failed]
        if waiting:
            names = ", ".join(self._where(r) for r in waiting)
            if silent:
                text += f"; {names} took it and waits (in a collective, for the rank(s) above)"
            else:
                text = f"{names} took the request but did not finish within {self.timeout:g} s"
        for rank in gave_up:
            text += f"; {self._where(rank)} took it, waited for the rank(s) above and failed: {failed[rank].how()}"
        # Ranks that said so themselves (a collective's CommTimeoutError may come just before our own deadline)
        for rank, error in sorted(exchange.gave_up.items()):
            if exchange.started is not None and rank not in silent:
                how = f"failed: {failed[rank].how()}" if rank in failed else f"gave up ({type(error).__name__})"
                text += f"; {self._where(rank)} took it, waited for the rank(s) above and {how}"
        return WorkerTimeoutError(f"{exchange.doing}: {text}")

    def _where(self, rank) -> str:
        """``rank 1 of 2 on host h (pid 123)``, from its BUILD_FINISH, else from the launcher."""
        info = self._ranks.get(rank)
        if info is not None:
            return f"rank {rank} of {self.tp} on host {info['host']} (pid {info['pid']})"
        pid = self._rank_pids().get(rank)
        if pid is None:
            return f"rank {rank} of {self.tp}"
        return f"rank {rank} of {self.tp} on host {socket.gethostname()} (pid {pid})"

    # -- introspection -------------------------------------------------------
    @property
    def pids(self) -> dict[int, int]:
        """Rank -> pid of each rank's process (as the rank reported it)."""
        return {rank: info["pid"] for rank, info in sorted(self._ranks.items())}

    @property
    def closed(self) -> bool:
        return self._closed is not None

    # -- stopping ------------------------------------------------------------
    def close(self) -> None:
        """Stop every rank (EXIT, then TERM + CONT and KILL after a deadline); calling it twice is harmless."""
        # Let a request in flight on another thread finish (it is bounded by its timeout).
        held = self._lock.acquire(timeout=self.timeout + EXIT_GRACE)
        try:
            self._closed = self._closed or "close() was called"
            self._job.shutdown(graceful=True)
            self._finalizer.detach()
        finally:
            if held:
                self._lock.release()

    def __enter__(self) -> "ShardedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Exchange:
    """What the master knows about one exchange with the ranks: the startup, or one request."""

    def __init__(self, doing: str, pending: set, started: set | None):
        self.doing = doing
        self.pending = pending  # ranks whose BUILD_FINISH / REPLY has not come
        self.started = started  # ranks that said they took the request (None at startup)
        self.since = time.monotonic()
        self.suspended: set[int] = set()  # pending ranks seen stopped by a signal while the master waited
        self.gave_up: dict[int, BaseException] = {}  # ranks whose ERROR reported a lost or silent peer


def _death(doing: str, report: Exception, cause: BaseException | None = None) -> WorkerError:
    """A WorkerError carrying the launchers' first-failure report."""
    error = WorkerError(f"{doing}: {report}")
    error.__cause__ = cause if cause is not None else report
    return error


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
    manifest = manifest_path_for(path)
    if not manifest.exists():
        if path.is_file():
            raise ModelNotFoundError(f"{path} is a whole model, not shards: there is no shard manifest {manifest.name} "
                                     f"beside it; slice it first (orchestrate shard {path} --tp N -o DIR, or "
                                     f"shard_model) and pass DIR/{path.name}")
        raise ModelNotFoundError(f"{path} does not exist; expected DIR/MODEL.onnx (or DIR) with the shards and the "
                                 f"manifest orchestrate shard writes")
    return path


def _input_specs(shard_path: Path, cache: list[dict] = ()) -> list[tuple[str, DataType, list[int]]]:
    """(name, dtype, shape with -1 for free dimensions) of a shard's graph inputs; a cache cut by heads
    with the whole model's heads (predict takes it whole)."""
    whole_heads = {c["past"]: (c["axis"], c["heads"]) for c in cache}
    graph = load_onnx_header(shard_path).graph
    weights = {t.name for t in graph.initializer}
    specs = []
    for value in graph.input:
        if value.name in weights:
            continue
        tensor = value.type.tensor_type
        dtype = DataType.from_numpy(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor.shape.dim]
        if value.name in whole_heads:
            axis, heads = whole_heads[value.name]
            shape[axis] = heads
        specs.append((value.name, dtype, shape))
    return specs
