"""Where a model's files come from: a Hugging Face repo or a local directory laid out like one.

Layout (that of `google/magenta-realtime-2`, which finetune repos follow):

    checkpoints/<variant>.safetensors        base weights of a variant
    checkpoint_<step>.safetensors            a finetune step (root or checkpoints/)
    resources/spectrostream/encoder.safetensors
    resources/musiccoca/*                    MusicCoCa TFLite models and spm.model
    mean_style_embed.npy, cluster_centroids.npy   finetune steering assets (optional)

Hub files go through `huggingface_hub`'s cache (resumable, HF_TOKEN and HF_HUB_OFFLINE
honoured), their progress logged as lines (serve_app/downloads.py). Nothing is unpickled:
`.npy` files load with `allow_pickle=False`, and every file name is checked to stay inside
its repo.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pathlib
import re

import numpy as np

from .downloads import DownloadProgress
from .styles import SteeringAssets

log = logging.getLogger(__name__)

DEFAULT_REPO = "google/magenta-realtime-2"
ENCODER_FILE = "resources/spectrostream/encoder.safetensors"
MUSICCOCA_DIR = "resources/musiccoca"
MUSICCOCA_FILES = (
    "spm.model",
    "text_encoder.tflite",
    "audio_preprocessor.tflite",
    "music_encoder.tflite",
    "pretrained_vector_quantizer.tflite",
)
MEAN_FILE = "mean_style_embed.npy"
CENTROIDS_FILE = "cluster_centroids.npy"
_STEP_FILE = re.compile(r"^(?:checkpoints/)?checkpoint_(\d+)\.safetensors$")
_V1_ARCHIVE = re.compile(r"checkpoint_(\d+)\.tgz$")


class CheckpointNotFound(FileNotFoundError):
    """A required model file is in neither the local directory nor the Hub/cache."""


class V1Checkpoint(ValueError):
    """The repo holds Magenta RT v1 (T5X `.tgz`) checkpoints, which this server cannot run."""


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """Resolved local paths of everything one model needs."""

    repo: str
    checkpoint: pathlib.Path
    step: int | None
    encoder: pathlib.Path | None
    musiccoca_dir: pathlib.Path | None
    steering: SteeringAssets


def is_local(repo: str) -> bool:
    return os.path.isdir(os.path.expanduser(repo))


# What `git check-ref-format` refuses in a branch or tag name (a commit id never has it):
# the Hub's revisions are those, so anything else cannot name one, and is better refused
# with its reason than stored as a selection every replica then fails to download.
_REF_PROBLEMS = (
    (re.compile(r"[\x00-\x20\x7f]"), "a space or control character"),
    (re.compile(r"[~^:?*\[\\]"), "one of ~ ^ : ? * [ \\"),
    (re.compile(r"\.\.|@\{|//"), "'..', '@{' or '//'"),
    (re.compile(r"(?:^|/)\.|^/"), "a part that starts with '.', or a '/' first"),
    (re.compile(r"/$|\.$|\.lock$"), "an end in '/', '.' or '.lock'"),
)


def check_revision(revision: str) -> str:
    """`revision` if it can be a Hub branch, tag or commit id; a ValueError saying why
    not."""
    if revision in ("", "@"):
        raise ValueError(f"{revision!r} is not a branch, tag or commit id")
    for pattern, what in _REF_PROBLEMS:
        if pattern.search(revision):
            raise ValueError(f"{revision!r} is not a branch, tag or commit id (it has {what})")
    return revision


def _safe_relative(name: str) -> str:
    path = pathlib.PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"file name {name!r} would leave the repository")
    return str(path)


class Repo:
    """Fetches files of one repo (local directory or Hub id) on demand. With
    `allow_local` False the name is always a Hub id: a caller who may not read the
    server's disk cannot even tell which directories exist."""

    def __init__(self, repo: str, *, revision: str | None = None,
                 allow_local: bool = True) -> None:
        self.repo = repo
        self.revision = revision
        local = allow_local and is_local(repo)
        self.local = pathlib.Path(os.path.expanduser(repo)) if local else None
        if allow_local and not local and repo.startswith(("/", "~", ".")):
            # no Hub id starts so: say what is wrong, not the Hub's word on a bad id
            raise CheckpointNotFound(f"no such local directory: {os.path.expanduser(repo)}")
        if local and revision is not None:
            # a revision the directory cannot have would otherwise be ignored, and stored
            raise CheckpointNotFound(f"{self.local} is a local directory, which has no "
                                     f"revision {revision!r} (only a Hub repo has)")

    def where(self) -> str:
        if self.local is not None:
            return f"local directory {self.local}"
        from huggingface_hub import constants

        return f"Hub repo {self.repo!r} (cache {constants.HF_HUB_CACHE})"

    def fetch(self, name: str) -> pathlib.Path | None:
        """The local path of `name`, downloading it if needed; None if it does not exist."""
        name = _safe_relative(name)
        if self.local is not None:
            path = self.local / name
            return path if path.is_file() else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        bar = functools.partial(DownloadProgress, name=name, source=self.where())
        try:
            return pathlib.Path(
                hf_hub_download(self.repo, name, revision=self.revision, tqdm_class=bar)
            )
        except LocalEntryNotFoundError as e:  # offline and not cached (an EntryNotFound too)
            raise CheckpointNotFound(
                f"{name} is not in the local cache and the Hub cannot be reached "
                f"({self.where()}): {e}"
            ) from e
        except EntryNotFoundError:
            return None
        except Exception as e:  # RepositoryNotFound, gated repo, HTTP errors
            raise CheckpointNotFound(f"could not fetch {name} from {self.where()}: {e}") from e

    def require(self, names: list[str], what: str) -> pathlib.Path:
        for name in names:
            path = self.fetch(name)
            if path is not None:
                return path
        raise CheckpointNotFound(f"{what}: none of {names} found in {self.where()}")

    def list_files(self) -> list[str]:
        """The repo's files; for a local directory only where the Hub layout puts the
        files we read (its top level, `checkpoints/`, the known resources), so that
        naming a big directory costs two directory reads, not a walk of the disk."""
        if self.local is not None:
            return _layout_files(self.local)
        from huggingface_hub import list_repo_files

        try:
            return sorted(list_repo_files(self.repo, revision=self.revision))
        except Exception as e:
            raise CheckpointNotFound(f"could not list {self.where()}: {e}") from e


