"""One rank of a sharded decoder that generates: what a user's own program under mpirun or a rank table does.

    python generate_rank.py --shards DIR/MODEL.onnx --prompt-ids FILE.npy --max-new-tokens N --output OUT{rank}.npy
                            [--rank_id R --device_id R --config_file INI]   (the rank-table launcher's flags)

Under ``mpirun`` the communicator is MPI's; with ``--config_file`` it is the one its ``[comm]`` section
names (zmq with a rank table). Every rank gets the same prompt, keeps its own heads' cache, and
writes the tokens it agreed on with the others.
"""

import argparse
import sys

import numpy as np

from orchestrator import StagedRunner, create_communicator, generate_on_rank, resolve_shard_path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", required=True)
    parser.add_argument("--prompt-ids", required=True)
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--rank_id", type=int)
    parser.add_argument("--device_id", type=int)
    parser.add_argument("--config_file")
    args = parser.parse_args()
    comm = create_communicator(config_file=args.config_file, rank=args.rank_id)
    try:
        runner = StagedRunner(resolve_shard_path(args.shards, comm.rank, comm.size), comm)
        result = generate_on_rank(runner, np.load(args.prompt_ids), args.max_new_tokens, return_logits=True)
        np.savez(args.output.format(rank=comm.rank), tokens=result.padded(), logits=np.stack(result.logits))
        print(f"rank {comm.rank}: generated {result.padded().tolist()}", flush=True)
    finally:
        comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
