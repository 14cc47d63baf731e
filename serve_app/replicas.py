"""What the API reports for a variant that several generator replicas serve.

`/health`, `/model/variants` and `/model/status` report per variant, and with
autoscaling a variant has several replicas. One replica's report, whichever answered,
would make `/health` flap between "ready" and "initializing" while a new replica
compiles, show one replica's sessions as the variant's, and hide a replica that has
not yet followed a model switch. So each report here is made of every replica's
(the ingress asks them all, `deployments/ingress.py`; in one process there is one):
`sessions` and `max_sessions` add up, `replicas` holds each replica's own report
ordered by replica id, and the other fields come from one chosen replica.
"""

from __future__ import annotations


def variant_health(reports: list[dict]) -> dict:
    """Ready while any replica is (it takes sessions), "error" when every replica
    failed, else "initializing"; the other fields are a ready replica's."""
    reports = _by_replica(reports)
    ready = [r for r in reports if r["state"] == "ready"]
    failed = all(r["state"] == "error" for r in reports)
    return {
        **_totals((ready or reports)[0], reports),
        "state": "ready" if ready else "error" if failed else "initializing",
    }


def variant_model_status(reports: list[dict]) -> dict:
    """The fields of the replica furthest along the stored selections (a switch is
    made on one replica and followed by the others within seconds)."""
    reports = _by_replica(reports)
    newest = max(reports, key=lambda r: r["selection_generation"])
    return _totals(newest, reports)


def _by_replica(reports: list[dict]) -> list[dict]:
    return sorted(reports, key=lambda r: r["replica"])


def _totals(chosen: dict, reports: list[dict]) -> dict:
    return {
        **chosen,
        "sessions": sum(r["sessions"] for r in reports),
        "max_sessions": sum(r["max_sessions"] for r in reports),
        "replicas": reports,
    }
