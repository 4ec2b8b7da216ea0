"""``orchestrate predict``: split one batch over worker processes, one per device, and print the joined outputs.

    orchestrate predict --model-path m.onnx --devices 0,1 [--target cpu] [--thread-num N]
                        [--input x.npz] [--output y.npz] [--broadcast NAME] [--batch N]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ranks._command_line import (
    UsageError,
    check_input_files,
    non_negative_int,
    positive_float,
    positive_int,
    prepare_output,
)
from ranks._context import Context
from ranks._tensor_io import emit_outputs, ones_for, read_input_files
from ranks._tensor import Tensor


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="split a batch across devices or cores (one worker process each) and print the joined outputs",
        description="Run a model on a batch split along dimension 0 over one worker process per device; "
                    "the outputs equal running the whole batch on one device.",
    )
    parser.add_argument("--model-path", action="append", required=True, metavar="FILE.onnx",
                        help="the model; give it once per device (in --devices order) for per-device files")
    parser.add_alias("--model", "--model-path")  # its first name, in README and scripts
    parser.add_argument("--devices", default="0,1", help="comma-separated device ids, one worker each (default 0,1)")
    parser.add_argument("--target", default="cpu", choices=("cpu", "gpu", "ascend"), help="device type (default cpu)")
    parser.add_argument("--thread-num", type=non_negative_int, default=0,
                        help="CPU threads per worker (default: the cores shared out evenly)")
    parser.add_alias("--threads", "--thread-num")  # its first name, in README and scripts
    parser.add_argument("--input", action="append", default=[], metavar="FILE",
                        help=".npz (arrays by input name), .npy (the next input in order) or .bin (raw values of the first input); default: ones")
    parser.add_argument("--output", metavar="FILE.npz", help="also save the joined outputs, by name, to this .npz file")
    parser.add_argument("--broadcast", action="append", default=[], metavar="NAME",
                        help="an input without a batch dimension, sent whole to every worker (repeatable)")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help="batch of the default ones inputs (default: one slice per device, of the model's "
                             "fixed batch or one row)")
    parser.add_argument("--timeout", type=positive_float, default=None,
                        help="seconds the build and the request may take (default ORCH_TIMEOUT)")
    parser.add_argument("--quiet", action="store_true", help="do not print the outputs")
    parser.set_defaults(func=run)


def parse_devices(text: str) -> list[int]:
    try:
        devices = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--devices must be comma-separated integers like 0,1; got {text!r}") from None
    if not devices:
        raise UsageError("--devices names no device; give e.g. --devices 0,1")
    return devices


def load_inputs(files: list[str], inputs: list[Tensor], broadcast: list[str], batch: int) -> dict[str, np.ndarray]:
    """Arrays for every input: from the files, else ones (the batch dimension set to ``batch``, free others to 1)."""
    arrays = read_input_files(files, inputs)
    for tensor in inputs:
        if tensor.name not in arrays:
            arrays[tensor.name] = ones_for(tensor, None if tensor.name in broadcast else batch)
    return arrays


def run(args) -> int:
    """Errors go up to ``orchestrate``'s main: one line, exit code 2 for usage errors, 1 for the rest."""
    from ._parallel_predictor import ParallelPredictor

    models = args.model_path
    devices = parse_devices(args.devices)
    if len(models) not in (1, len(devices)):
        raise UsageError(f"--model-path given {len(models)} times for {len(devices)} devices {devices}: "
                         f"give it once, or once per device")
    check_input_files(args.input)
    output = None
    if args.output:
        output = Path(args.output)
        output = prepare_output(output if output.suffix == ".npz" else output.with_name(output.name + ".npz"), "--output")
    context = Context()
    context.target = [args.target]
    context.cpu.thread_num = args.thread_num
    paths = {"model_path": models[0]} if len(models) == 1 else {"model_paths": models}
    with ParallelPredictor(device_ids=devices, context=context, broadcast_inputs=args.broadcast,
                           timeout=args.timeout, **paths) as predictor:
        inputs = predictor.get_inputs()
        # Default: one slice per device, of the model's fixed batch when it has one.
        rows = next((t.shape[0] for t in inputs if t.name not in args.broadcast and t.shape and t.shape[0] > 0), 1)
        arrays = load_inputs(args.input, inputs, args.broadcast, args.batch or rows * len(devices))
        batch_name = next(t.name for t in predictor.get_inputs() if t.name not in args.broadcast)
        batch = arrays[batch_name].shape[0] if arrays[batch_name].ndim else 0
        outputs = predictor.predict(arrays)
        print(f"split a batch of {batch} over devices {devices} as {predictor.split_sizes(batch)}",
              file=sys.stderr, flush=True)
    emit_outputs(outputs, output, quiet=args.quiet)
    return 0
