"""The model selection store of a Ray cluster: Ray's internal key-value store (in the GCS).

It outlives any replica, so a generator replica that restarts, or one that
autoscaling adds, serves the model last selected rather than the boot default.
Keys are namespaced by Serve application and generator name.
"""

from __future__ import annotations

from ray.experimental import internal_kv

from serve_app.selection import SelectionRecord

NAMESPACE = "mrt_serve_model_selection"


class RayKVSelectionStore:
    def __init__(self, app_name: str) -> None:
        self.app_name = app_name

    def _key(self, name: str) -> bytes:
        return f"{self.app_name}/{name}".encode()

    def get(self, name: str) -> SelectionRecord | None:
        value = internal_kv._internal_kv_get(self._key(name), namespace=NAMESPACE)
        return None if value is None else SelectionRecord.from_json(value.decode())

    def put(self, name: str, record: SelectionRecord) -> None:
        internal_kv._internal_kv_put(self._key(name), record.to_json().encode(),
                                     overwrite=True, namespace=NAMESPACE)
