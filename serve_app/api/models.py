"""`/model/*`: which weights each generator serves, switched at runtime.

The request forms are the prototype's (`repo_id`/`step`) and the documented ones
(`ckpt_repo`/`ckpt_step`); both are accepted, and naming one thing twice with two
values is an error rather than a guess. The generator does the work (validate,
load beside the old model, swap between steps, remember); this layer parses,
picks the generator, and reports.
"""

from __future__ import annotations

import asyncio
import os
from typing import Annotated, Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from .. import checkpoints
from ..engine.variants import SIZE_ALIASES, VARIANTS, variant_for_size
from ..errors import BadRequest, Int, Unavailable, either
from ..selection import ModelSelection
from .security import may_read_local_paths
from .service import JamService

BOOT_ENV = ("MRT_CKPT_REPO", "MRT_CKPT_STEP", "MRT_SIZE", "SPACE_MODE")


def _merge(values: dict, documented: str, prototype: str) -> None:
    a, b = values.pop(documented, None), values.pop(prototype, None)
    if a is not None and b is not None and a != b:
        raise ValueError(f"{documented} and {prototype} name the same thing and disagree "
                         f"({a!r} vs {b!r}); send one of them")
    values[documented] = a if a is not None else b


# a branch, tag or commit id of a Hub repo (`checkpoints.check_revision`)
Revision = Annotated[str, Field(max_length=200), AfterValidator(checkpoints.check_revision)]
Step = either(Int | Literal["latest"] | None, "a checkpoint step (an integer) or 'latest'")


class SelectRequest(BaseModel):
    """POST /model/select."""

    model_config = ConfigDict(extra="forbid")

    ckpt_repo: str | None = Field(None, min_length=1, max_length=500,
                                  description="Hub repo id or local directory (alias repo_id)")
    ckpt_step: Step = Field(
        None, description="finetune step, or 'latest' (alias step); none: the base weights")
    size: str | None = Field(None, description="tiny | small | base (large = base), or a "
                                               "variant name; default: the current one")
    revision: Revision | None = None
    assets_repo_id: str | None = Field(None, min_length=1, max_length=500)
    sync_assets: bool = Field(True, description="take steering assets from the new repo")
    prewarm: bool = Field(True, description="return once the new model serves")
    stop_active: bool = Field(False, description="end live sessions (needed to change size)")
    dry_run: bool = Field(False, description="only check: repo, checkpoint, tensors")
    variant: str | None = Field(None, description="which generator; default: the default")

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data):
        if not isinstance(data, dict):
            return data
        values = dict(data)
        _merge(values, "ckpt_repo", "repo_id")
        _merge(values, "ckpt_step", "step")
        return values

    @model_validator(mode="after")
    def _checks(self):
        if isinstance(self.ckpt_step, int) and self.ckpt_step < 0:
            raise ValueError("ckpt_step: must be >= 0")
        if self.size is not None:
            variant_for_size(self.size)
        return self


class AssetsRequest(BaseModel):
    """POST /model/assets/load."""

    model_config = ConfigDict(extra="forbid")

    repo_id: str = Field(min_length=1, max_length=500)
    revision: Revision | None = None
    variant: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data):
        if isinstance(data, dict) and "assets_repo_id" in data:
            values = dict(data)
            _merge(values, "repo_id", "assets_repo_id")
            return values
        return data


async def _listing(repo: str, revision: str | None, *, allow_local: bool = True) -> dict:
    try:
        return await asyncio.to_thread(checkpoints.list_checkpoints, repo, revision=revision,
                                       allow_local=allow_local)
    except checkpoints.CheckpointNotFound as e:
        if "cannot be reached" in str(e):
            raise Unavailable(f"repo_id: {e}") from e
        raise BadRequest(f"repo_id: {e}") from e
    except ValueError as e:
        raise BadRequest(f"repo_id: {e}") from e


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
        _, client = service.generator(request.variant)
        current = await client.model_status()
        size = variant_for_size(request.size) if request.size else current["model"]["size"]
        step = request.ckpt_step
        if step == "latest":
            if request.ckpt_repo is None:
                raise BadRequest("ckpt_step: 'latest' needs ckpt_repo (or repo_id)")
            step = (await _listing(request.ckpt_repo, request.revision))["latest"]
            if step is None:
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
            "sizes": {**SIZE_ALIASES, **{v: v for v in VARIANTS}},
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
        return await client.load_assets(request.repo_id, request.revision)

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
