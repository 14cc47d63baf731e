"""Session affinity: every call for a session goes to the generator replica that holds it.

Session ids end in `@<replica id>` (the replica mints them). Calls that carry a
`session_id` keyword go to that replica while it is among the running replicas.
If it is gone, the call goes to any replica, which answers "unknown session" —
never audio from an empty state.

New sessions use Serve's power-of-two choice among the replicas not named in the
call's `avoid` keyword: those that already refused this start, being full or still
loading (pow-2 alone prefers the least busy replica, which after a scale-up is the
one still compiling). The ingress retries such a start (`deployments/ingress.py`).
"""

from __future__ import annotations

import random

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RunningReplica

from serve_app.jam_spec import replica_of


class SessionAffinityRouter(PowerOfTwoChoicesRequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        kwargs = (pending_request.kwargs or {}) if pending_request else {}
        session_id = kwargs.get("session_id")
        if session_id:
            owner = replica_of(session_id)
            pinned = [r for r in candidate_replicas if r.replica_id.unique_id == owner]
            if pinned:
                return [pinned]
        avoid = kwargs.get("avoid") or ()
        others = [r for r in candidate_replicas if r.replica_id.unique_id not in avoid]
        if avoid and others:
            # Pow-2 among the others (its own choose_replicas reads every replica it
            # knows, not `candidate_replicas`): Serve takes the less busy of the two.
            return [random.sample(others, min(2, len(others)))]
        # no avoid, or every replica was avoided: ask again rather than fail unanswered
        return await super().choose_replicas(candidate_replicas, pending_request)
