"""`/model/*`: which weights each generator serves, switched at runtime.

The request forms are the prototype's (`repo_id`/`step`) and the documented ones
(`ckpt_repo`/`ckpt_step`); both are accepted, and naming one thing twice with two
values is an error rather than a guess. The generator does the work (validate,
load beside the old model, swap between steps, remember); this layer parses,
picks the generator, and reports.
"""

from __future__ import annotations

import asyncio
import functools
import os
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    model_validator,
)

from .. import checkpoints
from ..engine.catalog import SIZE_ALIASES, VARIANT_NAMES, variant_for_size
from ..errors import ApiError, BadRequest, Int, Unavailable, either
from ..selection import ModelSelection
from .security import may_read_local_paths
from .service import JamService

BOOT_ENV = ("MRT_CKPT_REPO", "MRT_CKPT_STEP", "MRT_SIZE", "SPACE_MODE")


class TwoNamedRequest(BaseModel):
    """A request some of whose fields have the prototype's name beside the documented one
    (`validation_alias=AliasChoices(documented, prototype)`, in that order). Either is
    read; both, agreeing, are one; both, disagreeing, are an error rather than a guess.
    Errors name the field as the client sent it: pydantic's do (it reports the alias it
    read), and `in_clients_words` renames ours, which name the documented field."""

    model_config = ConfigDict(extra="forbid")
    _sent_as: dict[str, str] = PrivateAttr(default_factory=dict)

    @classmethod
    @functools.cache  # per class: its fields do not change after it is made
    def _other_names(cls) -> dict[str, str]:
        return {field: info.validation_alias.choices[1]
                for field, info in cls.model_fields.items()
                if isinstance(info.validation_alias, AliasChoices)}

    @model_validator(mode="wrap")
    @classmethod
    def _one_name_each(cls, data: Any, handler: ModelWrapValidatorHandler) -> Any:
        if not isinstance(data, dict):
            return handler(data)
        values, sent_as = dict(data), {}
        for documented, other in cls._other_names().items():
            if other not in values:
                continue
            if documented not in values:
                sent_as[documented] = other
                continue
            a, b = values[documented], values.pop(other)
            if a is not None and b is not None and a != b:
                raise ValueError(f"{documented} and {other} name the same thing and disagree "
                                 f"({a!r} vs {b!r}); send one of them")
            values[documented] = a if a is not None else b
        request = handler(values)
        request._sent_as = sent_as
        return request

    def in_clients_words(self, error: ApiError) -> ApiError:
        """`error`, naming its field as the client sent it: the generator's checks say
        `ckpt_repo:` where a prototype client sent `repo_id`."""
        field, sep, reason = error.message.partition(":")
        if sep and field in self._sent_as:
            return error.reworded(f"{self._sent_as[field]}:{reason}")
        return error


# a branch, tag or commit id of a Hub repo (`checkpoints.check_revision`)
Revision = Annotated[str, Field(max_length=200), AfterValidator(checkpoints.check_revision)]


def _not_negative(step: int | str | None) -> int | str | None:
    if isinstance(step, int) and step < 0:
        raise ValueError("must be >= 0")
    return step


Step = Annotated[
    either(Int | Literal["latest"] | None, "a checkpoint step (an integer) or 'latest'"),
    AfterValidator(_not_negative)]


class SelectRequest(TwoNamedRequest):
    """POST /model/select."""

    ckpt_repo: str | None = Field(None, min_length=1, max_length=500,
                                  validation_alias=AliasChoices("ckpt_repo", "repo_id"),
                                  description="Hub repo id or local directory (alias repo_id)")
    ckpt_step: Step = Field(
        None, validation_alias=AliasChoices("ckpt_step", "step"),
        description="finetune step, or 'latest' (alias step); none: the base weights")
    size: str | None = Field(None, description="tiny | small | base (large = base), or a "
                                               "variant name; default: the current one")
    revision: Revision | None = None
    assets_repo_id: str | None = Field(None, min_length=1, max_length=500)
    sync_assets: bool = Field(True, description="take steering assets from the new repo")
    prewarm: bool = Field(True, description="return once the new model serves")
    stop_active: bool = Field(False, description="end live sessions (needed to change size)")
    dry_run: bool = Field(False, description="only check: repo, checkpoint, tensors")
    variant: str | None = Field(None, description="which generator; default: the default")

    @model_validator(mode="after")
    def _checks(self):
        if self.size is not None:
            variant_for_size(self.size)
        return self


class AssetsRequest(TwoNamedRequest):
    """POST /model/assets/load."""

    repo_id: str = Field(min_length=1, max_length=500,
                         validation_alias=AliasChoices("repo_id", "assets_repo_id"))
    revision: Revision | None = None
    variant: str | None = None


async def _listing(repo: str, revision: str | None, *, allow_local: bool = True,
                   field: str = "repo_id") -> dict:
    """The repo's checkpoints; an error names `field`, where the client sent the repo."""
    try:
        return await asyncio.to_thread(checkpoints.list_checkpoints, repo, revision=revision,
                                       allow_local=allow_local)
    except checkpoints.CheckpointNotFound as e:
        if "cannot be reached" in str(e):
            raise Unavailable(f"{field}: {e}") from e
        raise BadRequest(f"{field}: {e}") from e
    except ValueError as e:
        raise BadRequest(f"{field}: {e}") from e


