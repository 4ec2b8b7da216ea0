import pytest

from ranks import ConfigError, load_config


def write(tmp_path, text, name="config_file.ini"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_sections_and_relative_rank_table(tmp_path):
    sub = tmp_path / "conf"
    sub.mkdir()
    path = write(sub, "[ascend_context]\nrank_table_file=tables/t.json\n[comm]\nbackend=zmq\ntimeout=7.5\nbase_port=31000\n")
    config = load_config(path)
    assert config.rank_table_file == str(sub / "tables" / "t.json")
    assert (config.comm.backend, config.comm.timeout, config.comm.base_port) == ("zmq", 7.5, 31000)


@pytest.mark.parametrize("word, flag", [("false", False), ("No", False), ("0", False), ("TRUE", True), ("yes", True), ("1", True)])
def test_mpi_arrival_check(tmp_path, word, flag):
    config = load_config(write(tmp_path, f"[comm]\nbackend=mpi\nmpi_arrival_check={word}\n"))
    assert config.comm.mpi_arrival_check is flag


def test_mpi_arrival_check_unset_is_none(tmp_path):
    assert load_config(write(tmp_path, "[comm]\nbackend=mpi\n")).comm.mpi_arrival_check is None


def test_unknown_section_is_kept(tmp_path):
    config = load_config(write(tmp_path, "[my_plugin]\nanything=1\n"))
    assert config.extra == {"my_plugin": {"anything": "1"}}


@pytest.mark.parametrize(
    "text, message",
    [
        ("[comm]\nbakend=zmq\n", "unknown key 'bakend' in section [comm]; known keys are ['backend'"),
        ("rank_table_file=x.json\n", "comes before any [section] header"),
        ("[comm]\nbackend=nccl\n", "[comm] backend must be one of ['mpi', 'zmq', 'single'], got 'nccl'"),
        ("[comm]\ntimeout=soon\n", "[comm] timeout must be a positive number of seconds, got 'soon'"),
        ("[comm]\ntimeout=0\n", "[comm] timeout must be a positive number of seconds"),
        ("[comm]\nbase_port=70000\n", "[comm] base_port must be a TCP port 1..65535, got 70000"),
        ("[comm]\nbase_port=x\n", "[comm] base_port must be an integer, got 'x'"),
        ("[comm]\nbackend=zmq\n[comm]\nbackend=mpi\n", "not a valid ini file"),
        ("[cpu_context]\ninput_shape=x1,2\n", "is not NAME:D1,D2,..."),
        ("[comm]\nmpi_arrival_check=fast\n", "[comm] mpi_arrival_check must be one of true/false/1/0/yes/no, got 'fast'"),
        ("[comm]\nmpi_arrival_check=\n", "[comm] mpi_arrival_check must be one of true/false/1/0/yes/no, got ''"),
        # the device sections by the Context's own rules (cpu.thread_num = -3 fails alike)
        ("[cpu_context]\nthread_num=-3\n", "[cpu_context] thread_num must be an int >= 0, got -3"),
        ("[cpu_context]\nthread_num=two\n", "[cpu_context] thread_num must be an integer, got 'two'"),
        ("[cpu_context]\ninter_op_parallel_num=-1\n", "[cpu_context] inter_op_parallel_num must be an int >= 0, got -1"),
        ("[cpu_context]\nthread_affinity_mode=7\n", "[cpu_context] thread_affinity_mode must be one of {0: 'no binding'"),
        ("[cpu_context]\nthread_affinity_core_list=0,-1\n", "[cpu_context] thread_affinity_core_list[] must be an int >= 0, got -1"),
        ("[cpu_context]\nprecision_mode=fp8\n", "[cpu_context] precision_mode must be one of ['enforce_fp32', 'preferred_fp32', 'preferred_fp16'], got 'fp8'"),
        ("[cpu_context]\nallow_spinning=maybe\n", "[cpu_context] allow_spinning must be one of true/false/1/0/yes/no, got 'maybe'"),
        ("[gpu_context]\ndevice_id=-1\n", "[gpu_context] device_id must be an int >= 0, got -1"),
        ("[gpu_context]\nprovider=cuda9\n", "[gpu_context] provider must be one of ['', 'tensorrt'], got 'cuda9'"),
        ("[ascend_context]\nprecision_mode=fast\n", "[ascend_context] precision_mode must be one of ['enforce_fp32'"),
    ],
)
def test_malformed_files(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)
    assert str(path) in str(info.value) or "before any" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.ini")


def test_config_dict_overrides_file(tmp_path):
    path = write(tmp_path, "[comm]\nbackend=zmq\n")
    config = load_config(path, {"comm": {"backend": "single"}, "cpu_context": {"input_shape": "x:1,3"}})
    assert config.comm.backend == "single"
    assert config.input_shapes == {"x": [1, 3]}


@pytest.mark.parametrize("bad", [{"comm": {"timeout": 5}}, {"comm": "zmq"}, ["comm"]])
def test_config_dict_types(bad):
    with pytest.raises(ConfigError):
        load_config("", bad)


def test_inline_comments_as_in_the_readme(tmp_path):
    path = write(tmp_path, "[comm]\nbackend=zmq        ; optional: mpi | zmq | single\ntimeout=120  # seconds\n")
    config = load_config(path)
    assert (config.comm.backend, config.comm.timeout) == ("zmq", 120.0)


def test_mindspore_lite_keys_without_effect_warn_once_and_load(tmp_path, caplog):
    text = (
        "[ascend_context]\nrank_table_file=t.json\nop_select_impl_mode=high_precision\ninput_format=NCHW\n"
        "[ge_session_options]\nge.exec.formatMode=1\n"
    )
    with caplog.at_level("WARNING", logger="orchestrator.config"):
        config = load_config(write(tmp_path, text))
    messages = [r.getMessage() for r in caplog.records]
    assert any("[ascend_context] op_select_impl_mode is a MindSpore Lite option with no effect" in m for m in messages)
    assert any("[ascend_context] input_format is a MindSpore Lite option with no effect" in m for m in messages)
    assert any("section [ge_session_options] is MindSpore Lite's and has no effect" in m for m in messages)
    assert all("\n" not in m for m in messages)
    assert "op_select_impl_mode" not in config.sections["ascend_context"]
    assert config.rank_table_file == str(tmp_path / "t.json")
    # Read again by the same process (python -m ranks reads the rank table's name, then builds the model
    # with the file): its lines are not repeated.
    caplog.clear()
    with caplog.at_level("WARNING", logger="orchestrator.config"):
        assert load_config(write(tmp_path, text)).rank_table_file == str(tmp_path / "t.json")
    assert caplog.records == []


def test_a_key_nobody_knows_stays_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'rank_tabel_file' in section \[ascend_context\].*also accepted"):
        load_config(write(tmp_path, "[ascend_context]\nrank_tabel_file=t.json\n"))


def test_quoted_values_and_variable_weights_file(tmp_path):
    (tmp_path / "names.txt").write_text("w1\n\nw2\n")
    config = load_config(write(tmp_path, '[ascend_context]\nvariable_weights_file="names.txt"\nrank_id=1\n'))
    assert config.variable_weights == ["w1", "w2"]
    assert config.rank_id == 1


def test_variable_weights_file_missing_is_clear(tmp_path):
    with pytest.raises(ConfigError, match=r"variable_weights_file .*missing.txt cannot be read.*one weight name per line"):
        load_config(write(tmp_path, "[ascend_context]\nvariable_weights_file=missing.txt\n"))


def test_mindspore_lite_bracketed_input_shape(tmp_path):
    config = load_config(write(tmp_path, '[ascend_context]\ninput_shape="x:[1,3,8,8];y:[1,4]"\n'))
    assert config.input_shapes == {"x": [1, 3, 8, 8], "y": [1, 4]}


def test_weight_sharing_keys_flat_as_the_seed_writes_them_or_in_ascend_context(tmp_path):
    flat = load_config("", {"pids": "101, 102", "shared_mem_handle": 7 << 32 | 9})
    assert flat.get("ascend_context", "shareable_weight_pid_list") == "101, 102"
    assert flat.get("ascend_context", "shareable_weight_mem_handle") == str(7 << 32 | 9)
    assert load_config("", {"pids": [0, 5]}).get("ascend_context", "shareable_weight_pid_list") == "0, 5"
    ini = load_config(write(tmp_path, "[ascend_context]\nshareable_weight_pid_list=1, 2\nshareable_weight_mem_handle=3\n"))
    assert ini.get("ascend_context", "shareable_weight_pid_list") == "1, 2"
    with pytest.raises(ConfigError, match=r"config_dict\['shared_mem_handle'\] must be a str or int, got 1.5"):
        load_config("", {"shared_mem_handle": 1.5})


def test_valid_device_settings_load(tmp_path):
    text = ("[cpu_context]\nthread_num=2\ninter_op_parallel_num=1\nthread_affinity_mode=1\nthread_affinity_core_list=0\n"
            "precision_mode=preferred_fp16\nallow_spinning=No\n[ascend_context]\ndevice_id=3\nrank_id=1\n")
    config = load_config(write(tmp_path, text))
    assert config.sections["cpu_context"]["thread_num"] == "2" and config.device_id == 3 and config.rank_id == 1


def test_a_section_nothing_reads_is_named_with_a_guess(tmp_path, caplog):
    """[pol] for [pool]: kept (another tool may read it), but not in silence."""
    with caplog.at_level("WARNING", logger="orchestrator.config"):
        load_config(write(tmp_path, "[pol]\ntimeout=3\n[pool]\ntimeout=4\n"))
    [message] = [r.getMessage() for r in caplog.records]
    assert message.endswith("section [pol] is read by nothing here (ours: ascend_context, comm, cpu_context, "
                            "gpu_context, pool; MindSpore Lite's own are accepted and ignored); ignored (did you mean "
                            "[pool]?)"), message
