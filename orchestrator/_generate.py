"""Generating tokens with a decoder exported with its key/value cache: prefill, then one token per step.

The same loop runs in three places: in one process on the whole model (``generate``), on every rank
of a sharded model (``generate_on_rank``: what ``ShardedModel.generate``'s ranks and a user's own rank
program run), and under the benchmark. Per step::

    feeds (ids, attention mask, positions, each past) -> model -> logits of the last position, presents
    next token = argmax (greedy) or argmax(logits / T + Gumbel noise) (sampling, seeded)
    next feeds: the token, the mask one column longer, positions + 1, each present as the next past

On ranks, everything but the model's own collectives stays on the rank: each rank builds the same
feeds from the same prompt, keeps its present keys/values (its own heads) as its next past, and
picks the next token from its piece of the vocabulary: its best value and index, then ONE allgather
of ``batch x 2`` numbers, after which every rank knows the token and no logits were gathered.
Sampling draws the Gumbel noise of the whole vocabulary from ``(seed, step)`` on every rank and adds
each rank's piece: the sharded model samples exactly the tokens the whole model samples.

Prompts of different lengths are left-padded, with an attention mask and positions that start at 0
at each prompt's first real token (the exported graph must take ``attention_mask`` and
``position_ids`` for that). A stop token ends a prompt's generation; the loop ends when every
prompt has stopped or ``max_new_tokens`` are made.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ranks._errors import InputError, ModelError, is_ort_error, ort_message

from ._decoder_tables import IDS_NAMES as _IDS, POSITIONS_NAMES as _POSITIONS, DecoderTables, decoder_tables
from ._shard_cache import cache_pairs

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
       "tensor(bfloat16)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}
_MASK = ("attention_mask",)
# Optimum's merged decoder picks its no-past branch (prefill) or its with-past branch (decode) by this input.
_BRANCH = ("use_cache_branch",)


@dataclass
class GenerateResult:
    """What a generation made: per prompt the new ids (the stop token included when it came)."""

    tokens: list[np.ndarray]
    logits: list[np.ndarray] | None = None  # per prompt [new tokens, vocab], when asked for
    steps: int = 0  # model runs: the prefill and each decode step
    seconds: float = 0.0  # the whole loop
    model_seconds: float = 0.0  # inside the model's runs (the ranks' own compute and their collectives)
    pick_seconds: float = 0.0  # choosing the tokens (on ranks: with the one small collective per step)
    timings: dict = field(default_factory=dict)

    def padded(self, fill: int = -1) -> np.ndarray:
        """[prompts, longest] int64: each prompt's new ids, ``fill`` after a prompt that stopped early."""
        width = max((len(t) for t in self.tokens), default=0)
        out = np.full((len(self.tokens), width), fill, dtype=np.int64)
        for row, t in enumerate(self.tokens):
            out[row, :len(t)] = t
        return out


PAD = -1  # a prompt id that marks padding (in a list of prompts or a 2-D array)


