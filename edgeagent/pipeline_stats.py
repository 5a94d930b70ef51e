"""What one pipeline counts (frames, results, drops, errors, failovers) and its stage
latencies: written by the pipeline's threads, read by the status, telemetry, the systemd
watchdog and model probation. `edgeagent.pipeline` re-exports `PipelineStats`."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from edgeagent.telemetry.report import LatencyWindow


@dataclass
class PipelineStats:
    """Counters the telemetry reads; written by the pipeline's threads only."""

    frames_in: int = 0
    frames_dropped: int = 0
    results_out: int = 0
    invoke_errors: int = 0
    source_errors: int = 0
    fallbacks: int = 0
    fallback_reasons: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    model_swaps: int = 0
    non_finite: int = 0  # results whose outputs held NaN or infinity
    last_error: str | None = None
    last_result_at: float | None = None
    started_at: float = field(default_factory=time.time)
    window: LatencyWindow = field(default_factory=LatencyWindow)  # stage latencies, fps

    def percentiles(self, last: int | None = None) -> dict[str, dict[str, float | None]]:
        """p50/p95/p99 in milliseconds of the recent samples of each stage (of only the
        `last` ones when given)."""
        return {
            stage: {"p50": p.p50, "p95": p.p95, "p99": p.p99}
            for stage, p in self.window.percentiles(last).items()
            if p.samples
        }
