"""A variant's health across the generator replicas that serve it.

`/health` and `/model/variants` report per variant, and with autoscaling a variant
has several replicas. One replica's report, whichever answered, would make `/health`
flap between "ready" and "initializing" while a new replica compiles, and show one
replica's sessions as the variant's. So a variant is:
- "ready" when any replica is (it takes sessions), "error" when every replica
  failed, else "initializing";
- `sessions` and `max_sessions` add up over its replicas;
- every other field comes from one ready replica (any replica if none is), as it
  did with one; `replicas` holds each replica's own report, ordered by replica id.
"""

from __future__ import annotations


def variant_health(reports: list[dict]) -> dict:
    reports = sorted(reports, key=lambda r: r["replica"])
    ready = [r for r in reports if r["state"] == "ready"]
    failed = all(r["state"] == "error" for r in reports)
    return {
        **(ready or reports)[0],
        "state": "ready" if ready else "error" if failed else "initializing",
        "sessions": sum(r["sessions"] for r in reports),
        "max_sessions": sum(r["max_sessions"] for r in reports),
        "replicas": reports,
    }
