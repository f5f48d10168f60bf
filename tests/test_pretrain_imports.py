"""The layering of pretrain/: no import circle among its modules (imports inside functions count too),
and the config schema imports nothing of the project above kumihimo.core."""

from __future__ import annotations

import ast
from pathlib import Path

PRETRAIN = Path(__file__).resolve().parent.parent / "pretrain"
PACKAGE = "kumihimo.pretrain"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PRETRAIN.rglob("*.py"):
        parts = list(path.relative_to(PRETRAIN).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join([PACKAGE, *parts])] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `name` imports anywhere in its file (a package's submodule counts as itself)."""

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            targets = [f"{base}.{alias.name}" for alias in node.names] or [base]
        for target in targets:
            if target.startswith(PACKAGE):
                module = resolve(target)
                if module and module != name and not name.startswith(module + "."):
                    found.add(module)
    return found


def test_no_import_circle_in_pretrain():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import circle: " + " -> ".join([*path[path.index(name) :], name]))
        if name in done:
            return
        for dependency in sorted(graph[name]):
            visit(dependency, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_config_schema_imports_only_stdlib_yaml_and_core():
    tree = ast.parse((PRETRAIN / "config.py").read_text())
    project = [
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kumihimo")
    ]
    project += [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
        if alias.name.startswith("kumihimo")
    ]
    assert all(name.startswith("kumihimo.core") for name in project), project
