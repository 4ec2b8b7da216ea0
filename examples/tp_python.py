"""Tensor parallel from Python: slice a model into 2 shards, run them in 2 rank processes with one call.

Builds the sample MLP and transformer, slices each with `shard_model`, then
`ShardedModel` starts the ranks (through mpirun, or as local processes
talking over the zmq communicator), sends the input, and returns the output
the unsliced model gives.

    python examples/tp_python.py [--backend mpi|zmq] [--workdir DIR]
"""

import argparse
import atexit
import sys
import shutil
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _tp_common import prepare, report, whole_model_output  # noqa: E402

from orchestrator import ShardedModel, run_sharded  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="mpi", choices=("mpi", "zmq"))
    parser.add_argument("--workdir", help="where to write the models and shards (default: a temporary directory)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="orch_tp_python_"))
    if not args.workdir:
        atexit.register(shutil.rmtree, workdir, True)  # a directory we made goes when the example ends
    workdir.mkdir(parents=True, exist_ok=True)
    ok = True
    for name in ("mlp", "transformer"):
        source, shard_path, x_file = prepare(workdir, name)
        x = np.load(x_file)
        expected = whole_model_output(source, x)
        # One call: start the ranks, run, stop them.
        y = run_sharded(shard_path, {"x": x}, backend=args.backend)["y"]
        ok &= report(name, y, expected, f"run_sharded over {args.backend}")
        # Or keep the ranks up for many requests.
        with ShardedModel(shard_path, backend=args.backend) as model:
            for batch in (1, len(x)):
                y = model.predict({"x": x[:batch]})["y"]
                ok &= report(name, y, expected[:batch], f"ShardedModel.predict batch {batch}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
