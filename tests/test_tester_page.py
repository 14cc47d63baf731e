"""The /tester page in a real headless Chromium against the real Serve graph."""

from __future__ import annotations

import pytest

from .browser import open_page


@pytest.fixture
def page(serve_base, tmp_path):
    with open_page(f"{serve_base}/tester", tmp_path / "tester.png") as opened:
        yield opened


def stats(page) -> dict:
    return page.evaluate("window.mrtStats")


def test_tester_page_starts_a_jam_and_schedules_gapless_audio(page, tmp_path):
    page, errors = page
    page.wait_for_function("document.querySelector('#variant').options.length > 0")
    assert page.input_value("#variant") == "tiny"
    page.fill("#styles", "ambient, techno")
    page.select_option("#chunk", "0.16")
    page.click("#start")
    page.wait_for_function("window.mrtStats.chunksScheduled >= 25", timeout=120_000)
    s = stats(page)
    assert s["started"] and s["connected"] and s["audioState"] == "running"
    assert s["gaps"] == 0 and s["lastIndex"] == s["chunksScheduled"] - 1
    assert s["firstAudioMs"] is not None and s["bufferSeconds"] >= 0
    assert not s["errors"] and not errors
    assert "live" in page.text_content("#state")

    # A key on the keyboard is a held note: the update is heard in a later chunk.
    page.click('[data-pitch="64"]')
    page.wait_for_function("window.mrtStats.updateHeardMs !== null", timeout=60_000)
    assert "on" in page.get_attribute('[data-pitch="64"]', "class")
    # Sliders apply on change.
    page.fill("#temperature", "0.8")
    page.dispatch_event("#temperature", "change")
    page.wait_for_function("window.mrtStats.chunksScheduled >= 40", timeout=60_000)
    assert stats(page)["gaps"] == 0 and not stats(page)["errors"]
    page.screenshot(path=str(tmp_path / "tester-playing.png"))
    assert (tmp_path / "tester-playing.png").stat().st_size > 10_000
    page.click("#stop")
    page.wait_for_function("!window.mrtStats.connected", timeout=30_000)
    # closed after the server's `stopped`, not under chunks still on their way
    assert page.text_content("#log").rstrip().endswith("stopped")
    assert not stats(page)["errors"] and not errors
