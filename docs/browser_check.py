"""Open the built site in a real headless Chromium and check what a reader sees.

For the landing page, every method page and the other pages of the site: MathJax has typeset every formula (no raw ``$...$`` and no
TeX command such as ``\\frac`` left in the page's text outside code), every ``<img>`` has loaded
(``naturalWidth > 0``), nothing was logged to the console as an error, no page script failed, no request
left 127.0.0.1 and none failed. A full-page screenshot of each page goes to ``docs/_build/screenshots/``.

Run it after building (``python docs/build.py``)::

    python docs/browser_check.py [--site docs/_build/html] [--chromium /usr/bin/chromium]

It needs the ``playwright`` package (``pip install -e ".[docs]"``) and a Chromium: Debian's ``chromium``
package (``apt-get install chromium``); ``playwright install`` is not needed. Exit status 0 when every page
passes, 1 otherwise (each failure printed), 2 when no Chromium or playwright is found.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import re
import shutil
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

DOCS = Path(__file__).resolve().parent
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# The text a reader sees, outside code: MathJax output keeps no TeX, code blocks may contain anything.
VISIBLE_TEXT_JS = """() => {
  const body = document.querySelector('article') || document.body;
  const clone = body.cloneNode(true);
  clone.querySelectorAll('pre, code, script, style, mjx-assistive-mml, .headerlink').forEach(e => e.remove());
  return clone.innerText;
}"""
IMAGES_JS = """() => Array.from(document.images).map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0}))"""
MATH_JS = """() => Array.from(document.querySelectorAll('.math')).map(e => e.querySelector('mjx-container') !== null)"""
RAW_TEX = re.compile(r"\\(frac|sqrt|alpha|Delta|operatorname|mathrm|sum|cdot|odot|top|begin|end|left|right)\b")
RAW_DOLLAR = re.compile(r"\$[^\s$][^$\n]{0,200}\$")


SKIP = {"genindex.html", "search.html", "py-modindex.html"}   # generated indexes, no content of ours


def pages(site: Path) -> list[Path]:
    """The landing page, every method page, then the other pages (reading order, design, command, API,
    glossary)."""
    others = sorted(p for p in site.glob("*.html") if p.name not in SKIP | {"index.html"})
    return [site / "index.html", *sorted((site / "methods").glob("*.html")), *others]


def serve(site: Path):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # one line per page is printed by the check instead
            pass

    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def check_page(browser, base: str, rel: str, shots: Path) -> list[str]:
    problems: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} ({r.failure})"))

    def outside(request):
        if urlparse(request.url).hostname not in ("127.0.0.1", None) and not request.url.startswith("data:"):
            problems.append(f"request leaves the machine: {request.url}")
    page.on("request", outside)
    page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
    page.goto(f"{base}/{rel}", wait_until="networkidle")
    has_mathjax = page.evaluate("() => typeof window.MathJax !== 'undefined'")
    if page.query_selector(".math") is not None:
        if not has_mathjax:
            problems.append("the page has math but MathJax did not load")
        else:
            page.evaluate("() => MathJax.startup.promise")
            page.wait_for_load_state("networkidle")
            missing = page.evaluate(MATH_JS).count(False)
            if missing:
                problems.append(f"{missing} formula(s) not typeset by MathJax")
    text = page.evaluate(VISIBLE_TEXT_JS)
    for pattern in (RAW_TEX, RAW_DOLLAR):
        for m in list(pattern.finditer(text))[:3]:
            problems.append(f"raw TeX in the page text: {text[max(0, m.start() - 30):m.end() + 30]!r}")
    for img in page.evaluate(IMAGES_JS):
        if not img["ok"]:
            problems.append(f"image not loaded: {img['src']}")
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / (rel.replace("/", "_").removesuffix(".html") + ".png")), full_page=True)
    page.close()
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--site", type=Path, default=DOCS / "_build" / "html")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--screenshots", type=Path, default=DOCS / "_build" / "screenshots")
    args = ap.parse_args(argv)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("browser check: playwright is not installed (pip install -e '.[docs]')", file=sys.stderr)
        return 2
    if not Path(args.chromium).is_file():
        print(f"browser check: no Chromium at {args.chromium} (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    if not (args.site / "index.html").is_file():
        print(f"browser check: no built site at {args.site} (python docs/build.py)", file=sys.stderr)
        return 2
    server = serve(args.site)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    failed = 0
    with sync_playwright() as p:
        # launch() gives the browser a fresh, empty profile of its own (a new user-data-dir each run)
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS, headless=True)
        try:
            for path in pages(args.site):
                rel = path.relative_to(args.site).as_posix()
                problems = check_page(browser, base, rel, args.screenshots)
                print(f"{'FAIL' if problems else 'ok  '} {rel}")
                for problem in problems:
                    print(f"     {problem}")
                failed += bool(problems)
        finally:
            browser.close()
            server.shutdown()
    total = len(pages(args.site))
    print(f"screenshots: {args.screenshots}")
    print(f"browser: {total - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
