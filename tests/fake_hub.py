"""A Hugging Face Hub endpoint on localhost serving a directory the suite made, so that the
real download path (huggingface_hub's HEAD and GET on `resolve` URLs, its cache) runs
without the internet. Only what `hf_hub_download` asks for: no listing API."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import pathlib
import threading
from collections.abc import Iterator

COMMIT = "0" * 40


def _handler(root: pathlib.Path) -> type[http.server.BaseHTTPRequestHandler]:
    class Hub(http.server.BaseHTTPRequestHandler):
        def _file(self) -> pathlib.Path | None:
            # /{owner}/{name}/resolve/{revision}/{path}
            parts = self.path.split("?")[0].lstrip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve" or ".." in parts:
                return None
            path = root.joinpath(*parts[4:])
            return path if path.is_file() else None

        def _headers(self) -> bytes | None:
            path = self._file()
            if path is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return data

        def do_HEAD(self) -> None:
            self._headers()

        def do_GET(self) -> None:
            data = self._headers()
            if data:
                self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    return Hub


@contextlib.contextmanager
def fake_hub(root: pathlib.Path) -> Iterator[str]:
    """Serves `root` as every repo; yields the endpoint URL (huggingface_hub's ENDPOINT)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
