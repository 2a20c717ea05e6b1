"""The run report: per-stage counts, drop reasons and time, as JSON and as a readable table.

Every number in it is summed from the per-shard `StageStats` the workers saved, so a
resumed run reports the whole job, not only the part it redid.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lmforge.data.document import StageStats


@dataclass
class RunReport:
    output: str
    stages: list[StageStats]
    input_files: int = 0
    input_bytes: int = 0
    shards: int = 0
    shards_resumed: int = 0
    docs_written: int = 0
    chars_written: int = 0
    output_files: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)
    task_peak_mb: dict[str, float] = field(default_factory=dict)  # per phase, the largest task's peak RSS

    @property
    def docs_read(self) -> int:
        return self.stages[0].kept if self.stages else 0

    def throughput(self) -> dict[str, float]:
        """Input documents and megabytes per second of this invocation's wall time."""
        seconds = max(self.wall_seconds, 1e-9)
        return {"docs_per_second": round(self.docs_read / seconds, 2),
                "mb_per_second": round(self.input_bytes / 1e6 / seconds, 3)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output, "input_files": self.input_files, "input_bytes": self.input_bytes,
            "shards": self.shards, "shards_resumed": self.shards_resumed, "docs_read": self.docs_read,
            "docs_written": self.docs_written, "chars_written": self.chars_written,
            "wall_seconds": round(self.wall_seconds, 3),
            "phase_seconds": {k: round(v, 3) for k, v in self.phase_seconds.items()},
            "task_peak_mb": self.task_peak_mb,
            **self.throughput(), "output_files": self.output_files,
            "stages": [s.to_dict() for s in self.stages],
        }


def merge_stats(records: Iterable[dict[str, Any]], order: list[str]) -> list[StageStats]:
    """Sum serialised per-shard stats by stage name, in pipeline `order` (unknown names last)."""
    merged: dict[str, StageStats] = {}
    for record in records:
        stats = StageStats.from_dict(record)
        if stats.name in merged:
            merged[stats.name].merge(stats)
        else:
            merged[stats.name] = stats
    rank = {name: i for i, name in enumerate(order)}
    return sorted(merged.values(), key=lambda s: (rank.get(s.name, len(rank)), s.name))


def _reasons(stats: StageStats, limit: int = 3) -> str:
    parts = [f"{reason} {count:,}" for reason, count in stats.dropped.most_common(limit)]
    if len(stats.dropped) > limit:
        parts.append(f"+{len(stats.dropped) - limit} more")
    extra = [f"{k} {v:,}" for k, v in sorted(stats.counters.items()) if not k.startswith("warc_")]
    return ", ".join(parts + extra[:4])


def render_table(report: RunReport) -> str:
    """A fixed-width table: one row per stage, then totals and throughput."""
    header = (f"{'stage':<18} {'in':>9} {'kept':>9} {'dropped':>9} {'time s':>8} {'time %':>6}  "
              "reasons / events")
    lines = [header, "-" * len(header)]
    total_time = sum(s.seconds for s in report.stages) or 1e-9
    for s in report.stages:
        lines.append(f"{s.name:<18} {s.docs_in:>9,} {s.kept:>9,} {s.dropped_total:>9,} {s.seconds:>8.2f} "
                     f"{100 * s.seconds / total_time:>5.1f}%  {_reasons(s)}")
    speed = report.throughput()
    lines.append("-" * len(header))
    lines.append(f"{report.input_files:,} input files ({report.input_bytes / 1e6:.1f} MB) "
                 f"in {report.shards} shards"
                 + (f" ({report.shards_resumed} already done)" if report.shards_resumed else "")
                 + f"; {report.docs_read:,} documents read, {report.docs_written:,} written "
                 f"({report.chars_written / 1e6:.1f}M characters)")
    lines.append(f"wall time {report.wall_seconds:.1f}s: {speed['docs_per_second']:,.1f} docs/s, "
                 f"{speed['mb_per_second']:.2f} MB/s (stage times are summed over workers)")
    if report.task_peak_mb:
        lines.append("peak memory of one task: " + ", ".join(f"{phase} {mb:,.0f} MB"
                                                            for phase, mb in report.task_peak_mb.items()))
    lines.append(f"output: {report.output}")
    return "\n".join(lines)
