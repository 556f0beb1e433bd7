"""Percentiles, result rows, targets, and the printed table."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TextIO

Verdict = Literal["pass", "miss", "info", "error"]


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``samples``."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples) if samples else math.nan


@dataclass
class Target:
    """``value <op> limit``, where value is the row's ratio or its value."""

    text: str
    on: Literal["value", "ratio"]
    op: Literal["<", "<="]
    limit: float

    def check(self, value: float, ratio: float | None) -> bool:
        subject = ratio if self.on == "ratio" else value
        if subject is None or math.isnan(subject):
            return False
        return subject < self.limit if self.op == "<" else subject <= self.limit


@dataclass
class Row:
    section: str
    node: str
    figure: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    target: str = ""
    verdict: Verdict = "info"
    samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or not self.baseline or math.isnan(self.baseline):
            return None
        return self.value / self.baseline

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["ratio"] = self.ratio
        return doc


def row(
    section: str,
    node: str,
    figure: str,
    value: float,
    unit: str,
    *,
    baseline: float | None = None,
    baseline_name: str = "",
    target: Target | None = None,
    samples: int = 0,
    **extra: Any,
) -> Row:
    r = Row(section, node, figure, value, unit, baseline, baseline_name, samples=samples)
    r.extra = dict(extra)
    if target is not None:
        r.target = target.text
        r.verdict = "pass" if target.check(value, r.ratio) else "miss"
    return r


def _number(value: float | None, unit: str = "") -> str:
    if value is None or math.isnan(value):
        return "-"
    if abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def print_table(rows: Sequence[Row], out: TextIO) -> None:
    header = ("node", "figure", "value", "baseline", "ratio", "target", "result")
    lines: list[tuple[str, ...]] = []
    section = None
    order = {name: i for i, name in reversed(list(enumerate(r.section for r in rows)))}
    for r in sorted(rows, key=lambda r: order[r.section]):
        if r.section != section:
            section = r.section
            lines.append((f"[{section}]",))
        ratio = r.ratio
        lines.append(
            (
                r.node,
                r.figure,
                _number(r.value, r.unit),
                _number(r.baseline, r.unit) + (f" ({r.baseline_name})" if r.baseline_name else "")
                if r.baseline is not None
                else "-",
                f"{ratio:.2f}x" if ratio is not None else "-",
                r.target or "-",
                r.verdict,
            )
        )
    widths = [len(h) for h in header]
    for line in lines:
        if len(line) == len(header):
            widths = [max(w, len(c)) for w, c in zip(widths, line, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out.write(fmt.format(*header) + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for line in lines:
        out.write((fmt.format(*line) if len(line) == len(header) else line[0]) + "\n")
