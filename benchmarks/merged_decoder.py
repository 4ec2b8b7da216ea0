"""A rank's shard of Optimum's merged decoder: memory with the weights both branches read held once, and
what running on those shared weights (prepacking off) costs a decode step.

Memory: one fresh process per row builds the ``StagedProgram`` of rank 0's shard (TP=2) and reports its
RSS growth (RSS after the build minus RSS before the shard is loaded; each process first builds and runs
the tiny fixture's shard so that ONNX Runtime's code and pools are paged in):

- the with-past decoder's shard alone (what a rank would hold without the prefill branch);
- the merged decoder's shard, its branches on one shared copy of the weights, the with-past (decode)
  branch prepacked (the default);
- the same with prepacking off in both branches (``decode_prepacking=False``,
  ``ORCH_MERGED_DECODE_PREPACKING=false``): the least memory;
- the merged decoder's shard, each branch's sessions on their own copies (a session factory that takes
  no ``weights=``: how it ran before), for the ratio.

Speed: in this process, rank 0's stages, one thread, interleaved: a decode step (``use_cache_branch``
true, one new token after ``--past``) and a prefill (``--prompt`` tokens, no past), at batch 1 and 8, of
the merged shard built the two shared ways against each branch on its own copies, prepacked (the
baseline: how it ran before). The collectives are stood in for by this rank's own part (an all-reduce
returns its input, an all-gather repeats it), so the times are one rank's own compute.

Default model: the committed fixture ``tests/fixtures/gpt2_merged.onnx`` (width 64: tiny weights); for
numbers that mean something, a larger export from ``tests/fixtures/make_exports.py``::

    make_exports.py --only gpt2 --exporters dynamo --width 512 --layers 4 --heads 8 --positions 256 \\
        --merged gpt2 --out /tmp/big
    python benchmarks/merged_decoder.py --merged /tmp/big/gpt2_merged.onnx --with-past /tmp/big/gpt2_cache_dynamo.onnx
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import multiprocessing
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._runner import Bench  # noqa: E402
from orchestrator import shard_model  # noqa: E402
from ranks._staged_runner import StagedProgram, default_session_factory  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
TP = 2
TIMEOUT = 600.0


def rss() -> int:
    import psutil

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap is not memory this process holds
    return psutil.Process().memory_info().rss


def build(shard, mode: str, make_session=None, threads: int | None = None) -> StagedProgram:
    """``mode``: "default" (shared, the decode branch prepacked), "all shared" (decode_prepacking=False),
    "own copies" (a factory without ``weights=``: how a merged shard ran before)."""
    proto = onnx.load(str(shard))
    if mode == "own copies":
        make = make_session or default_session_factory(threads=threads)
        return StagedProgram(proto, lambda model_bytes: make(model_bytes))
    return StagedProgram(proto, make_session or default_session_factory(threads=threads),
                         decode_prepacking=mode == "default")


def _measure(conn, warm_up: str, shard: str, mode: str) -> None:
    try:
        StagedProgram(onnx.load(warm_up))  # page in ONNX Runtime's code and pools
        base = rss()
        sizes = []
        make = default_session_factory()

        def recording(model_bytes, **kwargs):
            sizes.append(len(model_bytes))
            return make(model_bytes, **kwargs)

        program = build(shard, mode, recording)
        grown = rss() - base
        conn.send((grown, sum(sizes), program.shared.nbytes if program.shared is not None else 0))
    except Exception as exc:  # noqa: BLE001 - reported by the parent
        conn.send(exc)


def measure_in_process(warm_up: Path, shard: Path, mode: str) -> tuple[int, int, int]:
    """(RSS growth, bytes of the stage models handed to ONNX Runtime, bytes held in shared initializers)."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_measure, args=(child, str(warm_up), str(shard), mode), daemon=True)
    process.start()
    child.close()
    try:
        if not parent.poll(TIMEOUT):
            raise TimeoutError(f"measuring {shard} (pid {process.pid}) took over {TIMEOUT:.0f} s")
        reply = parent.recv()
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()
            process.join(5)
    if isinstance(reply, Exception):
        raise RuntimeError(f"measuring {shard} failed") from reply
    return reply


