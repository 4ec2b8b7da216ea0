"""One worker process: ``python -m orchestrator._worker_main --fd N [--cancel-fd M]``.

Started by ``ParallelPredictor`` (batch-split) and by ``ModelParallelRunner``'s
process workers (``_pool_processes``) through the supervisor (``launchers.Supervisor``)
as a module of this installation: it never imports the caller's script, so
masters without a main guard, ``python -c``, stdin and notebooks work.
``--fd``: its end of a socketpair with the master (the protocol's stream
framing, ``_protocol``). ``--cancel-fd``: a second socket on which the master
sends CANCEL while the model runs (a thread here reads it and sets ONNX
Runtime's ``terminate`` on that run). Shared memory comes from ``ranks._shared_memory``
(through the slot and block layout of ``_worker_memory``).

Its states::

    STARTED  --BUILD-->  pin to its cores, build the model  --> BUILD_FINISH (or ERROR, exit 1)
    SERVING  --PREDICT/COLLECT--> REPLY or ERROR; --EXIT or EOF--> exit

It exits on its own when the master goes away: the socket reaches EOF, or
(while the model is running, when nobody reads the socket) a watcher thread
sees the parent pid change; either way it unlinks the segments it has mapped
first, and once the master is dead every other segment of the master's,
since a killed master cannot. (The supervisor also gives it a parent-death signal.)
"""

from __future__ import annotations

import argparse
import os
import pickle
import signal
import socket
import sys
import threading
import time

import onnxruntime as ort

from ranks._model import Model, ModelType

from . import _protocol as proto
from ._worker_memory import Attachments, layout, view

EXIT_PARENT_GONE = 70
PARENT_POLL_SECONDS = 0.5


def _watch_parent(parent_pid: int, attachments: Attachments) -> None:
    while True:
        time.sleep(PARENT_POLL_SECONDS)
        if os.getppid() != parent_pid:
            attachments.unlink()
            os._exit(EXIT_PARENT_GONE)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m orchestrator._worker_main",
                                     description="a batch-split worker; ParallelPredictor starts it")
    parser.add_argument("--fd", type=int, required=True, help="this worker's end of the socketpair with its master")
    parser.add_argument("--cancel-fd", type=int, help="a second socket on which the master sends CANCEL while a request runs")
    return parser


class _Canceller:
    """The run options of the request running now, and a thread that stops that run on CANCEL.

    Request ids only grow, so a CANCEL that arrives before its request started
    (the master gave up while the PREDICT was on its way) is kept as "every id up
    to this one" and stops the run as soon as it begins.
    """

    def __init__(self, channel: proto.StreamChannel | None):
        self._lock = threading.Lock()
        self._current: tuple[int, ort.RunOptions] | None = None
        self._cancelled_up_to = 0
        if channel is not None:
            threading.Thread(target=self._read, args=(channel,), daemon=True, name="orch-cancel").start()

    def begin(self, request_id: int) -> ort.RunOptions:
        options = ort.RunOptions()
        options.log_severity_level = 4  # a stopped run is the master's doing, not an error to print
        with self._lock:
            self._current = (request_id, options)
            if request_id <= self._cancelled_up_to:
                options.terminate = True
        return options

    def end(self) -> None:
        with self._lock:
            self._current = None

    def _read(self, channel: proto.StreamChannel) -> None:
        while True:
            try:
                msg = proto.decode(channel.recv(), "the master")
            except (EOFError, OSError, proto.ProtocolError):
                return  # the master is gone or closed it: the main loop sees that on its own socket
            if msg.kind != proto.CANCEL:
                continue
            with self._lock:
                self._cancelled_up_to = max(self._cancelled_up_to, msg.id)
                if self._current is not None and self._current[0] <= msg.id:
                    self._current[1].terminate = True


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    # Ctrl-C in a terminal reaches the whole foreground process group: the master turns
    # it into a shutdown of the workers, which must not die half way on their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = proto.StreamChannel.from_fd(args.fd)
    # The master is this process's parent (the supervisor starts workers directly): once it is dead,
    # a worker removes the master's named segments, which a killed master cannot.
    attachments = Attachments(os.getppid())
    who = "worker"
    try:
        msg = proto.decode(channel.recv(), "the master")
        if msg.kind != proto.BUILD:
            raise proto.ProtocolError(f"the master sent {msg.kind} first; a worker starts with BUILD")
        who = msg.get("who") or f"worker for device {msg['device_id']}"
        threading.Thread(target=_watch_parent, args=(msg["parent_pid"], attachments), daemon=True,
                         name="orch-parent-watch").start()
        context = pickle.loads(msg.buffers[0])
        if msg["cores"]:
            os.sched_setaffinity(0, msg["cores"])
        model = Model()
        model.build_from_file(msg["model_path"], ModelType.ONNX, context, config_dict=msg.get("config") or None)
        inputs = [(t.name, t.dtype.to_numpy().str, list(t.shape)) for t in model.get_inputs()]
        outputs = [(t.name, t.dtype.to_numpy().str, list(t.shape)) for t in model.get_outputs()]
        extra = {"weights_handle": int(model.get_model_info("shareable_weight_mem_handle"))} if msg.get("publish_weights") else {}
    except EOFError:
        return _parent_gone(attachments)
    except BaseException as exc:  # noqa: BLE001  every failure must reach the master
        _send(channel, proto.error_frames(0, exc, who), attachments)
        return 1
    _send(channel, proto.encode(
        proto.BUILD_FINISH, 0, status=proto.OK, who=who, host=socket.gethostname(), pid=os.getpid(),
        device_id=msg["device_id"], inputs=inputs, outputs=outputs, cores=sorted(os.sched_getaffinity(0)),
        threads=context.cpu.thread_num, **extra,
    ), attachments)
    cancel = proto.StreamChannel.from_fd(args.cancel_fd) if args.cancel_fd is not None else None
    serve(channel, model, attachments, who, _Canceller(cancel))
    attachments.close()
    model.close()
    return 0


