"""A small shared benchmark runner: warm-up, repeats, median, a printed table.

Machines here are shared and noisy, so every benchmark measures our path and
its baseline in the same run, interleaved round by round, and reports the
ratio of medians rather than absolute times.

    bench = Bench("predict overhead")
    bench.compare("mlp b=1", ours=lambda: model.predict(x), baseline=lambda: sess.run(None, feeds), target=("<=", 1.05))
    bench.report()
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable


def measure(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 20, min_time: float = 0.0) -> list[float]:
    """Seconds taken by each of ``repeats`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 3, repeats: int = 20) -> dict[str, list[float]]:
    """Time several functions round-robin, so a noisy neighbour hurts them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def format_seconds(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


@dataclass
class Row:
    case: str
    ours: float
    baseline: float
    ratio: float
    kind: str = "ours/baseline"  # which way ``ratio`` goes: ours/baseline (times: below 1 is better) or baseline/ours
    target: str = ""
    met: bool | None = None
    note: str = ""


@dataclass
class Bench:
    title: str
    rows: list[Row] = field(default_factory=list)

    def compare(
        self,
        case: str,
        ours: Callable[[], object],
        baseline: Callable[[], object],
        *,
        warmup: int = 3,
        repeats: int = 20,
        target: tuple[str, float] | None = None,
        ratio: str = "ours/baseline",
        note: str = "",
    ) -> Row:
        """Time both interleaved; ratio is ours/baseline (time) unless ``ratio='baseline/ours'`` (speed-up)."""
        times = interleaved({"ours": ours, "baseline": baseline}, warmup=warmup, repeats=repeats)
        return self.add(case, median(times["ours"]), median(times["baseline"]), target=target, ratio=ratio, note=note)

    def add(self, case: str, ours: float, baseline: float, *, target=None, ratio: str = "ours/baseline", note: str = "") -> Row:
        value = ours / baseline if ratio == "ours/baseline" else baseline / ours
        met = None
        target_text = ""
        if target:
            op, limit = target
            met = value <= limit if op == "<=" else value >= limit
            target_text = f"{op} {limit}"
        row = Row(case, ours, baseline, value, ratio, target_text, met, note)
        self.rows.append(row)
        return row

    def report(self) -> str:
        # Every row says which way its ratio goes: times are ours/baseline (below 1: ours is faster), speed-ups
        # and throughputs baseline/ours (above 1: ours is faster).
        header = ("case", "ours", "baseline", "ratio", "ratio is", "target", "")
        lines = [header] + [
            (
                r.case, format_seconds(r.ours), format_seconds(r.baseline), f"{r.ratio:.3f}", r.kind,
                r.target, "" if r.met is None else ("met" if r.met else "MISSED"),
            )
            for r in self.rows
        ]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        out = [f"== {self.title} =="]
        for i, line in enumerate(lines):
            out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
            if i == 0:
                out.append("  ".join("-" * w for w in widths).rstrip())
        for r in self.rows:
            if r.note:
                out.append(f"  {r.case}: {r.note}")
        text = "\n".join(out)
        print(text, flush=True)
        return text
