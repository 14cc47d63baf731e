"""A real headless Chromium (Debian's, installed by scripts/test) driven by Playwright."""

from __future__ import annotations

import contextlib
import pathlib
import shutil
from collections.abc import Iterator

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--autoplay-policy=no-user-gesture-required",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run", "--disable-quic",
]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Chromium is needed for this test: scripts/test installs Debian's chromium"
    return path


@contextlib.contextmanager
def open_page(url: str, screenshot: pathlib.Path) -> Iterator[tuple[object, list[str]]]:
    """The page at `url` and the uncaught script errors it raised; a full-page screenshot
    is left at `screenshot` for a failed test's post-mortem."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True,
                                    args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            yield page, errors
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
