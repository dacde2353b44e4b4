"""The demo in a real browser: Debian's chromium, headless, driven by Playwright."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gradio", reason="the demo extra is not installed (pip install vidsieve[demo])")
pytest.importorskip("playwright", reason="playwright is not installed (pip install vidsieve[dev])")

from eval.demo_screenshot import CHROMIUM, launch_chromium, run_example  # noqa: E402
from streaming import open_video  # noqa: E402
from vlm.model import VLM  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"Debian chromium is not installed ({CHROMIUM} is missing; "
                       "`make setup` installs it with apt-get install chromium where apt is available)"),
]


def test_browser_runs_an_example_and_shows_the_streamed_answer_and_the_overlay(demo_url, tmp_path, talkative_example):
    from playwright.sync_api import sync_playwright

    example = talkative_example  # VideoScan makes the model say words here, so the answer text is visible
    model = VLM.from_pretrained("vidsieve-tiny")
    frames = open_video(example.video, num_frames=model.config.num_frames).read_all()
    expected = model.answer(np.stack([f.rgb for f in frames]), [f.timestamp_s for f in frames], example.question,
                            "videoscan").text

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page()
            shown = run_example(page, demo_url, f"{example.video.stem}: {example.question}", compressor="videoscan")
            screenshot = tmp_path / "demo.png"
            page.screenshot(path=str(screenshot), full_page=True)
            stats = page.locator("#stats").inner_text()
        finally:
            browser.close()

    assert shown["status"].startswith("Done."), shown["status"]
    assert shown["answer"] == expected and expected
    assert shown["overlay_src"]
    assert "videoscan" in stats and "256 -> 16" in stats
    assert screenshot.stat().st_size > 10_000
