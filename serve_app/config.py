"""The serving graph's configuration: the `args:` of an application in configs/*.yaml.

Ray-free, so that the Ray Serve graph (`deployments.app:build_app`) and the one-process
server (`serve_app.standalone`) read the same files the same way. Fields that only mean
something to Ray (replicas, CPUs, GPUs, autoscaling) are kept here and ignored by the
one-process server.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .api.ab import ABSplit
from .api.settings import ApiSettings
from .engine import compile_cache
from .engine.catalog import check_variant_name, variant_for_size
from .errors import field_problems

log = logging.getLogger("mrt_serve.config")


# Every config model: NaN or infinity (YAML's .nan, .inf) in a count or weight is a typo,
# never a setting, and so is a name it does not know (`max_sesions`): an error, not a
# setting silently left at its default.
CHECKED = ConfigDict(allow_inf_nan=False, extra="forbid")


class VariantConfig(BaseModel):
    model_config = CHECKED

    name: str
    variant: str | None = None  # model variant; defaults to `name`
    repo: str | None = None
    step: int | None = Field(None, ge=0)
    compute_dtype: str = "auto"
    max_sessions: int = Field(16, ge=1)
    buckets: list[int] | None = None
    num_gpus: float = Field(0.0, ge=0)
    num_cpus: float = Field(1.0, ge=0)
    num_replicas: int | str = 1
    autoscaling_config: dict | None = None
    max_ongoing_requests: int = Field(256, ge=1)
    # a session nobody has asked about for this long is ended (its client is gone);
    # None: the generator's default (serve_app.generator.IDLE_SESSION_SECONDS)
    idle_session_seconds: float | None = Field(None, gt=0)
    # `tiny` only: a missing local `repo` is written before serving, a stand-in finetune
    # of random weights (configs/tiny.yaml's A/B demo); without it, a missing repo is an error
    write_if_missing: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", v):
            raise ValueError("variant names use letters, digits, '_' and '-' only")
        return v

    @field_validator("variant")
    @classmethod
    def _variant(cls, v: str | None) -> str | None:
        return None if v is None else variant_for_size(v)

    @model_validator(mode="after")
    def _room_for_streams(self) -> VariantConfig:
        # Each WebSocket session holds one chunk stream on its replica for its whole life
        # (GeneratorCore.chunks), and its control calls (grant, update, status) need room
        # beside it: a replica at its limit would hold them back, and the stream with them.
        if self.max_ongoing_requests < 2 * self.max_sessions:
            raise ValueError(
                f"max_ongoing_requests: must be at least twice max_sessions "
                f"({2 * self.max_sessions}), got {self.max_ongoing_requests}: each session's "
                "stream holds a request on its replica while it runs")
        return self

    @model_validator(mode="after")
    def _writable(self) -> VariantConfig:
        if self.write_if_missing and (self.model_variant != "tiny" or not self.repo):
            raise ValueError("write_if_missing: only a `tiny` variant's local `repo` can be "
                             "written (random weights); name one or leave it false")
        return self

    @property
    def model_variant(self) -> str:
        return self.variant or self.name

    def core_options(self) -> dict:
        """This variant's own keyword arguments of its GeneratorCore (the app's are added
        by `AppConfig.generator_options`)."""
        options = {
            "repo": self.repo, "step": self.step, "max_sessions": self.max_sessions,
            "compute_dtype": self.compute_dtype,
            "buckets": tuple(self.buckets) if self.buckets else None,
        }
        if self.idle_session_seconds is not None:
            options["idle_seconds"] = self.idle_session_seconds
        return options


class StyleEmbedderConfig(BaseModel):
    """`style_embedder:`: MusicCoCa, or mock embeddings (`tiny`'s default)."""

    model_config = CHECKED

    mock: bool | None = None  # None: mock when only `tiny` is served
    repo: str | None = None  # where MusicCoCa's files are (default: the Hub's)


class AppConfig(BaseModel):
    model_config = CHECKED

    variants: list[VariantConfig]
    default_variant: str | None = None
    # A/B split of sessions that name no variant: weight per variant, sticky per client id
    ab_split: dict[str, float] | None = None
    style_embedder: StyleEmbedderConfig = Field(default_factory=StyleEmbedderConfig)
    ingress: dict = Field(default_factory=dict)  # {num_replicas, max_ongoing_requests}
    api: dict = Field(default_factory=dict)
    # Ask Ray for the generators' CPUs and GPUs as the cluster can place them when the app
    # is built (deployments/placement.py); false on a cluster that adds nodes on demand.
    fit_to_cluster: bool = True
    # Benchmarks only: every variant starts with random weights (seed 0) and style
    # embeddings are mocked, so no checkpoint or MusicCoCa file is read (a GPU box with
    # no Hub access; speed does not depend on weight values). `mrt-serve local
    # --random-weights` sets it.
    random_weights: bool = False

    @property
    def api_config(self) -> dict:
        """The API's settings (`ApiSettings.from_config`): the `api:` section plus the
        graph-level choices the API acts on."""
        return {"default_variant": self.default_variant, "ab_split": self.ab_split, **self.api}

    @property
    def style_mock(self) -> bool:
        """Mock style embeddings unless told otherwise when only `tiny` is served (it has
        no MusicCoCa of its own); real MusicCoCa for real models; always mock with
        random weights."""
        mock = self.style_embedder.mock
        if mock is None:
            mock = all(v.model_variant == "tiny" for v in self.variants)
        return self.random_weights or mock

    def tiny_repos_to_write(self) -> list[tuple[pathlib.Path, int | None]]:
        """(directory, step) of each `write_if_missing` repo that does not exist yet: the
        offline demo's stand-in finetunes (random weights), which every way of serving a
        config writes before it starts (`engine.tiny.write_named_repos`)."""
        if self.random_weights:
            return []
        wanted = []
        for v in self.variants:
            if not v.write_if_missing:  # a repo that is not there is a mistake to report
                continue
            path = pathlib.Path(v.repo).expanduser()
            if not path.exists():
                wanted.append((path, v.step))
        return wanted

    def generator_options(self, v: VariantConfig) -> dict:
        """Keyword arguments of variant `v`'s GeneratorCore, wherever it runs."""
        options = v.core_options()
        if self.random_weights:
            options["random_weights_seed"] = 0
        return options


def load_app_config(args: Mapping, environ: Mapping[str, str] = os.environ, *,
                    only: Sequence[str] = ()) -> AppConfig:
    """An application's `args:`, checked as a whole, narrowed to the variants named in
    `only` (all when empty) and with the boot variables applied; every mistake is a
    ValueError naming the field."""
    try:
        config = AppConfig(**args)
    except ValidationError as e:
        raise ValueError("; ".join(field_problems(e.errors()))) from None
    if not config.variants:
        raise ValueError("variants: list at least one model variant to serve")
    for v in config.variants:  # a name doubles as the model variant when none is given
        check_variant_name(v.model_variant, f"variants[{v.name}].variant")
    names = [v.name for v in config.variants]
    config.default_variant = config.default_variant or names[0]
    if config.default_variant not in names:
        raise ValueError(f"default_variant: {config.default_variant!r} is not among {names}")
    try:  # the `api:` section as the ingress will read it (the environment aside)
        ApiSettings(**config.api_config)
    except ValidationError as e:
        raise ValueError("; ".join(f"api.{p}" for p in field_problems(e.errors()))) from None
    if config.ab_split is not None:
        ABSplit(config.ab_split, names)  # validates names and weights
    if only:
        _keep_only(config, only)
    apply_boot_env(config, environ)
    compile_cache.max_bytes(environ)  # a bad limit: said once, not by each replica starting
    return config


def _keep_only(config: AppConfig, only: Sequence[str]) -> None:
    """Narrows the config to the variants named in `only` (`mrt-serve local --variant`):
    one model of a config that lists several, on a box with one GPU. The config is checked whole
    first, so a mistake in it is not hidden by leaving its variant out. The default and
    the A/B split follow: a default left out becomes the first kept variant, and the
    split keeps the weights of the kept variants (no split when none of them is left)."""
    names = [v.name for v in config.variants]
    for name in only:
        if name not in names:
            raise ValueError(f"--variant: {name!r} is not among the config's variants {names}")
    config.variants = [v for v in config.variants if v.name in only]
    if config.default_variant not in only:
        config.default_variant = config.variants[0].name
    if config.ab_split is not None:
        kept = {name: w for name, w in config.ab_split.items() if name in only}
        config.ab_split = kept if sum(kept.values()) > 0 else None


def apply_boot_env(config: AppConfig, environ: Mapping[str, str] = os.environ) -> None:
    """MRT_CKPT_REPO / MRT_CKPT_STEP / MRT_SIZE choose the default variant's boot model
    (the prototype's way to boot a finetune); a later /model/select overrides them."""
    repo, step, size = (environ.get(k, "").strip()
                        for k in ("MRT_CKPT_REPO", "MRT_CKPT_STEP", "MRT_SIZE"))
    if not (repo or step or size):
        return
    target = next(v for v in config.variants if v.name == config.default_variant)
    if repo:
        target.repo = repo
    if step:
        if not step.isdigit():
            raise ValueError(f"MRT_CKPT_STEP: a checkpoint step number, got {step!r}")
        target.step = int(step)
    if size:
        target.variant = variant_for_size(size)
    log.info("boot model of %s from the environment: size %s, repo %s, step %s",
             target.name, target.model_variant, target.repo, target.step)


def read_config_file(path: str | os.PathLike, app: str | None = None) -> tuple[dict, dict]:
    """(the application's `args:`, the file's `http_options:`) of a Serve config file,
    for running it without `serve run`; `app` names the application when there are
    several (default: the first)."""
    import yaml

    file = pathlib.Path(path)
    try:
        document = yaml.safe_load(file.read_text())
    except OSError as e:
        raise ValueError(f"config: cannot read {file}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config: {file} is not valid YAML ({e})") from None
    apps = (document or {}).get("applications") if isinstance(document, dict) else None
    if not apps or not isinstance(apps, list):
        raise ValueError(f"config: {file} lists no `applications:`")
    names = [a.get("name") for a in apps]
    chosen = apps[0] if app is None else next((a for a in apps if a.get("name") == app), None)
    if chosen is None:
        raise ValueError(f"app: {app!r} is not among the config's applications {names}")
    return dict(chosen.get("args") or {}), dict(document.get("http_options") or {})