def serve(channel: proto.StreamChannel, model: Model, attachments: Attachments, who: str,
          canceller: _Canceller | None = None) -> None:
    """Answer PREDICT and COLLECT until EXIT (the loop of the SERVING state)."""
    canceller = canceller or _Canceller(None)
    runner = _BoundRunner(model)
    held = None  # (request id, arrays) waiting for a COLLECT after a need_space REPLY
    while True:
        try:
            frames = channel.recv()
        except (EOFError, OSError):
            _parent_gone(attachments)
        request_id = 0
        try:
            msg = proto.decode(frames, "the master")
            request_id = msg.id
            if msg.kind == proto.EXIT:
                return
            if msg.kind == proto.PREDICT:
                attachments.forget(msg.get("forget") or ())
                placement = msg.get("placement")
                reply = runner.run_placed(attachments, msg) if placement else None
                if reply is None:
                    buf = attachments.buffer(msg["slot"])
                    feeds = {s.name: view(buf, s) for s in msg["inputs"]}
                    try:
                        results = model.predict(feeds, run_options=canceller.begin(request_id))
                    finally:
                        canceller.end()
                    del feeds, buf
                    arrays = [t.get_data_to_numpy() for t in results]
                    if placement and _fits(placement, arrays):
                        reply = _write_placed(attachments, msg, arrays)
                    else:
                        held = (request_id, arrays)
                        reply = _write_outputs(attachments, msg, arrays)
            elif msg.kind == proto.COLLECT:
                if held is None or held[0] != request_id:
                    raise RuntimeError(f"COLLECT for request {request_id}, but this worker holds no outputs for it")
                attachments.buffer(msg["slot"])
                reply = _write_outputs(attachments, msg, held[1])
            else:
                raise proto.ProtocolError(f"worker received {msg.kind!r}, which a master never sends while it serves")
            if reply["status"] == proto.OK:
                held = None
            _send(channel, proto.encode(proto.REPLY, request_id, **reply), attachments)
        except proto.ProtocolError as exc:
            # A master of another version cannot be answered sensibly: say so once and leave.
            _send(channel, proto.error_frames(request_id, exc, who), attachments)
            return
        except BaseException as exc:  # noqa: BLE001
            held = None
            _send(channel, proto.error_frames(request_id, exc, who), attachments)


class _BoundRunner:
    """Runs the model with its outputs written straight into the request's block (ONNX Runtime I/O binding).

    The master says where each output goes (the placement, with the shapes it
    expects). If ONNX Runtime computes other shapes it refuses the bound
    buffers, and the plain path runs the model again and reports any real error.
    """

    def __init__(self, model: Model):
        self._model = model
        self._output_names = [t.name for t in model.get_outputs()]
        self._quiet = ort.RunOptions()
        self._quiet.log_severity_level = 4  # a refused placement is not an error worth a log line

    def run_placed(self, attachments: Attachments, msg: proto.Message) -> dict | None:
        buf = attachments.buffer(msg["slot"])
        block = attachments.block(msg["block"])
        inputs = {spec.name: view(buf, spec) for spec in msg["inputs"]}
        outputs = {name: view(block, spec) for name, spec in zip(self._output_names, msg["placement"])}
        try:
            self._model.predict_into(inputs, outputs, self._quiet)
        except Exception:  # noqa: BLE001  the plain path runs it again and reports real errors
            return None
        finally:
            del inputs, outputs, buf, block
        return {"status": proto.OK, "placed": True, "outputs": msg["placement"]}


def _fits(placement, arrays) -> bool:
    return len(placement) == len(arrays) and all(
        tuple(a.shape) == tuple(s.shape) and a.dtype.str == s.dtype for s, a in zip(placement, arrays)
    )


def _write_placed(attachments: Attachments, msg: proto.Message, arrays) -> dict:
    block = attachments.block(msg["block"])
    for spec, array in zip(msg["placement"], arrays):
        target = view(block, spec)
        target[...] = array
        del target
    del block
    return {"status": proto.OK, "placed": True, "outputs": msg["placement"]}


def _write_outputs(attachments: Attachments, msg: proto.Message, arrays) -> dict:
    start = msg["out_offset"]
    specs, end = layout([(f"out{i}", a.dtype, a.shape) for i, a in enumerate(arrays)], start)
    needed = end - start
    if needed > msg["out_capacity"]:
        return {"status": proto.NEED_SPACE, "needed": needed}
    buf = attachments.buffer(msg["slot"])
    for spec, array in zip(specs, arrays):
        target = view(buf, spec)
        target[...] = array
        del target
    del buf
    return {"status": proto.OK, "placed": False, "outputs": specs}


def _send(channel: proto.StreamChannel, frames: list, attachments: Attachments) -> None:
    try:
        channel.send(frames)
    except OSError:
        _parent_gone(attachments)


def _parent_gone(attachments: Attachments):
    # The pipe is closed without EXIT: the master is dying (a clean close sends EXIT first).
    attachments.unlink()
    os._exit(EXIT_PARENT_GONE)


if __name__ == "__main__":
    sys.exit(main())
