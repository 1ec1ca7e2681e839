"""Write one benchmark's section of benchmarks/RESULTS.md (between its own markers), keeping the others."""

from __future__ import annotations

import platform
import re
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# Benchmark results\n\nEach section is written by the script named in it; ratios are measured side by side in one run.\n"


def machine_line() -> str:
    import numpy
    import os

    parts = [f"{platform.machine()}", f"{os.cpu_count()} cores", f"Python {platform.python_version()}",
             f"NumPy {numpy.__version__}"]
    try:
        import scipy

        parts.append(f"SciPy {scipy.__version__}")
    except ImportError:
        pass
    try:
        import torch

        parts.append(f"torch {torch.__version__}")
    except ImportError:
        pass
    try:
        import peft

        parts.append(f"peft {peft.__version__}")
    except ImportError:
        pass
    return ", ".join(parts)


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section ``name`` of RESULTS.md with ``body`` (Markdown)."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
