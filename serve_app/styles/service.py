"""The style embedder as a service: batches of prompts in, cached embeddings out."""

from __future__ import annotations

import asyncio

import numpy as np

from .embedder import StyleModel


class StyleService:
    def __init__(self, model: StyleModel) -> None:
        self.model = model

    async def embed_texts(self, texts: list[str]) -> list[np.ndarray]:
        # MusicCoCa runs TFLite on CPU; keep the event loop free while it does.
        return await asyncio.to_thread(lambda: [self.model.embed_text(t) for t in texts])

    async def embed_audio(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """A clip's MusicCoCa embedding (a loop's own style, or the current mix)."""
        return await asyncio.to_thread(self.model.embed_audio, samples, sample_rate)

    async def health(self) -> dict:
        return {"state": "ready", "error": None, **self.stats()}

    def stats(self) -> dict:
        info = self.model.cache_info()
        return {"mock": self.model.is_mock, "cache_hits": info.hits, "cache_misses": info.misses,
                "cached": info.currsize}
