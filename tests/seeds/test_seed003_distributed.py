"""Seed 003's distributed main.py, both flavours, run as its run.sh runs them, on shards of a model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from _seed_run import copy_script, printed_outputs, whole_model_outputs
from conftest import project_env
from launchers import find_mpirun
from orchestrator import shard_model, write_sample_model
from ranks import free_base_port

pytestmark = [pytest.mark.cli, pytest.mark.multiprocess]

TOLERANCE = 1e-4  # the shards' partial sums meet in a different order than the whole model's


def fixed_shape_model(path, name, batch, **sizes):
    """A sample model whose free dimensions are fixed, as MindSpore's exported Matmul model has them:
    the seed fills its inputs with np.ones(input_i.shape)."""
    write_sample_model(name, path, **sizes)
    proto = onnx.load(str(path))
    for value in list(proto.graph.input) + list(proto.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_value = batch if dim.dim_param == "batch" else 8
    onnx.save(proto, str(path))
    return path


def expected_first_values(model, count=10):
    session_inputs = onnx.load(str(model)).graph.input
    feeds = {
        i.name: np.ones([d.dim_value for d in i.type.tensor_type.shape.dim], np.float32) for i in session_inputs
    }
    return {name: array.reshape(-1) for name, array in whole_model_outputs(model, feeds).items()}


def check_rank_output(stdout, whole, count=10):
    outputs = printed_outputs(stdout)
    assert [o[0] for o in outputs] == list(whole), stdout
    for name, size, elements, values in outputs:
        assert elements == whole[name].size and size == whole[name].nbytes
        assert len(values) == count
        np.testing.assert_allclose(values, whole[name][:count], atol=TOLERANCE, rtol=TOLERANCE)


def test_gpu_flavour_under_mpirun(tmp_path):
    # run.sh: mpirun -n $RANK_SIZE python3 ./main.py --model_path=/your/path/to/Matmul.mindir
    whole = fixed_shape_model(tmp_path / "whole" / "Matmul.onnx", "mlp", 4, width=64, hidden=128, layers=2)
    shard_model(whole, 2, tmp_path / "shards", progress=False)
    script = copy_script("seed003_gpu_main.py", tmp_path)
    argv = [find_mpirun(), "-n", "2", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "--tag-output",
            sys.executable, script.name, f"--model_path={tmp_path / 'shards' / 'Matmul.onnx'}"]
    result = subprocess.run(argv, cwd=tmp_path, env=project_env(), capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr
    expected = expected_first_values(whole)
    for rank in (0, 1):
        check_rank_output(_rank_lines(result.stdout, rank), expected)


def _rank_lines(stdout, rank):
    # --tag-output prefixes each line with "[job,rank]<stdout>: "
    tag = f",{rank}]<stdout>: "
    return "\n".join(line.split(tag, 1)[1] for line in stdout.splitlines() if tag in line)


def hccl_rank_table(path):
    """A table as hccl_tools.py writes it: device_ip is the NPU's own address, not one of this host's."""
    table = {
        "version": "1.0",
        "server_count": "1",
        "server_list": [{
            "server_id": "127.0.0.1",
            "device": [
                {"device_id": "0", "device_ip": "192.1.27.6", "rank_id": "0"},
                {"device_id": "1", "device_ip": "192.2.27.6", "rank_id": "1"},
            ],
            "host_nic_ip": "reserve",
        }],
        "status": "completed",
    }
    path.write_text(json.dumps(table, indent=4))


def test_ascend_flavour_one_command_per_rank_with_a_rank_table(tmp_path):
    # run.sh: python3 ./main.py --model_path=xxx0.mindir --device_id=0 --rank_id=0 --config_file=./config_file.ini &
    #         python3 ./main.py --model_path=xxx1.mindir --device_id=1 --rank_id=1 --config_file=./config_file.ini
    whole = fixed_shape_model(tmp_path / "whole" / "xxx.onnx", "transformer", 2, d_model=32, heads=4, layers=2, ffn=64)
    shard_model(whole, 2, tmp_path, progress=False)
    hccl_rank_table(tmp_path / "rank_table.json")
    (tmp_path / "config_file.ini").write_text("[ascend_context]\nrank_table_file=./rank_table.json\n")
    script = copy_script("seed003_ascend_main.py", tmp_path)
    env = project_env()
    env["ORCH_BASE_PORT"] = str(free_base_port(2))  # no fixed ports in tests; the seed's ini stays as it is
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    ranks = [
        subprocess.Popen(
            [sys.executable, script.name, f"--model_path=./xxx{r}.onnx", f"--device_id={r}", f"--rank_id={r}",
             "--config_file=./config_file.ini"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for r in (0, 1)
    ]
    try:
        results = [p.communicate(timeout=120) for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.wait()
    expected = expected_first_values(whole)
    for proc, (out, err) in zip(ranks, results):
        assert proc.returncode == 0, out + err
        check_rank_output(out, expected)


def test_ascend_flavour_rank_from_the_ini(tmp_path):
    """[ascend_context] rank_id= in the config file is used as MindSpore Lite uses it."""
    import orchestrator as mslite

    whole = fixed_shape_model(tmp_path / "whole" / "m.onnx", "mlp", 2, width=64, hidden=128, layers=2)
    shard_model(whole, 2, tmp_path, progress=False)
    hccl_rank_table(tmp_path / "rank_table.json")
    (tmp_path / "config_file.ini").write_text("[ascend_context]\nrank_table_file=rank_table.json\nrank_id=1\n")
    context = mslite.Context()
    context.ascend.rank_id = 0
    with pytest.raises(mslite.ConfigError, match=r"rank is given twice.*context.ascend.rank_id=0.*rank_id=1"):
        mslite.Model().build_from_file(str(tmp_path / "m1.onnx"), mslite.ModelType.MINDIR, context,
                                       str(tmp_path / "config_file.ini"))


def test_shard_rank_without_a_rank_table_is_a_clear_error(tmp_path):
    import orchestrator as mslite

    whole = fixed_shape_model(tmp_path / "whole" / "m.onnx", "mlp", 2, width=64, hidden=128, layers=2)
    shard_model(whole, 2, tmp_path, progress=False)
    context = mslite.Context()
    context.ascend.rank_id = 1
    with pytest.raises(mslite.ConfigError, match=r"rank 1's shard.*nothing says where its peers are.*rank_table_file"):
        mslite.Model().build_from_file(str(tmp_path / "m1.onnx"), mslite.ModelType.MINDIR, context)
