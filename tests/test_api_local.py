"""The API factory without Ray: our FastAPI app over an in-process GeneratorCore.

Keys and limits are settings of one app instance, so these run in-process (the
same create_app the Ingress deployment builds), against the real tiny model.
"""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient

from serve_app.api.app import create_app
from serve_app.api.settings import ApiSettings
from serve_app.config import load_app_config
from serve_app.generator import GeneratorCore
from serve_app.styles.service import StyleService

from .generator_cores import wait_until_ready


@pytest.fixture(scope="module")
def core(tiny):
    """Ready before any test uses it: each test of this module may run alone."""
    core = GeneratorCore("tiny", loaded=tiny, max_sessions=2, buckets=(1, 2))
    wait_until_ready(core)
    yield core
    core.shutdown()


def client(core, tiny, **settings) -> TestClient:
    app = create_app({"tiny": core}, StyleService(tiny.style), ApiSettings(**settings))
    return TestClient(app)


def test_keys_are_required_on_every_route_when_configured(core, tiny):
    with client(core, tiny, api_keys=["k1"], admin_keys=["root"]) as http:
        for method, path in [("get", "/"), ("get", "/ping"), ("get", "/health"),
                             ("get", "/docs"), ("post", "/jam/stop_all")]:
            r = getattr(http, method)(path)
            assert r.status_code == 401, path
            assert "api key: missing or not valid" in r.json()["error"]
        assert http.get("/ping", headers={"X-API-Key": "wrong"}).status_code == 401
        assert http.get("/ping", headers={"X-API-Key": "k1"}).status_code == 200
        assert http.get("/ping", headers={"Authorization": "Bearer k1"}).status_code == 200
        assert http.get("/ping?api_key=k1").status_code == 200
        assert http.get("/ping", headers={"X-API-Key": "root"}).status_code == 200
        r = http.post("/jam/start", data={"styles": "x"}, headers={"X-API-Key": "k1"})
        assert r.status_code == 200
        sid = r.json()["session_id"]
        assert http.post("/jam/stop", json={"session_id": sid},
                         headers={"X-API-Key": "k1"}).status_code == 200
    # a key with a character outside ASCII is a key like any other (it was a 500: the
    # header could not be decoded, or compare_digest refused the text)
    with client(core, tiny, api_keys=["clé"]) as http:
        for headers, params, status in [
            ({"X-API-Key": "clé".encode()}, {}, 200),
            ({"Authorization": "Bearer clé".encode()}, {}, 200),
            ({}, {"api_key": "clé"}, 200),
            ({"X-API-Key": b"\xff\xfe"}, {}, 401),
            ({"Authorization": b"Bearer \xe9"}, {}, 401),
            ({}, {"api_key": "cle\u0301"}, 401),
        ]:
            r = http.get("/ping", headers=headers, params=params)
            assert r.status_code == status, (headers, params, r.text)
        with http.websocket_connect("/ws/jam?api_key=cl%C3%A9") as ws:
            ws.send_json({"type": "ping"})
            assert ws.receive_json()["type"] == "pong"


def test_model_writes_need_an_admin_key(core, tiny):
    with client(core, tiny, api_keys=["k1"], admin_keys=["root"]) as http:
        r = http.post("/model/select", json={"dry_run": True}, headers={"X-API-Key": "k1"})
        assert r.status_code == 403 and "admin key" in r.json()["error"]
        r = http.post("/model/select", json={"dry_run": True}, headers={"X-API-Key": "root"})
        assert r.status_code == 200 and r.json()["dry_run"] is True
        # reads are not admin-only
        assert http.get("/model/status", headers={"X-API-Key": "k1"}).status_code == 200


def test_only_an_admin_key_may_name_a_directory_of_the_servers_disk(core, tiny, tiny_repo):
    """With keys configured, a user key's repo_id is always a Hub id: an existing local
    directory answers exactly as a missing one does, so the disk cannot be probed."""
    params = {"repo_id": str(tiny_repo)}
    with client(core, tiny, api_keys=["k1"], admin_keys=["root"]) as http:
        admin = http.get("/model/checkpoints", params=params, headers={"X-API-Key": "root"})
        assert admin.status_code == 200 and admin.json()["base_checkpoints"] == ["tiny"]
        user = http.get("/model/checkpoints", params=params, headers={"X-API-Key": "k1"})
        missing = http.get("/model/checkpoints", params={"repo_id": str(tiny_repo / "nope")},
                           headers={"X-API-Key": "k1"})
        assert user.status_code == missing.status_code and user.status_code in (400, 503)
        assert user.json()["error"].startswith("repo_id:") and "Hub repo" in user.json()["error"]
        assert "Hub repo" in missing.json()["error"]


