"""Generating tokens with decoders exported with their key/value cache, in one process.

The fixtures ``tests/fixtures/{gpt2,llama}_cache_dynamo.*`` (``make_exports.py``) hold the decoders and
torch's greedy tokens and logits for two prompts (8 and 5 tokens) over 40 steps, each prompt run alone;
``gpt2_prefill_dynamo.onnx`` the same GPT-2 as a separate prefill graph.
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
from orchestrator._shard_check import SimulatedRanks
from ranks import InputError, StagedRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shard_helpers import ThreadGroup  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures"
DECODERS = ["gpt2_cache_dynamo", "llama_cache_dynamo"]
# gpt2_prefill_dynamo.onnx: the same GPT-2 as a separate prefill graph (no past inputs)
STEPS = 40
TOLERANCE = 1e-4


def _reference(name: str) -> dict:
    with np.load(FIXTURES / f"{name}.npz") as saved:
        return {k: saved[k] for k in saved.files}


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


@pytest.mark.parametrize("name", DECODERS)
def test_whole_model_greedy_equals_torch(name):
    ref = _reference(name)
    got = generate(FIXTURES / f"{name}.onnx", ref["prompt_ids"], STEPS, return_logits=True)
    assert got.steps == STEPS
    _assert_like_torch(got, ref)
    # The batch is left-padded (prompts of 8 and 5 tokens); each prompt alone gives the same tokens.
    alone = generate(FIXTURES / f"{name}.onnx", ref["prompt_ids"][1][ref["prompt_ids"][1] >= 0], 8)
    assert alone.tokens[0].tolist() == ref["tokens"][1, :8].tolist()


@pytest.mark.parametrize("name", DECODERS)
def test_two_ranks_greedy_equals_torch(name, shards):
    ref = _reference(name)
    results = _on_threads(shards(name), 2, ref["prompt_ids"], STEPS, return_logits=True)
    for got in results:  # every rank knows every token
        _assert_like_torch(got, ref)


def test_key_value_heads_that_tp_does_not_divide_keep_the_cache_whole(shards):
    """Llama at TP=4: 2 key/value heads for 4 ranks; the cache stays whole on every rank, the tokens are right."""
    name = "llama_cache_dynamo"
    result = shards(name, 4)
    assert {c["axis"] for c in result.manifest["cache"]} == {None}
    ref = _reference(name)
    results = _on_threads(result, 4, ref["prompt_ids"], 12, return_logits=True)
    _assert_like_torch(results[0], ref, steps=12)


def test_sampling_with_a_seed_is_the_whole_models_and_repeats(shards):
    name = "gpt2_cache_dynamo"
    ref = _reference(name)
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
    ref = _reference(name)
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
    ref = _reference(name)
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


def test_a_separate_prefill_graph_starts_the_cache(shards, tmp_path):
    """Older exporters write a prefill graph (no past inputs) beside the decode graph: its presents are cut by
    heads and kept, the decode graph takes them as its pasts."""
    ref = _reference("gpt2_cache_dynamo")
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
