"""A real browser: headless Chromium loads the UI, types a description, clicks Generate, sees the gallery."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import RunningServer

pytestmark = [pytest.mark.anyio, pytest.mark.adapters]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Chromium's own network chatter is refused on a closed network; these flags keep it quiet.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (.ci/run installs Debian's chromium)")
async def test_page_generates_and_shows_the_gallery(server: RunningServer, tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 1400})
            await page.goto(f"http://127.0.0.1:{server.handle.ui_port}/", wait_until="domcontentloaded")
            await page.locator("#prompt textarea").fill("a knight with a red cape, full body")
            await page.locator("#generate").click()
            image = page.locator("#gallery img").first
            await image.wait_for(state="visible", timeout=60_000)
            await page.wait_for_function(
                "() => [...document.querySelectorAll('#gallery img')].some(img => img.naturalWidth > 0)",
                timeout=30_000,
            )
            status = await page.locator("#status").inner_text()
            await page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)
        finally:
            await browser.close()
    assert "Done: 1 image(s)" in status
    assert (tmp_path / "ui.png").stat().st_size > 10_000
    listed = (await server.client.get("/v1/generations")).json()["items"]
    assert listed[0]["request"]["prompt"] == "a knight with a red cape, full body"
