"""The one wire protocol between a master and its workers, defined once: kinds, headers, errors, framings.

Every master speaks it: ``ParallelPredictor`` with its batch-split workers
(``_worker_main``, over a socketpair, tensor bytes in shared memory) and
``ShardedModel`` with its ranks (``_sharded_worker``, over one Unix socket per
rank, ``_rank_links``; tensor bytes in the message), and the pool's process
workers (``_pool_processes``) like the batch-split ones.

A message is a kind, a header and buffers:

- ``kind``: one of ``KINDS`` (ASCII on the wire);
- ``header``: a JSON object; EVERY header carries ``v`` (``VERSION``),
  ``kind`` and ``id`` (the request it belongs to; 0 outside requests), and
  every message from a worker carries ``status`` (``OK``, ``NEED_SPACE`` or
  ``FAILED``);
- ``buffers``: raw bytes (array bytes, a pickled exception).

==============  ==============  ===============================================================
kind            direction       header fields beyond v, kind, id (and status) / buffers
==============  ==============  ===============================================================
BUILD           master->worker  batch-split: model_path, device_id, index, cores, parent_pid;
                                buffer 0: the pickled ``Context``; a pool worker adds who (its
                                name), config (Model's config_dict) and publish_weights (send
                                the shared weights' handle back). (A rank gets its arguments
                                on its command line instead.)
BUILD_FINISH    worker->master  status ok; who, host, pid, inputs and outputs as
                                [name, dtype, shape] (-1: a free dimension); batch-split adds
                                device_id, cores, threads (and weights_handle when asked
                                to publish); a rank adds rank, size
PREDICT         master->worker  batch-split: slot, inputs [TensorSpec], out_offset,
                                out_capacity, block, placement [TensorSpec], forget [names];
                                sharded: arrays [{name, dtype, shape}] + one buffer per array
STARTED         rank->master    status ok; rank: it took request ``id`` and still runs it (sent
                                once, only for a request running longer than a short while,
                                so a short request costs no message)
REPLY           worker->master  status ok: batch-split: placed, outputs [TensorSpec];
                                sharded: rank, seconds (time in run()), arrays + buffers
                                (rank 0 only; for a plain predict only rank 0 replies);
                                status need_space: needed (bytes)
COLLECT         master->worker  batch-split: slot, out_offset, out_capacity: write the held
                                outputs of request ``id`` there (after the slot grew)
ERROR           worker->master  status error; error {type, message, traceback, who, host, pid,
                                where}; buffer 0: the pickled exception (empty when it would
                                not pickle). The one shape of an error: ``error_frames`` makes
                                it, ``unpack_error`` turns it back into the exception (its
                                own type, the remote traceback as ``__cause__``)
EXIT            master->worker  leave: close what is open, exit 0
CANCEL          master->worker  stop the run of request ``id`` if it is running or about to
                                (a pool worker's second socket, read by a thread of its own
                                while the model runs); the worker then answers that request
                                with ERROR as usual. Ids at or below ``id`` are cancelled.
==============  ==============  ===============================================================

Order (handshake before traffic; each master documents its side):

- a worker sends exactly one BUILD_FINISH or ERROR after it starts (a
  batch-split worker after its BUILD); the master sends no PREDICT before it
  has BUILD_FINISH from EVERY worker, so a build error surfaces in the
  constructor, not in some later request;
- for each PREDICT, a worker sends exactly one REPLY or ERROR (a rank may send
  STARTED before it), one more after each COLLECT; a master never sends a second
  PREDICT to a worker before the answer to the first. Exception: for a sharded
  PREDICT without ``generate``, ranks other than 0 send no REPLY (rank 0's ends
  the request for all), only ERROR when they fail;
- a version mismatch is refused by whichever side reads the other's first
  message: ``decode`` raises ``ProtocolError`` naming both versions.

``TensorSpec`` says where a tensor lies in a shared-memory segment (the
layout is the shared-memory module's business); on the wire it is a list.

Framing (the transport beneath), a stream (a socket or pipe): ``u64 n`` bytes, then ``n`` bytes holding
``u32 count``, ``count x u64`` frame lengths and the frames ``[kind, header, *buffers]``;
``StreamChannel`` reads and writes it.
"""

from __future__ import annotations

import json
import json.scanner
import math
import os
import re
import select
import socket
import struct
import time
from typing import NamedTuple

import numpy as np

