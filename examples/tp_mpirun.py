"""Tensor parallel under mpirun: `orchestrate launch mpi -n 2 -- python -m ranks --model_path=shards/MODEL.onnx`.

Builds the sample MLP and transformer, slices each into 2 shards, then runs
the command line above (each rank resolves shards/MODEL.onnx to its own
shards/MODEL{rank}.onnx, runs its stages and all-reduces through MPI), and
compares what every rank saved with the unsliced model's output.

    python examples/tp_mpirun.py [--workdir DIR]
"""

import argparse
import atexit
import subprocess
import sys
import shutil
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _tp_common import prepare, report, whole_model_output  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where to write the models, shards and outputs (default: a temporary directory)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="orch_tp_mpirun_"))
    if not args.workdir:
        atexit.register(shutil.rmtree, workdir, True)  # a directory we made goes when the example ends
    workdir.mkdir(parents=True, exist_ok=True)
    ok = True
    for name in ("mlp", "transformer"):
        source, shard_path, x_file = prepare(workdir, name)
        out = workdir / f"{name}_out_rank{{rank}}.npz"
        command = [
            "orchestrate", "launch", "mpi", "-n", "2", "--",
            "python", "-m", "ranks", f"--model_path={shard_path}", f"--input={x_file}", f"--output={out}",
            "--thread_num=1",
        ]
        print("$", " ".join(command), flush=True)
        # `orchestrate` is this interpreter's orchestrator._cli, so the example runs from a checkout too.
        result = subprocess.run([sys.executable, "-m", "orchestrator._cli", *command[1:]], timeout=600,
                                cwd=Path(__file__).resolve().parent.parent)
        if result.returncode != 0:
            print(f"{name}: the launch failed with exit code {result.returncode}")
            ok = False
            continue
        expected = whole_model_output(source, np.load(x_file))
        for rank in range(2):
            with np.load(str(out).format(rank=rank)) as saved:
                ok &= report(name, saved["y"], expected, f"rank {rank} under mpirun")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
