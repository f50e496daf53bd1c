"""Screenshot of the dashboard for the README: launch the app on a model (+ state), run an example in chromium.

usage: python bench/screenshot.py --model /tmp/mars-real/qwen2-vl-qwen2.5-0.5b --state DIR --out assets/screenshot.png
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mars_viz.data.examples import example_by_name  # noqa: E402
from mars_viz.ui import create_app  # noqa: E402
from mars_viz.ui.app import launch_kwargs  # noqa: E402
from mars_viz.ui.session import open_session  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--state")
    ap.add_argument("--example", default="Solid colour + harmful request")
    ap.add_argument("--tab", default="Trust region")
    ap.add_argument("--out", default="assets/screenshot.png")
    ap.add_argument("--width", type=int, default=1500, help="viewport width in px")
    ap.add_argument("--prompt", help="another prompt than the example's (its media is kept)")
    args = ap.parse_args()
    session = open_session(args.model)
    if args.state:
        session.load_state(args.state)
    demo = create_app(session)
    demo.queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(prevent_thread_lock=True, **launch_kwargs(port=port))
    from playwright.sync_api import sync_playwright

    ex = example_by_name(args.example)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": args.width, "height": 1300})
        page.goto(f"http://127.0.0.1:{port}/")
        page.locator("#prompt textarea").fill(args.prompt or ex.prompt)
        upload = "#image" if ex.image else "#video"
        page.locator(f"{upload} input[type=file]").set_input_files(ex.path())
        page.locator(upload).get_by_text(Path(ex.path()).name).first.wait_for(timeout=30_000)
        page.locator("#run").click()
        done = re.compile(r"Unsteered: (answered|refused)")
        page.locator("#verdict").get_by_text(done).first.wait_for(timeout=900_000)
        page.get_by_role("tab", name=args.tab).click()
        page.locator("[role=tabpanel]:visible .js-plotly-plot").first.wait_for(state="attached", timeout=60_000)
        page.wait_for_timeout(1500)
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    demo.close()
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
