"""The repository's layout shows its architecture: results/ holds only published models, every relative link in
the docs resolves, and the package's imports form no cycle."""

import ast
import re
from pathlib import Path

from conftest import REPO

PUBLISHED_FILES = {"checkpoint.pt", "meta.json", "results.json", "curves.png", "eval.json", "eval_confusion.png"}


def test_results_holds_only_published_models():
    for entry in (REPO / "results").iterdir():
        assert entry.is_dir(), f"results/ should hold one folder per published model, not {entry.name}"
        files = {p.name for p in entry.iterdir()}
        assert "checkpoint.pt" in files and files <= PUBLISHED_FILES, f"results/{entry.name}: {files - PUBLISHED_FILES}"


def test_every_relative_link_in_the_docs_resolves():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "experiments").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://", "mailto:")) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken


def package_imports() -> dict[str, set[str]]:
    """module -> the package's modules it imports at module level or inside functions (relative imports)."""
    root = REPO / "distributed_resnet"
    graph = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        module = ".".join(p for p in parts if p != "__init__") or "distributed_resnet"
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = list(package[:len(package) - (node.level - 1)] if node.level > 1 else package)
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                for alias in node.names:  # `from . import checkpoint` names a module
                    full = f"{target}.{alias.name}" if target else alias.name
                    deps.add(full if (root / Path(*full.split("."))).with_suffix(".py").exists() else target)
        graph[module] = {d for d in deps if d != module}
    return graph


def test_the_package_imports_form_no_cycle():
    graph = package_imports()
    state = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import cycle: {' -> '.join(trail + [node])}"
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            visit(dep, trail + [node])
        state[node] = "done"

    for module in sorted(graph):
        visit(module, [])
