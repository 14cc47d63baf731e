"""Ray's internal key-value store (in the GCS), as text by key, namespaced per Serve app.

It outlives any replica and every replica of the cluster reads the same values:
the model selection (`selection_store.py`) and renders' progress
(`serve_app/progress.py`) are kept here. Every call is a round trip to the GCS;
callers on an event loop run it in a thread.
"""

from __future__ import annotations

from ray.experimental import internal_kv


class RayKV:
    def __init__(self, namespace: str, app_name: str) -> None:
        self.namespace = namespace
        self.app_name = app_name

    def _key(self, key: str) -> bytes:
        return f"{self.app_name}/{key}".encode()

    def get(self, key: str) -> str | None:
        value = internal_kv._internal_kv_get(self._key(key), namespace=self.namespace)
        return None if value is None else value.decode()

    def put(self, key: str, value: str) -> None:
        internal_kv._internal_kv_put(self._key(key), value.encode(), overwrite=True,
                                     namespace=self.namespace)

    def delete(self, key: str) -> None:
        internal_kv._internal_kv_del(self._key(key), namespace=self.namespace)

    def keys(self) -> list[str]:
        """This app's keys in the namespace."""
        prefix = self._key("")
        found = internal_kv._internal_kv_list(prefix, namespace=self.namespace) or []
        return [k[len(prefix):].decode() for k in found]
