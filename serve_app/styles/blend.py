"""Weighted style blends with finetune steering.

A style is a convex mix of parts: text (or audio) prompts with their weights, the
finetune's mean style embedding with weight `mean`, and its cluster centroids with
`centroid_weights`. Weights are normalised over all parts, so "1.0, 0.8" and
"10, 8" mean the same mix and steering weights read on the same scale as prompts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from ..frames import STYLE_EMBEDDING_DIM


@dataclasses.dataclass(frozen=True)
class SteeringAssets:
    """A finetune's `mean_style_embed.npy` (768,) and `cluster_centroids.npy` (K, 768)."""

    mean: np.ndarray | None = None
    centroids: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.mean is not None and self.mean.shape != (STYLE_EMBEDDING_DIM,):
            raise ValueError(f"mean_style_embed.npy: expected shape (768,), got {self.mean.shape}")
        if self.centroids is not None and (
            self.centroids.ndim != 2 or self.centroids.shape[1] != STYLE_EMBEDDING_DIM
        ):
            raise ValueError(
                f"cluster_centroids.npy: expected shape (K, 768), got {self.centroids.shape}"
            )

    @property
    def num_centroids(self) -> int:
        return 0 if self.centroids is None else int(self.centroids.shape[0])

    def describe(self) -> dict:
        return {"mean": self.mean is not None, "centroids": self.num_centroids}


def blend(
    embeddings: Sequence[np.ndarray],
    weights: Sequence[float],
    *,
    steering: SteeringAssets | None = None,
    mean: float = 0.0,
    centroid_weights: Sequence[float] = (),
) -> np.ndarray:
    """The normalised weighted mix of prompt embeddings and steering vectors."""
    if len(embeddings) != len(weights):
        raise ValueError(
            f"style_weights: got {len(weights)} weights for {len(embeddings)} styles"
        )
    for field, values in (("style_weights", weights), ("mean", [mean]),
                          ("centroid_weights", centroid_weights)):
        if not all(0 <= w < math.inf for w in values):  # NaN fails this too
            raise ValueError(f"{field}: weights must be finite and >= 0, got "
                             f"{[float(w) for w in values]}")
    steering = steering or SteeringAssets()
    parts = list(zip(embeddings, weights, strict=True))
    if mean:
        if steering.mean is None:
            raise ValueError("mean: this model has no mean_style_embed.npy to steer towards")
        parts.append((steering.mean, mean))
    if any(centroid_weights):
        if len(centroid_weights) > steering.num_centroids:
            raise ValueError(
                f"centroid_weights: got {len(centroid_weights)} weights but the model has "
                f"{steering.num_centroids} centroids"
            )
        parts.extend(
            (steering.centroids[i], w) for i, w in enumerate(centroid_weights) if w
        )
    all_weights = [w for _, w in parts]
    top = max(all_weights, default=0.0)
    if top <= 0:
        raise ValueError("style_weights: at least one style or steering weight must be > 0")
    # Weights are relative: scaled by the largest first, their sum cannot overflow (two
    # weights of 1e308 summed to inf and mixed every style at 0, a silent all-zero style).
    ratios = [w / top for w in all_weights]
    total = sum(ratios)
    mix = sum(np.asarray(e, np.float32) * (r / total) for (e, _), r in zip(parts, ratios,
                                                                            strict=True))
    return np.asarray(mix, np.float32)
