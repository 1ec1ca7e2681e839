"""The command is argument parsing and wiring (design §2): the library code it runs lives in
peftmath/inspect.py, peftmath/extract.py, peftmath/formats/ and peftmath/_linalg.py, which never import the
command, and the names the command module exported before the split still resolve to that code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import peftmath

ROOT = Path(peftmath.__file__).parent
LIBRARY = ["demo.py", "inspect.py", "extract.py", "verify.py", "_linalg.py", *[
    str(p.relative_to(ROOT)) for p in sorted((ROOT / "formats").glob("*.py"))]]


def _imported_modules(source: str, package: str) -> set[str]:
    """Every module an ``import`` anywhere in ``source`` names (function-level imports included), relative
    imports resolved against ``package`` (``"peftmath.formats"``)."""
    pkg = package.split(".")
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


@pytest.mark.parametrize("name", LIBRARY)
def test_library_modules_do_not_import_the_command(name):
    path = ROOT / name
    mods = _imported_modules(path.read_text(encoding="utf-8"), ".".join(["peftmath", *Path(name).parent.parts]))
    assert "peftmath.cli" not in mods, f"peftmath/{name} imports peftmath.cli"


def test_the_checker_sees_a_command_import():
    """The check above can fail: relative imports of the command, inside a function, are found."""
    assert "peftmath.cli" in _imported_modules("def f():\n    from ..cli import main\n", "peftmath.formats")
    assert "peftmath.cli" in _imported_modules("def f():\n    from . import cli\n", "peftmath")
    assert "peftmath.cli" not in _imported_modules("from ..io import cli_like\n", "peftmath.formats")


def test_the_command_re_exports_its_former_library_names():
    from peftmath import cli, extract, inspect

    assert cli.inspect_adapter is inspect.inspect_adapter
    assert cli.top_singular_values is inspect.top_singular_values
    assert cli.extract_lora is extract.extract_lora
    assert cli.write_adapter is extract.write_adapter


def test_formats_keeps_its_public_names():
    from peftmath import formats

    for name in formats.__all__ + ["META_KEY", "PEFT_PREFIX", "candle_prefix_for", "LOHA_KEYS", "LOKR_KEYS",
                                   "KOHYA_LORA_KEYS", "KOHYA_UNSUPPORTED", "CANDLE_DEFAULT_PREFIX",
                                   "CANDLE_TYPED_PREFIXES", "CANDLE_DUMMY_EMBEDDING"]:
        assert hasattr(formats, name), name
    assert peftmath.convert is formats.convert
    assert issubclass(formats.ConversionWarning, peftmath.errors.PeftMathWarning)
