"""Tensor parallel from a rank table: one command per rank, the ranks talk over the zmq communicator.

Builds the sample MLP and transformer, slices each into 2 shards, writes a
2-device HCCL rank table and a config_file.ini naming it, then starts one
command per rank, as the seeds' shell samples do:

    python -m ranks --model_path=shards/MODEL.onnx --device_id=0 --rank_id=0 --config_file=config_file.ini &
    python -m ranks --model_path=shards/MODEL.onnx --device_id=1 --rank_id=1 --config_file=config_file.ini &

and compares what each rank saved with the unsliced model's output.

    python examples/tp_rank_table.py [--workdir DIR]
"""

import argparse
import atexit
import os
import subprocess
import sys
import shutil
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _tp_common import prepare, report, whole_model_output  # noqa: E402

from ranks import free_base_port, generate_rank_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where to write models, shards, the rank table and outputs (default: a temporary directory)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="orch_tp_rank_table_"))
    if not args.workdir:
        atexit.register(shutil.rmtree, workdir, True)  # a directory we made goes when the example ends
    workdir.mkdir(parents=True, exist_ok=True)
    table = workdir / "rank_table_2p.json"
    generate_rank_table([("127.0.0.1", [0, 1])]).dump(table)
    ok = True
    for name in ("mlp", "transformer"):
        source, shard_path, x_file = prepare(workdir, name)
        ini = workdir / "config_file.ini"
        ini.write_text(
            "[ascend_context]\n"
            f"rank_table_file={table.name}\n"
            "[comm]\n"
            "backend=zmq\n"
            f"base_port={free_base_port(2)}\n"
        )
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        procs = []
        for rank in range(2):
            command = [
                "python", "-m", "ranks", f"--model_path={shard_path}", f"--device_id={rank}", f"--rank_id={rank}",
                f"--config_file={ini}", f"--input={x_file}", f"--output={workdir / f'{name}_out_rank{rank}.npz'}",
                "--thread_num=1", "--quiet",
            ]
            print("$", " ".join(command), "&", flush=True)
            procs.append(subprocess.Popen([sys.executable, *command[1:]], env=env, cwd=workdir))
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=300))
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                codes.append("timeout")
        if any(code != 0 for code in codes):
            print(f"{name}: the ranks exited with {codes}")
            ok = False
            continue
        expected = whole_model_output(source, np.load(x_file))
        for rank in range(2):
            with np.load(workdir / f"{name}_out_rank{rank}.npz") as saved:
                ok &= report(name, saved["y"], expected, f"rank {rank} started from the rank table")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