def test_no_keys_means_open_local_access(core, tiny):
    with client(core, tiny) as http:
        assert http.get("/ping").status_code == 200


def test_cors_lets_the_configured_origins_call_with_a_key(core, tiny):
    """A page on an allowed origin: its preflight is answered without a key (a browser
    sends none), and a refusal carries the CORS headers, so the page can read why. A page
    on another origin gets none; with no origins configured, nothing changes."""
    app = "https://app.example.com"
    preflight = {"Origin": app, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "x-api-key"}
    with client(core, tiny, api_keys=["k1"], cors_origins=[app]) as http:
        r = http.options("/jam/start", headers=preflight)
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == app
        assert "x-api-key" in r.headers["access-control-allow-headers"].lower()
        refused = http.get("/health", headers={"Origin": app})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == app
        r = http.get("/health", headers={"Origin": app, "X-API-Key": "k1"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == app
        other = http.options("/jam/start", headers={**preflight, "Origin": "https://evil.example"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        # refused, it says why as every error does (Starlette: "Disallowed CORS origin")
        assert other.json()["error"] == ("origin: https://evil.example is not in "
                                         "api.cors_origins (MRT_CORS_ORIGINS)"), other.text
        odd = http.options("/jam/start", headers={**preflight, "Origin": "https://evil.example",
                                                   "Access-Control-Request-Method": "JAM"})
        assert odd.json()["error"].endswith(
            "; access-control-request-method: JAM is not an HTTP method"), odd.text
    with client(core, tiny) as http:
        r = http.get("/health", headers={"Origin": app})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_with_origins_set_another_site_may_not_change_state(core, tiny):
    """CORS hides answers, not requests: a page on any site may POST a form (no preflight).
    With origins configured, a browser's request that changes state comes only from them
    or the server's own pages; reading, and clients that send no Origin, are untouched."""
    app, evil = "https://app.example.com", "https://evil.example"
    with client(core, tiny, cors_origins=[app]) as http:
        r = http.post("/jam/stop_all", headers={"Origin": evil})
        assert r.status_code == 403 and r.json()["error"] == (
            "origin: https://evil.example may not send POST requests here "
            "(not in api.cors_origins)"), r.text
        assert "access-control-allow-origin" not in r.headers
        r = http.post("/model/select", json={"dry_run": True}, headers={"Origin": "null"})
        assert r.status_code == 403 and r.json()["error"].startswith("origin: null "), r.text
        r = http.post("/jam/stop_all", headers={"Origin": "http://[::1"})  # was a 500
        assert r.status_code == 403 and r.json()["error"].startswith("origin: http://[::1 ")
        assert http.get("/health", headers={"Origin": evil}).status_code == 200
        for headers in ({"Origin": app}, {"Origin": "http://testserver"}, {}):
            r = http.post("/jam/stop_all", headers=headers)
            assert r.status_code == 200 and "stopped" in r.json(), (headers, r.text)
    with client(core, tiny, cors_origins=["*"]) as http:
        assert http.post("/jam/stop_all", headers={"Origin": evil}).status_code == 200


def test_a_server_without_keys_open_to_the_network_is_warned_of():
    """`mrt-serve local` prints this at start: no keys is meant for local use."""
    from serve_app.api.security import open_to_the_network

    for host in ("0.0.0.0", "192.168.1.20", "::", "lab-box"):
        assert "anyone who reaches this port" in open_to_the_network(host, ApiSettings())
        assert open_to_the_network(host, ApiSettings(api_keys=["k"])) is None
        assert open_to_the_network(host, ApiSettings(admin_keys=["root"])) is None
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert open_to_the_network(host, ApiSettings()) is None


def test_template_mode_reports_and_refuses_generation(core, tiny):
    with client(core, tiny, space_mode="template") as http:
        assert http.get("/health").json()["status"] == "template"
        r = http.post("/jam/start", data={"styles": "x"})
        assert r.status_code == 503 and "template mode" in r.json()["error"]


def test_settings_read_keys_and_mode_from_the_environment(monkeypatch):
    monkeypatch.setenv("MRT_API_KEYS", "a, b")
    monkeypatch.setenv("MRT_ADMIN_KEYS", "z")
    monkeypatch.setenv("SPACE_MODE", "Template")
    monkeypatch.setenv("MRT_CORS_ORIGINS", "https://a.example, http://localhost:5173")
    s = ApiSettings.from_config({"max_styles": 3})
    assert s.api_keys == ["a", "b"] and s.admin_keys == ["z"]
    assert s.template_mode and s.max_styles == 3
    assert s.cors_origins == ["https://a.example", "http://localhost:5173"]
    monkeypatch.setenv("MRT_CORS_ORIGINS", "https://a.example/app")  # a path never matches
    with pytest.raises(ValueError, match=r"MRT_CORS_ORIGINS: 'https://a.example/app' is not an "
                                         r"origin: scheme://host\[:port\] with no path"):
        ApiSettings.from_config({})
    monkeypatch.delenv("MRT_CORS_ORIGINS")
    with pytest.raises(ValueError, match=r"api.cors_origins.0: 'https://a.example/' is not an "
                                         r"origin"):  # the config's section, named so
        load_app_config({"variants": [{"name": "tiny"}],
                         "api": {"cors_origins": ["https://a.example/"]}}, {})
    # a mode it does not know was served as "auto" without a word
    monkeypatch.setenv("SPACE_MODE", "templat")
    with pytest.raises(ValueError, match=r"SPACE_MODE: must be one of \['serve', 'template', "
                                         r"'auto'\], got 'templat'"):
        ApiSettings.from_config({})


def test_a_stop_ends_a_waiting_next_chunk_quietly(core, tiny):
    """The WebSocket stream's next_chunk is often waiting when the client stops: it
    ends with None (no error logged for a normal stop); asking afresh still fails."""
    import asyncio

    from serve_app.errors import UnknownSession
    from serve_app.jam import StreamConfig
    from serve_app.jam_spec import JamSpec, StyleSpec

    async def scenario():
        spec = JamSpec(style=StyleSpec(), stream=StreamConfig(chunk_frames=50, pace="realtime"))
        sid = (await core.start(spec))["session_id"]
        assert await core.next_chunk(sid, timeout=60) is not None  # chunk 0 comes at once
        waiting = asyncio.create_task(core.next_chunk(sid, timeout=60))
        await asyncio.sleep(0.3)  # chunk 1 is paced ~1.8 s behind the wall clock
        assert not waiting.done()
        await core.stop(sid)
        assert await asyncio.wait_for(waiting, 10) is None
        with pytest.raises(UnknownSession):
            await core.next_chunk(sid, timeout=1)

    asyncio.run(scenario())


def test_a_websocket_loop_over_the_upload_limit_is_refused_by_name(core, tiny):
    """HTTP bodies are held to `max_upload_bytes` on the way in; a loop inside a WebSocket
    message is held to the same limit when it is read, and the socket goes on."""
    loop = base64.b64encode(b"\0" * 2000).decode()
    with client(core, tiny, max_upload_bytes=1000) as http, http.websocket_connect(
            "/ws/jam") as ws:
        ws.send_json({"type": "start", "mode": "bar", "params": {"loop_audio_b64": loop}})
        assert ws.receive_json() == {
            "type": "error", "error": "loop_audio_b64: 2000 bytes, larger than the limit of 1000"}
        ws.send_json({"type": "ping"})
        assert ws.receive_json()["type"] == "pong"


def test_what_the_framework_refuses_is_answered_with_the_field_and_the_reason(core, tiny):
    """Starlette and FastAPI answer some requests before a route runs; those answers were
    `{"detail": ...}` alone (no `error`, no field). `detail` stays for older clients."""
    deep = b"[" * 100_000  # json.loads raises RecursionError, which FastAPI called unparseable
    cases = [
        ("get", "/jam/nowhere", {}, 404,
         "path: /jam/nowhere is not a route of this server (see /docs)"),
        ("post", "/health", {}, 405, "method: POST is not allowed on /health (it takes GET)"),
        ("post", "/model/select", {"content": deep, "headers": {
            "Content-Type": "application/json"}}, 422, "body: not valid JSON (nested too deeply)"),
        ("post", "/jam/start", {"content": b"--x\r\nstyles", "headers": {
            "Content-Type": "multipart/form-data"}}, 400, "body: Missing boundary in multipart"),
    ]
    with client(core, tiny) as http:
        for method, path, kwargs, status, error in cases:
            r = getattr(http, method)(path, **kwargs)
            assert (r.status_code, r.json()["error"]) == (status, error), (path, r.text)
            assert "detail" in r.json()
        assert http.post("/health").headers["allow"] == "GET"
        assert http.get("/health").status_code == 200  # and the server goes on
