"""``orchestrate shard MODEL.onnx --tp N -o DIR``: slice a model into tensor-parallel shards."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ranks._command_line import UsageError, non_negative_float, positive_int, prepare_output


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "shard",
        help="slice a model into tensor-parallel shards (Megatron-style, collectives written in)",
        description="Write DIR/MODEL0.onnx ... DIR/MODEL{N-1}.onnx and DIR/MODEL.manifest.json.",
    )
    parser.add_argument("model", help="the ONNX model to slice, or a whole MINDIR model (converted through MindSpore first)")
    parser.add_argument("--tp", type=positive_int, required=True, help="tensor-parallel degree: number of ranks")
    parser.add_argument("-o", "--output", required=True, help="directory for the shards and the manifest (created)")
    parser.add_argument("--allow-replicate", action="store_true",
                        help="write whole-model shards when nothing can be split, keep undividable layers whole")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--external-data", dest="external_data", action="store_true", default=None,
                      help="weights in <shard>.data files (default: as the source model)")
    data.add_argument("--no-external-data", dest="external_data", action="store_false",
                      help="weights inside the shard files")
    add_cache_pair_option(parser)
    parser.add_argument("--explain", action="store_true",
                        help="say per layer what was paired, what stays whole and why, the collectives per rank "
                             "and the bytes each rank sends per token against Megatron's minimum")
    parser.add_argument("--check", action="store_true",
                        help="run the model and the shards (simulated in one process) on random inputs and compare")
    parser.add_argument("--tolerance", type=non_negative_float, default=1e-4,
                        help="largest absolute difference --check accepts")
    parser.add_argument("--seed", type=int, default=0, help="seed of --check's random inputs")
    add_progress_options(parser)
    parser.add_alias("--quiet", "--no-progress")  # its first name, in README
    parser.set_defaults(func=_run)


def add_cache_pair_option(parser) -> None:
    parser.add_argument("--cache-pair", action="append", metavar="PAST:PRESENT",
                        help="a decoder's cache input and the output that becomes it at the next step, when the "
                             "exporter named them otherwise than past_key_values.N.key -> present.N.key or "
                             "past_N_key -> present_N_key; one * on both sides stands for the varying part "
                             "('cache_in_*:cache_out_*'); repeatable")


def add_progress_options(parser) -> None:
    """--progress / --no-progress; by default a bar on stderr only when stderr is a terminal."""
    bar = parser.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="always show the progress bar on stderr (default: only when stderr is a terminal)")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="never show the progress bar")


def _run(args) -> int:
    """Errors go up to ``orchestrate``'s main: a bad model or flag exits 2, a failing run 1."""
    if args.tp == 1:
        raise UsageError("--tp 1 would leave the model whole: there is nothing to slice; give --tp 2 or more, "
                         "or run the model itself (a Model, orchestrate predict)")
    prepare_output(args.output, "-o", directory=True)
    with tempfile.TemporaryDirectory(prefix="orch-shard-") as scratch:
        return _shard(args, _onnx_model(args.model, Path(scratch)))


def _onnx_model(model: str, scratch: Path) -> str:
    """``model``, or for a MINDIR file its ONNX conversion (cached) under the MINDIR's name, so the shards are MODEL{r}.onnx."""
    from ranks._mindir import cached_conversion, is_mindir_file

    if not Path(model).is_file() or not is_mindir_file(model):
        return model
    named = scratch / f"{Path(model).stem}.onnx"
    shutil.copyfile(cached_conversion(model), named)
    return str(named)


def _shard(args, model: str) -> int:
    from ._shard import shard_model
    from ._shard_cache import parse_pairs
    from ._shard_check import check_shards

    result = shard_model(model, args.tp, args.output, allow_replicate=args.allow_replicate,
                         external_data=args.external_data, progress=args.progress,
                         cache=parse_pairs(args.cache_pair))
    print(result.summary(), flush=True)
    if args.explain:
        print(result.explain(), flush=True)
    if not args.check:
        return 0
    check = check_shards(model, result.model_path, seed=args.seed, progress=args.progress)
    for name, diff in check.per_output.items():
        print(f"check: output {name}: max abs difference {diff:.3g}")
    verdict = "ok" if check.ok(args.tolerance) else "FAILED"
    print(f"check: {args.tp} shards vs whole model: max abs difference {check.max_abs_diff:.3g} "
          f"(tolerance {args.tolerance:g}): {verdict}")
    return 0 if check.ok(args.tolerance) else 1
