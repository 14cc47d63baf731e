"""StyleEmbedder deployment: text prompts -> MusicCoCa embeddings, cached per replica;
a thin shell over StyleEmbedderCore."""

from __future__ import annotations

from ray import serve

from serve_app import logs
from serve_app.styles.service import StyleEmbedderCore


@serve.deployment
class StyleEmbedder:
    def __init__(self, mock: bool, repo: str | None = None) -> None:
        logs.configure()
        self.core = StyleEmbedderCore(mock, repo)

    async def health(self) -> dict:
        return await self.core.health()

    async def embed_texts(self, texts: list[str]):
        return await self.core.embed_texts(texts)

    async def embed_audio(self, samples, sample_rate: int):
        return await self.core.embed_audio(samples, sample_rate)
