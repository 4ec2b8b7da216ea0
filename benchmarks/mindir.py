"""A MINDIR model run by MindSpore's own runtime against its ONNX conversion run by us.

The network: a residual MLP (width 1024, hidden 4096, 4 layers: 134 MB of weights), built with
mindspore.nn and exported by MindSpore as MINDIR with a free batch.
  ours:     Model.build_from_file("mlp.mindir") -- converted to ONNX through MindSpore once, run on ONNX Runtime
  baseline: nn.GraphCell(mindspore.load("mlp.mindir")) -- MindSpore's own runtime
Same threads for both (ONNX Runtime's intra-op pool, not spinning, and MindSpore's CPU kernel threads), batch 1 and 64,
interleaved round by round in one process; the ratio is ours/baseline in time (below 1: ours is faster).
The outputs of the two are compared first.

    python benchmarks/mindir.py [--threads 2] [--width 1024] [--hidden 4096] [--layers 4] [--repeats 20]

Needs the mindspore extra: pip install -e '.[mindspore]'.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._runner import Bench  # noqa: E402
from orchestrator import Context, Model, ModelType  # noqa: E402


def export_mlp(path: Path, width: int, hidden: int, layers: int) -> None:
    import mindspore as ms
    from mindspore import Tensor, nn

    class Block(nn.Cell):
        def __init__(self):
            super().__init__()
            self.up, self.relu, self.down = nn.Dense(width, hidden), nn.ReLU(), nn.Dense(hidden, width)

        def construct(self, x):
            return x + self.down(self.relu(self.up(x)))

    class ResidualMlp(nn.Cell):
        def __init__(self):
            super().__init__()
            self.blocks = nn.SequentialCell([Block() for _ in range(layers)])

        def construct(self, x):
            return self.blocks(x)

    ms.set_seed(0)
    ms.export(ResidualMlp(), Tensor(shape=[None, width], dtype=ms.float32), file_name=str(path.with_suffix("")),
              file_format="MINDIR")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    import mindspore as ms
    from mindspore import Tensor, nn

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    ms.device_context.cpu.op_tuning.threads_num(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-mindir-") as folder:
        path = Path(folder) / "mlp.mindir"
        export_mlp(path, args.width, args.hidden, args.layers)
        context = Context()
        context.cpu.thread_num = args.threads
        started = time.monotonic()
        ours = Model()
        # Both runtimes live in this process and take turns: ONNX Runtime's idle threads must not spin into
        # MindSpore's turn (it would slow the baseline, as several spinning pools slow each other: measurements.md).
        ours.build_from_file(str(path), ModelType.MINDIR, context, config_dict={"cpu_context": {"allow_spinning": "false"}})
        print(f"converted and built {path.name} ({path.stat().st_size / 1e6:.0f} MB) in {time.monotonic() - started:.1f} s "
              f"(MindSpore in a child process; later builds reuse the cached ONNX file)")
        graph = nn.GraphCell(ms.load(str(path)))

        bench = Bench(f"MINDIR residual MLP {args.width}/{args.hidden}/{args.layers}: ONNX conversion on our runtime vs "
                      f"MindSpore GraphCell, {args.threads} thread(s)")
        rng = np.random.default_rng(0)
        for batch in (1, 64):
            x = rng.standard_normal((batch, args.width)).astype(np.float32)
            xt = Tensor(x)
            mine = ours.predict([x])[0].get_data_to_numpy()
            theirs = graph(xt).asnumpy()
            diff = float(np.max(np.abs(mine - theirs)))
            scale = float(np.max(np.abs(theirs)))
            assert diff <= 1e-4 * max(1.0, scale), f"batch {batch}: outputs differ by {diff} (magnitude {scale})"
            bench.compare(f"batch {batch}", ours=lambda: ours.predict([x]), baseline=lambda: graph(xt).asnumpy(),
                          repeats=args.repeats, note=f"max abs difference {diff:.2g} (outputs up to {scale:.3g})")
        bench.report()
        for row in bench.rows:
            print(f"{row.case}: ONNX Runtime (ours) is {1 / row.ratio:.2f}x as fast as MindSpore's GraphCell")
        ours.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
