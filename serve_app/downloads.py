"""Progress of a Hub download as log lines, for `huggingface_hub`'s `tqdm_class`.

A model download takes minutes (mrt2_base's weights are gigabytes). huggingface_hub draws
a tqdm bar on `sys.stderr`, which in a Serve replica under scripts/serve is Serve's
redirect into the replica's log file (and a bar's carriage-return redraws make poor log
lines wherever they go). These lines go to the `mrt_serve.progress` logger
instead (serve_app/logs.py): one when a download starts, one every `EVERY_S` while it
runs, one when it ends.
"""

from __future__ import annotations

import io
import logging
import time

from tqdm import tqdm

from .logs import PROGRESS_LOGGER

progress = logging.getLogger(PROGRESS_LOGGER)
EVERY_S = 10.0


class DownloadProgress(tqdm):
    """A tqdm that logs instead of drawing. `name` and `source` say what is downloaded
    from where (huggingface_hub's own `desc` shortens long names)."""

    def __init__(self, *args, name: str = "", source: str = "", **kwargs) -> None:
        self._name = name or kwargs.get("desc") or "file"
        self._source = source
        self._logged_at: float | None = None
        self._ended = False
        kwargs["file"] = io.StringIO()  # tqdm's own drawing goes nowhere
        kwargs.setdefault("mininterval", 1.0)
        super().__init__(*args, **kwargs)

    def _size(self, n: float | None) -> str:
        return "unknown size" if n is None else self.format_sizeof(n, "B", 1000)

    def display(self, msg: str | None = None, pos: int | None = None) -> None:
        now = time.monotonic()
        if self._ended:
            return
        if self._logged_at is None:
            progress.info("downloading %s (%s)%s", self._name, self._size(self.total),
                          f" from {self._source}" if self._source else "")
        elif now - self._logged_at >= EVERY_S and self.total:
            progress.info("downloading %s: %s of %s (%.0f%%)", self._name, self._size(self.n),
                          self._size(self.total), 100.0 * self.n / self.total)
        else:
            return
        self._logged_at = now

    def close(self) -> None:
        if not self._ended and not self.disable and self._logged_at is not None:
            if self.total is None or self.n >= self.total:
                progress.info("downloaded %s (%s) in %.1f s", self._name, self._size(self.n),
                              self.format_dict["elapsed"])
            else:
                progress.info("download of %s stopped at %s of %s", self._name,
                              self._size(self.n), self._size(self.total))
        self._ended = True  # tqdm may close twice (close, then __del__)
        super().close()
