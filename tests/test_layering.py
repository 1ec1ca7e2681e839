"""The layering of peftmath (design §2, "Who may use whom"), checked on the source with ``ast``.

The rule counts *module-level* imports only: an ``import`` at the top level of a module (including
inside a top-level ``if``/``try``) runs when the module is imported and so defines the import graph;
the body of ``if TYPE_CHECKING:`` never runs (imports for annotations only) and is not counted.
An import inside a function or method body runs only when it is called; it is the sanctioned way to
reach upward lazily (``LoraModule(...)`` building a ``DoraModule``, the registry importing a method
on first use) and is ignored here.

Checked:

* ``peftmath/methods/*`` imports no ``peftmath.io``, ``adapter``, ``cli``, ``demo``, ``formats``
  (methods are pure array math);
* the core (``_array``, ``backends``, ``layers``, ``config``, ``errors``) imports no method and no
  plugin (``peftmath_cupy``);
* the module-level import graph of ``peftmath`` has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "peftmath"

#: cycles still present on purpose, each with the reason; empty means none is tolerated
KNOWN_CYCLES: list[frozenset[str]] = []


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _top_level_imports(node: ast.AST):
    """Import nodes executed at import time: the module body and the bodies of top-level if/try/with."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            yield from _top_level_imports(ast.Module(body=child.orelse, type_ignores=[]))  # the if-body never runs
        elif isinstance(child, (ast.If, ast.Try, ast.With)):
            yield from _top_level_imports(child)
        elif isinstance(child, ast.ExceptHandler):
            yield from _top_level_imports(child)


def _is_type_checking(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` / ``if typing.TYPE_CHECKING:``: imports only for annotations, never executed."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of peftmath (or plugins) it imports at module level}``."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()
        for node in _top_level_imports(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                    continue
                base = _resolve(name, is_pkg, node)
                # "from . import x" / "from .pkg import mod": the names may be submodules
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                if t.startswith("peftmath_cupy"):
                    deps.add("peftmath_cupy")
                    continue
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t.startswith("peftmath") and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[frozenset[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _is_under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_graph_sees_known_edges():
    """The parser finds edges that are certainly there (so the checks below cannot pass vacuously)."""
    g = import_graph()
    assert "peftmath.methods.lora" in g["peftmath.methods.dora"]
    assert "peftmath.methods._base" in g["peftmath.methods.lora"]
    assert "peftmath.methods" in g["peftmath.adapter"]
    assert "peftmath.methods.dora" not in g["peftmath.methods.lora"]  # only inside functions
    assert "peftmath.methods.adalora_allocator" in g["peftmath.methods.adalora"]
    assert "peftmath.methods.adalora" not in g["peftmath.methods.adalora_allocator"]  # only under TYPE_CHECKING


def test_methods_import_no_io_adapter_cli():
    forbidden = ("peftmath.io", "peftmath.adapter", "peftmath.cli", "peftmath.demo", "peftmath.formats",
                 "peftmath.inspect", "peftmath.extract", "peftmath.combine", "peftmath.multi", "peftmath.create")
    bad = {m: sorted(d for d in deps if _is_under(d, forbidden))
           for m, deps in import_graph().items() if _is_under(m, ("peftmath.methods",))}
    assert {m: d for m, d in bad.items() if d} == {}


def test_core_imports_no_method_and_no_plugin():
    core = ("peftmath._array", "peftmath.backends", "peftmath.layers", "peftmath.config", "peftmath.errors")
    bad = {m: sorted(d for d in deps if _is_under(d, ("peftmath.methods", "peftmath_cupy")))
           for m, deps in import_graph().items() if m in core}
    assert {m: d for m, d in bad.items() if d} == {}


def test_no_import_cycle():
    found = [c for c in _cycles(import_graph()) if c not in KNOWN_CYCLES]
    assert found == [], f"module-level import cycles: {[sorted(c) for c in found]}"


def test_cycle_finder_finds_a_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(g) == [frozenset({"a", "b", "c"})]


#: method module -> other method modules it may import at module level, each with the reason. Shared code
#: lives in a private module (``_base``, ``_contract``, ``_lycoris``, ``_prompt``), not in a sibling method.
ALLOWED_METHOD_EDGES: dict[str, set[str]] = {
    "peftmath.methods.dora": {"peftmath.methods.lora"},     # DoRA is LoRA plus a magnitude (DoraModule(LoraModule))
    "peftmath.methods.adalora": {"peftmath.methods.lora"},  # AdaLoraConfig/Module extend LoRA's (PEFT's classes do)
    "peftmath.methods.boft": {"peftmath.methods.oft"},      # BOFT's butterfly factors reuse OFT's block product
    "peftmath.methods.p_tuning": {"peftmath.methods.prompt_tuning"},  # its prompts are prepended as prompt tuning's
    "peftmath.methods.pvera": {"peftmath.methods.vera"},    # PVeRA's mean layer is VeRA's on the mean halves
    # multitask prompt tuning's config extends prompt tuning's (PEFT's class does); its P starts as prompt tuning's
    "peftmath.methods.multitask_prompt_tuning": {"peftmath.methods.prompt_tuning"},
}


def test_methods_share_code_through_private_modules():
    """A method module imports another method module only where it extends that method (LoHa and LoKr
    share LyCORIS plumbing through ``methods._lycoris``, never each other)."""
    g = import_graph()
    from peftmath.methods import METHOD_MODULES

    methods = set(METHOD_MODULES.values())
    assert {"peftmath.methods.loha", "peftmath.methods.lokr", "peftmath.methods.lora"} <= methods
    assert "peftmath.methods._lycoris" in g["peftmath.methods.lokr"]
    extra = {m: sorted((g[m] & methods) - ALLOWED_METHOD_EDGES.get(m, set())) for m in methods}
    assert {m: d for m, d in extra.items() if d} == {}


def test_engines_sit_on_io_methods_and_adapter():
    """``peftmath.engines`` (optional: dask.distributed) uses the streamed plan and tasks (``io``), the methods
    and the adapter (and the core below them); nothing in peftmath imports it at module level, so
    ``import peftmath`` and the command never load it unless ``--workers`` / ``--scheduler`` is given."""
    g = import_graph()
    engines = {m for m in g if _is_under(m, ("peftmath.engines",))}
    assert {"peftmath.engines.dask", "peftmath.engines.rows"} <= engines
    allowed = ("peftmath.engines", "peftmath.io", "peftmath.methods", "peftmath.adapter", "peftmath.layers",
               "peftmath.errors", "peftmath._array", "peftmath.backends")
    bad = {m: sorted(d for d in g[m] if not _is_under(d, allowed)) for m in engines}
    assert {m: d for m, d in bad.items() if d} == {}
    users = sorted(m for m, deps in g.items() if m not in engines and any(_is_under(d, ("peftmath.engines",)) for d in deps))
    assert users == []
