"""A real browser: headless Chromium loads the UI, types a description, clicks Generate, sees the gallery."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

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
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine (.ci/run installs Debian's chromium)"
)
GALLERY_SHOWS_AN_IMAGE = "() => [...document.querySelectorAll('#gallery img')].some(img => img.naturalWidth > 0)"


@asynccontextmanager
async def ui_page(server: RunningServer, height: int) -> AsyncIterator[Any]:
    """The UI loaded in headless Chromium."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": height})
            await page.goto(f"http://127.0.0.1:{server.handle.ui_port}/", wait_until="domcontentloaded")
            yield page
        finally:
            await browser.close()


@needs_chromium
async def test_page_generates_and_shows_the_gallery(server: RunningServer, tmp_path: Path) -> None:
    async with ui_page(server, 1400) as page:
        await page.locator("#prompt textarea").fill("a knight with a red cape, full body")
        await page.locator("#generate").click()
        image = page.locator("#gallery img").first
        await image.wait_for(state="visible", timeout=60_000)
        await page.wait_for_function(GALLERY_SHOWS_AN_IMAGE, timeout=30_000)
        status = await page.locator("#status").inner_text()
        await page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)
    assert "Done: 1 image(s)" in status
    assert (tmp_path / "ui.png").stat().st_size > 10_000
    listed = (await server.client.get("/v1/generations")).json()["items"]
    assert listed[0]["request"]["prompt"] == "a knight with a red cape, full body"


@needs_chromium
async def test_inpainting_with_the_mask_brush_repaints_only_what_was_painted(
    server: RunningServer, tmp_path: Path
) -> None:
    import io

    import numpy as np
    from PIL import Image

    from tests.helpers import gradient_image

    init = gradient_image(64)
    init.save(tmp_path / "init.png")
    async with ui_page(server, 1600) as page:
        await page.locator("#prompt textarea").fill("a knight, new helmet")
        await page.get_by_text("Start from an image").click()
        editor = page.locator("#init-image")
        await editor.locator("input[type=file]").set_input_files(str(tmp_path / "init.png"))
        canvas = editor.locator("canvas").first
        await canvas.wait_for(state="visible")
        await page.wait_for_timeout(500)  # the picture settles on the canvas
        await editor.get_by_label("Brush", exact=True).click()
        box = await canvas.bounding_box()
        assert box is not None
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        await page.mouse.move(x - 20, y)
        await page.mouse.down()
        for step in range(1, 11):  # a short horizontal stroke through the middle
            await page.mouse.move(x - 20 + 4 * step, y, steps=2)
        await page.mouse.up()
        await page.locator("#generate").click()
        await page.wait_for_function(GALLERY_SHOWS_AN_IMAGE, timeout=60_000)
    task = (await server.client.get("/v1/generations")).json()["items"][0]
    request = task["request"]
    assert request["init_image"] and request["mask"], request  # the brush made a mask

    size = (request["width"], request["height"])  # the picture's, within the model's sides

    def upload(upload_id: str, mode: str) -> Image.Image:
        """An upload as the engine sees it: at the task's size."""
        with Image.open(next((tmp_path / "data").rglob(f"{upload_id}.png"))) as opened:
            return opened.convert(mode).resize(size, Image.Resampling.LANCZOS)

    # The editor sends its canvas (the picture at the canvas's size) and the brush's strokes as the mask.
    painted = np.asarray(upload(request["mask"], "L")) > 127
    init_pixels = np.asarray(upload(request["init_image"], "RGB"))
    assert 0 < painted.mean() < 0.9  # a stroke, not the whole picture
    response = await server.client.get(task["images"][0]["url"])
    with Image.open(io.BytesIO(response.content)) as result:
        pixels = np.asarray(result.convert("RGB"))
    assert pixels.shape[:2] == (size[1], size[0])
    assert (pixels[~painted] == init_pixels[~painted]).all()
    assert (pixels[painted] != init_pixels[painted]).any()


@needs_chromium
async def test_the_animate_tab_plays_a_characters_cycle(server: RunningServer) -> None:
    await server.client.post("/v1/characters", json={"name": "tumbler", "description": "an acrobat"})
    async with ui_page(server, 1400) as page:
        await page.get_by_role("tab", name="Animate").click()
        await page.locator("#animate-character").click()
        await page.get_by_role("option", name="tumbler").click()
        await page.get_by_label("1", exact=True).check()
        await page.get_by_label("jump").check()
        await page.locator("#animate").click()
        await page.wait_for_function(
            "() => [...document.querySelectorAll('#animation img')].some(img => img.naturalWidth > 0)", timeout=120_000
        )
        shown = page.locator("#animation img").first
        await shown.scroll_into_view_if_needed()
        # The page shows a playing animation: screenshots of it a moment apart show other frames.
        first = await shown.screenshot()
        plays = False
        for _ in range(20):
            await page.wait_for_timeout(60)
            if await shown.screenshot() != first:
                plays = True
                break
        status = await page.locator("#animate-status").inner_text()
    assert "Done: 6 image(s)" in status, status
    assert plays, "the animation's frames did not change"
    task = (await server.client.get("/v1/generations")).json()["items"][0]
    assert task["request"]["animation"]["action"] == "jump" and task["request"]["animation"]["directions"] == 1
