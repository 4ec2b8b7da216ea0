"""Checking shards against the whole model in ONE process: a simulation of N ranks.

Each shard is cut into stages as a rank would run it (``ranks._staged_runner``);
the stages of all N shards run in lock step and each collective is done
locally (sum for AllReduce, concatenation for AllGather), so no second
process, socket or MPI is involved.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ranks._errors import ShardError
from ranks._shard_files import resolve_shard_path
from ranks._shard_manifest import manifest_path_for, read_manifest
from ranks._shard_manifest import shard_metadata
from ranks._staged_runner import META_CACHE, Arg, StagedProgram, default_session_factory

from ._progress import progress_bar

_NP_OF_TYPE = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def random_inputs(inputs: list, *, dynamic: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds for session-style input descriptions; symbolic or unknown dims become ``dynamic``."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for arg in inputs:
        shape = [d if isinstance(d, int) and d > 0 else dynamic for d in (arg.shape or [])]
        dtype = _NP_OF_TYPE.get(arg.type)
        if dtype is None:
            raise ShardError(f"cannot make a random input of type {arg.type} for {arg.name}")
        if np.issubdtype(dtype, np.floating):
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[arg.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[arg.name] = rng.integers(0, 4, shape).astype(dtype)
    return feeds


def shard_files(shard_path: str | os.PathLike) -> list[Path]:
    """All shard files of ``DIR/MODEL.onnx`` (or of the only manifest in a directory), in rank order."""
    path = Path(shard_path)
    if path.is_dir():
        manifests = sorted(path.glob("*.manifest.json"))
        if len(manifests) != 1:
            raise ShardError(f"{path} holds {len(manifests)} shard manifests; name the model, e.g. {path}/MODEL.onnx")
        path = path / manifests[0].name.replace(".manifest.json", ".onnx")
    manifest = read_manifest(manifest_path_for(path))
    size = manifest["world_size"]
    return [resolve_shard_path(path, rank, size) for rank in range(size)]


class SimulatedRanks:
    """N shards run in one process; ``run(feeds)`` returns what every rank would output."""

    def __init__(self, shard_paths: list[str | os.PathLike], make_session=None, *, progress=None):
        make_session = make_session or default_session_factory()
        self.programs = []
        self.cache: list[dict] = []  # a decoder's cache cut by heads: whole in and out, as the source model's
        for p in shard_paths:
            proto = onnx.load(str(p))
            self.cache = [c for c in json.loads(shard_metadata(proto).get(META_CACHE, "[]")) if c["axis"] is not None]
            self.programs.append(StagedProgram(proto, make_session, label=str(p)))
            del proto
            if progress is not None:
                progress.update(1)
        first = self.programs[0]
        for p in self.programs[1:]:
            if _collective_layout(p) != _collective_layout(first):
                raise ShardError(f"{p.label} and {first.label} do not have the same collectives: not sibling shards")

    def get_inputs(self) -> list[Arg]:
        return self.programs[0].inputs

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        envs = [dict(feeds) for _ in self.programs]
        for c in self.cache:
            if c["past"] in feeds:
                pieces = np.split(np.asarray(feeds[c["past"]]), len(self.programs), axis=c["axis"])
                for env, piece in zip(envs, pieces):
                    env[c["past"]] = piece
        programs = [p.select(feeds) for p in self.programs]  # (a merged decoder: the branch the feeds pick)
        for k in range(len(programs[0].stages)):
            for program, env in zip(programs, envs):
                program.run_stage(k, env)
            for j, c in enumerate(programs[0].stages[k].collectives):
                parts = [env[p.stages[k].collectives[j].input] for p, env in zip(programs, envs)]
                if c.op == "AllReduce":
                    value = parts[0].copy()
                    for part in parts[1:]:
                        value += part
                else:
                    value = np.concatenate(parts, axis=c.axis)
                for p, env in zip(programs, envs):
                    env[p.stages[k].collectives[j].output] = value
        presents = {c["present"]: c["axis"] for c in self.cache}
        return {a.name: np.concatenate([env[a.name] for env in envs], axis=presents[a.name]) if a.name in presents
                else envs[0][a.name] for a in self.programs[0].outputs}


_BRANCH = "use_cache_branch"  # the input by which Optimum's merged decoder picks its with-past branch


def _collective_layout(program) -> list:
    """The collectives of each stage (of each branch, for a merged decoder): alike in sibling shards."""
    return [[(c.op, c.axis) for c in s.collectives] for s in program.stages] + [
        (which, _collective_layout(b)) for which, b in sorted(program.branches.items())]


def _consistent_cache(feeds: dict, session) -> dict:
    """A decoder step with its cache: a past of 2 positions, the attention mask over past + sequence (ones),
    positions after the past; random sizes that disagree would fail in the whole model itself."""
    from ._shard_cache import cache_pairs

    pairs = cache_pairs(list(feeds), [o.name for o in session.get_outputs()])
    if not pairs:
        return feeds
    if _BRANCH in feeds:
        feeds[_BRANCH] = np.array([True])  # a merged decoder's with-past branch (check_shards runs the other too)
    past = 2
    for name in pairs:
        value = feeds[name]
        if value.ndim == 4:
            feeds[name] = np.concatenate([value[:, :, :1]] * past, axis=2)
    ids = feeds.get("input_ids")
    if ids is not None and ids.ndim == 2:
        if "attention_mask" in feeds:
            feeds["attention_mask"] = np.ones((ids.shape[0], past + ids.shape[1]), feeds["attention_mask"].dtype)
        if "position_ids" in feeds:
            feeds["position_ids"] = np.broadcast_to(np.arange(past, past + ids.shape[1]), ids.shape).astype(
                feeds["position_ids"].dtype)
    return feeds


@dataclass
class CheckResult:
    max_abs_diff: float
    per_output: dict[str, float]
    feeds: dict[str, np.ndarray]

    def ok(self, tolerance: float) -> bool:
        return self.max_abs_diff <= tolerance


def check_shards(model_path: str | os.PathLike, shard_path: str | os.PathLike, *, seed: int = 0,
                 dynamic: int = 3, make_session=None, progress: bool | None = None) -> CheckResult:
    """Run the whole model and its simulated shards on the same random inputs; report the largest difference.

    ``progress``: a bar on stderr (loading the model, each shard, the two runs); None shows it
    only when stderr is a terminal.
    """
    make_session = make_session or default_session_factory()
    files = shard_files(shard_path)
    with progress_bar(len(files) + 3, f"check {Path(model_path).name} tp={len(files)}", enabled=progress) as bar:
        whole = make_session(str(model_path))
        bar.update(1)
        ranks = SimulatedRanks(files, make_session, progress=bar)
        feeds = _consistent_cache(random_inputs(whole.get_inputs(), dynamic=dynamic, seed=seed), whole)
        runs = [(feeds, dict(zip([o.name for o in whole.get_outputs()], whole.run(None, feeds))))]
        if _BRANCH in feeds:
            # Optimum's merged decoder: the no-past branch too (its attention mask covers the new tokens only).
            no_past = dict(feeds, **{_BRANCH: np.array([False])})
            if "attention_mask" in feeds and "input_ids" in feeds:
                no_past["attention_mask"] = np.ones(feeds["input_ids"].shape, feeds["attention_mask"].dtype)
            runs.append((no_past, dict(zip([o.name for o in whole.get_outputs()], whole.run(None, no_past)))))
        bar.update(1)
        per_output: dict[str, float] = {}
        for run_feeds, expected in runs:
            got = ranks.run(run_feeds)
            for name, value in expected.items():
                if got[name].shape != value.shape:
                    raise ShardError(f"output {name}: shards give shape {got[name].shape}, the whole model {value.shape}")
                diff = float(np.max(np.abs(got[name].astype(np.float64) - value))) if value.size else 0.0
                per_output[name] = max(per_output.get(name, 0.0), diff)
        bar.update(1)
    return CheckResult(max(per_output.values(), default=0.0), per_output, feeds)