from ranks._remote_errors import pack_exception, unpack_exception, where_header

from ._errors import WorkerError

VERSION = 2

BUILD = "BUILD"
BUILD_FINISH = "BUILD_FINISH"
PREDICT = "PREDICT"
STARTED = "STARTED"
REPLY = "REPLY"
COLLECT = "COLLECT"
ERROR = "ERROR"
EXIT = "EXIT"
CANCEL = "CANCEL"
KINDS = (BUILD, BUILD_FINISH, PREDICT, STARTED, REPLY, COLLECT, ERROR, EXIT, CANCEL)

OK = "ok"
NEED_SPACE = "need_space"
FAILED = "error"

# Header fields that hold TensorSpecs, per kind (lists on the wire, TensorSpec tuples in Python).
_SPEC_FIELDS = {PREDICT: ("inputs", "placement"), REPLY: ("outputs",)}
_KIND_BYTES = {kind: kind.encode("ascii") for kind in KINDS}
_SCAN = json.scanner.make_scanner(json.JSONDecoder())


class TensorSpec(NamedTuple):
    """Where one tensor lies in a segment: its bytes are ``segment[offset : offset + nbytes]``."""

    name: str
    dtype: str  # numpy dtype string, e.g. "<f4"
    shape: tuple
    offset: int
    nbytes: int


class ProtocolError(WorkerError):
    """A message that is not of this protocol, or of another version of it."""