def prepare_prompts(input_ids, attention_mask=None) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, L] int64, mask [B, L] int64), left-padded.

    ``input_ids``: one prompt (1-D), a list of prompts of any lengths, or a 2-D array; -1 entries are
    padding (on either side), or an ``attention_mask`` (2-D, 0 = padding) says which are. Padding
    positions get id 0 and mask 0. Ids that are not integers, or negative ids other than the padding,
    are refused: an embedding lookup would wrap -5 round to the end of the vocabulary without a word.
    """
    if isinstance(input_ids, (list, tuple)) and not input_ids:
        raise InputError("no prompt was given")
    if isinstance(input_ids, (list, tuple)) and not np.isscalar(input_ids[0]):
        if attention_mask is not None:
            raise InputError("attention_mask goes with a 2-D input_ids array; a list of prompts of different "
                             "lengths needs none (or mark padding with -1)")
        rows = []
        for r, raw in enumerate(input_ids):
            row = np.asarray(raw).reshape(-1)
            _check_integers(row.dtype, f"prompt {r}")
            rows.append(row[row != PAD])
    else:
        array = np.asarray(input_ids)
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2:
            raise InputError(f"input_ids must be one prompt (1-D), a list of prompts or a 2-D array, got shape {array.shape}")
        if array.shape[0] == 0:
            raise InputError("no prompt was given")
        _check_integers(array.dtype, "input_ids")  # before any comparison: a str array has none
        if attention_mask is not None:
            mask = np.asarray(attention_mask)
            if mask.shape != array.shape:
                raise InputError(f"attention_mask has shape {mask.shape}, input_ids {array.shape}; they must match")
            keep = mask != 0
        else:
            keep = array != PAD
        rows = [array[r][keep[r]] for r in range(array.shape[0])]
    for r, row in enumerate(rows):
        if row.size == 0:
            raise InputError(f"prompt {r} is empty (every entry is padding); each prompt needs at least one token")
        if (row < 0).any():
            raise InputError(f"prompt {r}: token id {int(row[row < 0][0])} is negative; ids start at 0 "
                             f"(-1 marks padding{' where attention_mask is not 0' if attention_mask is not None else ''})")
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = row
        mask[r, width - len(row):] = 1
    return ids, mask


def _check_integers(dtype: np.dtype, what: str) -> None:
    if not np.issubdtype(dtype, np.integer):
        raise InputError(f"{what}: token ids must be integers, got {dtype}")


def check_options(max_new_tokens, temperature, seed, stop_token, tables: DecoderTables, label: str) -> None:
    """Refuse bad generation options before any work, alike in one process and on ranks."""
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.integer, np.floating)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature must be 0 (greedy) or a positive finite number, got {temperature!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63):
        raise InputError(f"seed must be an integer from 0 to 2**63 - 1, or None, got {seed!r}")
    if stop_token is not None:
        if isinstance(stop_token, bool) or not isinstance(stop_token, (int, np.integer)) or stop_token < 0:
            raise InputError(f"stop_token must be a token id (an integer from 0), got {stop_token!r}")
        if tables.vocabulary is not None and stop_token >= tables.vocabulary:
            raise InputError(f"stop_token {stop_token} is outside the vocabulary of {label} ({tables.vocabulary} "
                             f"tokens: ids 0 to {tables.vocabulary - 1}), so no step could pick it")


class DecoderIO:
    """Which graph input is what: token ids, attention mask, positions, each past and its present, the logits."""

    def __init__(self, inputs: list, outputs: list, *, cache: list[tuple[str, str]] | None = None,
                 pairs: dict[str, str] | None = None, label: str = "the model"):
        names = [a.name for a in inputs]
        out_names = [a.name for a in outputs]
        self.pairs = pairs if pairs is not None else cache_pairs(names, out_names, cache)
        if not self.pairs:
            raise ModelError(
                f"{label} has no key/value cache inputs and outputs (past_key_values.N.key -> present.N.key, "
                f"past_N_key -> present_N_key, ...): export it with use_cache=True, or name its pairs "
                f"(--cache-pair PAST:PRESENT); its inputs are {names}, its outputs {out_names}")
        by_name = {a.name: a for a in inputs}
        self.ids = _find(names, _IDS) or next((n for n in names if n not in self.pairs and "mask" not in n
                                               and "position" not in n), None)
        self.mask = _find(names, _MASK)
        self.positions = _find(names, _POSITIONS)
        self.branch = _find(names, _BRANCH)
        others = [n for n in names if n not in self.pairs and n not in (self.ids, self.mask, self.positions, self.branch)]
        if self.ids is None or others:
            raise ModelError(f"{label}: cannot tell how to feed input(s) {others or names}; a decoder step takes "
                             f"input_ids, attention_mask, position_ids and the past keys/values")
        self.logits = "logits" if "logits" in out_names else next(
            (n for n in out_names if n not in self.pairs.values()), None)
        if self.logits is None:
            raise ModelError(f"{label} has no logits output; its outputs are {out_names}")
        self.past_shapes = {}
        for past in self.pairs:
            shape = by_name[past].shape
            if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in (shape[1], shape[3])):
                raise ModelError(f"{label}: cache input {past} has shape {shape}; expected [batch, heads, past, head_dim] "
                                 f"with heads and head_dim fixed")
            self.past_shapes[past] = (shape[1], shape[3], _NP.get(by_name[past].type, np.float32))
        self.output_names = [self.logits] + list(self.pairs.values())
        # ids, mask and positions in the integer type the graph declares (int64 unless it says int32)
        self.int_types = {n: _NP.get(by_name[n].type, np.int64) for n in (self.ids, self.mask, self.positions) if n}
        self.prefill_inputs: set[str] = set()
        self.label = label
        self.max_positions: int | None = None  # the rows of a learned position table (``_decoder_positions``)

    def check_prefill(self, inputs: list, outputs: list, label: str) -> None:
        """A separate prefill graph: the same ids/mask/positions inputs without the pasts, the same presents out."""
        names, out_names = [a.name for a in inputs], {a.name for a in outputs}
        unknown = [n for n in names if n not in (self.ids, self.mask, self.positions)]
        missing = [n for n in self.output_names if n not in out_names]
        if unknown or missing or self.ids not in names:
            raise ModelError(f"{label} is not a prefill graph for this decoder: "
                             + (f"it takes {unknown}, which the decode step does not; " if unknown else "")
                             + (f"it does not give {missing}; " if missing else "")
                             + f"expected inputs among {[n for n in (self.ids, self.mask, self.positions) if n]} "
                               f"and outputs {self.output_names}")
        self.prefill_inputs = set(names)

    def feeds(self, ids, mask, positions, cache) -> dict:
        feeds = {self.ids: ids.astype(self.int_types[self.ids], copy=False), **cache}
        if self.mask is not None:
            feeds[self.mask] = mask.astype(self.int_types[self.mask], copy=False)
        if self.positions is not None:
            feeds[self.positions] = positions.astype(self.int_types[self.positions], copy=False)
        if self.branch is not None:
            # As Optimum's ORTModelForCausalLM feeds a merged decoder: the no-past branch while the pasts are
            # empty (length 0, read by neither branch then), the with-past branch after.
            feeds[self.branch] = np.array([any(np.shape(v)[2] > 0 for v in cache.values())])
        return feeds

    def check_request(self, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int) -> None:
        """What this decoder cannot generate for (``prepare_prompts``' ids and mask), refused before any work."""
        if (mask == 0).any() and (self.mask is None or self.positions is None):
            raise InputError(f"prompts of different lengths need a model that takes an attention mask and position "
                             f"ids (left padding); {self.label} takes "
                             f"{[n for n in (self.ids, self.mask, self.positions) if n]}")
        check_prompts(ids, mask, max_new_tokens, self.tables, self.label)

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        return {past: np.zeros((batch, heads, 0, dim), dtype) for past, (heads, dim, dtype) in self.past_shapes.items()}


def check_prompts(ids: np.ndarray, mask: np.ndarray, max_new_tokens: int, tables: DecoderTables, label: str) -> None:
    """Refuse, before any work, token ids past the vocabulary or a generation that would run past the
    positions the decoder's table holds (``tables``: the sizes ``_decoder_tables`` found, None: no limit)."""
    if tables.vocabulary is not None and ids.size and int(np.where(mask > 0, ids, 0).max()) >= tables.vocabulary:
        raise InputError(f"token id {int(np.where(mask > 0, ids, 0).max())} is outside the vocabulary of {label} "
                         f"({tables.vocabulary} tokens: ids 0 to {tables.vocabulary - 1})")
    limit = tables.positions
    if limit is None:
        return
    longest = int(mask.sum(axis=1).max())
    needed = longest + int(max_new_tokens) - 1  # the last new token is picked, never fed back
    if longest > limit:
        raise InputError(f"a prompt of {longest} tokens is longer than the {limit} positions {label} holds")
    if needed > limit:
        raise InputError(f"a prompt of {longest} tokens and {max_new_tokens} new tokens need {needed} positions; "
                         f"{label} holds {limit}: ask for at most {limit - longest + 1} new tokens")


def _find(names: list[str], wanted: tuple[str, ...]) -> str | None:
    for w in wanted:
        if w in names:
            return w
    return None


class _Picker:
    """Chooses each next token from this process's piece of the vocabulary; ``comm`` joins the pieces."""

    def __init__(self, comm, vocab_piece: int, split: bool, temperature: float, seed: int | None):
        self.comm = comm if split and comm is not None and comm.size > 1 else None
        self.offset = comm.rank * vocab_piece if self.comm is not None else 0
        self.vocab = vocab_piece * (comm.size if self.comm is not None else 1)
        self.piece = vocab_piece
        self.temperature = temperature
        self.seed = seed

    def pick(self, last: np.ndarray, step: int) -> np.ndarray:
        if self.temperature:
            # Gumbel-max: argmax(logits / T + Gumbel noise) samples softmax(logits / T). The noise of the whole
            # vocabulary comes from (seed, step), so every rank (and the whole model) adds the same numbers.
            noise = np.random.default_rng([self.seed, step]).gumbel(size=(last.shape[0], self.vocab))
            scores = last.astype(np.float64) / self.temperature + noise[:, self.offset:self.offset + self.piece]
        else:
            scores = last
        index = np.argmax(scores, axis=-1)
        if self.comm is None:
            return index.astype(np.int64)
        rows = np.arange(last.shape[0])
        mine = np.stack([scores[rows, index].astype(np.float64), (index + self.offset).astype(np.float64)], axis=-1)
        every = self.comm.allgather(mine[None], axis=0)  # [ranks, batch, 2]: each rank's best value and index
        # The first rank with the largest value: the lowest index among equal values, as argmax over the whole.
        best = np.argmax(every[:, :, 0], axis=0)
        return every[best, rows, 1].astype(np.int64)


def decode(run, io: DecoderIO, input_ids, max_new_tokens: int, *, attention_mask=None, stop_token: int | None = None,
           temperature: float = 0.0, seed: int | None = None, return_logits: bool = False, comm=None,
           logits_split: bool = False, gather_logits=None, prefill=None) -> GenerateResult:
    """The generation loop. ``run(feeds) -> [logits, *presents]`` in ``io.output_names`` order, the logits this
    process's piece along the vocabulary when ``logits_split`` (then ``comm`` joins the pieces, and
    ``gather_logits(piece) -> whole`` when ``return_logits``). ``prefill``: the same for a separate prefill
    graph (no pasts in, checked by ``io.check_prefill``), run for the prompt instead of ``run``."""
    check_options(max_new_tokens, temperature, seed, stop_token, io.tables, io.label)
    if temperature and seed is None:
        seed = int.from_bytes(os.urandom(4), "little")  # (on ranks the caller sends one seed to all)
    ids, mask = prepare_prompts(input_ids, attention_mask)
    batch = ids.shape[0]
    io.check_request(ids, mask, max_new_tokens)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    cache = io.empty_cache(batch)
    done = np.zeros(batch, dtype=bool)
    tokens: list[np.ndarray] = []
    logits: list[np.ndarray] = []
    lengths = np.full(batch, max_new_tokens)
    picker = None
    started = time.perf_counter()
    model_seconds = pick_seconds = 0.0
    step_ids = ids
    for step in range(max_new_tokens):
        t0 = time.perf_counter()
        try:
            if step == 0 and prefill is not None:
                feeds = io.feeds(step_ids, mask, positions, {})
                outputs = prefill({k: v for k, v in feeds.items() if k in io.prefill_inputs})
            else:
                outputs = run(io.feeds(step_ids, mask, positions, cache))
        except Exception as exc:
            if not is_ort_error(exc):
                raise
            # ONNX Runtime's own types: said as ours, with the step it failed at
            raise ModelError(f"{io.label}: generation step {step + 1} (positions up to {int(positions.max())}) "
                             f"failed: {ort_message(exc)}") from None
        t1 = time.perf_counter()
        last = outputs[0][:, -1, :]
        if picker is None:
            picker = _Picker(comm, last.shape[-1], logits_split, temperature, seed)
        token = picker.pick(last, step)
        if return_logits:
            logits.append(gather_logits(last) if logits_split and gather_logits is not None else np.array(last))
        pick_seconds += time.perf_counter() - t1
        model_seconds += t1 - t0
        if stop_token is not None:
            token = np.where(done, stop_token, token)
            lengths = np.where(~done & (token == stop_token), step + 1, lengths)
            done |= token == stop_token
        tokens.append(token)
        if done.all() or step + 1 == max_new_tokens:
            break
        cache = dict(zip(io.pairs, outputs[1:]))  # each present is the next past: no copy, no communication
        step_ids = token[:, None]
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        positions = positions[:, -1:] + 1
    made = np.stack(tokens, axis=1)
    result = GenerateResult(tokens=[made[r, :min(lengths[r], made.shape[1])] for r in range(batch)], steps=len(tokens),
                            seconds=time.perf_counter() - started, model_seconds=model_seconds,
                            pick_seconds=pick_seconds)
    if return_logits:
        stacked = np.stack(logits, axis=1)
        result.logits = [stacked[r, :len(result.tokens[r])] for r in range(batch)]
    return result


# -- the whole model in this process -------------------------------------------------------

class WholeModel:
    """A decoder in one ONNX Runtime session, its cache carried by this Python loop (the baseline)."""

    def __init__(self, model_path, *, threads: int | None = None, cache: list[tuple[str, str]] | None = None,
                 prefill=None):
        from ranks._staged_runner import default_session_factory

        make_session = default_session_factory(threads=threads)
        self.path = str(model_path)
        self.session = make_session(self.path)
        self.io = DecoderIO(self.session.get_inputs(), self.session.get_outputs(), cache=cache, label=self.path)
        self.io.tables = decoder_tables(onnx.load(self.path, load_external_data=False))
        self.prefill = None
        if prefill is not None:
            self.prefill = make_session(str(prefill))
            self.io.check_prefill(self.prefill.get_inputs(), self.prefill.get_outputs(), str(prefill))

    def generate(self, input_ids, max_new_tokens: int, **options) -> GenerateResult:
        names = self.io.output_names
        prefill = None if self.prefill is None else (lambda feeds: self.prefill.run(names, feeds))
        return decode(lambda feeds: self.session.run(names, feeds), self.io, input_ids, max_new_tokens,
                      prefill=prefill, **options)


def generate(model_path, input_ids, max_new_tokens: int, *, threads: int | None = None,
             cache: list[tuple[str, str]] | None = None, prefill=None, **options) -> GenerateResult:
    """Generate with a whole (unsliced) decoder in this process; ``prefill``: a separate prefill graph (no past
    inputs) for the prompt; options as ``decode``."""
    return WholeModel(model_path, threads=threads, cache=cache, prefill=prefill).generate(input_ids, max_new_tokens,
                                                                                         **options)


def check_decoder_file(model_path, input_ids, max_new_tokens: int, *, attention_mask=None,
                       cache: list[tuple[str, str]] | None = None) -> None:
    """What ``decode`` would refuse, checked from the file's graph alone (no session, no weights): a decoder
    with its cache, prompts within its vocabulary and positions. Run before slicing and starting ranks, so
    that a mistake is said at once and names the user's file."""
    io = decoder_io_of_file(model_path, cache=cache, tables=True)
    io.check_request(*prepare_prompts(input_ids, attention_mask), max_new_tokens)


def decoder_io_of_file(model_path, *, cache: list[tuple[str, str]] | None = None, pairs: dict[str, str] | None = None,
                       tables: bool = False) -> DecoderIO:
    """The DecoderIO of a file's graph, read without its weights: ModelError when it is no decoder with its cache.
    ``tables``: also find its vocabulary and positions (``decoder_tables``)."""
    from ranks._model import load_onnx_header

    proto = load_onnx_header(Path(model_path))
    initializers = {t.name for t in proto.graph.initializer}
    io = DecoderIO([_Arg(v) for v in proto.graph.input if v.name not in initializers],
                   [_Arg(v) for v in proto.graph.output], cache=cache, pairs=pairs, label=str(model_path))
    if tables:
        io.tables = decoder_tables(proto)
    return io


class _Arg:
    """A graph input or output as ONNX Runtime describes it (name, shape, ``tensor(float)`` type)."""

    def __init__(self, value: onnx.ValueInfoProto):
        tensor = value.type.tensor_type
        self.name = value.name
        self.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
        # ONNX Runtime's names are ONNX's own in lower case: FLOAT -> tensor(float), INT64 -> tensor(int64)
        self.type = f"tensor({onnx.TensorProto.DataType.Name(tensor.elem_type).lower()})"


# -- one rank of a sharded model -------------------------------------------------------------

def rank_decoder_io(runner) -> DecoderIO:
    """The DecoderIO of a shard (a ``StagedRunner``): its cache pairs as the slicer recorded them."""
    pairs = {c["past"]: c["present"] for c in runner.cache} or None
    io = DecoderIO(runner.get_inputs(), runner.get_outputs(), pairs=pairs, label=str(runner.path or "the shard"))
    io.tables = DecoderTables(None, runner.max_positions)  # the master checked the ids against the vocabulary
    return io


def generate_on_rank(runner, input_ids, max_new_tokens: int, *, prefill_runner=None, **options) -> GenerateResult:
    """Every rank of a sharded decoder calls this with the same prompt and options (and, to sample, the same
    seed); each keeps its own heads' cache, and every rank returns the same tokens.

    ``runner``: this rank's ``StagedRunner`` (its communicator joins the ranks' vocabulary pieces).
    ``prefill_runner``: this rank's shard of a separate prefill graph (no past inputs), sliced alike.
    """
    io = rank_decoder_io(runner)
    prefill = None
    if prefill_runner is not None:
        io.check_prefill(prefill_runner.get_inputs(), prefill_runner.get_outputs(), str(prefill_runner.path))
        _check_prefill_cut(runner, prefill_runner)
        pieces = {io.logits} if io.logits in prefill_runner.gathered_outputs else set()
        prefill = lambda feeds: prefill_runner.run_local(io.output_names, feeds, local=pieces)  # noqa: E731
    comm = runner.comm
    split = io.logits in runner.gathered_outputs
    if split and runner.gathered_outputs[io.logits] not in (-1, 2):
        raise ModelError(f"the logits of {runner.path} are gathered along axis {runner.gathered_outputs[io.logits]}, "
                         f"not the vocabulary")
    local = {io.logits} if split else set()
    names = io.output_names
    if options.get("temperature") and options.get("seed") is None:
        raise InputError("sampling on ranks needs a seed that every rank is given (the same tokens on every rank)")
    if prefill is not None and (io.logits in prefill_runner.gathered_outputs) != split:
        raise ModelError(f"{prefill_runner.path} and {runner.path} do not split their logits alike")
    return decode(lambda feeds: runner.run_local(names, feeds, local=local), io, input_ids, max_new_tokens,
                  comm=comm, logits_split=split, gather_logits=lambda piece: comm.allgather(piece, axis=-1),
                  prefill=prefill, **options)


def _check_prefill_cut(runner, prefill_runner) -> None:
    """The prefill graph's presents must come out cut as the decode graph's pasts go in."""
    decode_cut = {c["present"]: (c["axis"], c["heads_per_rank"]) for c in runner.cache}
    prefill_cut = {c["present"]: (c["axis"], c["heads_per_rank"]) for c in prefill_runner.cache}
    for present, cut in decode_cut.items():
        if prefill_cut.get(present, (None, None)) != cut:
            raise ModelError(
                f"the prefill shard {prefill_runner.path} gives {present} "
                f"{'whole' if prefill_cut.get(present, (None,))[0] is None else 'cut otherwise'}, but the decode shard "
                f"{runner.path} takes its cache {'whole' if cut[0] is None else f'cut by heads ({cut[1]} per rank)'}")
