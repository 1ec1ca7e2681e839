"""Sphinx extension for peftmath's documentation site.

* ``peftmath-figure``: a figure drawn at build time by a function in ``docs/figures/`` from peftmath's own
  code (``{peftmath-figure} lora.spectrum``). A function that fails, or a missing matplotlib, is a build error.
* ``peftmath-cli``: the command's reference, generated from :func:`peftmath.cli.build_parser` (one section
  per sub-command with its ``--help`` text), so it cannot drift from the parser.
* ``>>>`` blocks fenced as ``python`` are highlighted as ``pycon`` (interactive sessions with tracebacks).
* Links in the included specs to source files (``../peftmath/methods/lora.py``) become references to the
  module's API page.
* MathJax is served from the built site (``docs/node_modules/mathjax``, ``npm ci --prefix docs``), never from
  a CDN: the site renders its math offline.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.parsers.rst.directives.images import Figure
from sphinx.application import Sphinx
from sphinx.errors import ConfigError as SphinxConfigError
from sphinx.util.docutils import SphinxDirective

DOCS = Path(__file__).resolve().parent.parent
FIGURES = DOCS / "figures"
GENERATED = DOCS / "_generated"
MATHJAX_SRC = DOCS / "node_modules" / "mathjax" / "es5"
# what the tex-chtml component loads at run time (fonts, TeX extensions on demand, the menu); not the
# speech engine (sre), which is only fetched when a reader turns speech on
MATHJAX_PARTS = ["tex-chtml.js", "input", "output", "a11y", "ui", "adaptors"]


# --- figures -----------------------------------------------------------------------------------------
def _figure_function(spec: str):
    module_name, _, func_name = spec.partition(".")
    path = FIGURES / f"{module_name}.py"
    if not func_name or not path.is_file():
        raise ValueError(f"peftmath-figure {spec!r}: expected MODULE.FUNCTION with docs/figures/MODULE.py")
    key = f"_peftmath_docs_figures_{module_name}"
    mod = sys.modules.get(key)
    if mod is None:
        loaded = importlib.util.spec_from_file_location(key, path)
        mod = importlib.util.module_from_spec(loaded)
        sys.modules[key] = mod
        loaded.loader.exec_module(mod)
    try:
        return getattr(mod, func_name)
    except AttributeError:
        raise ValueError(f"peftmath-figure {spec!r}: docs/figures/{module_name}.py has no {func_name}()") from None


class PeftmathFigure(SphinxDirective):
    """``{peftmath-figure} MODULE.FUNCTION``: call ``docs/figures/MODULE.py:FUNCTION()`` (it returns a
    matplotlib Figure), save it as PNG and insert it as a figure; the directive's content is the caption."""

    required_arguments = 1
    has_content = True
    option_spec = {"alt": directives.unchanged, "width": directives.unchanged}

    def run(self):
        spec = self.arguments[0]
        out = GENERATED / "figures" / f"{spec}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig = _figure_function(spec)()
            fig.savefig(out, dpi=110, bbox_inches="tight")
            plt.close(fig)
        except Exception as exc:  # the build must fail: report it as an error at this line
            return [self.state.document.reporter.error(
                f"figure {spec} failed: {type(exc).__name__}: {exc}", line=self.lineno)]
        figure = Figure(self.name, ["/_generated/figures/" + out.name],
                        {"alt": self.options.get("alt", spec), "width": self.options.get("width", "100%")},
                        self.content, self.lineno, self.content_offset, self.block_text, self.state,
                        self.state_machine)
        return figure.run()


# --- the command's reference ------------------------------------------------------------------------
class PeftmathCli(SphinxDirective):
    """``{peftmath-cli}``: one section per sub-command of ``peftmath``, with its help text."""

    has_content = False

    def run(self):
        import argparse
        import os

        from peftmath.cli import build_parser

        saved = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = "100"    # argparse wraps to the terminal: fix the width, the page is the same
        try:
            return self._sections(build_parser(), argparse)
        finally:
            if saved is None:
                os.environ.pop("COLUMNS", None)
            else:
                os.environ["COLUMNS"] = saved

    def _sections(self, parser, argparse):
        result = []
        top = nodes.section(ids=["command-peftmath"], names=["peftmath"])
        top += nodes.title(text="peftmath")
        top += nodes.literal_block(text=parser.format_help(), language="none")
        result.append(top)
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for action in subs:
            for name, sub in action.choices.items():
                sec = nodes.section(ids=[f"command-{name}"], names=[f"peftmath {name}"])
                sec += nodes.title(text=f"peftmath {name}")
                sec += nodes.literal_block(text=sub.format_help(), language="none")
                result.append(sec)
        return result