def step_feeds(program: StagedProgram, batch: int, past: int, new: int = 1) -> dict:
    """A decode step (``new`` 1 after ``past``) or a prompt (``past`` 0, ``new`` its length)."""
    rng = np.random.default_rng(0)
    feeds = {}
    for arg in program.inputs:
        if arg.name == "use_cache_branch":
            feeds[arg.name] = np.array([past > 0])
        elif arg.name == "attention_mask":
            feeds[arg.name] = np.ones((batch, past + new), np.int64)
        elif arg.name == "position_ids":
            feeds[arg.name] = np.tile(np.arange(past, past + new, dtype=np.int64), (batch, 1))
        elif arg.name == "input_ids":
            feeds[arg.name] = rng.integers(0, 100, (batch, new)).astype(np.int64)
        else:  # a past key or value: [batch, heads of this rank, past, head_dim]
            shape = [batch, arg.shape[1], past, arg.shape[3]]
            feeds[arg.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def one_rank_step(program: StagedProgram, feeds: dict) -> dict:
    """Rank 0's stages; each collective gives this rank's own part (the compute of one rank, no peers)."""
    branch = program.select(feeds)
    env = dict(feeds)
    for k, stage in enumerate(branch.stages):
        branch.run_stage(k, env)
        for c in stage.collectives:
            value = env[c.input]
            env[c.output] = value if c.op == "AllReduce" else np.concatenate([value] * TP, axis=c.axis)
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--merged", type=Path, default=FIXTURES / "gpt2_merged.onnx")
    parser.add_argument("--with-past", type=Path, default=FIXTURES / "gpt2_cache_dynamo.onnx",
                        help="the same decoder exported with its cache, without the prefill branch")
    parser.add_argument("--past", type=int, default=64, help="past length of the decode step")
    parser.add_argument("--prompt", type=int, default=16, help="prompt length of the prefill")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="orch_bench_") as tmp:
        tmp = Path(tmp)
        warm = shard_model(FIXTURES / "gpt2_merged.onnx", TP, tmp / "warm", progress=False).shard_paths[0]
        merged = shard_model(args.merged, TP, tmp / "merged", progress=False).shard_paths[0]
        with_past = shard_model(args.with_past, TP, tmp / "with_past", progress=False).shard_paths[0]
        weight_bytes = sum(onnx.numpy_helper.to_array(t).nbytes for t in onnx.load(str(merged)).graph.initializer)

        rows = {
            "with-past shard alone": measure_in_process(warm, with_past, "default"),
            "merged (default)": measure_in_process(warm, merged, "default"),
            "merged, all shared": measure_in_process(warm, merged, "all shared"),
            "merged, own copies": measure_in_process(warm, merged, "own copies"),
        }

        programs = {mode: build(merged, mode, threads=1) for mode in ("default", "all shared", "own copies")}
        bench = Bench(f"one rank's step (rank 0 of TP={TP}, 1 thread), against each branch on its own copies, "
                      f"prepacking on (baseline, as before)")
        for batch in args.batches:
            for step, feeds in (("decode", step_feeds(programs["default"], batch, args.past)),
                                ("prefill", step_feeds(programs["default"], batch, 0, args.prompt))):
                want = one_rank_step(programs["own copies"], feeds)["logits"]
                for mode in ("default", "all shared"):
                    got = one_rank_step(programs[mode], feeds)["logits"]
                    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
                    bench.compare(f"{step} batch {batch}, {mode}", ours=lambda p=programs[mode], f=feeds: one_rank_step(p, f),
                                  baseline=lambda f=feeds: one_rank_step(programs["own copies"], f), repeats=args.repeats)

    print(f"== RSS a rank's process adds building its StagedProgram (rank 0 of TP={TP}) ==")
    print(f"merged shard: {args.merged} ({weight_bytes / 2**20:.1f} MiB of weights in rank 0's shard)")
    for name, (grown, stage_bytes, shared_bytes) in rows.items():
        print(f"  {name:<25} {grown / 2**20:7.1f} MiB   stage models handed to ONNX Runtime: "
              f"{stage_bytes / 2**20:6.1f} MiB   shared initializers: {shared_bytes / 2**20:6.1f} MiB")
    before, alone = rows["merged, own copies"][0], rows["with-past shard alone"][0]
    for name in ("merged (default)", "merged, all shared"):
        print(f"{name} / merged, own copies: {rows[name][0] / before:.2f}; / with-past alone: {rows[name][0] / alone:.2f}")
    bench.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
