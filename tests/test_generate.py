"""Generating tokens with decoders exported with their key/value cache, in one process.

The fixtures ``tests/fixtures/{gpt2,llama}_cache_dynamo.*`` (``make_exports.py``) hold the decoders and
torch's greedy tokens and logits for two prompts (8 and 5 tokens) over 40 steps, each prompt run alone;
``gpt2_prefill_dynamo.onnx`` the same GPT-2 as a separate prefill graph; ``{gpt2,llama}_merged.*`` the same
decoders as Optimum's ``merge_decoders`` writes them (an If on ``use_cache_branch``: no-past and with-past branches).
Here: the whole model's loop against torch; the slicer's cut of the cache; the sharded loop with its
ranks as threads (the launched ranks are in ``test_generate_ranks.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from orchestrator import ModelError, ShardError, generate, generate_on_rank, shard_model
from orchestrator._shard_check import SimulatedRanks, check_shards
from ranks import InputError, StagedRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shard_helpers import ThreadGroup, fixture_arrays  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures"
DECODERS = ["gpt2_cache_dynamo", "llama_cache_dynamo"]
MERGED = ["gpt2_merged", "llama_merged"]  # Optimum's layout: If(use_cache_branch) over the two decoders
# gpt2_prefill_dynamo.onnx: the same GPT-2 as a separate prefill graph (no past inputs)
STEPS = 40
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    made = {}

    def get(name: str, tp: int = 2, **kwargs):
        key = (name, tp, tuple(sorted(kwargs)))
        if key not in made:
            made[key] = shard_model(FIXTURES / f"{name}.onnx", tp, tmp_path_factory.mktemp(f"{name}_tp{tp}"),
                                    progress=False, **kwargs)
        return made[key]

    return get


def _on_threads(result, tp: int, prompt, steps: int, **options):
    """Every rank's GenerateResult, the ranks as threads of this process."""
    def rank(comm):
        runner = StagedRunner(onnx.load(str(result.shard_paths[comm.rank])), comm)
        return generate_on_rank(runner, prompt, steps, **options)

    return ThreadGroup(tp).run(rank)


def _assert_like_torch(got, ref, steps=STEPS):
    for row in range(len(ref["tokens"])):
        assert got.tokens[row].tolist() == ref["tokens"][row, :steps].tolist(), f"prompt {row}"
        if got.logits is not None:
            assert np.max(np.abs(got.logits[row] - ref["logits"][row, :steps])) <= TOLERANCE


