"""``orchestrate generate``: generate tokens with a decoder exported with its key/value cache.

    orchestrate generate MODEL_OR_SHARDS --prompt-ids FILE.npy --max-new-tokens N [--tp N] [--output FILE.npy]
                         [--stop-token ID] [--temperature T --seed S] [--backend mpi|zmq] [--threads T]
                         [--prefill MODEL_OR_SHARDS] [--cache-pair PAST:PRESENT] [--allow-replicate]

A whole model (an .onnx without a shard manifest beside it) runs in this process; with ``--tp N``
above 1 it is sliced first (into a temporary directory) and run by N ranks. A shard path
(``DIR/MODEL.onnx`` with its manifest, or the shard directory) starts the ranks as ``ShardedModel``
does. Prints one line per prompt: ``generated: ID ID ...`` (the new ids).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from ranks._command_line import (
    UsageError,
    check_input_files,
    non_negative_float,
    positive_float,
    positive_int,
    prepare_output,
    read_numpy_file,
    write_failed,
)
from ranks._errors import InputError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate tokens with an exported decoder (its key/value cache kept by each rank when sharded)",
        description="Prefill the prompts, then decode one token per step: greedy, or sampled with --temperature.",
    )
    parser.add_argument("model", metavar="MODEL_OR_SHARDS",
                        help="a decoder exported with its cache (.onnx), or its shards (DIR/MODEL.onnx or DIR)")
    parser.add_argument("--prompt-ids", required=True, metavar="FILE.npy",
                        help="token ids: one prompt (1-D) or one per row (2-D, -1 as padding for shorter prompts); "
                             "or an .npz with input_ids (and attention_mask)")
    parser.add_argument("--max-new-tokens", type=positive_int, required=True, help="tokens to generate per prompt")
    parser.add_argument("--tp", type=positive_int, default=None,
                        help="ranks: a whole model is sliced for them first; shards must have been made for it")
    parser.add_argument("--allow-replicate", action="store_true",
                        help="with --tp on a whole model: keep whole on every rank what --tp does not divide "
                             "(heads, vocabulary), as orchestrate shard --allow-replicate does")
    parser.add_argument("--output", metavar="FILE.npy",
                        help="also save the new ids, [prompts, tokens] int64, -1 after a prompt that stopped")
    parser.add_argument("--stop-token", type=int, default=None, help="a prompt stops once it generates this id")
    parser.add_argument("--temperature", type=non_negative_float, default=0.0,
                        help="0 (default): greedy; above 0: sample from softmax(logits / T)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling (the same tokens every run)")
    parser.add_argument("--backend", choices=("mpi", "zmq"), default="mpi", help="how ranks talk (default mpi)")
    parser.add_argument("--threads", type=positive_int, default=1, help="intra-op threads per rank or process")
    parser.add_argument("--prefill", metavar="MODEL_OR_SHARDS",
                        help="a separate prefill graph (no past inputs) beside the decode graph, whole or sharded "
                             "as MODEL_OR_SHARDS is")
    parser.add_argument("--cache-pair", action="append", metavar="PAST:PRESENT",
                        help="a cache input and its output, when named otherwise than the exporters' usual names")
    parser.add_argument("--timeout", type=positive_float, default=None,
                        help="seconds the ranks may take for the whole generation (default ORCH_TIMEOUT)")
    parser.set_defaults(func=run)


def _prompts(path: str):
    check_input_files([path], "--prompt-ids")
    loaded = read_numpy_file(Path(path))
    if isinstance(loaded, dict):
        ids = loaded.get("input_ids", loaded.get("prompt_ids"))
        if ids is None:
            raise InputError(f"--prompt-ids {path} holds {sorted(loaded)}; expected input_ids (and attention_mask)")
        return ids, loaded.get("attention_mask")
    return loaded, None


def _is_shards(path: Path) -> bool:
    from ranks._shard_manifest import manifest_path_for

    return path.is_dir() or manifest_path_for(path).exists()


def run(args) -> int:
    from ._generate import generate
    from ._shard_cache import parse_pairs

    ids, mask = _prompts(args.prompt_ids)
    if args.output:
        prepare_output(args.output, "--output")
    if args.seed is not None and not args.temperature:
        raise UsageError("--seed is for sampling: give --temperature above 0 too")
    model = Path(args.model)
    if not _is_shards(model) and not model.is_file():
        raise InputError(f"model {model} does not exist (neither a model file nor shards with their manifest)")
    options = dict(stop_token=args.stop_token, temperature=args.temperature, seed=args.seed)
    pairs = parse_pairs(args.cache_pair)
    prefill = Path(args.prefill) if args.prefill else None
    if prefill is not None and not _is_shards(prefill) and not prefill.is_file():
        raise InputError(f"--prefill {prefill} does not exist (neither a model file nor shards with their manifest)")
    if prefill is not None and _is_shards(prefill) != _is_shards(model):
        raise UsageError(f"--prefill {prefill} and {model} must both be whole models or both shards")
    if _is_shards(model):
        result = _sharded(model, args, ids, mask, options, prefill)
    elif args.tp and args.tp > 1:
        from ._generate import check_decoder_file
        from ._shard import shard_model

        # Before slicing and starting ranks: a mistake is said at once, naming this file, not a scratch copy.
        check_decoder_file(model, ids, args.max_new_tokens, attention_mask=mask, cache=pairs)
        with tempfile.TemporaryDirectory(prefix="orch-generate-") as scratch:
            cut = dict(cache=pairs, allow_replicate=args.allow_replicate, progress=False)
            shards = shard_model(model, args.tp, Path(scratch) / "decode", **cut)
            prefill_shards = None if prefill is None else shard_model(prefill, args.tp, Path(scratch) / "prefill",
                                                                      **cut).model_path
            result = _sharded(shards.model_path, args, ids, mask, options, prefill_shards)
    else:
        result = generate(model, ids, args.max_new_tokens, attention_mask=mask, threads=args.threads, cache=pairs,
                          prefill=prefill, **options)
    for tokens in result.tokens:
        print("generated: " + " ".join(str(int(t)) for t in tokens), flush=True)
    made = sum(len(t) for t in result.tokens)
    print(f"{made} tokens for {len(result.tokens)} prompt(s) in {result.seconds:.3f} s "
          f"({made / max(result.seconds, 1e-9):.0f} tokens/s)", file=sys.stderr, flush=True)
    if args.output:
        try:
            np.save(args.output, result.padded())
        except OSError as exc:
            raise write_failed(args.output, "--output", exc) from None
    return 0


def _sharded(path: Path, args, ids, mask, options, prefill=None):
    from ._sharded_model import ShardedModel

    with ShardedModel(path, tp=args.tp, backend=args.backend, threads=args.threads, timeout=args.timeout,
                      prefill=prefill) as model:
        return model.generate(ids, args.max_new_tokens, attention_mask=mask, **options)
