"""Build the documentation site: ``python docs/build.py [--browser-check]``.

1. MathJax, which the site serves itself (no CDN), from the npm registry: ``npm ci --prefix docs`` when
   ``docs/node_modules/mathjax`` is missing (``docs/package.json`` and ``package-lock.json`` pin it).
2. Sphinx from scratch (``-E``), warnings as errors (``-W --keep-going``): every include, internal link,
   cross-reference and figure must resolve; a figure function that fails is an error. Output in
   ``docs/_build/html``.
3. With ``--browser-check``, ``docs/browser_check.py`` on the result (headless Chromium).

Examples and exercises run as doctests under pytest (``python -m pytest specs -q``), not here.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parent


def ensure_mathjax() -> None:
    if (DOCS / "node_modules" / "mathjax" / "es5" / "tex-chtml.js").is_file():
        return
    npm = shutil.which("npm")
    if npm is None:
        sys.exit("docs: MathJax is missing and npm is not installed; install Node.js/npm, then "
                 "`npm ci --prefix docs` (the site serves MathJax itself so that it works offline)")
    subprocess.run([npm, "ci", "--prefix", str(DOCS), "--no-audit", "--no-fund"], check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--browser-check", action="store_true", help="then open every page in headless Chromium")
    ap.add_argument("--out", type=Path, default=DOCS / "_build" / "html")
    args = ap.parse_args(argv)
    ensure_mathjax()
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(args.out)]
    rc = subprocess.run(cmd).returncode
    print(f"docs: sphinx exited {rc} after {time.perf_counter() - start:.1f} s; site in {args.out}")
    if rc or not args.browser_check:
        return rc
    return subprocess.run([sys.executable, str(DOCS / "browser_check.py"), "--site", str(args.out)]).returncode


if __name__ == "__main__":
    sys.exit(main())