def add_model_routes(app: FastAPI, service: JamService) -> None:
    settings = service.settings

    def named(variant: str | None) -> list[str]:
        if variant is None:
            return list(service.generators)
        return [service.generator(variant)[0]]

    async def statuses(variant: str | None) -> dict:
        names = named(variant)
        reports = await asyncio.gather(*(service.generators[n].model_status() for n in names),
                                       return_exceptions=True)
        return {n: r if isinstance(r, dict) else {"state": "error", "error": str(r)}
                for n, r in zip(names, reports, strict=True)}

    @app.post("/model/select")
    async def model_select(request: SelectRequest):
        """Switch a generator's model: validated first, loaded beside the old one, swapped
        between two steps (live sessions keep streaming when the size is unchanged), and
        remembered for every replica. Any failure keeps the old model serving."""
        try:
            return await select(request)
        except ApiError as e:
            raise request.in_clients_words(e) from None

    async def select(request: SelectRequest) -> JSONResponse:
        _, client = service.generator(request.variant)
        current = await client.model_status()
        size = variant_for_size(request.size) if request.size else current["model"]["size"]
        step = request.ckpt_step
        if step == "latest":
            if request.ckpt_repo is None:
                raise BadRequest("ckpt_step: 'latest' needs ckpt_repo (or repo_id)")
            listing = await _listing(request.ckpt_repo, request.revision, field="ckpt_repo")
            if (step := listing["latest"]) is None:
                raise BadRequest(f"ckpt_step: {request.ckpt_repo} has no "
                                 "checkpoint_<step>.safetensors to be the latest")
        selection = ModelSelection(size, request.ckpt_repo, step, request.revision,
                                   request.assets_repo_id)
        result = await client.select(
            selection, dry_run=request.dry_run, prewarm=request.prewarm,
            stop_active=request.stop_active, sync_assets=request.sync_assets)
        status = 202 if result.get("state") == "loading" else 200
        return JSONResponse(result, status_code=status)

    @app.get("/model/status")
    async def model_status(variant: str | None = Query(None)):
        """What each generator serves, its last switch, and the remembered selection."""
        return {"default_variant": settings.default_variant, "variants": await statuses(variant)}

    @app.get("/model/config")
    async def model_config():
        """How models are chosen here: variants, sizes, A/B split, boot variables."""
        return {
            "default_variant": settings.default_variant,
            "variants": {n: {"model": s.get("model"), "boot_default": s.get("boot_default")}
                         for n, s in (await statuses(None)).items()},
            "sizes": {**SIZE_ALIASES, **{v: v for v in VARIANT_NAMES}},
            "ab_split": service.ab.weights if service.ab else None,
            "boot_env": {k: os.environ.get(k) for k in BOOT_ENV},
            "checkpoint_naming": "checkpoint_<step>.safetensors (root or checkpoints/); "
                                 "steering assets mean_style_embed.npy, cluster_centroids.npy",
        }

    @app.get("/model/checkpoints")
    async def model_checkpoints(request: Request,
                                repo_id: str = Query(..., min_length=1, max_length=500),
                                revision: Annotated[Revision | None, Query()] = None):
        """Finetune steps a repo offers, and the latest: a Hub id, or a local directory
        for an admin key (or when no keys are configured)."""
        return await _listing(repo_id, revision,
                              allow_local=may_read_local_paths(request.scope))

    @app.post("/model/assets/load")
    async def model_assets_load(request: AssetsRequest):
        """Load steering assets (mean style, centroids) from a repo for a generator."""
        _, client = service.generator(request.variant)
        try:
            return await client.load_assets(request.repo_id, request.revision)
        except ApiError as e:
            raise request.in_clients_words(e) from None

    @app.get("/model/assets/status")
    async def model_assets_status(variant: str | None = Query(None)):
        return {"variants": {n: {"steering_assets": s.get("steering_assets"),
                                 "assets_repo_id": (s.get("model") or {}).get("assets_repo_id")
                                 or (s.get("model") or {}).get("repo_id")}
                             for n, s in (await statuses(variant)).items()}}

    @app.get("/model/variants")
    async def model_variants():
        """Every generator side by side: model, state, load, A/B share and counters."""
        health = await asyncio.gather(*(g.health() for g in service.generators.values()),
                                      return_exceptions=True)
        weights = service.ab.weights if service.ab else {}
        return {
            "default_variant": settings.default_variant,
            "ab_split": weights or None,
            "variants": {
                name: ({"ab_share": weights.get(name, 0.0) if weights else None,
                        **{k: h.get(k) for k in ("model", "state", "error", "replica",
                                                 "sessions", "max_sessions", "mean_step_ms",
                                                 "metrics", "switch")}}
                       if isinstance(h, dict) else {"state": "error", "error": str(h)})
                for name, h in zip(service.generators, health, strict=True)
            },
        }
