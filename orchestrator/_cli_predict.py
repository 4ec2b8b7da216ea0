"""``orchestrate predict``: split one batch over worker processes, one per device, and print the joined outputs.

    orchestrate predict --model m.onnx --devices 0,1 [--target cpu] [--threads N]
                        [--input x.npz] [--output y.npz] [--broadcast NAME] [--batch N]
"""

from __future__ import annotations

import sys

import numpy as np

from ranks._context import Context
from ranks._errors import ConfigError, OrchestratorError
from ranks._rank_program import format_output, ones_for, read_input_files
from ranks._tensor import Tensor


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="split a batch across devices or cores (one worker process each) and print the joined outputs",
        description="Run a model on a batch split along dimension 0 over one worker process per device; "
                    "the outputs equal running the whole batch on one device.",
    )
    parser.add_argument("--model", action="append", required=True, metavar="FILE.onnx",
                        help="the model; give it once per device (in --devices order) for per-device files")
    parser.add_argument("--devices", default="0,1", help="comma-separated device ids, one worker each (default 0,1)")
    parser.add_argument("--target", default="cpu", choices=("cpu", "gpu", "ascend"), help="device type (default cpu)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads per worker (default: the cores shared out evenly)")
    parser.add_argument("--input", action="append", default=[], metavar="FILE",
                        help=".npz (arrays by input name), .npy (the next input in order) or .bin (raw values of the first input); default: ones")
    parser.add_argument("--output", metavar="FILE.npz", help="also save the joined outputs, by name, to this .npz file")
    parser.add_argument("--broadcast", action="append", default=[], metavar="NAME",
                        help="an input without a batch dimension, sent whole to every worker (repeatable)")
    parser.add_argument("--batch", type=int, default=0,
                        help="batch of the default ones inputs (default: one slice per device, of the model's "
                             "fixed batch or one row)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds the build and the request may take (default ORCH_TIMEOUT)")
    parser.add_argument("--quiet", action="store_true", help="do not print the outputs")
    parser.set_defaults(func=run)


def parse_devices(text: str) -> list[int]:
    try:
        devices = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--devices must be comma-separated integers like 0,1; got {text!r}") from None
    if not devices:
        raise ConfigError("--devices names no device; give e.g. --devices 0,1")
    return devices


def load_inputs(files: list[str], inputs: list[Tensor], broadcast: list[str], batch: int) -> dict[str, np.ndarray]:
    """Arrays for every input: from the files, else ones (the batch dimension set to ``batch``, free others to 1)."""
    arrays = read_input_files(files, inputs)
    for tensor in inputs:
        if tensor.name not in arrays:
            arrays[tensor.name] = ones_for(tensor, None if tensor.name in broadcast else batch)
    return arrays


def run(args) -> int:
    from ._parallel_predictor import ParallelPredictor

    try:
        devices = parse_devices(args.devices)
        if args.batch < 0:
            raise ConfigError(f"--batch must be a positive number of rows, got {args.batch}")
        if len(args.model) not in (1, len(devices)):
            raise ConfigError(f"--model given {len(args.model)} times for {len(devices)} devices {devices}: "
                              f"give it once, or once per device")
        context = Context()
        context.target = [args.target]
        context.cpu.thread_num = args.threads
        paths = {"model_path": args.model[0]} if len(args.model) == 1 else {"model_paths": args.model}
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
        if not args.quiet:
            for tensor in outputs:
                print(format_output(tensor), flush=True)
        if args.output:
            np.savez(args.output, **{t.name: t.get_data_to_numpy() for t in outputs})
    except OrchestratorError as exc:
        # A user error or a worker's: one clear line, exit code 1.
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
