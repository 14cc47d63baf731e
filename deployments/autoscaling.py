"""Autoscaling generators on live sessions rather than on in-flight requests.

A polling jam holds no request between polls, so Serve's default request-count
policy undercounts jams. Each Generator replica reports its session count
(`record_autoscaling_stats`); this policy asks for enough replicas to keep
sessions per replica at the target, and never fewer than the replicas that
currently hold sessions (a stopped replica takes its sessions with it).
"""

from __future__ import annotations

import math

from ray.serve.config import AutoscalingContext


class SessionsPolicy:
    def __init__(self, target_sessions_per_replica: float = 12.0) -> None:
        if target_sessions_per_replica <= 0:
            raise ValueError("target_sessions_per_replica: must be > 0")
        self.target = target_sessions_per_replica

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict]:
        per_replica = (ctx.aggregated_metrics or {}).get("sessions", {})
        sessions = sum(per_replica.values())
        busy = sum(1 for n in per_replica.values() if n > 0)
        desired = max(math.ceil(sessions / self.target), busy)
        desired = min(max(desired, ctx.capacity_adjusted_min_replicas),
                      ctx.capacity_adjusted_max_replicas)
        return desired, ctx.policy_state
