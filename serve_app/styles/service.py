"""The style embedder as a service: batches of prompts in, cached embeddings out."""

from __future__ import annotations

import asyncio

import numpy as np

from .. import checkpoints
from ..errors import Unavailable
from .embedder import StyleModel


def load_style_model(mock: bool, repo: str | None = None) -> StyleModel:
    """MusicCoCa from `repo` (default: the model's Hub repo), or the mock's fixed vectors."""
    if mock:
        return StyleModel.mock()
    source = checkpoints.Repo(repo or checkpoints.DEFAULT_REPO)
    files = [source.require([f"{checkpoints.MUSICCOCA_DIR}/{f}"], "MusicCoCa")
             for f in checkpoints.MUSICCOCA_FILES]
    return StyleModel.from_resources(files[0].parent)


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


class StyleEmbedderCore:
    """The API's style embedder wherever it runs (a Serve replica, or the one-process
    server): one whose MusicCoCa files cannot be found stays up and says why, in /health
    and in every embedding error, instead of crash-looping."""

    def __init__(self, mock: bool, repo: str | None = None) -> None:
        self.service: StyleService | None = None
        self.error: str | None = None
        try:
            self.service = StyleService(load_style_model(mock, repo))
        except Exception as e:
            self.error = f"MusicCoCa unavailable: {e}"

    def _ready(self) -> StyleService:
        if self.service is None:
            raise Unavailable(f"styles: {self.error}")
        return self.service

    async def health(self) -> dict:
        if self.service is None:
            return {"state": "error", "error": self.error}
        return await self.service.health()

    async def embed_texts(self, texts: list[str]) -> list[np.ndarray]:
        return await self._ready().embed_texts(texts)

    async def embed_audio(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        return await self._ready().embed_audio(samples, sample_rate)