class Message:
    """A decoded message: ``msg.kind``, ``msg["field"]`` (header), ``msg.buffers`` (raw bytes)."""

    __slots__ = ("kind", "header", "buffers")

    def __init__(self, kind: str, header: dict, buffers: list):
        self.kind = kind
        self.header = header
        self.buffers = buffers

    def __getitem__(self, name: str):
        return self.header[name]

    def get(self, name: str, default=None):
        return self.header.get(name, default)

    @property
    def id(self) -> int:
        return self.header.get("id", 0)

    @property
    def status(self) -> str | None:
        return self.header.get("status")

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays the message carries (read-only views of its buffers), by name."""
        specs = self.header.get("arrays", [])
        return {
            spec["name"]: np.frombuffer(frame, dtype=np.dtype(spec["dtype"])).reshape(spec["shape"])
            for spec, frame in zip(specs, self.buffers)
        }

    def extra(self) -> list:
        """The buffers after the arrays' (an ERROR's pickled exception)."""
        return self.buffers[len(self.header.get("arrays", [])):]

    def __repr__(self) -> str:
        return f"Message({self.kind}, {self.header!r:.200})"


def _plain(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    raise TypeError(f"{type(value).__name__} cannot go in a message header")


def encode(kind: str, request_id: int = 0, *, arrays: dict[str, np.ndarray] | None = None, buffers=(), **fields) -> list:
    """The frames ``[kind, header, *array buffers, *buffers]`` of one message."""
    if kind not in _KIND_BYTES:
        raise ValueError(f"unknown message kind {kind!r}; the protocol knows {list(KINDS)}")
    frames = []
    specs = None
    if arrays is not None:
        specs = []
        for name, array in arrays.items():
            if not isinstance(array, np.ndarray) or not array.flags.c_contiguous:
                array = np.asarray(array, order="C")
            specs.append((name, array.dtype.str, array.shape))
            frames.append(memoryview(array).cast("B") if array.size else b"")
    return [_KIND_BYTES[kind], _header(kind, request_id, specs, fields)] + frames + list(buffers)


def _header(kind: str, request_id: int, specs: list | None, fields: dict) -> bytes:
    # A batch-1 loop sends the same messages call after call (PREDICT with the same shapes, REPLY with the
    # same fields), whose headers differ only in their scalar values: each shape of header is dumped once as
    # a template, and a call fills in its values (the master and rank 0 of a small call are mostly Python).
    values = [request_id]
    kinds = []
    for value in fields.values():
        kinds.append(type(value))
        if type(value) not in _SCALARS:
            return _dumped(kind, request_id, specs, fields)
        values.append(value)
    key = (kind, None if specs is None else tuple(specs), tuple(fields), tuple(kinds))
    parts = _HEADERS.get(key)
    if parts is None:
        holes = {name: _HOLE % (k + 1) for k, name in enumerate(fields)}
        text = _dumped(kind, _HOLE % 0, specs, holes).decode()
        parts = [part.encode() for part in _HOLE_SPLIT.split(text)]
        if len(parts) != len(values) + 1:  # a field's name that looks like a hole: no template for it
            return _dumped(kind, request_id, specs, fields)
        if len(_HEADERS) >= _HEADERS_KEPT:
            _HEADERS.clear()
        _HEADERS[key] = parts
    out = [parts[0]]
    for value, part in zip(values, parts[1:]):
        out.append(_scalar_json(value))
        out.append(part)
    return b"".join(out)


def _dumped(kind: str, request_id, specs: list | None, fields: dict) -> bytes:
    header = {"v": VERSION, "kind": kind, "id": request_id, **fields}
    if specs is not None:
        header["arrays"] = [{"name": n, "dtype": d, "shape": list(shape)} for n, d, shape in specs]
    return json.dumps(header, default=_plain).encode()


def _scalar_json(value) -> bytes:
    """``value`` as json.dumps writes it (for the types in ``_SCALARS``)."""
    if value is None:
        return b"null"
    if value is True:
        return b"true"
    if value is False:
        return b"false"
    if type(value) is str:
        return json.dumps(value).encode()
    if type(value) is float and not math.isfinite(value):
        return json.dumps(value).encode()
    return repr(value).encode()  # int, and float as json writes it (float.__repr__)


_SCALARS = frozenset({int, float, str, bool, type(None)})
_HOLE = "\x01hole%d\x01"  # a placeholder no real value holds (json writes \x01 escaped as \u0001)
_HOLE_SPLIT = re.compile(r'"\\u0001hole\d+\\u0001"')
_HEADERS: dict = {}  # (kind, array specs, field names, value types) -> the template's JSON around its holes
_HEADERS_KEPT = 64


def decode(frames: list, sender: str = "the peer") -> Message:
    """The message in ``frames``; ``ProtocolError`` (naming ``sender`` and both versions) if it is not one of ours."""
    if len(frames) < 2:
        raise ProtocolError(f"{sender} sent {len(frames)} frame(s), which is not a message of the worker protocol")
    try:
        # the JSON scanner itself: json.loads would also sniff the encoding and match whitespace around it
        text = bytes(frames[1]).decode()
        header, end = _SCAN(text, 0)
        if end != len(text):
            header = None
    except (StopIteration, ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ProtocolError(f"{sender} sent {bytes(frames[0])[:40]!r}..., which is not a message of the worker protocol")
    if header.get("v") != VERSION:
        raise ProtocolError(
            f"{sender} speaks worker protocol version {header.get('v')!r}, this side speaks {VERSION}: "
            f"master and worker come from different installations of the orchestrator"
        )
    kind = bytes(frames[0]).decode("ascii", "replace")
    if kind not in _KIND_BYTES or header.get("kind") != kind:
        raise ProtocolError(f"{sender} sent unknown message kind {kind!r}; the protocol knows {list(KINDS)}")
    for name in _SPEC_FIELDS.get(kind, ()):
        value = header.get(name)
        if value:
            header[name] = [TensorSpec(s[0], s[1], tuple(s[2]), s[3], s[4]) for s in value]
    return Message(kind, header, list(frames[2:]))


def error_frames(request_id: int, exc: BaseException, who: str, **fields) -> list:
    """An ERROR for ``exc``, raised in this process, which is ``who`` ("rank 1 of 2", "worker for device 0")."""
    packed = pack_exception(exc, where_header(who))
    pickled = packed.pop("pickled", b"")
    error = {**packed, "who": who, "host": socket.gethostname(), "pid": os.getpid()}
    return encode(ERROR, request_id, status=FAILED, error=error, buffers=[pickled], **fields)


def unpack_error(msg: Message) -> BaseException:
    """The exception an ERROR carries: its own type when it unpickles, else a ``RemoteError``; traceback as ``__cause__``."""
    packed = dict(msg["error"])
    extra = msg.extra()
    packed["pickled"] = bytes(extra[0]) if extra else b""
    return unpack_exception(packed)


# --- the stream framing ------------------------------------------------------------------------
_LENGTH = struct.Struct("<Q")
_COUNT = struct.Struct("<I")
_JOIN_BELOW = 64 * 1024  # messages up to this size are joined and written with one sendall
_IOV_MAX = 512  # buffers per sendmsg (the system allows 1024)


def pack_stream(frames: list) -> list:
    """The buffers that carry ``frames`` as one message of the stream framing (for ``StreamChannel.send_packed``)."""
    lengths = [len(f) if isinstance(f, bytes) else memoryview(f).nbytes for f in frames]
    total = _COUNT.size + 8 * len(frames) + sum(lengths)
    head = _LENGTH.pack(total) + _COUNT.pack(len(frames)) + struct.pack(f"<{len(frames)}Q", *lengths)
    if total <= _JOIN_BELOW:
        return [memoryview(b"".join([head, *frames]))]  # one small copy, one system call
    # large tensors go out from where they lie, no joined copy
    return [memoryview(head)] + [memoryview(f).cast("B") for f in frames if memoryview(f).nbytes]


class StreamChannel:
    """Messages over a connected stream socket (one end of a socketpair, a Unix socket).

    ``send`` writes one message whole; ``recv`` returns the next one's frames
    and raises ``EOFError`` when the peer closed its end (it exited or died).
    Usable with ``select`` (``fileno``). One reader and one writer at a time.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        sock.setblocking(True)

    @classmethod
    def from_fd(cls, fd: int) -> "StreamChannel":
        return cls(socket.socket(fileno=fd))

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, frames: list, timeout: float | None = None) -> None:
        """Write one message whole; ``TimeoutError`` if the peer has not taken it within ``timeout`` seconds."""
        self.send_packed(pack_stream(frames), timeout)

    def send_packed(self, packed: list, timeout: float | None = None) -> None:
        """Write a message ``pack_stream`` made (one message to several peers is packed once)."""
        pending = list(packed)
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            try:
                # Without a timeout, a blocking write; with one, a write that never blocks, and a wait for
                # room only when the peer's buffer is full (no switching the socket's mode per message).
                sent = self.sock.sendmsg(pending[:_IOV_MAX], (), 0 if deadline is None else socket.MSG_DONTWAIT)
            except BlockingIOError:
                self._wait_for(select.POLLOUT, deadline, "take the message")
                continue
            while pending and sent >= pending[0].nbytes:
                sent -= pending.pop(0).nbytes
            if sent:
                pending[0] = pending[0][sent:]

    def _wait_for(self, event: int, deadline: float, what: str) -> None:
        remaining = deadline - time.monotonic()
        poller = select.poll()
        poller.register(self.sock.fileno(), event)
        if remaining <= 0 or not poller.poll(max(1, int(remaining * 1000 + 0.999))):
            raise TimeoutError(f"the peer did not {what} within the timeout")

    def _read(self, count: int, deadline: float | None) -> bytearray:
        data = bytearray(count)
        view = memoryview(data)
        got = 0
        while got < count:
            try:
                n = self.sock.recv_into(view[got:], 0, 0 if deadline is None else socket.MSG_DONTWAIT)
            except BlockingIOError:
                self._wait_for(select.POLLIN, deadline, "send the rest of its message")
                continue
            if n == 0:
                raise EOFError("the peer closed the connection")
            got += n
        return data

    def recv(self, timeout: float | None = None) -> list:
        """The next message's frames; ``EOFError`` when the peer closed its end, ``TimeoutError`` when a
        message has not come whole within ``timeout`` seconds (a sender stopped half-way)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        (size,) = _LENGTH.unpack(self._read(_LENGTH.size, deadline))
        body = memoryview(self._read(size, deadline))
        (count,) = _COUNT.unpack_from(body)
        lengths = struct.unpack_from(f"<{count}Q", body, _COUNT.size)
        at = _COUNT.size + 8 * count
        frames = []
        for length in lengths:
            frames.append(body[at:at + length])
            at += length
        return frames

    def poll(self, timeout: float | None = 0.0) -> bool:
        """True when a message (or EOF) is waiting, within ``timeout`` seconds."""
        return bool(wait([self], timeout))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def wait(channels, timeout: float | None) -> list:
    """The channels among ``channels`` with a message (or EOF) waiting, within ``timeout`` seconds (None: no limit).

    ``poll``, not ``select``: it takes file descriptors above 1023, which a busy master may hold.
    """
    poller = select.poll()
    by_fd = {}
    for channel in channels:
        fd = channel.fileno()
        by_fd[fd] = channel
        poller.register(fd, select.POLLIN | select.POLLPRI)
    events = poller.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999)))
    return [by_fd[fd] for fd, _ in events if fd in by_fd]
