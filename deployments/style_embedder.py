"""StyleEmbedder deployment: text prompts -> MusicCoCa embeddings, cached per replica."""

from __future__ import annotations

from ray import serve

from serve_app import checkpoints, logs
from serve_app.styles import StyleModel
from serve_app.styles.service import StyleService


@serve.deployment
class StyleEmbedder:
    def __init__(self, mock: bool, repo: str | None = None) -> None:
        logs.configure()
        if mock:
            model = StyleModel.mock()
        else:
            source = checkpoints.Repo(repo or checkpoints.DEFAULT_REPO)
            files = [source.require([f"{checkpoints.MUSICCOCA_DIR}/{f}"], "MusicCoCa")
                     for f in checkpoints.MUSICCOCA_FILES]
            model = StyleModel.from_resources(files[0].parent)
        self.service = StyleService(model)

    async def embed_texts(self, texts: list[str]):
        return await self.service.embed_texts(texts)

    async def stats(self) -> dict:
        return self.service.stats()