def _layout_files(root: pathlib.Path) -> list[str]:
    def files_in(folder: pathlib.Path) -> list[str]:
        if not folder.is_dir():
            return []
        return [str(p.relative_to(root)) for p in folder.iterdir() if p.is_file()]

    resources = [ENCODER_FILE, *(f"{MUSICCOCA_DIR}/{name}" for name in MUSICCOCA_FILES)]
    return sorted(files_in(root) + files_in(root / "checkpoints")
                  + [f for f in resources if (root / f).is_file()])


def list_steps(files: list[str]) -> list[int]:
    return sorted({int(m.group(1)) for f in files if (m := _STEP_FILE.match(f))})


def v1_steps(files: list[str]) -> list[int]:
    return sorted({int(m.group(1)) for f in files if (m := _V1_ARCHIVE.search(f))})


def list_checkpoints(repo: str, *, revision: str | None = None,
                     allow_local: bool = True) -> dict:
    """What a repo offers: finetune steps, the latest, base variant files, steering assets,
    and any MRT v1 archives (listed so a client can tell why they are not offered)."""
    files = Repo(repo, revision=revision, allow_local=allow_local).list_files()
    steps = list_steps(files)
    bases = sorted(pathlib.PurePosixPath(f).stem for f in files
                   if f.startswith("checkpoints/") and f.endswith(".safetensors")
                   and not _STEP_FILE.match(f))
    return {
        "repo_id": repo, "revision": revision, "steps": steps,
        "latest": steps[-1] if steps else None, "base_checkpoints": bases,
        "steering_assets": {"mean": MEAN_FILE in files, "centroids": CENTROIDS_FILE in files},
        "v1_archives": v1_steps(files),
    }


