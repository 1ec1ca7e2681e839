"""The documentation site's sources, checked without building it: every spec has a page, every figure named
in a spec exists and draws, links to source files become API references, known docstring issues are let
through by name only. (The build itself, with -W, and the browser check run in .ci/run.)"""

import ast
import importlib.util
import logging
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
FIGURE = re.compile(r"^```\{peftmath-figure\}\s+(\S+)", re.M)


def _ext():
    spec = importlib.util.spec_from_file_location("peftmath_docs_ext", DOCS / "_ext" / "peftmath_docs.py")
    if importlib.util.find_spec("sphinx") is None:
        pytest.skip("sphinx is not installed (pip install -e '.[docs]')")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_spec_has_a_page_that_includes_it_and_the_page_is_in_the_contents():
    index = (DOCS / "index.md").read_text()
    for spec in sorted((ROOT / "specs").glob("*.md")):
        if spec.name == "README.md":      # the spec -> module map, for readers of the repository
            continue
        page = DOCS / "methods" / spec.name
        assert page.is_file(), f"{spec.name} has no docs/methods/{spec.name}"
        assert f"../../specs/{spec.name}" in page.read_text()
        assert f"methods/{spec.stem}\n" in index, f"docs/index.md does not list methods/{spec.stem}"


def test_every_figure_named_in_a_spec_is_a_function_of_docs_figures():
    named = {m.group(1) for spec in (ROOT / "specs").glob("*.md") for m in FIGURE.finditer(spec.read_text())}
    assert {"lora.bottleneck", "lora.spectrum", "dora.rescale", "oft.blocks"} <= named
    for name in sorted(named):
        module, func = name.split(".")
        tree = ast.parse((DOCS / "figures" / f"{module}.py").read_text())
        assert func in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, name


def test_every_figure_draws():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ext = _ext()
    named = {m.group(1) for spec in (ROOT / "specs").glob("*.md") for m in FIGURE.finditer(spec.read_text())}
    for name in sorted(named):
        fig = ext._figure_function(name)()
        assert fig.axes, name
        plt.close(fig)
    with pytest.raises(ValueError, match="docs/figures/lora.py has no nope"):
        ext._figure_function("lora.nope")


def test_source_links_become_module_references():
    ext = _ext()
    text = "see [`peftmath/methods/lora.py`](../peftmath/methods/lora.py) and [dora.md](dora.md)"
    assert ext._rewrite_source_links(text) == (
        "see {py:mod}`peftmath/methods/lora.py <peftmath.methods.lora>` and [dora.md](dora.md)")


def test_known_docstring_issues_pass_by_object_and_message_only():
    ext = _ext()
    flt = ext._KnownDocstringIssues({"peftmath.layers": "Malformed table"})

    def record(location, msg, level=logging.WARNING):
        r = logging.LogRecord("sphinx", level, "", 0, msg, (), None)
        r.location = location
        return r

    assert not flt.filter(record("/x/layers.py:docstring of peftmath.layers:12", "Malformed table."))
    assert flt.filter(record("/x/layers.py:docstring of peftmath.layers:12", "Unexpected indentation."))
    assert flt.filter(record("/x/layers.py:docstring of peftmath.layers.Layer:3", "Malformed table."))
    assert flt.filter(record("specs/lora.md:4", "Malformed table."))
    assert flt.seen == ["peftmath.layers: Malformed table"]
