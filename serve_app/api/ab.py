"""A/B split: sessions that name no variant are assigned one by weight, sticky per client.

The assignment is a pure function of the client id (SHA-256 to a point in [0, 1),
then the weights' cumulative ranges), so every ingress replica, and the same one
after a restart, gives a client the same variant with no shared state. Clients
without an id get a random draw with the same weights.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping


class ABSplit:
    def __init__(self, weights: Mapping[str, float], variants: Iterable[str]) -> None:
        served = set(variants)
        if not weights:
            raise ValueError("ab_split: list at least one variant with a weight")
        for name, weight in weights.items():
            if name not in served:
                raise ValueError(f"ab_split: {name!r} is not a served variant "
                                 f"({sorted(served)})")
            if not weight >= 0:
                raise ValueError(f"ab_split: weight of {name!r} must be >= 0, got {weight}")
        total = sum(weights.values())
        if total <= 0:
            raise ValueError("ab_split: the weights must not all be zero")
        self.weights = {name: w / total for name, w in sorted(weights.items()) if w > 0}

    @staticmethod
    def point(client_id: str) -> float:
        digest = hashlib.sha256(client_id.encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def assign(self, client_id: str | None) -> str:
        x = self.point(client_id) if client_id else random.random()
        edge = 0.0
        for name, share in self.weights.items():
            edge += share
            if x < edge:
                return name
        return next(reversed(self.weights))  # x within rounding of 1.0
