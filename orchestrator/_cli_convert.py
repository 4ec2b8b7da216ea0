"""``orchestrate convert MODEL.mindir -o MODEL.onnx``: a MINDIR model to ONNX, through MindSpore, checked."""

from __future__ import annotations

import os
from pathlib import Path

from ranks._command_line import UsageError, non_negative_float, prepare_output
from ranks._config_file import parse_input_shape


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a MINDIR model to ONNX through MindSpore and check it against MindSpore's own output",
        description="Load MODEL.mindir with MindSpore (mindspore.load -> nn.GraphCell), export it to ONNX with "
                    "MindSpore, run both on the same random inputs and print the largest difference. The batch "
                    "dimension is left free when the graph allows it (checked at another batch). Needs the "
                    "mindspore extra: pip install 'orchestrator[mindspore]'.",
    )
    parser.add_argument("model", help="the MINDIR file (exported by mindspore.export(..., file_format='MINDIR'))")
    parser.add_argument("-o", "--output", required=True, help="the ONNX file to write")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME:D0,D1,...",
                        help="shape to export input NAME with (repeatable; default: the file's, a free batch as 1)")
    parser.add_argument("--static-batch", action="store_true", help="keep the export batch fixed in the ONNX file")
    parser.add_argument("--tolerance", type=non_negative_float, default=1e-4,
                        help="largest difference from MindSpore accepted, relative for outputs above 1 in magnitude "
                             "(default 1e-4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs of the check")
    parser.add_argument("--dec-key-file", metavar="FILE",
                        help="for an encrypted MINDIR: a file holding the key's bytes (the dec_key of mindspore.load)")
    parser.add_argument("--dec-mode", default="AES-GCM", choices=("AES-GCM", "AES-CBC", "SM4-CBC"),
                        help="the encryption mode it was exported with (default AES-GCM)")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    """Exit 0 when the conversion matches MindSpore; 1 (and no file written) when it does not."""
    from ranks._mindir import convert_mindir

    source = Path(args.model)
    if not source.is_file():
        raise UsageError(f"MINDIR file {source} " + ("is a directory" if source.is_dir() else "does not exist"))
    shapes: dict[str, list[int]] = {}
    for spec in args.input_shape:
        shapes.update(parse_input_shape(spec, "--input-shape"))
    dec_key = None
    if args.dec_key_file:
        key_file = Path(args.dec_key_file)
        if not key_file.is_file():
            raise UsageError(f"--dec-key-file {key_file} does not exist")
        dec_key = key_file.read_bytes()
        if len(dec_key) not in (16, 24, 32):
            raise UsageError(f"--dec-key-file {key_file} holds {len(dec_key)} bytes; a key is 16, 24 or 32 bytes "
                             f"(write it without a trailing newline)")
    output = prepare_output(args.output, "-o")
    # Written beside the target under another name and renamed when it passed: never half a file, never a wrong one.
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial")
    try:
        conversion = convert_mindir(source, partial, input_shapes=shapes, seed=args.seed, tolerance=args.tolerance,
                                    dynamic_batch=not args.static_batch, dec_key=dec_key, dec_mode=args.dec_mode)
        conversion.onnx_path = output
        print(conversion.summary(), flush=True)
        ok = conversion.ok(args.tolerance)
        print(f"check: ONNX Runtime vs MindSpore on random inputs: max abs difference {conversion.max_abs_diff:.3g} "
              f"(tolerance {args.tolerance:g}" + (f" x {conversion.scale:.3g}" if conversion.scale > 1 else "")
              + f"): {'ok' if ok else 'FAILED, nothing written'}", flush=True)
        if ok:
            os.replace(partial, output)
        return 0 if ok else 1
    finally:
        partial.unlink(missing_ok=True)