@pytest.mark.parametrize("name", DECODERS)
def test_the_cache_is_cut_by_heads_and_kept_by_each_rank(name, shards):
    result = shards(name)
    manifest = result.manifest
    heads = 4 if name.startswith("gpt2") else 2  # Llama: grouped-query attention, 2 key/value heads
    assert len(manifest["cache"]) == 4
    assert {(c["axis"], c["heads"], c["heads_per_rank"]) for c in manifest["cache"]} == {(1, heads, heads // 2)}
    pasts = {c["past"]: c["present"] for c in manifest["cache"]}
    if name.startswith("gpt2"):
        assert pasts["past_key_values.0.key"] == "present.0.key"
    else:
        assert pasts["past_1_value"] == "present_1_value"
    # Megatron's two all-reduces per block and the embedding's; only the logits are gathered, never the cache.
    ops = [(c["op"], c["tensor"]) for c in manifest["collectives"]]
    assert [op for op, _ in ops].count("AllReduce") == 5
    assert [t for op, t in ops if op == "AllGather"] == ["logits"]
    shard = onnx.load(str(result.shard_paths[1]))
    declared = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
                for v in list(shard.graph.input) + list(shard.graph.output)}
    for past, present in pasts.items():
        assert declared[past][1] == declared[present][1] == heads // 2
    assert "key/value cache: 4 past/present pairs" in result.summary()


@pytest.mark.parametrize("name", DECODERS)
def test_shards_with_a_whole_cache_in_and_out_equal_the_whole_model(name, shards):
    """predict-style use: the cache goes in whole, each rank takes its heads, the presents come back whole."""
    import onnxruntime as ort

    result = shards(name)
    session = ort.InferenceSession(str(FIXTURES / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 512, (2, 3)), "attention_mask": np.ones((2, 7), np.int64),
             "position_ids": np.tile(np.arange(4, 7), (2, 1))}
    for arg in session.get_inputs()[3:]:
        feeds[arg.name] = rng.standard_normal((2, arg.shape[1], 4, arg.shape[3])).astype(np.float32)
    want = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    got = SimulatedRanks(result.shard_paths).run(feeds)
    for key, value in want.items():
        assert got[key].shape == value.shape
        assert np.max(np.abs(got[key] - value)) <= TOLERANCE, key


@pytest.mark.parametrize("name", DECODERS + MERGED)
def test_whole_model_greedy_equals_torch(name):
    ref = fixture_arrays(name)
    got = generate(FIXTURES / f"{name}.onnx", ref["prompt_ids"], STEPS, return_logits=True)
    assert got.steps == STEPS
    _assert_like_torch(got, ref)
    # The batch is left-padded (prompts of 8 and 5 tokens); each prompt alone gives the same tokens.
    alone = generate(FIXTURES / f"{name}.onnx", ref["prompt_ids"][1][ref["prompt_ids"][1] >= 0], 8)
    assert alone.tokens[0].tolist() == ref["tokens"][1, :8].tolist()


@pytest.mark.parametrize("name", DECODERS + MERGED)
def test_two_ranks_greedy_equals_torch(name, shards):
    ref = fixture_arrays(name)
    results = _on_threads(shards(name), 2, ref["prompt_ids"], STEPS, return_logits=True)
    for got in results:  # every rank knows every token
        _assert_like_torch(got, ref)


@pytest.mark.parametrize("name", MERGED)
def test_a_merged_decoder_is_sliced_branch_by_branch_and_keeps_both(name, shards):
    """Each rank's shard is one If on use_cache_branch, as the merged model; in each branch two AllReduces per
    block (and the embedding's), the logits the only AllGather; both branches give the whole model's outputs."""
    import onnxruntime as ort

    result = shards(name)
    shard = onnx.load(str(result.shard_paths[1]))
    assert [n.op_type for n in shard.graph.node] == ["If"] and shard.graph.node[0].input[0] == "use_cache_branch"
    report = result.manifest["explain"]
    for branch in ("then_branch", "else_branch"):
        ops = [(c["op"], c["tensor"]) for c in result.manifest["collectives"] if c["branch"] == branch]
        assert [op for op, _ in ops].count("AllReduce") == 5, branch
        assert [t for op, t in ops if op == "AllGather"] == ["logits"], branch
        layers = report["branches"][branch]["layers"]
        assert [(layer["kind"], layer["all_reduce"] is not None) for layer in layers] == [
            ("attention", True), ("mlp", True)] * 2, branch
    assert {(c["axis"], c["heads_per_rank"]) for c in result.manifest["cache"]} == {(1, 2 if name.startswith("gpt2") else 1)}
    summary, explained = result.summary(), result.explain()
    assert "merged decoder: If optimum::if on use_cache_branch" in summary
    assert "collectives per rank (then_branch): 1 AllGather, 5 AllReduce" in summary
    assert "then_branch (use_cache_branch true):" in explained and "else_branch (use_cache_branch false):" in explained
    session = ort.InferenceSession(str(FIXTURES / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    ranks = SimulatedRanks(result.shard_paths)
    rng = np.random.default_rng(0)
    pasts = [a for a in session.get_inputs() if a.name not in ("input_ids", "attention_mask", "position_ids",
                                                                "use_cache_branch")]
    for use_cache, past in ((False, 0), (True, 4), (False, 3)):  # the no-past branch ignores a past it is given
        feeds = {"input_ids": rng.integers(0, 512, (2, 3)), "position_ids": np.tile(np.arange(past, past + 3), (2, 1)),
                 "attention_mask": np.ones((2, (past if use_cache else 0) + 3), np.int64),
                 "use_cache_branch": np.array([use_cache])}
        feeds.update({a.name: rng.standard_normal((2, a.shape[1], past, a.shape[3])).astype(np.float32) for a in pasts})
        want = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        got = ranks.run(feeds)
        for key, value in want.items():
            assert got[key].shape == value.shape
            assert np.max(np.abs(got[key] - value)) <= TOLERANCE, (use_cache, key)
    # orchestrate shard --check runs both branches against the whole model too
    check = check_shards(FIXTURES / f"{name}.onnx", result.model_path, progress=False)
    assert check.ok(TOLERANCE) and set(check.per_output) == {o.name for o in session.get_outputs()}


def test_merged_branches_that_cut_a_weight_differently_are_refused(tmp_path):
    """The weights are one copy per rank that both branches read: a plan that cuts one differently per branch
    (here the no-past branch reads the MLP weight through an Identity, so its layer stays whole) is an error."""
    model = onnx.load(str(FIXTURES / "gpt2_merged.onnx"))
    weight = "model.transformer.h.0.mlp.c_fc.weight_merged_0"
    body = next(a.g for a in model.graph.node[0].attribute if a.name == "else_branch")
    reader = next(n for n in body.node if weight in n.input)
    reader.input[list(reader.input).index(weight)] = "c_fc_weight_copy"
    body.node.insert(0, onnx.helper.make_node("Identity", [weight], ["c_fc_weight_copy"], name="copy"))
    onnx.save(model, str(tmp_path / "disagree.onnx"))
    with pytest.raises(ShardError) as caught:
        shard_model(tmp_path / "disagree.onnx", 2, tmp_path / "s", progress=False)
    assert str(caught.value).startswith(
        f"the weight {weight} is cut along axis 1 in the then_branch of optimum::if (use_cache_branch true) but "
        f"whole on every rank in the else_branch of optimum::if (use_cache_branch false)")
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").iterdir())
    # an error in planning one branch says which branch
    with pytest.raises(ShardError, match=r"^in the then_branch of optimum::if \(use_cache_branch true\): "
                                         r"tensor-parallel degree 3 does not divide the hidden size 64"):
        shard_model(FIXTURES / "gpt2_merged.onnx", 3, tmp_path / "t", progress=False)


@pytest.mark.parametrize("name", MERGED)
def test_a_ranks_merged_shard_holds_the_weights_both_branches_read_once(name, shards):
    """Both branches' stage sessions take every weight the main graph holds for them from one set of arrays
    (one OrtValue per name; GPT-2's Transpose of its tied LM-head weight is folded once, for both), and the
    stage models handed to ONNX Runtime carry no copy of those weights; a session factory that takes no
    ``weights=`` still builds (each branch on its own copies), and both ways give the same outputs."""
    from onnx import numpy_helper

    from ranks._shared_weights import _FOLDABLE_WEIGHT_BYTES
    from ranks._staged_runner import StagedProgram, default_session_factory

    shard = onnx.load(str(shards(name).shard_paths[0]))
    weights = {t.name: numpy_helper.to_array(t) for t in shard.graph.initializer
               if numpy_helper.to_array(t).nbytes >= _FOLDABLE_WEIGHT_BYTES}
    assert len(weights) >= 8
    built, make = [], default_session_factory()

    def recording(model_bytes, weights=None):
        built.append((onnx.load_from_string(model_bytes), weights))
        return make(model_bytes, weights=weights)

    program = StagedProgram(shard, recording, label=name)
    shared = program.shared
    assert shared is not None and all(b.shared is shared for b in program.branches.values())
    first = sum(1 for s in program.branches[True].stages if s.session is not None)  # built first: then_branch
    assert len(built) == first + sum(1 for s in program.branches[False].stages if s.session is not None)
    taken = {True: set(), False: set()}
    for k, (stage_model, stage_weights) in enumerate(built):
        which = k < first
        if stage_weights is None:
            continue
        assert stage_weights.shared is shared
        assert "ConstantFolding" not in stage_weights.disabled_optimizers  # nothing computes from a weight alone
        inits = {t.name: t for t in stage_model.graph.initializer}
        for weight in stage_weights.names:
            assert inits[weight].data_location == onnx.TensorProto.EXTERNAL and not inits[weight].raw_data, weight
        taken[which] |= set(stage_weights.names)
    assert taken[True] & taken[False] >= set(weights)  # every weight of the main graph, by both branches
    for weight in weights:
        if weight in shared.arrays:
            np.testing.assert_array_equal(shared.arrays[weight], weights[weight])
    # One array per weight: what both branches read is held once (an array under two names counts once).
    assert shared.nbytes <= sum(a.nbytes for a in weights.values()) * 1.25
    assert len({id(a) for a in shared.arrays.values()}) <= len(weights) + 1
    own_bytes = []

    def own_copies(model_bytes):  # no weights=: each branch's sessions on their own copies, as before
        own_bytes.append(len(model_bytes))
        return make(model_bytes)

    own = StagedProgram(onnx.load(str(shards(name).shard_paths[0])), own_copies)
    assert own.shared is None
    # Each branch's stage models held every weight: ours hold none of them.
    weight_bytes = sum(a.nbytes for a in weights.values())
    assert sum(own_bytes) - sum(len(m.SerializeToString()) for m, _ in built) >= 1.5 * weight_bytes
    feeds = {"input_ids": np.array([[5, 7, 9]]), "attention_mask": np.ones((1, 3), np.int64),
             "position_ids": np.array([[0, 1, 2]]), "use_cache_branch": np.array([False])}
    for arg in program.inputs:
        if arg.name not in feeds:
            feeds[arg.name] = np.zeros((1, arg.shape[1], 0, arg.shape[3]), np.float32)
    for which in (False, True):
        feeds["use_cache_branch"] = np.array([which])
        a, b = program.select(feeds), own.select(feeds)
        env_a, env_b = dict(feeds), dict(feeds)
        for k in range(len(a.stages)):  # rank 0's stages; a collective passes this rank's part on
            for prog, env in ((a, env_a), (b, env_b)):
                prog.run_stage(k, env)
                for c in prog.stages[k].collectives:
                    env[c.output] = env[c.input]
        np.testing.assert_allclose(env_a["logits"], env_b["logits"], rtol=0, atol=1e-5)


def test_a_stage_session_built_without_its_shared_weights_fails_to_build(shards):
    """A factory that takes ``weights=`` but does not hand them to the session gets an error naming the stage,
    not a session that runs on a placeholder."""
    from ranks._staged_runner import StagedProgram, default_session_factory

    make = default_session_factory()
    with pytest.raises(ModelError, match=r"cannot build stage 0 of \d+"):
        StagedProgram(onnx.load(str(shards("gpt2_merged").shard_paths[0])), lambda model_bytes, weights=None: make(model_bytes),
                      label="merged")


def test_a_merged_shard_builds_in_a_process_whose_working_directory_is_gone(shards, tmp_path, monkeypatch):
    """The placeholders of the shared weights name no file of the working directory (ranks may run anywhere)."""
    from ranks._staged_runner import StagedProgram

    shard = onnx.load(str(shards("gpt2_merged").shard_paths[0]))
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert StagedProgram(shard).shared is not None


@pytest.mark.parametrize("prepacking", ["true", "false"])
def test_merged_shards_give_torchs_tokens_with_and_without_decode_prepacking(prepacking, shards, monkeypatch):
    monkeypatch.setenv("ORCH_MERGED_DECODE_PREPACKING", prepacking)
    ref = fixture_arrays("gpt2_merged")
    for got in _on_threads(shards("gpt2_merged"), 2, ref["prompt_ids"], STEPS, return_logits=True):
        _assert_like_torch(got, ref)


def test_a_bad_merged_decode_prepacking_value_is_named(shards, monkeypatch):
    from ranks._staged_runner import StagedProgram

    monkeypatch.setenv("ORCH_MERGED_DECODE_PREPACKING", "sometimes")
    with pytest.raises(ValueError, match="ORCH_MERGED_DECODE_PREPACKING must be one of true/false/1/0/yes/no, got 'sometimes'"):
        StagedProgram(onnx.load(str(shards("gpt2_merged").shard_paths[0])))


def test_key_value_heads_that_tp_does_not_divide_keep_the_cache_whole(shards):
    """Llama at TP=4: 2 key/value heads for 4 ranks; the cache stays whole on every rank, the tokens are right."""
    name = "llama_cache_dynamo"
    result = shards(name, 4)
    assert {c["axis"] for c in result.manifest["cache"]} == {None}
    ref = fixture_arrays(name)
    results = _on_threads(result, 4, ref["prompt_ids"], 12, return_logits=True)
    _assert_like_torch(results[0], ref, steps=12)


def test_sampling_with_a_seed_is_the_whole_models_and_repeats(shards):
    name = "gpt2_cache_dynamo"
    ref = fixture_arrays(name)
    whole = generate(FIXTURES / f"{name}.onnx", ref["prompt_ids"], 16, temperature=0.8, seed=5)
    again = generate(FIXTURES / f"{name}.onnx", ref["prompt_ids"], 16, temperature=0.8, seed=5)
    other = generate(FIXTURES / f"{name}.onnx", ref["prompt_ids"], 16, temperature=0.8, seed=6)
    assert [t.tolist() for t in whole.tokens] == [t.tolist() for t in again.tokens]
    assert [t.tolist() for t in whole.tokens] != [t.tolist() for t in other.tokens]
    assert whole.tokens[0].tolist() != ref["tokens"][0, :16].tolist()  # not greedy
    ranks = _on_threads(shards(name), 2, ref["prompt_ids"], 16, temperature=0.8, seed=5)
    assert [t.tolist() for t in ranks[0].tokens] == [t.tolist() for t in whole.tokens]


def test_a_stop_token_ends_its_prompt_only(shards):
    name = "llama_cache_dynamo"
    ref = fixture_arrays(name)
    stop = int(ref["tokens"][0, 6])
    first_stop = [list(ref["tokens"][row]).index(stop) if stop in ref["tokens"][row] else None for row in range(2)]
    results = _on_threads(shards(name), 2, ref["prompt_ids"], 20, stop_token=stop)
    got = results[1].tokens
    for row in range(2):
        end = 20 if first_stop[row] is None or first_stop[row] >= 20 else first_stop[row] + 1
        assert got[row].tolist() == ref["tokens"][row, :end].tolist()
    assert got[0][-1] == stop and len(got[0]) == first_stop[0] + 1


def test_cache_pairs_named_by_the_user(tmp_path):
    """An exporter with its own names: --cache-pair 'cache_in_*:cache_out_*' pairs them."""
    name = "gpt2_cache_dynamo"
    model = onnx.load(str(FIXTURES / f"{name}.onnx"))
    renames = {}
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name.startswith(("past_key_values.", "present.")):
            layer, kv = value.name.split(".")[1:]
            renames[value.name] = f"cache_{'in' if value.name.startswith('past') else 'out'}_{layer}_{kv}"
            value.name = renames[value.name]
    for node in model.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    onnx.save(model, str(tmp_path / "renamed.onnx"))
    with pytest.raises(ModelError, match="has no key/value cache inputs and outputs"):
        generate(tmp_path / "renamed.onnx", [1, 2, 3], 2)
    pairs = [("cache_in_*", "cache_out_*")]
    result = shard_model(tmp_path / "renamed.onnx", 2, tmp_path / "s", cache=pairs, progress=False)
    assert {c["past"]: c["present"] for c in result.manifest["cache"]}["cache_in_1_value"] == "cache_out_1_value"
    ref = fixture_arrays(name)
    whole = generate(tmp_path / "renamed.onnx", ref["prompt_ids"], 8, cache=pairs)
    assert whole.tokens[0].tolist() == ref["tokens"][0, :8].tolist()
    ranks = _on_threads(result, 2, ref["prompt_ids"], 8)
    assert ranks[0].tokens[1].tolist() == ref["tokens"][1, :8].tolist()
    with pytest.raises(ShardError, match="matches no input/output pair"):
        shard_model(tmp_path / "renamed.onnx", 2, tmp_path / "t", cache=[("kv_*", "kv_out_*")], progress=False)


def test_bad_requests_say_what_is_wrong():
    path = FIXTURES / "gpt2_cache_dynamo.onnx"
    with pytest.raises(ModelError, match="no key/value cache inputs and outputs .* use_cache=True"):
        generate(FIXTURES / "gpt2_dynamo.onnx", [1, 2, 3], 2)
    with pytest.raises(InputError, match="prompt 1 is empty"):
        generate(path, np.array([[1, 2], [-1, -1]]), 2)
    with pytest.raises(InputError, match="max_new_tokens must be a positive integer, got 0"):
        generate(path, [1, 2, 3], 0)
    with pytest.raises(InputError, match="temperature must be 0 .* got -1"):
        generate(path, [1, 2, 3], 2, temperature=-1)
    with pytest.raises(InputError, match=r"token id 512 is outside the vocabulary of .*gpt2_cache_dynamo.onnx "
                                         r"\(512 tokens: ids 0 to 511\)"):
        generate(path, [1, 512], 2)
    with pytest.raises(InputError, match=r"a prompt of 8 tokens and 122 new tokens need 129 positions; "
                                         r".*gpt2_cache_dynamo.onnx holds 128: ask for at most 121 new tokens"):
        generate(path, np.arange(8), 122)
    with pytest.raises(InputError, match="a prompt of 130 tokens is longer than the 128 positions"):
        generate(path, np.arange(130), 1)
    assert generate(path, np.arange(8), 121).steps == 121  # the last position is the table's last row


BAD_REQUESTS = [  # (input_ids, options, the error's text): each refused before any work, alike on ranks
    ([[3, -5, 4]], {}, "prompt 0: token id -5 is negative; ids start at 0 (-1 marks padding)"),  # not wrapped round
    (np.array([[3, -5, 4]]), {}, "prompt 0: token id -5 is negative"),  # not dropped as if it were padding
    (np.array(["a", "b"]), {}, "input_ids: token ids must be integers, got <U1"),
    ([[1.5, 2]], {}, "prompt 0: token ids must be integers, got float64"),
    ([], {}, "no prompt was given"),
    ([1, 2], {"temperature": float("nan")}, "temperature must be 0 (greedy) or a positive finite number, got nan"),
    ([1, 2], {"temperature": float("inf")}, "temperature must be 0 (greedy) or a positive finite number, got inf"),
    ([1, 2], {"temperature": 0.5, "seed": -1}, "seed must be an integer from 0 to 2**63 - 1, or None, got -1"),
    ([1, 2], {"stop_token": 99999}, "stop_token 99999 is outside the vocabulary of"),
    ([1, 2], {"stop_token": -1}, "stop_token must be a token id (an integer from 0), got -1"),
    ([[1, 2]], {"attention_mask": [[1, 1]]}, "attention_mask goes with a 2-D input_ids array"),
]


@pytest.mark.parametrize("input_ids, options, text", BAD_REQUESTS)
def test_bad_ids_and_options_are_refused_in_one_process(input_ids, options, text):
    with pytest.raises(InputError) as info:
        generate(FIXTURES / "gpt2_cache_dynamo.onnx", input_ids, 2, **options)
    assert text in str(info.value), str(info.value)


def test_a_failure_inside_onnx_runtime_is_a_model_error_naming_the_step(shards):
    """Past the checks (here: as if the position table had not been found), ONNX Runtime's own error comes
    out as a ModelError with the step it failed at, in one process and on every rank."""
    from orchestrator._decoder_tables import DecoderTables
    from orchestrator._generate import WholeModel

    whole = WholeModel(FIXTURES / "gpt2_cache_dynamo.onnx")
    whole.io.tables = DecoderTables(None, None)
    with pytest.raises(ModelError, match=r"generation step 122 \(positions up to 128\) failed: .*idx=128"):
        whole.generate(np.arange(8), 125)

    result = shards("gpt2_cache_dynamo")
    assert result.manifest["positions"] == 128

    def rank(comm):
        runner = StagedRunner(onnx.load(str(result.shard_paths[comm.rank])), comm)
        assert runner.max_positions == 128  # from the shard's metadata: refused up front on the rank too
        with pytest.raises(InputError, match="need 129 positions"):
            generate_on_rank(runner, np.arange(8), 122)
        runner.max_positions = None
        with pytest.raises(ModelError, match=r"stage 0 of \d+ failed: .*idx=128"):
            generate_on_rank(runner, np.arange(8), 125)
        return True

    assert ThreadGroup(2).run(rank) == [True, True]


def test_a_separate_prefill_graph_starts_the_cache(shards, tmp_path):
    """Older exporters write a prefill graph (no past inputs) beside the decode graph: its presents are cut by
    heads and kept, the decode graph takes them as its pasts."""
    ref = fixture_arrays("gpt2_cache_dynamo")
    prefill = FIXTURES / "gpt2_prefill_dynamo.onnx"
    whole = generate(FIXTURES / "gpt2_cache_dynamo.onnx", ref["prompt_ids"], STEPS, prefill=prefill,
                     return_logits=True)
    _assert_like_torch(whole, ref)
    cut = shard_model(prefill, 2, tmp_path / "prefill", progress=False)
    assert {(c["past"], c["axis"], c["heads_per_rank"]) for c in cut.manifest["cache"]} == {(None, 1, 2)}
    assert [c["tensor"] for c in cut.manifest["collectives"] if c["op"] == "AllGather"] == ["logits"]
    assert "4 presents without a past (a prefill graph" in cut.summary()
    decode = shards("gpt2_cache_dynamo")

    def ranks(prefill_result):
        def rank(comm):
            return generate_on_rank(StagedRunner(onnx.load(str(decode.shard_paths[comm.rank])), comm), ref["prompt_ids"],
                                    STEPS, return_logits=True,
                                    prefill_runner=StagedRunner(onnx.load(str(prefill_result.shard_paths[comm.rank])), comm))
        return ThreadGroup(2).run(rank)

    _assert_like_torch(ranks(cut)[0], ref)
    # The prefill graph is what runs the prompt: other weights there change the first token.
    model = onnx.load(str(prefill))
    head = next(t for t in model.graph.initializer if t.name == "model.lm_head.weight")
    head.raw_data = (onnx.numpy_helper.to_array(head) * -1).astype(np.float32).tobytes()
    onnx.save(model, str(tmp_path / "other.onnx"))
    other = generate(FIXTURES / "gpt2_cache_dynamo.onnx", ref["prompt_ids"], 2, prefill=tmp_path / "other.onnx")
    assert other.tokens[0][0] != ref["tokens"][0, 0]
    with pytest.raises(ModelError, match="gpt2_dynamo.onnx is not a prefill graph for this decoder: it does not give"):
        generate(FIXTURES / "gpt2_cache_dynamo.onnx", [1, 2], 2, prefill=FIXTURES / "gpt2_dynamo.onnx")
