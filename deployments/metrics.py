"""Generator metrics through Ray Serve's metrics API, so Prometheus can read an A/B test.

Every series is tagged with `variant`, the generator's name in the config (what
an A/B split assigns); Serve adds the deployment, replica and application tags.
"""

from __future__ import annotations

from ray.serve import metrics

from serve_app.metrics import HISTOGRAM_BOUNDARIES_MS, METRICS

_KINDS = {"counter": metrics.Counter, "gauge": metrics.Gauge, "histogram": metrics.Histogram}


class RayServeMetricsSink:
    def __init__(self, variant: str) -> None:
        self.tags = {"variant": variant}
        self._metrics = {}
        for name, (kind, description) in METRICS.items():
            options = {"boundaries": HISTOGRAM_BOUNDARIES_MS} if kind == "histogram" else {}
            metric = _KINDS[kind](name, description=description,
                                  tag_keys=("variant",), **options)
            metric.set_default_tags(dict(self.tags))  # Serve adds its tags in place
            self._metrics[name] = metric

    def record(self, name: str, value: float) -> None:
        metric = self._metrics[name]
        if isinstance(metric, metrics.Counter):
            if value > 0:  # Ray's counters refuse zero increments
                metric.inc(value)
        elif isinstance(metric, metrics.Gauge):
            metric.set(value)
        else:
            metric.observe(value)
