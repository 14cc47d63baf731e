"""StyleEmbedder deployment: text prompts -> MusicCoCa embeddings, cached per replica.

A replica whose MusicCoCa files cannot be found stays up and reports why (in
/health and in every embedding error) instead of crash-looping.
"""

from __future__ import annotations

from ray import serve

from serve_app import checkpoints, logs
from serve_app.errors import Unavailable
from serve_app.styles import StyleModel
from serve_app.styles.service import StyleService


def _load(mock: bool, repo: str | None) -> StyleModel:
    if mock:
        return StyleModel.mock()
    source = checkpoints.Repo(repo or checkpoints.DEFAULT_REPO)
    files = [source.require([f"{checkpoints.MUSICCOCA_DIR}/{f}"], "MusicCoCa")
             for f in checkpoints.MUSICCOCA_FILES]
    return StyleModel.from_resources(files[0].parent)


@serve.deployment
class StyleEmbedder:
    def __init__(self, mock: bool, repo: str | None = None) -> None:
        logs.configure()
        self.service: StyleService | None = None
        self.error: str | None = None
        try:
            self.service = StyleService(_load(mock, repo))
        except Exception as e:
            self.error = f"MusicCoCa unavailable: {e}"

    async def health(self) -> dict:
        if self.service is None:
            return {"state": "error", "error": self.error}
        return {"state": "ready", "error": None, **self.service.stats()}

    async def embed_texts(self, texts: list[str]):
        if self.service is None:
            raise Unavailable(f"styles: {self.error}")
        return await self.service.embed_texts(texts)

    async def embed_audio(self, samples, sample_rate: int):
        if self.service is None:
            raise Unavailable(f"styles: {self.error}")
        return await self.service.embed_audio(samples, sample_rate)
