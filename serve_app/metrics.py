"""Per-generator counters: what an A/B test between variants is read from.

The generator keeps plain tallies (reported by /health and /model/variants) and
mirrors every event to a `MetricsSink`. In Ray Serve the sink is Ray Serve's
metrics API (deployments/metrics.py), so the same numbers reach Prometheus,
tagged with the generator's name and model; without Ray nothing is exported.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
from typing import Protocol

log = logging.getLogger(__name__)

# name -> (kind, description); the Ray sink declares exactly these.
METRICS = {
    "mrt_sessions": ("gauge", "live sessions on this generator replica"),
    "mrt_sessions_started": ("counter", "sessions started"),
    "mrt_frames": ("counter", "40 ms frames generated (forced prefill frames included)"),
    "mrt_chunks": ("counter", "chunks completed"),
    "mrt_underruns": ("counter", "realtime chunks completed after the client needed them"),
    "mrt_step_ms": ("histogram", "wall time of one batched engine step, from when it could "
                    "start (its dispatch began, the step before it done) to its audio on "
                    "the host"),
    "mrt_handout_ms": ("histogram", "host time the step loop takes to hand one step's frames "
                       "to their sessions (chunks cut; bar-mode loudness matching runs in "
                       "finisher threads); the next step is already on the device meanwhile"),
    "mrt_reply_hold_ms": ("histogram", "time the step loop held the next step after completing "
                          "chunks realtime clients were waiting for, so that their replies "
                          "leave before it takes the cores (CPU hosts only)"),
    "mrt_chunk_latency_ms": ("histogram", "wall time from a chunk's first frame to its last"),
    "mrt_model_switches": ("counter", "successful model selections (hot swaps)"),
    "mrt_device_memory_gb": ("gauge", "device memory in use on this generator replica's "
                             "accelerator, its allocator's count in GB (weights, session "
                             "states, XLA's workspace); not recorded on CPU"),
}
HISTOGRAM_BOUNDARIES_MS = [5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 5120, 10240]


class MetricsSink(Protocol):
    def record(self, name: str, value: float) -> None: ...


class GeneratorMetrics:
    def __init__(self, sink: MetricsSink | None = None) -> None:
        self.sink = sink
        self._sink_failed = False
        self._lock = threading.Lock()
        self.totals = {name: 0.0 for name, (kind, _) in METRICS.items() if kind == "counter"}
        # the last value set; None until one is (a CPU replica never sets device memory)
        self.gauges: dict[str, float | None] = {
            name: None for name, (kind, _) in METRICS.items() if kind == "gauge"}
        # per histogram: the sum of its values, and counts per bucket of
        # HISTOGRAM_BOUNDARIES_MS (the last: above them all), whose total is the count
        self._sums = {name: 0.0 for name, (kind, _) in METRICS.items() if kind == "histogram"}
        self._buckets = {name: [0] * (len(HISTOGRAM_BOUNDARIES_MS) + 1) for name in self._sums}

    def record(self, name: str, value: float = 1.0) -> None:
        kind = METRICS[name][0]
        with self._lock:
            if kind == "counter":
                self.totals[name] += value
            elif kind == "histogram":
                self._sums[name] += value
                self._buckets[name][bisect.bisect_left(HISTOGRAM_BOUNDARIES_MS, value)] += 1
            else:
                self.gauges[name] = value
        if self.sink is None:
            return
        try:
            self.sink.record(name, value)
        except Exception as e:  # exporting must never stop generation
            if not self._sink_failed:
                log.warning("metrics export failed (%s: %s); counters stay local",
                            type(e).__name__, e)
            self._sink_failed = True

    def snapshot(self) -> dict:
        """Counters, and per histogram its mean, sum and cumulative bucket counts as
        Prometheus keeps them (`_le`: values <= each bound in ms, "+Inf" the count):
        two snapshots' difference is what happened between them, e.g. the share of
        steps slower than a frame during one benchmark run."""
        with self._lock:
            histograms = {}
            for name, total in self._sums.items():
                le = dict(zip([*map(str, HISTOGRAM_BOUNDARIES_MS), "+Inf"],
                              itertools.accumulate(self._buckets[name]), strict=True))
                n = le["+Inf"]
                histograms |= {f"{name}_mean": total / n if n else None,
                               f"{name}_sum": total, f"{name}_le": le}
            return {"mrt_sessions": int(self.gauges["mrt_sessions"] or 0),
                    "mrt_device_memory_gb": self.gauges["mrt_device_memory_gb"],
                    **{k: int(v) for k, v in self.totals.items()}, **histograms}