# --- the API reference: every public module, found, not listed ----------------------------------------
class PeftmathAutomodules(SphinxDirective):
    """``{peftmath-automodules} PACKAGE``: an ``automodule`` for every public module of ``PACKAGE`` (names
    without a leading underscore; ``:exclude: a b`` leaves some out), so a new module is documented
    without editing the page."""

    required_arguments = 1
    option_spec = {"exclude": directives.unchanged}

    def run(self):
        import importlib
        import pkgutil

        from docutils.statemachine import StringList

        package = importlib.import_module(self.arguments[0])
        exclude = set((self.options.get("exclude") or "").split())
        names = sorted(m.name for m in pkgutil.iter_modules(package.__path__)
                       if not m.name.startswith("_") and m.name not in exclude)
        # the page is MyST: nested content is Markdown, and autodoc's output is reStructuredText, so the
        # automodule directives go into one eval-rst block
        lines = StringList()
        for line in ["```{eval-rst}", *(f".. automodule:: {package.__name__}.{name}" for name in names), "```"]:
            lines.append(line, "<peftmath-automodules>")
        container = nodes.container()
        self.state.nested_parse(lines, self.content_offset, container)
        return container.children


# --- small rewrites ------------------------------------------------------------------------------------
_SOURCE_LINK = re.compile(r"\[`?([^\]`]+?)`?\]\(\.\./(peftmath/[\w/]+)\.py\)")


def _rewrite_source_links(text: str) -> str:
    """``[`peftmath/methods/lora.py`](../peftmath/methods/lora.py)`` -> a reference to the module's API."""
    return _SOURCE_LINK.sub(lambda m: "{py:mod}" + f"`{m.group(1)} <{m.group(2).replace('/', '.')}>`", text)


def _include_read(app, relative_path, parent_docname, content):
    content[0] = _rewrite_source_links(content[0])


def _source_read(app, docname, content):
    content[0] = _rewrite_source_links(content[0])


def _doctest_blocks_as_pycon(app, doctree):
    for block in doctree.findall(nodes.literal_block):
        if block.get("language") in ("python", "py", None) and block.astext().lstrip().startswith(">>>"):
            block["language"] = "pycon"


def _copy_mathjax(app: Sphinx) -> None:
    if app.builder.format != "html":
        return
    entry = MATHJAX_SRC / MATHJAX_PARTS[0]
    if not entry.is_file():
        raise SphinxConfigError(
            f"MathJax is not installed at {MATHJAX_SRC}: run `npm ci --prefix docs` (docs/package.json pins it); "
            "the site serves MathJax itself so that its math renders offline")
    dest = GENERATED / "static" / "mathjax"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for part in MATHJAX_PARTS:
        src = MATHJAX_SRC / part
        if src.is_dir():
            shutil.copytree(src, dest / part)
        else:
            shutil.copy2(src, dest / part)


# --- docstring problems known and reported, not yet fixed in library code ---------------------------
class _KnownDocstringIssues:
    """A logging filter that lets through every warning except those from the docstrings listed in
    ``conf.py``'s ``peftmath_known_docstring_issues`` (``"peftmath.methods.lora": "Malformed table"``).
    Each entry names the object and the message it is known for; a new problem, anywhere, still fails the
    ``-W`` build, and the suppressed ones are listed at the end of every build."""

    def __init__(self, known: dict[str, str]):
        self.known = known
        self.seen: list[str] = []

    def filter(self, record) -> bool:
        import logging

        if record.levelno < logging.WARNING:
            return True
        location = str(getattr(record, "location", "") or "")
        message = record.getMessage()
        for obj, what in self.known.items():
            if f"docstring of {obj}:" in location and what in message:
                self.seen.append(f"{obj}: {what}")
                return False
        return True


def _install_known_issues(app: Sphinx) -> None:
    import logging

    flt = _KnownDocstringIssues(dict(app.config.peftmath_known_docstring_issues))
    app._peftmath_known_filter = flt  # noqa: SLF001 (read back at build-finished)
    for handler in logging.getLogger("sphinx").handlers:
        handler.filters.insert(0, flt)


def _report_known_issues(app: Sphinx, exc) -> None:
    flt = getattr(app, "_peftmath_known_filter", None)
    if flt is not None and flt.seen:
        from sphinx.util import logging as slog

        slog.getLogger(__name__).info(
            "known docstring issues, not counted as warnings (fix them, then remove them from "
            "peftmath_known_docstring_issues in docs/conf.py):\n  " + "\n  ".join(sorted(set(flt.seen))))


def setup(app: Sphinx):
    app.add_config_value("peftmath_known_docstring_issues", {}, "env")
    app.connect("config-inited", lambda app, config: _install_known_issues(app))
    app.connect("build-finished", _report_known_issues)
    app.add_directive("peftmath-figure", PeftmathFigure)
    app.add_directive("peftmath-cli", PeftmathCli)
    app.add_directive("peftmath-automodules", PeftmathAutomodules)
    app.connect("include-read", _include_read)
    app.connect("source-read", _source_read)
    app.connect("doctree-read", _doctest_blocks_as_pycon)
    app.connect("builder-inited", _copy_mathjax, priority=100)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
