"""Which weights a generator serves, and where that choice is kept.

A `ModelSelection` names a model variant (the architecture) and where its weights
come from. `POST /model/select` changes it on one replica; the replica writes it to
a `SelectionStore`, and every replica of that generator (a restarted one, or one
added by autoscaling) reads it at boot and while running, so the choice survives
the replica that made it. In Ray Serve the store is Ray's cluster key-value store
(deployments/selection_store.py); here, a directory of JSON files.

A stored choice is tied to the boot default it replaced: redeploying with a
different `repo`/`step` in the config means the operator changed their mind, and
the config wins.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
import tempfile
import time
from typing import Protocol

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class ModelSelection:
    variant: str  # model variant: tiny | mrt2_small | mrt2_base
    repo: str | None = None  # Hub id or local directory; None: the variant's default
    step: int | None = None  # finetune step (checkpoint_<step>.safetensors)
    revision: str | None = None
    assets_repo: str | None = None  # steering assets from another repo

    def describe(self) -> dict:
        return {"size": self.variant, "repo_id": self.repo, "step": self.step,
                "revision": self.revision, "assets_repo_id": self.assets_repo}

    def label(self) -> str:
        """One line for progress logs, e.g. "mrt2_base (google/magenta-realtime-2, step
        50000)": the fields that are set."""
        where = [f for f in (self.repo, self.step is not None and f"step {self.step}",
                             self.revision and f"revision {self.revision}",
                             self.assets_repo and f"assets from {self.assets_repo}") if f]
        return f"{self.variant} ({', '.join(where)})" if where else self.variant

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelSelection:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


@dataclasses.dataclass(frozen=True)
class SelectionRecord:
    """A stored choice: what was selected, the boot default it replaced, and a
    generation number that increases with every change (replicas follow newer ones)."""

    selection: ModelSelection
    boot: ModelSelection
    generation: int
    selected_at: float = dataclasses.field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps({"selection": self.selection.to_dict(), "boot": self.boot.to_dict(),
                           "generation": self.generation, "selected_at": self.selected_at})

    @classmethod
    def from_json(cls, text: str) -> SelectionRecord:
        data = json.loads(text)
        return cls(ModelSelection.from_dict(data["selection"]),
                   ModelSelection.from_dict(data["boot"]), int(data["generation"]),
                   float(data.get("selected_at", 0.0)))


class SelectionStore(Protocol):
    def get(self, name: str) -> SelectionRecord | None: ...
    def put(self, name: str, record: SelectionRecord) -> None: ...


def _key(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"selection key {name!r}: letters, digits, '_', '.', '-' only")
    return name


def stored_for_boot(store: SelectionStore | None, name: str,
                    boot: ModelSelection) -> SelectionRecord | None:
    """The selection stored for generator `name`, unless it replaced another boot default
    than `boot` (the config changed since: the config wins). An unreadable store is
    logged and treated as empty: it must not keep a replica from serving."""
    if store is None:
        return None
    try:
        record = store.get(name)
    except Exception as e:
        log.warning("generator %s: selection store unreadable (%s)", name, e)
        return None
    if record is None or record.boot != boot:
        return None
    return record


class FileSelectionStore:
    """One JSON file per generator in `directory`, replaced atomically."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = pathlib.Path(directory)

    def get(self, name: str) -> SelectionRecord | None:
        path = self.directory / f"{_key(name)}.json"
        try:
            return SelectionRecord.from_json(path.read_text())
        except FileNotFoundError:
            return None

    def put(self, name: str, record: SelectionRecord) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".partial")
        with os.fdopen(fd, "w") as f:
            f.write(record.to_json())
        os.replace(tmp, self.directory / f"{_key(name)}.json")
