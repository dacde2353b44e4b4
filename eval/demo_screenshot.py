"""Screenshot of the demo for the README: launch it, run a bundled example in headless Debian
chromium, save the page.

    python -m eval.demo_screenshot                # -> docs/demo.png

Playwright drives the system's `chromium` (Debian package; `make setup` installs it), not a
browser Playwright downloads: nothing here needs the network. The browser test uses the same
functions.
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run")
VIEWPORT = {"width": 1400, "height": 1000}
ANSWER_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_chromium(playwright):
    """Headless Debian chromium, background networking off."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=list(CHROMIUM_ARGS))


def run_example(page, url: str, example_label: str, *, compressor: str = "todre") -> dict[str, str]:
    """Open the demo, click a bundled example, ask, wait for the answer to finish.
    Returns the answer, the status line and the overlay image's source."""
    page.set_viewport_size(VIEWPORT)
    page.goto(url, wait_until="domcontentloaded")
    page.locator("#examples").get_by_text(example_label, exact=True).click()
    page.locator("#video video").wait_for(timeout=30_000)  # the example's clip is loaded
    compressor_input = page.locator("#compressor input")
    compressor_input.fill(compressor)
    compressor_input.press("Enter")
    page.locator("#ask").click()
    page.wait_for_function(
        "() => { const s = document.querySelector('#status textarea'); return s && /^(Done|Error)/.test(s.value); }",
        timeout=ANSWER_TIMEOUT_S * 1000)
    overlay = page.locator("#overlay img")
    overlay.wait_for(timeout=30_000)
    page.wait_for_function("() => { const i = document.querySelector('#overlay img'); return i && i.complete "
                           "&& i.naturalWidth > 0; }", timeout=30_000)
    return {"answer": page.locator("#answer textarea").input_value(),
            "status": page.locator("#status textarea").input_value(),
            "overlay_src": overlay.get_attribute("src") or ""}


def capture(out: Path, *, model: str = "vidsieve-tiny") -> dict[str, str]:
    """Launch the demo in-process, run the first bundled example, save a full-page screenshot."""
    from playwright.sync_api import sync_playwright

    from server.demo import bundled_examples, build_demo, launch_demo

    example = bundled_examples()[0]
    blocks = launch_demo(build_demo(model), port=free_port(), block=False)
    try:
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            try:
                page = browser.new_page()
                result = run_example(page, blocks.local_url, f"{example.video.stem}: {example.question}")
                out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(out), full_page=True)
            finally:
                browser.close()
    finally:
        blocks.close()
        blocks.handlers.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/demo.png"))
    parser.add_argument("--model", default="vidsieve-tiny")
    args = parser.parse_args()
    result = capture(args.out, model=args.model)
    print(f"{args.out}: {result['status']}")


if __name__ == "__main__":
    main()
