"""A decoder's key/value cache in the slicer: which graph inputs and outputs are a layer's past and present.

An exporter that writes a decoder step with its cache (``use_cache=True``) gives it one input per
layer and per key/value (``past``: [batch, kv_heads, past_length, head_dim]) and the matching output
(``present``: the past with this step's keys/values appended). A generation loop feeds each present
back as the next step's past. Under tensor parallel each rank's attention runs on its own heads, so
its cache holds its own heads only: the past is cut by heads like the attention it feeds, the present
comes out cut the same way and is NOT gathered; each rank keeps its piece as its next past.

Pairs are found by the names exporters write (``past_key_values.N.key`` -> ``present.N.key``,
``past_N_key`` -> ``present_N_key``, Optimum's ``past_key_values.N.decoder.key`` ->
``present.N.decoder.key``); ``cache_pairs`` takes explicit pairs otherwise, with ``*`` standing for
the varying part (``"cache_in_*:cache_out_*"``). A separate prefill graph has presents and no pasts
(``lone_presents``): they are cut by heads and kept the same way, so the decode graph's shards take
them as their pasts.
"""

from __future__ import annotations

import json
import re

from ranks._errors import ShardError

# Rewrites that turn a past input's name into its present output's name, tried in order.
_RULES = (
    (re.compile(r"^past_key_values(?=[._])"), "present"),
    (re.compile(r"^past_key_values$"), "present"),
    (re.compile(r"^past(?=[._])"), "present"),
    (re.compile(r"^past"), "present"),
)


def parse_pairs(specs: list[str] | None) -> list[tuple[str, str]]:
    """``["PAST:PRESENT", ...]`` (``*`` allowed on both sides, matching the same text) -> [(past, present)]."""
    pairs = []
    for spec in specs or []:
        past, sep, present = spec.partition(":")
        if not sep or not past or not present or past.count("*") != present.count("*") or past.count("*") > 1:
            raise ShardError(f"cache pair {spec!r}: expected PAST:PRESENT, e.g. past_key_values.0.key:present.0.key "
                             f"or with one * on each side, e.g. 'cache_in_*:cache_out_*'")
        pairs.append((past, present))
    return pairs


def cache_pairs(inputs: list[str], outputs: list[str], explicit: list[tuple[str, str]] | None = None) -> dict[str, str]:
    """{past input: present output} among a graph's inputs and outputs.

    ``explicit`` pairs replace the name rules; a pair naming a missing input or output is an error
    (a pair whose present alone is there names a prefill graph's present: see ``lone_presents``).
    """
    found: dict[str, str] = {}
    output_set = set(outputs)
    if explicit:
        for past, present in explicit:
            if "*" not in past:
                if past not in inputs and present in output_set:
                    continue  # a prefill graph: its present starts the cache
                if past not in inputs or present not in output_set:
                    missing = past if past not in inputs else present
                    raise ShardError(f"cache pair {past}:{present}: the graph has no {'input' if missing == past else 'output'} "
                                     f"{missing!r}; its inputs are {inputs}, its outputs {outputs}")
                found[past] = present
                continue
            head, tail = past.split("*")
            matched = 0
            for name in inputs:
                if name.startswith(head) and name.endswith(tail) and len(name) >= len(head) + len(tail):
                    middle = name[len(head): len(name) - len(tail)]
                    target = present.replace("*", middle)
                    if target in output_set:
                        found[name] = target
                        matched += 1
            if not matched and not any(o.startswith(present.split("*")[0]) and o.endswith(present.split("*")[1])
                                       for o in outputs):
                raise ShardError(f"cache pair {past}:{present} matches no input/output pair of the graph; "
                                 f"its inputs are {inputs}, its outputs {outputs}")
        return found
    for name in inputs:
        for pattern, replacement in _RULES:
            if pattern.search(name):
                target = pattern.sub(replacement, name, count=1)
                if target in output_set:
                    found[name] = target
                    break
    return found


def lone_presents(inputs: list[str], outputs: list[str], pairs: dict[str, str],
                  explicit: list[tuple[str, str]] | None = None) -> list[str]:
    """Present outputs without a past input: a separate prefill graph's (it starts the cache, it reads none)."""
    paired = set(pairs.values())
    if explicit:
        found = []
        for _past, present in explicit:
            head, _, tail = present.partition("*")
            for name in outputs:
                if name not in paired and name not in found and (
                        name == present if "*" not in present else
                        name.startswith(head) and name.endswith(tail) and len(name) >= len(head) + len(tail)):
                    found.append(name)
        return found
    return [name for name in outputs if name not in paired and re.match(r"^present(?=[._]|$)", name)]


def cache_metadata(entries: list[dict]) -> str:
    return json.dumps(entries, separators=(",", ":"))
