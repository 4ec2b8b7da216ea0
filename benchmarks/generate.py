"""Generating tokens: TP=2 ranks (one thread each, each keeping its own heads' cache) against the whole
decoder in one process with two threads and a Python loop over ONNX Runtime that carries the cache itself.

Side by side, in one run, interleaved round by round, at batch 1 and 8 (prompts of --prompt tokens, then
--new-tokens greedy steps):

- tokens per second of ``ShardedModel.generate`` (as its Python caller sees it) and of the whole
  model's loop (``orchestrator.generate``: the same loop, the cache carried by this process);
- time per token spent outside the ranks' own compute (target <= 0.3 ms): the caller's wall time
  minus the slowest rank's time inside the model's runs (its ONNX Runtime stages and Megatron's
  all-reduces), per step: the token pick with its one small collective, building the next feeds,
  and the request and reply between the caller and the ranks (once per generation). The pick is
  also given alone, as the rank that reached its collective last saw it (the others wait there for
  it: that is the ranks' imbalance, not the pick);
- bytes crossing processes per token against the minimum: token ids in (the prompt, once), token
  ids out, Megatron's all-reduces. Ours adds each rank's best value and index per row (16 bytes);
  gathering the logits instead would add the vocabulary's width, the cache through the caller
  every layer's keys and values.

Default model: the committed fixture ``tests/fixtures/gpt2_cache_dynamo.onnx`` (width 64, 2 layers: the
overheads dominate); ``--model PATH`` for a larger export from ``tests/fixtures/make_exports.py``, e.g.
``--only gpt2 --exporters --width 512 --layers 4 --heads 8 --positions 256 --out /tmp/big``.

    python benchmarks/generate.py [--model PATH] [--backend mpi|zmq] [--rounds 20] [--new-tokens 32] [--prompt 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._runner import Bench, format_seconds  # noqa: E402
from orchestrator import ShardedModel, shard_model  # noqa: E402
from ranks._branches import BRANCH_ATTRS  # noqa: E402
from orchestrator._generate import WholeModel  # noqa: E402

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gpt2_cache_dynamo.onnx"
TP = 2


def _traffic(manifest: dict, batch: int, width: int) -> tuple[float, float]:
    """(ours, minimum) bytes crossing processes per generated token, summed over the ranks (ring collectives:
    each rank sends (tp-1)/tp of an all-reduce's buffer twice, of an allgather's once)."""
    ring = (TP - 1) / TP
    # a merged decoder lists both branches' collectives: a decode step runs the with-past branch's
    decode_branch = BRANCH_ATTRS[True]
    allreduces = sum(1 for c in manifest["collectives"]
                     if c["op"] == "AllReduce" and c.get("branch", decode_branch) == decode_branch)
    megatron = TP * allreduces * 2 * ring * width * 4  # per row: a [1, width] float32 per all-reduce
    ids_out = 8  # one int64 per row, rank 0 to the caller
    pick = TP * ring * TP * 16  # each rank's (value, index) as two float64, allgathered
    return megatron + ids_out + pick, megatron + ids_out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=FIXTURE, help="a decoder exported with its key/value cache")
    parser.add_argument("--backend", default="mpi", choices=("mpi", "zmq"))
    parser.add_argument("--rounds", type=int, default=20, help="timed generations of each (median; 5 are too few on a shared machine)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=16, help="prompt length in tokens")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    whole = WholeModel(args.model, threads=2)
    vocab = None
    bench = Bench(f"generate: TP={TP} ({args.backend}, 1 thread per rank, cache kept by each rank) vs 1 process "
                  f"with 2 threads carrying the cache; {args.new_tokens} new tokens after {args.prompt}")
    notes = []
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        shards = shard_model(args.model, TP, tmp, progress=False)
        width = int(shards.manifest["explain"]["layers"][0]["values_per_token"])  # the hidden width
        with ShardedModel(shards.model_path, backend=args.backend, threads=1, timeout=300) as model:
            for batch in args.batches:
                prompts = rng.integers(0, 500, (batch, args.prompt))
                sharded_runs, whole_runs = [], []
                for _ in range(args.rounds + 1):  # the first round warms both up and is not counted
                    sharded_runs.append(model.generate(prompts, args.new_tokens))
                    whole_runs.append(whole.generate(prompts, args.new_tokens))
                sharded_runs, whole_runs = sharded_runs[1:], whole_runs[1:]
                same = all(np.array_equal(a, b) for a, b in zip(sharded_runs[0].tokens, whole_runs[0].tokens))
                made = batch * args.new_tokens
                ours = statistics.median(r.seconds for r in sharded_runs)
                base = statistics.median(r.seconds for r in whole_runs)
                bench.add(f"b={batch} time per generation", ours, base,
                          note=f"{made / ours:.0f} tokens/s TP={TP} vs {made / base:.0f} tokens/s whole "
                               f"(speed-up {base / ours:.2f}x); tokens equal: {same}")
                outside = statistics.median((r.seconds - r.model_seconds) / r.steps for r in sharded_runs)
                pick = statistics.median(r.pick_seconds / r.steps for r in sharded_runs)
                inside = statistics.median(r.model_seconds / r.steps for r in sharded_runs)
                whole_outside = statistics.median((r.seconds - r.model_seconds) / r.steps for r in whole_runs)
                met = "met" if outside <= 0.3e-3 else "MISSED"
                notes.append(f"b={batch}: per token outside the ranks' own compute {format_seconds(outside)} "
                             f"(target <= 0.3 ms: {met}; of it the pick with its collective {format_seconds(pick)}), "
                             f"the ranks' compute {format_seconds(inside)}; the whole model's loop spends "
                             f"{format_seconds(whole_outside)} per token outside ONNX Runtime")
                if vocab is None:
                    vocab = int(whole.session.get_outputs()[0].shape[-1])
                ours_bytes, minimum = _traffic(shards.manifest, batch, width)
                logits_gather = minimum + TP * (TP - 1) / TP * vocab * 4
                notes.append(f"b={batch}: bytes crossing processes per token {ours_bytes:.0f}, minimum {minimum:.0f} "
                             f"(ratio {ours_bytes / minimum:.3f}; gathering the logits instead: "
                             f"{logits_gather / minimum:.2f}); prompt once: {prompts.size * 16 / made:.0f} bytes per "
                             f"token of this run")
    bench.report()
    for line in notes:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
