"""``orchestrate sample NAME -o PATH``: write one of the sample models."""

from __future__ import annotations

import inspect


def register(subparsers) -> None:
    from ._samples import SAMPLE_MODELS

    parser = subparsers.add_parser(
        "sample",
        help="write a sample model (add, mlp, transformer, image, unet)",
        description="Write a sample ONNX model built by code. Sizes: --set width=256 --set layers=2 ...",
    )
    parser.add_argument("name", choices=sorted(SAMPLE_MODELS))
    parser.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    parser.add_argument("--external-data", action="store_true", help="write the weights to <file>.data beside the model")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=INT", help="a size option of the model (repeatable)")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from ._samples import SAMPLE_MODELS, write_sample_model

    options = {}
    allowed = list(inspect.signature(SAMPLE_MODELS[args.name]).parameters)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in allowed:
            raise SystemExit(f"orchestrate sample: --set {item!r}: expected KEY=INT with KEY one of {allowed}")
        try:
            options[key] = int(value)
        except ValueError:
            raise SystemExit(f"orchestrate sample: --set {item!r}: {value!r} is not an integer") from None
    try:
        path = write_sample_model(args.name, args.output, external_data=args.external_data, **options)
    except ValueError as exc:
        raise SystemExit(f"orchestrate sample: {exc}") from None
    print(f"wrote {path}")
    return 0
