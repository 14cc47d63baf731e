"""A variant's reports made of its replicas' (serve_app/replicas.py); the same through
real Ray Serve with two replicas is in tests/test_serve_replicas.py."""

from __future__ import annotations

import pytest

from serve_app.replicas import variant_health, variant_model_status


def replica(tag: str, state: str, sessions: int = 0, error: str | None = None) -> dict:
    return {"replica": tag, "state": state, "error": error, "sessions": sessions,
            "max_sessions": 4, "model": {"step": tag}}


@pytest.mark.parametrize("states, expected", [
    (["ready"], "ready"),
    (["initializing", "ready"], "ready"),  # a replica added by autoscaling, compiling
    (["error", "ready"], "ready"),
    (["error", "initializing"], "initializing"),
    (["error", "error"], "error"),
    (["initializing"], "initializing"),
])
def test_a_variant_is_ready_while_any_replica_is(states, expected):
    reports = [replica(f"r{i}", state) for i, state in enumerate(states)]
    assert variant_health(reports)["state"] == expected


def test_sessions_add_up_and_the_fields_are_a_ready_replicas():
    merged = variant_health([replica("b", "ready", 3), replica("a", "initializing", 0),
                             replica("c", "ready", 1)])
    assert (merged["sessions"], merged["max_sessions"]) == (4, 12)
    assert merged["replica"] == "b" and merged["model"] == {"step": "b"}
    assert [r["replica"] for r in merged["replicas"]] == ["a", "b", "c"]
    failed = variant_health([replica("a", "error", error="no weights")])
    assert failed["error"] == "no weights" and failed["replicas"][0]["state"] == "error"


def test_model_status_shows_the_replica_furthest_along_and_every_replica():
    behind, ahead = replica("a", "ready", 1), replica("b", "ready", 2)
    behind["selection_generation"], ahead["selection_generation"] = 3, 4
    merged = variant_model_status([ahead, behind])
    assert merged["model"] == {"step": "b"} and merged["selection_generation"] == 4
    assert merged["sessions"] == 3 and [r["replica"] for r in merged["replicas"]] == ["a", "b"]
