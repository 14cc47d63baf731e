"""Session affinity: every call for a session goes to the generator replica that holds it.

Session ids end in `@<replica id>` (the replica mints them). Calls that carry a
`session_id` keyword go to that replica while it is among the running replicas.
If it is gone, the call goes to any replica, which answers "unknown session" —
never audio from an empty state. New sessions use Serve's power-of-two choice.
"""

from __future__ import annotations

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RunningReplica

from serve_app.generator import replica_of


class SessionAffinityRouter(PowerOfTwoChoicesRequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        session_id = (pending_request.kwargs or {}).get("session_id") if pending_request else None
        if session_id:
            owner = replica_of(session_id)
            pinned = [r for r in candidate_replicas if r.replica_id.unique_id == owner]
            if pinned:
                return [pinned]
        return await super().choose_replicas(candidate_replicas, pending_request)
