"""The per-rank program: ``python -m ranks --model_path=PATH [...]`` (also ``orchestrate rank``).

It builds one model (or this rank's shard), feeds it inputs from a file or
ones, and prints each output in the seeds' format. Rank and world size come
from, in order: ``--rank_id``/``--world_size``; mpirun; torchrun-style
``RANK``/``WORLD_SIZE``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._command_line import (
    ArgumentParser,
    add_version_option,
    check_input_files,
    exit_code,
    non_negative_int,
    positive_int,
    prepare_output,
    report,
)
from ._context import Context
from ._errors import OrchestratorError
from ._model import Model, ModelType
from ._tensor_io import emit_outputs, load_inputs


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m ranks",
        description="Run one rank of a model (or a whole model on one device) and print its outputs. "
                    "Exit code 2 for a usage error (bad flag, missing file, malformed config), 1 when the model "
                    "or a peer fails.",
    )
    add_version_option(parser)
    parser.add_argument("--model_path", required=True, help="ONNX file; shards/m.onnx resolves to shards/m{rank}.onnx")
    parser.add_argument("--input", action="append", default=[], metavar="FILE",
                        help=".npy (one input), .npz (arrays by input name) or .bin (raw bytes of the first input); default: ones")
    parser.add_argument("--output", metavar="FILE.npz", help="also save the outputs, by name, to this .npz file ({rank} is replaced by the rank)")
    parser.add_argument("--device_id", type=non_negative_int, help="device this rank runs on")
    parser.add_argument("--rank_id", type=non_negative_int, help="this rank (default: from mpirun or RANK)")
    parser.add_argument("--world_size", type=positive_int, help="number of ranks (default: from mpirun, WORLD_SIZE or the rank table)")
    parser.add_argument("--config_file", default="", help="config_file.ini ([ascend_context] rank_table_file=..., [comm] ...)")
    parser.add_argument("--target", default="cpu", choices=("cpu", "gpu", "ascend"), help="device type (default cpu)")
    parser.add_argument("--thread_num", type=non_negative_int, default=0, help="CPU threads (0: ONNX Runtime's default)")
    parser.add_argument("--backend", choices=("mpi", "zmq", "single"), help="communicator for shards (default: automatic)")
    parser.add_argument("--repeat", type=positive_int, default=1, help="run predict this many times (prints the last outputs)")
    parser.add_argument("--quiet", action="store_true", help="do not print the outputs")
    return parser


def run(args: argparse.Namespace) -> int:
    identity = _identity(args)
    context = Context()
    context.target = [args.target]
    context.cpu.thread_num = args.thread_num
    if args.target == "gpu":
        context.gpu.device_id = identity.device_id  # gpu.rank_id/group_size are read-only: from the launcher
    elif args.target == "ascend":
        context.ascend.device_id = identity.device_id
        context.ascend.rank_id = identity.rank
    output = _output_path(args.output, identity.rank) if args.output else None
    # The launch's size, when a launcher gave one, so shards made for another size say so.
    model_path = _resolve_model_path(args.model_path, identity.rank, identity.size if identity.source != "single" else None)
    config_dict = {"comm": {"backend": args.backend}} if args.backend else None
    model = Model()
    try:
        model.build_from_file(model_path, ModelType.ONNX, context, config_path=args.config_file, config_dict=config_dict)
    except BaseException as exc:
        _stop_peers(model, exc)
        raise
    try:
        arrays = load_inputs(args.input, model)
        for _ in range(max(1, args.repeat)):
            outputs = model.predict(arrays)
        emit_outputs(outputs, output, quiet=args.quiet)
    finally:
        model.close()
    return 0


def _output_path(template: str, rank: int) -> Path:
    """The file np.savez will write (it adds .npz to other names), checked before the model runs."""
    path = Path(template.replace("{rank}", str(rank)))
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    return prepare_output(path, "--output")


def _stop_peers(model: Model, exc: BaseException) -> None:
    """A rank that fails while its peers wait in a collective must not leave them waiting out the timeout.

    This process is one rank and nothing else, so ending the whole job is right:
    under MPI that is an abort (the peers cannot be told otherwise); the zmq
    communicator tells its peers when it closes.
    """
    comm = model._communicator
    if comm is None or comm.size < 2:
        return
    print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    exc._orch_printed = True  # printed once, before the abort: a copy after it would follow the peers' errors
    comm.abort(f"rank {comm.rank} of {comm.size}: {type(exc).__name__} while building {model._path}; stopping the job")


def _identity(args):
    """Rank, size and device from the flags, mpirun or RANK/WORLD_SIZE; exported for libraries that read them."""
    from ._world import export_torchrun_env, resolve_identity

    table = None
    if args.config_file:
        from ._config_file import load_config

        table = load_config(args.config_file).rank_table_file
    identity = resolve_identity(args.rank_id, args.world_size, args.device_id, rank_table=table)
    export_torchrun_env(identity)
    return identity


def _resolve_model_path(path: str, rank: int, size: int | None = None) -> Path:
    """shards/m.onnx -> shards/m{rank}.onnx when the former does not exist, checked against the manifest."""
    from ._shard_files import resolve_shard_path

    return resolve_shard_path(path, rank, size)


def main(argv: list[str] | None = None) -> int:
    """``python -m ranks``: 0, 1 for a runtime error, 2 for a usage error (see ``_command_line``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_input_files(args.input)
        return run(args)
    except (OrchestratorError, OSError) as exc:
        # One clear line, no traceback. No program name: under a launcher every
        # line already carries its rank, and the launcher quotes this one. A rank
        # that stopped its peers printed it already, before the abort.
        if getattr(exc, "_orch_printed", False):
            return exit_code(exc)
        return report(exc)
