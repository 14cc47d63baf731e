"""The model selection store of a Ray cluster: Ray's internal key-value store.

It outlives any replica, so a generator replica that restarts, or one that
autoscaling adds, serves the model last selected rather than the boot default.
Keys are namespaced by Serve application and generator name.
"""

from __future__ import annotations

from serve_app.selection import SelectionRecord

from .kv import RayKV

NAMESPACE = "mrt_serve_model_selection"


class RayKVSelectionStore:
    def __init__(self, app_name: str) -> None:
        self.kv = RayKV(NAMESPACE, app_name)

    def get(self, name: str) -> SelectionRecord | None:
        value = self.kv.get(name)
        return None if value is None else SelectionRecord.from_json(value)

    def put(self, name: str, record: SelectionRecord) -> None:
        self.kv.put(name, record.to_json())
