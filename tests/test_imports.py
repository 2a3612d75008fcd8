"""The layers only point down. Every module imports alone in a fresh interpreter (no cycle hides
behind another module's import order); the import graph read from the source (module-level and
deferred imports alike; `if TYPE_CHECKING:` blocks aside) has no cycle; and the low layers import
nothing above them."""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the package's source folders (pyproject.toml's wheel.packages)
SOURCES = {"pydgemma": ROOT / "pydgemma", "pydgemma.quantize": ROOT / "quantize", "pydgemma.models": ROOT / "models"}


def source_modules() -> dict[str, Path]:
    out = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__main__":
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if not name.startswith("pydgemma.quantize") or folder.name == "quantize":
                out.setdefault(name, path)
    return out


MODULES = source_modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str) -> set[str]:
    """The pydgemma modules `name` imports at run time (resolved to modules of this package)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def resolve(target: str) -> None:
        while target and target not in MODULES:  # `from pkg import name`: name may be a module or an object
            target = target.rsplit(".", 1)[0] if "." in target else ""
        if target:
            found.add(target)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "pydgemma":
                        resolve(alias.name)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                if module.split(".")[0] == "pydgemma":
                    for alias in child.names:
                        resolve(f"{module}.{alias.name}")
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    found.discard(name)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def _import_alone(name: str) -> tuple[str, int, str]:
    r = subprocess.run([sys.executable, "-c", f"import importlib; importlib.import_module({name!r})"],
                       capture_output=True, text=True, timeout=120)
    return name, r.returncode, r.stderr.strip().splitlines()[-1] if r.returncode else ""


@pytest.mark.slow
def test_every_module_imports_alone() -> None:
    assert {"pydgemma.hub", "pydgemma.quantize.convert", "pydgemma.models.demo.sudoku", "pydgemma.server.app"} <= set(MODULES)
    with ThreadPoolExecutor(4) as pool:
        failed = {name: err for name, rc, err in pool.map(_import_alone, MODULES) if rc}
    assert failed == {}


def test_the_import_graph_has_no_cycle() -> None:
    state: dict[str, int] = {}
    path: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            # a package's own __init__ importing its submodules is the package, not a cycle
            if nxt != node and not node.startswith(nxt + "."):
                if state.get(nxt) == 1:
                    raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
                if nxt not in state:
                    walk(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            walk(name)


def test_the_low_layers_import_nothing_above_them() -> None:
    # module -> every pydgemma module it may import
    allowed = {
        "pydgemma.errors": set(),
        "pydgemma.gguf": set(),
        "pydgemma.gguf.schema": set(),
        "pydgemma.chat_format": set(),
        "pydgemma.tools": {"pydgemma.chat_format"},
        "pydgemma.progress": set(),
        "pydgemma.models.demo.sudoku": set(),
        "pydgemma.hub": {"pydgemma.errors", "pydgemma.progress"},
        "pydgemma._native": {"pydgemma.errors"},
        "pydgemma.quantization": {"pydgemma._native", "pydgemma.errors"},
    }
    for name, ok in allowed.items():
        assert GRAPH[name] - ok == set(), name
    # the conversion tools: the format facts, their own modules, and the core's public entry points
    # (pydgemma.Model to validate what they write, pydgemma.quantization), never the binding or the
    # runtime's internals; drift and imatrix are tools on top of the runtime and may use it
    public = {"pydgemma", "pydgemma.errors", "pydgemma.hub", "pydgemma.progress", "pydgemma.quantization"}
    for name, deps in GRAPH.items():
        if name.startswith("pydgemma.quantize.") and name.rsplit(".", 1)[1] in {"convert", "quantize", "checkpoint",
                                                                            "tensor_map", "policy", "vocab", "hf_config", "imatrix_file"}:
            outside = {d for d in deps if not d.startswith("pydgemma.quantize") and not d.startswith("pydgemma.gguf")}
            assert outside - public == set(), name
    # the runtime CLI reaches the demo's task without its training recipe
    assert "pydgemma.models.demo.train" not in GRAPH["pydgemma.cli"] | GRAPH["pydgemma.run_cli"]


def test_running_a_gguf_needs_no_torch_transformers_or_hub_client() -> None:
    code = ("import sys, pydgemma, pydgemma.cli, pydgemma.quantize.convert, pydgemma.quantize.quantize, "
            "pydgemma.quantize.drift, pydgemma.run_cli, pydgemma.models.demo.sudoku; "
            "print(sorted(m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
