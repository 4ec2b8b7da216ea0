"""``orchestrate sample NAME -o PATH``: write one of the sample models."""

from __future__ import annotations

import inspect

from ranks._command_line import UsageError, prepare_output, write_failed

from ._cli_shard import add_progress_options


def register(subparsers) -> None:
    from ._samples import SAMPLE_MODELS

    parser = subparsers.add_parser(
        "sample",
        help="write a sample model (add, mlp, transformer, image, unet)",
        description="Write a sample ONNX model built by code. Sizes: --set width=256 --set layers=2 ...",
    )
    parser.add_argument("name", choices=sorted(SAMPLE_MODELS))
    parser.add_argument("-o", "--output", required=True, help="the .onnx file to write (missing directories are created)")
    parser.add_argument("--external-data", action="store_true", help="write the weights to <file>.data beside the model")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the model (repeatable): a size, or a word such as layout=NHWC")
    add_progress_options(parser)
    parser.set_defaults(func=_run)


def _run(args) -> int:
    """Errors go up to ``orchestrate``'s main: a bad --set or -o exits 2, a failed write 1."""
    from ._samples import SAMPLE_MODELS, write_sample_model

    options = {}
    parameters = inspect.signature(SAMPLE_MODELS[args.name]).parameters
    allowed = list(parameters)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in allowed:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE with KEY one of {allowed}")
        if isinstance(parameters[key].default, str):  # a word, e.g. layout=NHWC; the model checks its value
            options[key] = value
            continue
        try:
            options[key] = int(value)
        except ValueError:
            raise UsageError(f"--set {item!r}: {value!r} is not an integer") from None
    path = prepare_output(args.output, "-o")
    try:
        path = write_sample_model(args.name, path, external_data=args.external_data, progress=args.progress, **options)
    except ValueError as exc:  # a size the model cannot take, e.g. d_model not a multiple of heads
        raise UsageError(f"{exc}") from None
    except OSError as exc:
        raise write_failed(path, "-o", exc) from None
    print(f"wrote {path}")
    return 0
