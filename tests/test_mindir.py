"""MINDIR files converted through MindSpore: `orchestrate convert`, the cache behind Model/ranks, bad files.

The MINDIR files are exported in the test by MindSpore (tests/mindir_nets.py); references are the outputs
of the MindSpore networks themselves. Float32 through two runtimes: compared within 1e-5 (softmax outputs
around 1e-3, MLP outputs around 1).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest

import ranks._mindir as mindir_module
from _mindir_helpers import build_nets, cache_files, fresh_copy, reference
from conftest import orchestrate_command, project_env, python_command, run_command
from ranks import Model, ModelError, ModelType

TOL = 1e-5


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    return build_nets(tmp_path_factory)


def ort_run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


# -- orchestrate convert -------------------------------------------------------------------------


@pytest.mark.cli
def test_convert_prints_the_check_and_writes_a_model_with_a_free_batch(nets, tmp_path):
    ref = reference(nets, "classifier")
    out = tmp_path / "out" / "classifier.onnx"

    result = run_command(orchestrate_command("convert", str(nets / "classifier.mindir"), "-o", str(out)), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "input x: float32[batch,3,32,32]" in lines
    assert "batch: free (checked against MindSpore at twice the export batch)" in lines
    check = next(line for line in lines if line.startswith("check: "))
    assert check.startswith("check: ONNX Runtime vs MindSpore on random inputs: max abs difference ") and check.endswith(": ok")
    assert float(check.split("max abs difference ")[1].split()[0]) <= 1e-5
    np.testing.assert_allclose(ort_run(out, ref["x1"]), ref["y1"], atol=TOL)
    np.testing.assert_allclose(ort_run(out, ref["x5"]), ref["y5"], atol=TOL)  # another batch than exported
    assert sorted(p.name for p in out.parent.iterdir()) == ["classifier.onnx"]  # no partial file left
    assert list(tmp_path.iterdir()) == [out.parent]  # MindSpore wrote nothing where the command ran


@pytest.mark.cli
def test_convert_with_a_static_batch_and_an_input_shape(nets, tmp_path):
    ref = reference(nets, "classifier")
    out = tmp_path / "c2.onnx"
    result = run_command(orchestrate_command("convert", str(nets / "classifier.mindir"), "-o", str(out),
                                             "--static-batch", "--input-shape", "x:2,3,32,32"))
    assert result.returncode == 0, result.stderr
    assert "batch: fixed (not asked for)" in result.stdout
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [2, 3, 32, 32]
    np.testing.assert_allclose(ort_run(out, ref["x5"][:2]), ref["y5"][:2], atol=TOL)

    wrong = run_command(orchestrate_command("convert", str(nets / "classifier.mindir"), "-o", str(out),
                                            "--input-shape", "image:1,3,32,32"))
    assert wrong.returncode == 2
    assert "--input-shape names ['image'], but the model's inputs are ['x']" in wrong.stderr


@pytest.mark.cli
def test_convert_names_the_operator_mindspore_cannot_export(nets, tmp_path):
    out = tmp_path / "erfinv.onnx"
    result = run_command(orchestrate_command("convert", str(nets / "erfinv.mindir"), "-o", str(out)))
    assert result.returncode == 1
    assert f"MINDIR file {nets / 'erfinv.mindir'}: MindSpore cannot export its operator Erfinv to ONNX" in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.cli
def test_convert_decrypts_with_the_key_mindspore_exported_it_with(nets, tmp_path):
    ref = reference(nets, "mlp")  # encrypted.mindir is the MLP, exported with enc_key
    (tmp_path / "key.bin").write_bytes(b"0123456789abcdef")
    (tmp_path / "wrong.bin").write_bytes(b"0123456789abcdeX")
    out = tmp_path / "out" / "mlp.onnx"

    wrong = run_command(orchestrate_command("convert", str(nets / "encrypted.mindir"), "-o", str(out),
                                            "--dec-key-file", str(tmp_path / "wrong.bin")))
    assert wrong.returncode == 1
    assert (f"MINDIR file {nets / 'encrypted.mindir'}: MindSpore could not decrypt the file with the given key and "
            f"mode AES-GCM") in wrong.stderr
    assert not out.exists()

    right = run_command(orchestrate_command("convert", str(nets / "encrypted.mindir"), "-o", str(out),
                                            "--dec-key-file", str(tmp_path / "key.bin")), cwd=tmp_path)
    assert right.returncode == 0, right.stderr
    np.testing.assert_allclose(ort_run(out, ref["x4"]), ref["y4"], atol=TOL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.bin", "out", "wrong.bin"]  # the plain file stayed in the child's folder


# -- the cache behind Model, python -m ranks and the workers ---------------------------------------


def test_model_converts_once_reuses_the_cache_and_rebuilds_when_the_file_changes(nets, tmp_path):
    path = fresh_copy(nets, "classifier.mindir", tmp_path)
    ref, ref2 = reference(nets, "classifier"), reference(nets, "classifier_v2")

    model = Model()
    model.build_from_file(str(path), ModelType.MINDIR)
    assert [t.shape for t in model.get_inputs()] == [[1, 3, 32, 32]]  # the batch the file declares, as MindSpore Lite
    np.testing.assert_allclose(model.predict([ref["x1"]])[0].get_data_to_numpy(), ref["y1"], atol=TOL)
    [cached] = cache_files(path)
    stamp = cached.stat().st_mtime_ns

    started = time.monotonic()
    again = Model()
    again.build_from_file(str(path), ModelType.MINDIR)
    assert time.monotonic() - started < 1.5  # no MindSpore child: a conversion alone takes about 2 s
    assert cache_files(path) == [cached] and cached.stat().st_mtime_ns == stamp

    os.replace(fresh_copy(nets, "classifier_v2.mindir", tmp_path / "new"), path)  # the file changes
    changed = Model()
    changed.build_from_file(str(path), ModelType.ONNX)  # the content decides, not the type
    [rebuilt] = cache_files(path)
    assert rebuilt != cached and not cached.exists()  # the stale conversion is gone
    out = changed.predict([ref2["x1"]])[0].get_data_to_numpy()
    np.testing.assert_allclose(out, ref2["y1"], atol=TOL)
    assert not np.allclose(out, ref["y1"], atol=TOL)
    assert sorted(p.name for p in rebuilt.parent.iterdir()) == [rebuilt.name]  # no lock or partial file left


@pytest.mark.cli
@pytest.mark.multiprocess
def test_ranks_started_at_once_convert_the_file_once(nets, tmp_path):
    path = fresh_copy(nets, "classifier.mindir", tmp_path)
    ref = reference(nets, "classifier")
    np.save(tmp_path / "x.npy", ref["x1"])
    env = {**project_env(), "ORCH_LOG_LEVEL": "INFO"}
    procs = [
        subprocess.Popen(python_command("-m", "ranks", f"--model_path={path}", "--input", str(tmp_path / "x.npy"),
                                        "--output", str(tmp_path / f"out{i}.npz"), "--quiet"),
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(3)
    ]
    results = [p.communicate(timeout=120) for p in procs]

    assert [p.returncode for p in procs] == [0, 0, 0], results
    assert sum("converted to" in err for _, err in results) == 1, [err for _, err in results]
    [cached] = cache_files(path)
    assert sorted(p.name for p in cached.parent.iterdir()) == [cached.name]
    for i in range(3):
        with np.load(tmp_path / f"out{i}.npz") as out:
            np.testing.assert_allclose(next(iter(out.values())), ref["y1"], atol=TOL)


def test_the_cache_goes_to_ORCH_MINDIR_CACHE_when_the_folder_cannot_hold_it(nets, tmp_path, monkeypatch):
    path = fresh_copy(nets, "mlp.mindir", tmp_path / "models")
    (path.parent / ".orchestrator-cache").write_text("a file where the cache folder would go")
    monkeypatch.setenv("ORCH_MINDIR_CACHE", str(tmp_path / "elsewhere"))
    ref = reference(nets, "mlp")

    model = Model()
    model.build_from_file(str(path))

    assert [p.name.split(".")[:2] for p in (tmp_path / "elsewhere").iterdir()] == [["mlp", "mindir"]]
    np.testing.assert_allclose(model.predict([ref["x4"][:1]])[0].get_data_to_numpy(), ref["y4"][:1], atol=TOL)


def test_without_mindspore_a_new_file_says_what_to_install_and_a_cached_one_still_runs(nets, tmp_path, monkeypatch):
    cached = fresh_copy(nets, "mlp.mindir", tmp_path / "a")
    Model().build_from_file(str(cached))  # converted while MindSpore is there
    fresh = fresh_copy(nets, "mlp.mindir", tmp_path / "b")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(mindir_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mindspore" else real_find_spec(name, *a))

    with pytest.raises(ModelError) as caught:
        Model().build_from_file(str(fresh), ModelType.MINDIR)
    assert str(caught.value) == (f"{fresh} is a MINDIR model; converting it to ONNX needs MindSpore, which is not "
                                 f"installed: pip install 'orchestrator[mindspore]' (or: pip install mindspore)")
    Model().build_from_file(str(cached))  # no MindSpore needed for a conversion made before


# -- bad files -----------------------------------------------------------------------------------


def _truncated(nets, path):
    data = (nets / "classifier.mindir").read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_FILES = {
    "text": (lambda nets, p: p.write_text("not a model\n" * 20),
             "the file is not a MINDIR model (MindSpore's protobuf parser: "),
    "truncated": (_truncated, "the file starts as a MINDIR written by MindSpore but cannot be parsed"),
    "empty": (lambda nets, p: p.write_bytes(b""), "the file is empty"),
    "encrypted": (lambda nets, p: p.write_bytes((nets / "encrypted.mindir").read_bytes()),
                  "the file is an encrypted MINDIR (it starts with MindSpore's encryption magic); this runtime does "
                  "not keep decrypted models: convert it once with `orchestrate convert FILE -o FILE.onnx "
                  "--dec-key-file KEY`"),
    "erfinv": (lambda nets, p: p.write_bytes((nets / "erfinv.mindir").read_bytes()),
               "MindSpore cannot export its operator Erfinv to ONNX (Can not find key Erfinv in convert map."),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_mindir_file_gets_an_error_naming_the_file_and_what_is_wrong(nets, tmp_path, case):
    write, expected = BAD_FILES[case]
    path = tmp_path / f"{case}.mindir"
    write(nets, path)

    with pytest.raises(ModelError) as caught:
        Model().build_from_file(str(path), ModelType.MINDIR)

    assert str(caught.value).startswith(f"MINDIR file {path}: {expected}"), str(caught.value)
    assert cache_files(path) == [] and sorted(p.name for p in tmp_path.iterdir()) == [".orchestrator-cache", path.name]
    assert list((tmp_path / ".orchestrator-cache").iterdir()) == []  # no lock or partial file left


def test_an_onnx_file_named_mindir_is_loaded_as_onnx(nets, tmp_path):
    onnx_file = tmp_path / "converted.onnx"
    assert mindir_module.convert_mindir(nets / "mlp.mindir", onnx_file).ok()
    renamed = tmp_path / "model.mindir"
    os.replace(onnx_file, renamed)
    assert not mindir_module.is_mindir_file(renamed)
    model = Model()
    model.build_from_file(str(renamed), ModelType.MINDIR)
    ref = reference(nets, "mlp")
    np.testing.assert_allclose(model.predict([ref["x4"]])[0].get_data_to_numpy(), ref["y4"], atol=TOL)
    assert not (tmp_path / ".orchestrator-cache").exists()
    with pytest.raises(ModelError, match=rf"{renamed} is an ONNX model, not MINDIR: there is nothing to convert"):
        mindir_module.convert_mindir(renamed, tmp_path / "again.onnx")  # said without asking for MindSpore
    assert not (tmp_path / "again.onnx").exists()


def test_the_child_is_python_itself(nets):
    # The conversion runs in `python -m ranks._mindir_export`: MindSpore never enters this process.
    assert "mindspore" not in sys.modules


@pytest.mark.multiprocess
def test_a_process_killed_while_converting_leaves_no_converter_running_and_the_next_one_converts(nets, tmp_path):
    import psutil

    path = fresh_copy(nets, "mlp.mindir", tmp_path)
    victim = subprocess.Popen(python_command("-m", "ranks", f"--model_path={path}", "--quiet"), env=project_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    converter = None
    while converter is None and time.monotonic() < deadline:
        converter = next((c for c in psutil.Process(victim.pid).children()
                          if "ranks._mindir_export" in " ".join(c.cmdline())), None)
        time.sleep(0.02)
    assert converter is not None, "the MindSpore child never started"
    work = converter.cwd()  # the killed process's temporary folder
    victim.kill()
    victim.wait(timeout=10)

    gone, alive = psutil.wait_procs([converter], timeout=10)  # it notices its parent is gone within 0.5 s
    assert not alive, "the MindSpore child outlived the process that started it"
    # It stopped, rather than finishing its conversion for nobody: it never wrote the file it was asked for.
    assert list((path.parent / ".orchestrator-cache").glob("*.partial")) == []
    assert not os.path.exists(work)  # nor the temporary folder its requester could no longer remove
    ref = reference(nets, "mlp")
    model = Model()
    model.build_from_file(str(path))
    np.testing.assert_allclose(model.predict([ref["x4"][:1]])[0].get_data_to_numpy(), ref["y4"][:1], atol=TOL)
    [cached] = cache_files(path)
    assert sorted(p.name for p in cached.parent.iterdir()) == [cached.name]  # no lock or partial file left
