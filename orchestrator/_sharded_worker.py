"""One rank of a ``ShardedModel``: build this rank's shard, then answer the master's requests.

``python -m orchestrator._sharded_worker --model PATH --master DIR/master.sock
--backend mpi|zmq [--rank R --size N --rank_table FILE --base_port P] [--threads T] [--master_pid PID]``

Messages are the one protocol's (``_protocol``, stream framing) over this rank's
one Unix-socket connection to the master (``_rank_links``). Its states::

    BUILDING  communicator, shard, a barrier with every rank --> BUILD_FINISH (or ERROR, exit 1)
    SERVING   PREDICT --> run (STARTED once it has run STARTED_AFTER s), REPLY (or ERROR, exit 1);
              PREDICT with a ``generate`` field --> the whole generation loop here (``_generate``), REPLY;
              EXIT --> close, exit 0

The barrier comes before BUILD_FINISH, so BUILD_FINISH from every rank means
every rank is ready. Every rank gets every request from the master (not
through a collective), so ranks that sit idle between requests never run into
a collective's timeout. STARTED says the rank took the request: when a request
stalls, the master names the ranks that never said so. A helper thread sends it,
and only for a request still running after a short while
(``_Progress``): a short request costs no message, and no wake-up of the
master while the ranks compute (on a machine with as many cores as ranks,
that wake-up would delay a rank and its peers with it); it writes on the rank's one
connection, a message at a time (a lock). Rank 0 replies with the
outputs; for a plain predict the other ranks send nothing (rank 0's REPLY ends
the request; a rank that fails after its last collective with rank 0 says so
with an ERROR, which the master reads at the next request): one message and
one wake-up of the master less per call. After ``generate`` every rank replies
with its own timings. After an ERROR inside a request the rank exits: its peers may be
stuck in a collective, the job is over. Between requests a rank sleeps in poll(); rank 0
polls without sleeping for ``LINGER`` after a reply while its caller calls back to back.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time

import numpy as np

from ranks._shard_files import resolve_shard_path
from ranks._staged_runner import StagedRunner, default_session_factory

from . import _protocol as proto
from ._rank_links import RankLink

_POLL_MS = 500
STARTED_AFTER = 0.2  # seconds a request runs before the rank reports it took it (at most a quarter of the timeout)
# After a reply, rank 0 polls for the next request this long before it sleeps, while its caller calls back to
# back (the last request came within twice this after the reply before it). Waking a process that sleeps
# costs 0.05 to 0.13 ms on a virtual machine like this project's (the host must wake the idle virtual CPU):
# a decoding loop's batch-1 calls pay it on every call. Only rank 0: on a machine with as many cores as
# ranks, the master needs the other core meanwhile, and the other ranks' wake-up overlaps rank 0's.
LINGER = 0.0005


class _Progress:
    """A thread that sends STARTED for a request once it has run ``after`` seconds.

    The main thread only writes ``current`` (request id, start) before a run and
    None after it: no system call per request. A stopped process sends nothing,
    which is what the master needs to tell a stopped rank from one that waits
    for it inside a collective.
    """

    def __init__(self, link: RankLink, rank: int, after: float):
        self.current: tuple[int, float] | None = None
        self._link, self._rank, self._after = link, rank, after
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="orch-progress", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        reported = None
        while not self._stop.wait(self._after / 2):
            current = self.current
            if current is not None and current[0] != reported and time.monotonic() - current[1] >= self._after:
                try:
                    self._link.send(proto.encode(proto.STARTED, current[0], status=proto.OK, rank=self._rank))
                except OSError:
                    return  # the master is gone; the main thread finds out on its own
                reported = current[0]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator._sharded_worker")
    p.add_argument("--model", required=True)
    p.add_argument("--master", required=True)
    p.add_argument("--backend", choices=("mpi", "zmq"), required=True)
    p.add_argument("--rank", type=int)
    p.add_argument("--size", type=int)
    p.add_argument("--rank_table")
    p.add_argument("--base_port", type=int)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--master_pid", type=int)
    p.add_argument("--timeout", type=float)
    p.add_argument("--prefill", help="shards of a separate prefill graph, for generate")
    return p


def make_communicator(args):
    if args.backend == "mpi":
        from ranks._comm_mpi import MpiCommunicator

        return MpiCommunicator(timeout=args.timeout)
    from ranks._world import create_communicator

    return create_communicator(backend="zmq", rank=args.rank, size=args.size, rank_table=args.rank_table,
                               base_port=args.base_port, timeout=args.timeout)


def _master_alive(pid: int | None) -> bool:
    if not pid:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tell(link: RankLink, frames: list) -> None:
    """Send an ERROR if the master is still there to read it (its end may be why we fail)."""
    try:
        link.send(frames)
    except OSError:
        pass


def _last_word(who: str, exc: BaseException) -> None:
    """One line on stderr for the supervisor's record of this rank (never the user's console): the master
    reads it when this rank's exit is reported before its ERROR is weighed. A rank that only lost its peer
    (PeerLostError naming that peer) is then told from the peer that left first, even with exit code 0."""
    first = (str(exc).splitlines() or [""])[0]
    try:
        print(f"{who}: {type(exc).__name__}: {first}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _generate(runner, arrays: dict, options: dict) -> tuple[dict, dict]:
    """A whole generation on this rank (``ShardedModel.generate``): the prompt came once, the loop runs here,
    this rank's cache never leaves it; rank 0 sends back the new ids (and the logits when asked)."""
    from ._generate import generate_on_rank

    result = generate_on_rank(runner, arrays["input_ids"], int(options["max_new_tokens"]),
                              prefill_runner=getattr(runner, "prefill", None),
                              attention_mask=arrays.get("attention_mask"), stop_token=options.get("stop_token"),
                              temperature=float(options.get("temperature") or 0.0), seed=options.get("seed"),
                              return_logits=bool(options.get("return_logits")))
    payload = {"tokens": result.padded(), "lengths": np.array([len(t) for t in result.tokens], dtype=np.int64)}
    if result.logits is not None:
        width = payload["tokens"].shape[1]
        logits = np.zeros((len(result.logits), width, result.logits[0].shape[-1]), dtype=result.logits[0].dtype)
        for row, value in enumerate(result.logits):
            logits[row, :len(value)] = value
        payload["logits"] = logits
    return payload, {"steps": result.steps, "model_seconds": result.model_seconds, "pick_seconds": result.pick_seconds}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        link = RankLink(args.master)
    except OSError as exc:
        print(f"orchestrator._sharded_worker: cannot reach the master at {args.master}: {exc}", file=sys.stderr)
        return 1
    comm = None
    progress = None
    rank = args.rank if args.rank is not None else "?"
    who = f"rank {rank}" + (f" of {args.size}" if args.size else "")  # before the communicator knows better
    try:
        try:
            comm = make_communicator(args)
            rank = comm.rank
            who = f"rank {comm.rank} of {comm.size}"
            path = resolve_shard_path(args.model, comm.rank, comm.size)
            runner = StagedRunner(path, comm, make_session=default_session_factory(threads=args.threads))
            if args.prefill:
                runner.prefill = StagedRunner(resolve_shard_path(args.prefill, comm.rank, comm.size), comm,
                                              make_session=default_session_factory(threads=args.threads))
            # Every rank built its shard before any BUILD_FINISH: the master starts no request on a half-built job.
            comm.barrier()
        except BaseException as exc:
            _tell(link, proto.error_frames(0, exc, who, rank=rank))
            _last_word(who, exc)
            return 1
        link.send(proto.encode(
            proto.BUILD_FINISH, 0, status=proto.OK, who=who, host=socket.gethostname(), pid=os.getpid(),
            rank=comm.rank, size=comm.size,
            inputs=[a.name for a in runner.get_inputs()], outputs=[a.name for a in runner.get_outputs()],
        ))
        names = [a.name for a in runner.get_outputs()]
        after = STARTED_AFTER if not args.timeout else min(STARTED_AFTER, args.timeout / 4)
        progress = _Progress(link, comm.rank, after)
        replied_at = None  # when rank 0 last replied (None: not yet, or its caller was not calling back to back)
        linger = comm.rank == 0
        while True:
            if replied_at is not None and linger:
                until = replied_at + LINGER
                while time.perf_counter() < until and not link.poll(0):
                    pass
            if not link.poll(_POLL_MS / 1000):
                if not _master_alive(args.master_pid):
                    return 1  # orphaned: the master is gone, nobody will send EXIT
                continue
            request_id = 0
            try:
                try:
                    msg = link.recv()
                except EOFError:
                    return 1  # the master closed its end: it is gone, nobody will send EXIT
                request_id = msg.id
                if replied_at is not None:
                    linger = comm.rank == 0 and time.perf_counter() - replied_at <= 2 * LINGER
                if msg.kind == proto.EXIT:
                    return 0
                if msg.kind != proto.PREDICT:
                    raise proto.ProtocolError(f"{who} received {msg.kind}, which a master never sends to a rank")
                progress.current = (request_id, time.monotonic())
                started = time.perf_counter()
                options = msg.get("generate")
                extra = {}
                if options is not None:
                    payload, extra = _generate(runner, msg.arrays(), options)
                else:
                    outputs = runner.run(None, msg.arrays())
                seconds = time.perf_counter() - started
                progress.current = None
            except BaseException as exc:
                _tell(link, proto.error_frames(request_id, exc, who, rank=comm.rank))
                _last_word(who, exc)
                return 1  # peers may be stuck in a collective: this job is over
            if options is None:
                if comm.rank != 0:
                    continue  # a plain predict: rank 0's REPLY carries the outputs and ends the request
                payload = dict(zip(names, outputs))
            try:
                link.send(proto.encode(proto.REPLY, request_id, status=proto.OK, rank=comm.rank,
                                       seconds=seconds, arrays=payload if comm.rank == 0 else {}, **extra))
            except ConnectionError:
                return 1  # the master is gone
            replied_at = time.perf_counter()
    finally:
        if progress is not None:
            progress.close()
        if comm is not None:
            try:
                comm.close()
            except Exception:
                pass
        link.close()


if __name__ == "__main__":
    sys.exit(main())
