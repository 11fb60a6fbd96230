"""The import graph of the package: the pipeline's layers, no cycle, no private cross-module import.

Every import counts, also those inside functions (the lazy torch-side ones). A layer may
import only the layers listed for it in LAYERS; the table is the one in docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[2] / "karmixlang"

# module prefix -> layer, the longest prefix wins
LAYER_OF = {
    "karmixlang": "base",  # __init__: the version only
    "karmixlang.diagnostics": "base",
    "karmixlang.resources": "base",
    "karmixlang.machine": "base",
    "karmixlang.units": "base",
    "karmixlang.limits": "base",
    "karmixlang.builtins": "base",
    "karmixlang.ops": "base",
    "karmixlang.blocks": "base",
    "karmixlang.io": "io",
    "karmixlang.io.layouts": "io",  # naming detection and name tables: names and shapes only
    "karmixlang.syntax": "syntax",
    "karmixlang.check": "check",
    "karmixlang.ir": "ir",
    "karmixlang.plan": "plan",
    "karmixlang.runtime": "runtime",
    "karmixlang.api": "api",
    "karmixlang.console": "console",
    "karmixlang.demo.synth": "io",  # synthetic checkpoints: numpy and safetensors only
    "karmixlang.demo": "app",
    "karmixlang.cli": "app",
    "karmixlang.__main__": "app",
}

# layer -> the layers it may import (besides itself), in pipeline order
LAYERS = {
    "base": set(),
    "io": {"base"},
    "syntax": {"base"},
    "check": {"base", "io", "syntax"},
    "ir": {"base", "io", "syntax", "check"},
    "plan": {"base", "io", "check", "ir"},
    "runtime": {"base", "io", "ir", "plan"},
    "api": {"base", "io", "syntax", "check", "ir", "plan", "runtime"},
    "console": {"base", "plan"},
    "app": {"base", "io", "syntax", "check", "ir", "plan", "runtime", "api", "console"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    best = max((p for p in LAYER_OF if module == p or module.startswith(p + ".")), key=len)
    return LAYER_OF[best]


def imports(path: Path):
    """(imported module, imported names, line) for every import of the package's modules."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "karmixlang":
            yield node.module, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level:
            yield None, [], node.lineno  # relative imports are not used in the package
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "karmixlang":
                    yield a.name, [], node.lineno


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(module: str, names: list[str]) -> list[str]:
    """`from karmixlang.x import y`: y is a module when karmixlang.x.y is one."""
    subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
    return subs or [module]


def edges():
    for mod, path in MODULES.items():
        for target, names, line in imports(path):
            assert target is not None, f"{path}:{line}: relative import"
            for t in resolve(target, names):
                yield mod, t, names, f"{path.relative_to(PACKAGE.parent)}:{line}"


def test_every_module_has_a_layer():
    assert {m for m in MODULES if layer(m) not in LAYERS} == set()


def test_only_allowed_layer_edges():
    bad = [f"{where}: {a} ({layer(a)}) imports {b} ({layer(b)})"
           for a, b, _, where in edges()
           if layer(a) != layer(b) and layer(b) not in LAYERS[layer(a)]]
    assert bad == [], "\n".join(bad)


def test_no_private_name_crosses_a_module():
    bad = [f"{where}: {a} imports {n} from {b}" for a, b, names, where in edges()
           for n in names if n.startswith("_") and not n.startswith("__") and a != b]
    assert bad == [], "\n".join(bad)


def test_no_import_cycle():
    graph = nx.DiGraph((a, b) for a, b, _, _ in edges() if a != b)
    # a package's __init__ importing its own submodules is not a cycle of the pipeline
    graph.remove_edges_from([(a, b) for a, b in list(graph.edges) if b.startswith(a + ".")])
    cycles = list(nx.simple_cycles(graph))
    assert cycles == [], cycles


def test_runtime_never_imports_api_or_the_front_end():
    bad = [f"{where}: {b}" for a, b, _, where in edges() if layer(a) == "runtime"
           and layer(b) in ("api", "syntax", "check", "app", "console")]
    assert bad == [], "\n".join(bad)