def refuse_v1(repo: str, files: list[str], step: int | None) -> None:
    """Raises V1Checkpoint when `step` (or, with no step, the whole repo) is only
    available as an MRT v1 T5X archive."""
    old = v1_steps(files)
    if not old:
        return
    wanted_v1 = step in old if step is not None else not list_steps(files) and not any(
        f.endswith(".safetensors") for f in files)
    if wanted_v1:
        which = f"checkpoint_{step}.tgz" if step is not None else "checkpoint_<step>.tgz files"
        raise V1Checkpoint(
            f"ckpt_repo: {repo} holds {which}, a Magenta RT v1 (T5X) checkpoint. This server "
            "runs Magenta RT 2, whose weights are safetensors (checkpoint_<step>.safetensors "
            "for finetune steps); finetune the MRT2 model and upload its safetensors"
        )


def checkpoint_candidates(variant_file: str, step: int | None) -> list[str]:
    if step is None:
        return [variant_file, pathlib.PurePosixPath(variant_file).name]
    return [f"checkpoint_{step}.safetensors", f"checkpoints/checkpoint_{step}.safetensors"]


def _load_npy(path: pathlib.Path | None) -> np.ndarray | None:
    if path is None:
        return None
    return np.load(path, allow_pickle=False).astype(np.float32)


def load_steering(source: Repo) -> SteeringAssets:
    """A finetune's steering assets (either may be absent); never unpickled."""
    return SteeringAssets(mean=_load_npy(source.fetch(MEAN_FILE)),
                          centroids=_load_npy(source.fetch(CENTROIDS_FILE)))


def find_checkpoint(source: Repo, variant_file: str, step: int | None) -> pathlib.Path:
    """The weights file of a base variant (no step) or a finetune step, or why not."""
    try:
        return source.require(
            checkpoint_candidates(variant_file, step),
            f"checkpoint{'' if step is None else f' step {step}'}",
        )
    except CheckpointNotFound:
        try:
            files = source.list_files()
        except CheckpointNotFound:  # cannot list either: the first error says it best
            files = []
        refuse_v1(source.repo, files, step)  # say so, if it is an MRT v1 repo
        raise


def _first(repos: list[Repo], name: str) -> pathlib.Path | None:
    for repo in repos:
        path = repo.fetch(name)
        if path is not None:
            return path
    return None


def resolve(
    repo: str,
    variant_file: str,
    *,
    step: int | None = None,
    revision: str | None = None,
    need_musiccoca: bool = True,
    assets_repo: str | None = None,
    base_repo: str | None = DEFAULT_REPO,
    checkpoint: pathlib.Path | None = None,
) -> ModelFiles:
    """Finds (downloading where needed) every file a model needs, or says what is missing.
    A `checkpoint` already found (by `find_checkpoint`) is not looked up again."""
    source = Repo(repo, revision=revision)
    checkpoint = checkpoint or find_checkpoint(source, variant_file, step)
    # Finetune repos usually hold only weights and steering assets; the codec encoder
    # and MusicCoCa then come from the base repo.
    resources = [source] if base_repo in (None, repo) else [source, Repo(base_repo)]
    encoder = _first(resources, ENCODER_FILE)
    musiccoca_dir = None
    if need_musiccoca:
        for holder in resources:
            paths = [holder.fetch(f"{MUSICCOCA_DIR}/{f}") for f in MUSICCOCA_FILES]
            if all(paths):
                musiccoca_dir = paths[0].parent
                break
        else:
            raise CheckpointNotFound(f"MusicCoCa: {MUSICCOCA_DIR}/ is incomplete in "
                                     f"{' and '.join(r.where() for r in resources)}")
    steering = load_steering(Repo(assets_repo) if assets_repo else source)
    log.info("model files from %s: %s", source.where(), checkpoint.name)
    return ModelFiles(repo, checkpoint, step, encoder, musiccoca_dir, steering)
